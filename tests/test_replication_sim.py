"""The replica's replication rules (immucore/replication/machine.py), one test per rule, then the
seeded simulation of tests/sim.py (docs/reliability.md R13) and a hypothesis state machine over it.

Seeds: ``IMMUCORE_SIM_SEEDS=5000`` runs more of them; ``IMMUCORE_SIM_SEED=1234`` replays one (a
failing seed's message shows its last steps); ``IMMUCORE_SIM_HYPOTHESIS_EXAMPLES`` sets how many
runs hypothesis tries.
"""
from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from immucore.replication import machine as m
from .sim import (ZERO_ALH, Config, Faults, Sim, SimFailure, blob_tx_id, make_blob,
                  run_seed)

BACKOFF_SECONDS_MIN, BACKOFF_SECONDS_MAX = 0.5, 30.0
SIM_SEEDS_DEFAULT = 500


# --- helpers: a machine and the answers a driver would feed it -----------------------------

def alh(tx_id: int, history: str = "a") -> bytes:
    return f"{history}{tx_id}".encode().ljust(32, b".")


def new_machine(local_tx_id=0, floor_tx_id=0, *, batch_txs=2, queue_batches=2,
                queue_bytes=1 << 20, allow_discarding=False) -> m.ReplicaMachine:
    return m.ReplicaMachine(local_tx_id, alh(local_tx_id), floor_tx_id, batch_txs=batch_txs,
                            queue_batches=queue_batches, queue_bytes=queue_bytes,
                            backoff_seconds_min=BACKOFF_SECONDS_MIN,
                            backoff_seconds_max=BACKOFF_SECONDS_MAX,
                            allow_discarding=allow_discarding, rng=random.Random(7))


def blobs(first_tx_id: int, last_tx_id: int, size_bytes: int = 20) -> list:
    return [make_blob(t, ZERO_ALH, b"x" * size_bytes) for t in range(first_tx_id, last_tx_id + 1)]


def connect_and_follow(machine: m.ReplicaMachine) -> m.Fetch:
    """Connect; if asked, the primary holds our tip (and floor) with our Alhs."""
    commands = machine.connected()
    if commands and isinstance(commands[0], m.CheckPrimary):
        same = {t: alh(t) for t in commands[0].tx_ids}
        commands = machine.primary_checked(machine.epoch, 100, same, same)
        if machine.local_tx_id:         # a reconnect first tells the primary what we hold
            ack, *commands = commands
            assert ack == m.Ack(machine.epoch, machine.local_tx_id, machine.local_alh)
    (fetch,) = commands
    assert isinstance(fetch, m.Fetch)
    return fetch


def answer(machine, fetch: m.Fetch, last_tx_id: int, *, acked_tx_id=0, size_bytes=20) -> list:
    """The primary's answer to ``fetch``: txs ``fetch.first_tx_id..last_tx_id``."""
    return machine.received(fetch.epoch, fetch.first_tx_id,
                            blobs(fetch.first_tx_id, last_tx_id, size_bytes), last_tx_id,
                            100, acked_tx_id)


def of_type(commands: list, kind) -> list:
    return [c for c in commands if isinstance(c, kind)]


# --- ordering: only the next txs are ever applied --------------------------------------------

def test_answer_for_another_position_is_ignored():
    machine = new_machine()
    fetch = connect_and_follow(machine)
    assert machine.received(fetch.epoch, 3, blobs(3, 4), 4, 100, 0) == []
    commands = answer(machine, fetch, 2)
    assert of_type(commands, m.Apply)[0].first_tx_id == 1
    # the same answer again (a duplicate) is for position 1, now behind us
    assert answer(machine, fetch, 2) == []


def test_stale_answer_from_previous_connection_is_ignored():
    machine = new_machine()
    old = connect_and_follow(machine)
    machine.failed("ConnectionResetError")
    new = connect_and_follow(machine)
    assert new.epoch != old.epoch and new.first_tx_id == old.first_tx_id
    assert answer(machine, old, 2) == []            # same position, earlier connection
    assert of_type(answer(machine, new, 2), m.Apply)


def test_at_most_one_fetch_in_flight():
    machine = new_machine(queue_batches=3)
    fetch = connect_and_follow(machine)
    # nothing but the fetch's own answer lets another fetch out
    assert machine.applied(0, alh(0)) == []
    assert machine.primary_checked(machine.epoch, 100, {}, {}) == []
    commands = answer(machine, fetch, 2)
    assert len(of_type(commands, m.Fetch)) == 1
    assert answer(machine, fetch, 2) == []          # a duplicate opens no second one


def test_received_batches_bounded_by_count_and_bytes():
    machine = new_machine(queue_batches=2)
    fetch = connect_and_follow(machine)
    commands = answer(machine, fetch, 2)            # 1..2 goes to the apply, not the queue
    for last in (4, 6):
        (fetch,) = of_type(commands, m.Fetch)
        commands = answer(machine, fetch, last)
    assert len(machine._queue) == 2 and commands == []  # full: no fetch until an apply ends
    commands = machine.applied(2, alh(2))
    assert of_type(commands, m.Apply)[0].first_tx_id == 3 and of_type(commands, m.Fetch)

    machine = new_machine(queue_batches=5, queue_bytes=100)
    fetch = connect_and_follow(machine)
    (fetch,) = of_type(answer(machine, fetch, 2), m.Fetch)
    assert answer(machine, fetch, 4, size_bytes=60) == []   # 2 blobs > 100 bytes queued
    assert machine.queued_bytes >= 100


# --- failures: resume where the durable log ends, after a capped backoff ----------------------

def test_resume_after_failure_starts_after_the_batch_being_applied():
    machine = new_machine()
    fetch = connect_and_follow(machine)
    commands = answer(machine, fetch, 2)            # applying 1..2
    answer(machine, of_type(commands, m.Fetch)[0], 4)   # 3..4 queued
    machine.failed("ConnectionResetError")
    # the driver's order: the apply ends, then the reconnect
    assert machine.applied(2, alh(2)) == []         # no ack, no fetch while retrying
    assert connect_and_follow(machine).first_tx_id == 3

    machine = new_machine()                         # a reconnect while the apply still runs
    commands = answer(machine, connect_and_follow(machine), 2)
    machine.failed("ConnectionResetError")
    assert connect_and_follow(machine).first_tx_id == 3


def test_backoff_is_capped_exponential_with_jitter():
    machine = new_machine()
    connect_and_follow(machine)
    for failures in range(1, 12):
        (backoff,) = machine.failed("ConnectionRefusedError")
        delay = min(BACKOFF_SECONDS_MIN * 2 ** (failures - 1), BACKOFF_SECONDS_MAX)
        assert 0.9 * delay <= backoff.seconds <= delay


def test_durable_progress_resets_backoff():
    machine = new_machine()
    for _ in range(6):
        machine.failed("ConnectionRefusedError")
    answer(machine, connect_and_follow(machine), 2)
    machine.applied(2, alh(2))
    (backoff,) = machine.failed("ConnectionResetError")
    assert backoff.seconds <= BACKOFF_SECONDS_MIN


def test_apply_failure_reconnects_and_refetches():
    machine = new_machine(local_tx_id=4)
    fetch = connect_and_follow(machine)
    answer(machine, fetch, 6)
    (backoff,) = machine.apply_failed("OSError: No space left on device")
    assert isinstance(backoff, m.Backoff) and machine.state == "retrying"
    assert connect_and_follow(machine).first_tx_id == 5


def test_a_reconnect_acknowledges_what_the_replica_already_holds():
    """An ack lost with the last connection (or a primary restarted since) must not leave a sync
    write waiting for a tx the replica holds."""
    machine = new_machine(local_tx_id=7)
    (check,) = machine.connected()
    same = {t: alh(t) for t in check.tx_ids}
    commands = machine.primary_checked(check.epoch, 9, same, same)
    assert commands[0] == m.Ack(machine.epoch, 7, alh(7))
    assert isinstance(commands[1], m.Fetch)


def test_ack_after_each_apply():
    machine = new_machine()
    fetch = connect_and_follow(machine)
    commands = answer(machine, fetch, 2)
    answer(machine, of_type(commands, m.Fetch)[0], 4)
    assert of_type(machine.applied(2, alh(2)), m.Ack) == [m.Ack(fetch.epoch, 2, alh(2))]
    assert of_type(machine.applied(4, alh(4)), m.Ack) == [m.Ack(fetch.epoch, 4, alh(4))]
    assert machine.applied(4, alh(4)) == []         # no second ack for the same apply


# --- divergence: stop for good, or discard only what the primary never acknowledged -----------

def diverge(machine, floor_alh_on_primary=None) -> list:
    """Reconnect to a primary whose Alh at our tip differs."""
    (check,) = machine.connected()
    primary = {t: alh(t, "b") for t in check.tx_ids}
    if floor_alh_on_primary is not None:
        primary[machine.floor_tx_id] = floor_alh_on_primary
    return machine.primary_checked(check.epoch, 100, primary, {t: alh(t) for t in check.tx_ids})


def test_divergence_stops_for_good():
    machine = new_machine(local_tx_id=10)
    (stop,) = diverge(machine)
    assert isinstance(stop, m.Stop) and machine.state == "diverged"
    assert machine.connected() == [] and machine.failed("x") == []
    assert machine.received(machine.epoch, 11, blobs(11, 12), 12, 100, 0) == []
    machine.stopped()
    assert machine.state == "diverged"


def test_diverged_apply_failure_is_terminal():
    machine = new_machine(allow_discarding=True)
    answer(machine, connect_and_follow(machine), 2)
    (stop,) = machine.apply_failed("ReplicaDivergedError: tx 1 differs", diverged=True)
    assert isinstance(stop, m.Stop) and machine.state == "diverged"
    assert machine.connected() == []


def test_discarding_only_above_floor():
    machine = new_machine(local_tx_id=10, floor_tx_id=6, allow_discarding=True)
    assert diverge(machine, floor_alh_on_primary=alh(6)) == [m.Discard(6)]
    ack, fetch = machine.discarded(6, alh(6))
    assert ack == m.Ack(machine.epoch, 6, alh(6))
    assert fetch.first_tx_id == 7 and machine.state == "following"


def test_discarding_refused_when_floor_differs():
    machine = new_machine(local_tx_id=10, floor_tx_id=6, allow_discarding=True)
    assert isinstance(diverge(machine, floor_alh_on_primary=alh(6, "b"))[0], m.Stop)
    machine = new_machine(local_tx_id=10, floor_tx_id=10, allow_discarding=True)
    assert isinstance(diverge(machine)[0], m.Stop)    # everything we hold was acknowledged
    machine = new_machine(local_tx_id=10, floor_tx_id=6)
    assert isinstance(diverge(machine, floor_alh_on_primary=alh(6))[0], m.Stop)   # not allowed


def test_floor_never_decreases():
    assert new_machine(local_tx_id=4, floor_tx_id=9).floor_tx_id == 4   # never above the tip
    machine = new_machine()
    fetch = connect_and_follow(machine)
    commands = answer(machine, fetch, 2, acked_tx_id=8)
    assert of_type(commands, m.Apply)[0].floor_tx_id == 2               # not above the batch
    commands = answer(machine, of_type(commands, m.Fetch)[0], 4, acked_tx_id=1)  # new primary
    machine.applied(2, alh(2))
    machine.applied(4, alh(4))
    assert machine.floor_tx_id == 2


# --- defects the simulation found, fixed in machine.py --------------------------------------

def test_backoff_survives_a_long_outage():
    machine = new_machine()
    for _ in range(1100):
        (backoff,) = machine.failed("ConnectionRefusedError")
        assert backoff.seconds <= BACKOFF_SECONDS_MAX


def test_failing_apply_backs_off_exponentially():
    machine = new_machine(local_tx_id=4)
    delays = []
    for _ in range(5):
        answer(machine, connect_and_follow(machine), 6)
        (backoff,) = machine.apply_failed("OSError: No space left on device")
        delays.append(backoff.seconds)
    assert delays[-1] > 4 * BACKOFF_SECONDS_MIN


def test_discard_outlives_a_connection_failure():
    machine = new_machine(local_tx_id=10, floor_tx_id=6, allow_discarding=True)
    assert diverge(machine, floor_alh_on_primary=alh(6)) == [m.Discard(6)]
    machine.failed("ConnectionResetError")
    machine.discarded(6, alh(6))                    # the store did drop txs 7..10
    assert machine.local_tx_id == 6


# --- the simulation -------------------------------------------------------------------------

def test_fake_blobs_carry_the_tx_id_where_real_export_blobs_do(tmp_path):
    """The driver reads a blob's tx id at bytes 4..12; the fake blobs keep it there."""
    from immucore.database import open_database
    database = open_database(str(tmp_path / "db"), durable=False)
    try:
        for i in range(3):
            database.set({b"k%d" % i: b"v"})
        assert [blob_tx_id(b) for b in database.export_txs(1, 3)] == [1, 2, 3]
    finally:
        database.close()
    assert blob_tx_id(make_blob(7, ZERO_ALH, b"")) == 7


def sim_seeds() -> list:
    if os.environ.get("IMMUCORE_SIM_SEED"):
        return [int(os.environ["IMMUCORE_SIM_SEED"])]
    return list(range(int(os.environ.get("IMMUCORE_SIM_SEEDS", SIM_SEEDS_DEFAULT))))


def run_seeds(divergence: bool, test_name: str):
    failures = []
    for seed in sim_seeds():
        try:
            run_seed(seed, divergence=divergence)
        except SimFailure as exc:
            failures.append(exc)
    if failures:
        pytest.fail(f"{len(failures)} seed(s) failed; replay one with IMMUCORE_SIM_SEED=<seed> "
                    f"pytest tests/test_replication_sim.py -k {test_name}\n{failures[0]}",
                    pytrace=False)


def test_simulation_keeps_invariants_and_converges():
    """Drops, duplicates, reordering, stale answers, partitions, login and disk failures,
    crashes, a primary that keeps committing: the store stays a prefix of the primary's log,
    memory stays bounded, and once the faults heal the replica reaches the primary's tip."""
    run_seeds(False, "test_simulation_keeps_invariants_and_converges")


def test_simulation_with_failovers_never_mixes_histories():
    """As above, and the primary fails over to a log that differs from some tx on: the replica
    never applies a tx of the new history on top of its old one — it stops as diverged, or
    (allowed to discard, floor below the fork) discards down to its floor and converges."""
    run_seeds(True, "test_simulation_with_failovers_never_mixes_histories")


# --- hypothesis chooses the steps (and shrinks a failing run to few of them) ------------------

class ReplicationSteps(RuleBasedStateMachine):
    sim = None

    @initialize(seed=st.integers(0, 2 ** 32 - 1), divergence=st.booleans())
    def start(self, seed, divergence):
        rng = random.Random(seed)
        config = Config.draw(rng, allow_discarding=divergence and rng.random() < 0.6)
        self.sim = Sim(seed, config, Faults(rewrite=0.01 if divergence else 0.0))

    @rule(choice=st.integers(0, 63))
    def step(self, choice):
        actions = self.sim.actions()
        if actions:
            self.sim.do(actions[choice % len(actions)])

    @invariant()
    def invariants_hold(self):
        if self.sim is not None:
            self.sim.check()

    def teardown(self):
        if self.sim is not None:
            self.sim.heal()
            self.sim.run_until_quiet(steps_max=2000)
            self.sim.check_converged()


TestReplicationSteps = ReplicationSteps.TestCase
TestReplicationSteps.settings = settings(
    max_examples=int(os.environ.get("IMMUCORE_SIM_HYPOTHESIS_EXAMPLES", 60)),
    stateful_step_count=80, deadline=None, suppress_health_check=list(HealthCheck))


def test_apply_durations_are_a_cumulative_histogram():
    from immucore.replication.replicator import Durations
    durations = Durations()
    for seconds in (0.0005, 0.001, 0.003, 0.2, 20.0):
        durations.observe(seconds)
    buckets = dict(durations.buckets())
    assert buckets["0.001"] == 2 and buckets["0.005"] == 3 and buckets["0.5"] == 4
    assert buckets["10.0"] == 4 and buckets["+Inf"] == 5
    assert abs(durations.total_seconds - 20.2045) < 1e-9
