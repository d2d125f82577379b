"""Network faults between a primary and its replica (docs/reliability.md R4, R6,
R7): real nodes, the replica database following the primary through a FaultProxy.

What every test checks, whatever the fault: the replica's log stays a prefix of the primary's
(same Alh at its last tx) while the fault lasts, and once it is healed the replica converges (same
state, same Alh at a seeded sample of tx ids) and its whole log audits clean (contiguous ids, every
Alh re-verified). Each test also asserts from the proxy's counters that its fault really fired.

Seeds: ``IMMUCORE_FAULT_SEED`` (printed by each proxy); the slow variants run more seeds, longer.
"""
import contextlib
import dataclasses
import os
import random
import signal
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import List

import msgpack
import pytest

from immucore.client import Client
from immucore.constants import REPLICATION_WAIT_MS
from immucore.database import open_database
from immucore.protocol.messages import Msg

from .faults.proxy import TO_CLIENT, TO_SERVER, FaultProxy, FrameFault
from .nodes import running_node

SEED = int(os.environ.get("IMMUCORE_FAULT_SEED", "5"))
WAIT_SECONDS = 30
# The replicator's request timeout (replicator.py): a fault that loses an answer silently is
# noticed only after it, then the backoff; one more timeout if the retry is lost too.
REQUEST_TIMEOUT_SECONDS = REPLICATION_WAIT_MS / 1000 + 30
SILENT_FAULT_SECONDS_MAX = REQUEST_TIMEOUT_SECONDS + 20
CONVERGE_SECONDS = 2 * REQUEST_TIMEOUT_SECONDS + 10
RSS_GROWTH_BYTES_MAX = 150 << 20
SAMPLED_TX_IDS = 20
BANDWIDTH_CAP_BPS = 20 << 10      # below what one writer's txs need (docs/reliability.md R7)
KEY_PREFIX = b"w-"


# --- setup ----------------------------------------------------------------------------------------

@dataclass
class Pair:
    """A primary node and a replica node whose replica databases follow it through proxies."""
    primary: object
    replica: object
    p: Client                                   # sysadmin on the primary's defaultdb
    proxies: List[FaultProxy]
    names: List[str]
    clients: List[Client] = field(default_factory=list)   # one per replica database

    @property
    def proxy(self) -> FaultProxy:
        return self.proxies[0]

    @property
    def r(self) -> Client:
        return self.clients[0]


def _login(node, database="defaultdb") -> Client:
    client = Client(node.host, node.port)
    client.login("immudb", "immudb", database)
    return client


def _follow_settings(proxy: FaultProxy) -> dict:
    return {"replica": True, "primary_database": "defaultdb", "primary_host": "127.0.0.1",
            "primary_port": proxy.port, "primary_username": "immudb",
            "primary_password": "immudb"}


@contextlib.contextmanager
def replication_through_proxies(tmp_path, count: int = 1, seed: int = SEED, prefill: int = 20):
    """``count`` replica databases, each following the primary's defaultdb through its own proxy;
    ``prefill`` txs replicated before the test starts. At the end (when the test passed) the
    replica node is stopped and every replica database's log is audited."""
    with running_node(tmp_path / "p") as primary, running_node(tmp_path / "r") as replica, \
            contextlib.ExitStack() as stack:
        proxies = [stack.enter_context(FaultProxy(primary.host, primary.port, seed=seed + n,
                                                  name=f"replica{n}")) for n in range(count)]
        p = stack.enter_context(_login(primary))
        _write(p, prefill)
        names = [f"replica{n}" for n in range(count)]
        pair = Pair(primary, replica, p, proxies, names)
        with _login(replica) as admin:
            for name, proxy in zip(names, proxies):
                admin.create_database(name, _follow_settings(proxy))
        for name in names:
            pair.clients.append(stack.enter_context(_login(replica, name)))
        for client in pair.clients:
            _wait_for(lambda c=client: c.current_state().tx_id == prefill, "the prefill")
        yield pair
        for client in pair.clients:
            client.close()
        tx_count = p.current_state().tx_id
        assert replica.stop() == 0
        for name in names:
            with open_database(os.path.join(replica.dir, name), replica=True) as db:
                assert db.audit() == tx_count, name       # contiguous, every Alh re-verified


def _write(p: Client, count: int):
    for _ in range(count):
        p.set({KEY_PREFIX + os.urandom(4).hex().encode(): b"value-" + os.urandom(8).hex().encode()})


class Writer:
    """Writes single-entry txs to the primary from a thread, as fast as it can or ``pause``
    seconds apart, and keeps each write's latency."""

    def __init__(self, node, pause: float = 0.005):
        self.node, self.pause = node, pause
        self.latencies: List[float] = []
        self.error = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(WAIT_SECONDS)
        assert not self._thread.is_alive(), "the writer did not stop"
        if self.error is not None and exc[0] is None:
            raise self.error

    def _run(self):
        try:
            with _login(self.node) as client:
                while not self._stop.is_set():
                    start = time.monotonic()
                    _write(client, 1)
                    self.latencies.append(time.monotonic() - start)
                    if self.pause:
                        time.sleep(self.pause)
        except Exception as exc:  # noqa: BLE001 - re-raised in the test thread
            self.error = exc


# --- checks ---------------------------------------------------------------------------------------

def _wait_for(predicate, what: str, seconds: float = WAIT_SECONDS, poll: float = 0.05):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {seconds}s waiting for {what}")


def _status(pair: Pair, index: int = 0) -> dict:
    name = pair.names[index]
    return next(d for d in pair.r.list_databases() if d["name"] == name)["replication"]


def _assert_prefix(p: Client, r: Client):
    """The replica holds nothing the primary does not: same Alh at the replica's last tx."""
    local = r.current_state()
    if local.tx_id:
        assert p.tx_by_id(local.tx_id).header.alh() == local.tx_hash, \
            f"replica's tx {local.tx_id} is not the primary's"


def _watch_prefix(p: Client, r: Client, seconds: float):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        _assert_prefix(p, r)
        time.sleep(0.1)


def _assert_converges(p: Client, r: Client, seconds: float = CONVERGE_SECONDS):
    """Writes have stopped: the replica reaches the primary's state, and a seeded sample of tx
    ids has the same header (hence the same Alh) on both."""
    primary_state = p.current_state()
    _wait_for(lambda: r.current_state().tx_id >= primary_state.tx_id,
              f"the replica to reach tx {primary_state.tx_id}", seconds)
    replica_state = r.current_state()
    assert (replica_state.tx_id, replica_state.tx_hash) == (primary_state.tx_id,
                                                            primary_state.tx_hash)
    rng = random.Random(SEED)
    last = primary_state.tx_id
    for tx_id in {1, last, *(rng.randint(1, last) for _ in range(SAMPLED_TX_IDS))}:
        replica_header = r.tx_by_id(tx_id).header
        assert replica_header.id == tx_id
        assert replica_header.alh() == p.tx_by_id(tx_id).header.alh(), f"tx {tx_id}"


def _assert_serves_reads(r: Client):
    """A replica cut off from its primary still answers reads of what it holds."""
    state = r.current_state()
    assert r.tx_by_id(state.tx_id).header.alh() == state.tx_hash
    assert r.scan(prefix=KEY_PREFIX, limit=1)


def _rss_bytes(node) -> int:
    with open(f"/proc/{node.process.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line")


def _mutated(proxy: FaultProxy, kind: str) -> int:
    return proxy.stats()["frames_mutated"].get(kind, 0)


# --- R4: partitions -------------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_reset_partition_replica_keeps_serving_reads_retries_then_converges(tmp_path):
    with replication_through_proxies(tmp_path) as pair:
        with Writer(pair.primary):
            _wait_for(lambda: pair.r.current_state().tx_id > 40, "live replication")
            pair.proxy.reset()                           # RST now and on every reconnect
            status = _wait_for(lambda: _status(pair)["state"] == "retrying" and _status(pair),
                               "the replicator to report the partition")
            assert status["last_error"]
            _assert_serves_reads(pair.r)
            _watch_prefix(pair.p, pair.r, 1.5)
            stats = pair.proxy.stats()
            assert stats["connections_reset"] >= 1 and stats["connections_refused"] >= 1
            pair.proxy.heal()
        _assert_converges(pair.p, pair.r)
        assert _status(pair)["state"] == "following" and _status(pair)["lag_txs"] == 0


def _flapping_converges(tmp_path, seed: int, flap_seconds: float, mode: str):
    with replication_through_proxies(tmp_path, seed=seed) as pair:
        with Writer(pair.primary, pause=0.01):
            pair.proxy.flap(up_seconds=(0.5, 3.0), down_seconds=(0.5, 2.0), mode=mode)
            _watch_prefix(pair.p, pair.r, flap_seconds)
            _assert_serves_reads(pair.r)
            pair.proxy.heal()
        stats = pair.proxy.stats()
        assert stats["flaps"] >= 2, stats
        _assert_converges(pair.p, pair.r)
        assert stats["connections_accepted"] >= 2      # it reconnected at least once


@pytest.mark.timeout(150)
def test_flapping_link_replica_converges_once_it_settles(tmp_path):
    _flapping_converges(tmp_path, SEED, flap_seconds=8, mode="reset")


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("seed", [11, 12, 13])
@pytest.mark.parametrize("mode", ["reset", "blackhole"])
def test_flapping_link_long_runs(tmp_path, seed, mode):
    _flapping_converges(tmp_path, seed, flap_seconds=40, mode=mode)


# --- silent faults: only the replicator's request timeout notices them ---------------------------

# name: (start the fault, what shows it fired: "bytes" dropped or a "frame" mutated)
SILENT_FAULTS = {
    "blackhole": (lambda proxy: proxy.blackhole(), "bytes"),
    "drop primary->replica": (lambda proxy: proxy.drop(TO_CLIENT), "bytes"),
    "drop replica->primary": (lambda proxy: proxy.drop(TO_SERVER), "bytes"),
    # R6: a whole answer lost, and a legal but forged length (32 MiB) on an answer, checksums
    # fixed: the replica must wait for bytes that never come without allocating for them
    "drop frame": (lambda proxy: proxy.add_frame_fault(
        FrameFault("drop", msg_type=Msg.EXPORT_TXS)), "frame"),
    "forged length 32 MiB": (lambda proxy: proxy.add_frame_fault(
        FrameFault("forge_length", msg_type=Msg.EXPORT_TXS, body_len=32 << 20, rehash=True)),
        "frame"),
}


@pytest.mark.timeout(300)
def test_silent_faults_are_noticed_by_the_request_timeout_and_heal(tmp_path):
    """These lose bytes without closing anything: the replicator sees them only when its
    request times out (REQUEST_TIMEOUT_SECONDS). They run side by side, one replica database and
    proxy each, so the run pays that timeout once. Each proxy is healed as soon as its replica
    reports ``retrying``."""
    names = list(SILENT_FAULTS)
    with replication_through_proxies(tmp_path, count=len(names)) as pair:
        rss_before = _rss_bytes(pair.replica)
        with Writer(pair.primary, pause=0.02):
            _wait_for(lambda: all(c.current_state().tx_id > 30 for c in pair.clients),
                      "live replication")
            for name, proxy in zip(names, pair.proxies):
                SILENT_FAULTS[name][0](proxy)
            pending = set(range(len(names)))
            deadline = time.monotonic() + SILENT_FAULT_SECONDS_MAX
            while pending and time.monotonic() < deadline:
                for index in sorted(pending):
                    _assert_prefix(pair.p, pair.clients[index])
                    if _status(pair, index)["state"] == "retrying":
                        pair.proxies[index].heal()
                        pending.discard(index)
                time.sleep(0.05)
            assert not pending, f"never reported: {[names[i] for i in pending]}"
            for client in pair.clients:
                _assert_serves_reads(client)
        for client in pair.clients:
            _assert_converges(pair.p, client)
        for name, proxy in zip(names, pair.proxies):
            stats = proxy.stats()
            if SILENT_FAULTS[name][1] == "bytes":
                assert sum(stats["bytes_dropped"].values()) > 0, name
            else:
                assert sum(stats["frames_mutated"].values()) == 1, name
            assert stats["connections_accepted"] >= 2, name      # it gave up and reconnected
        assert _rss_bytes(pair.replica) - rss_before < RSS_GROWTH_BYTES_MAX


# --- R6: corrupted, truncated, duplicated, reordered, replayed and spliced frames -----------------

def _last_blob_bit(offset_in_blob: int, bit: int = 7):
    """A ``FrameFault.bit`` locator: ``bit`` of byte ``offset_in_blob`` of the answer's last export
    blob (None for an answer without blobs, which is then skipped)."""
    def locate(body: bytes):
        blobs = msgpack.unpackb(body, raw=False).get("blobs") or []
        if not blobs:
            return None
        return (body.rindex(blobs[-1]) + offset_in_blob) * 8 + bit
    return locate


def _value_bit(body: bytes):
    """A bit inside the last entry value of the answer's last blob: its Eh no longer matches."""
    blobs = msgpack.unpackb(body, raw=False).get("blobs") or []
    if not blobs:
        return None
    return (body.rindex(blobs[-1]) + blobs[-1].rindex(b"value-") + 7) * 8


TS_OFFSET_IN_BLOB = 4 + 40 + 7     # u32 header length, id and prevAlh, then ts: its last byte

# (fault, whether the replica must drop the connection to get past it)
FRAME_FAULTS = {
    "flip header bit": (FrameFault("flip_header", msg_type=Msg.EXPORT_TXS), True),
    "flip body bit": (FrameFault("flip_body", msg_type=Msg.EXPORT_TXS), True),
    "flip value bit, checksums fixed": (
        FrameFault("flip_body", msg_type=Msg.EXPORT_TXS, bit=_value_bit, rehash=True), True),
    "forged length 0": (
        FrameFault("forge_length", msg_type=Msg.EXPORT_TXS, body_len=0, rehash=True), True),
    "forged length 4 GiB": (
        FrameFault("forge_length", msg_type=Msg.EXPORT_TXS, body_len=0xFFFFFFFF, rehash=True),
        True),
    "truncated": (FrameFault("truncate", msg_type=Msg.EXPORT_TXS), True),
    "duplicated": (FrameFault("duplicate", msg_type=Msg.EXPORT_TXS), False),
    "replayed": (FrameFault("replay", msg_type=Msg.EXPORT_TXS), False),
}


def _fired(proxy: FaultProxy, fault: FrameFault) -> bool:
    return _mutated(proxy, fault.kind) >= 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(FRAME_FAULTS))
def test_a_bad_frame_is_never_applied_and_replication_resumes(tmp_path, name):
    template, must_reconnect = FRAME_FAULTS[name]
    fault = dataclasses.replace(template)                # fresh counters for each run
    with replication_through_proxies(tmp_path) as pair:
        rss_before = _rss_bytes(pair.replica)
        connections_before = pair.proxy.stats()["connections_accepted"]
        pair.proxy.add_frame_fault(fault)
        with Writer(pair.primary, pause=0.01):
            _wait_for(lambda: _fired(pair.proxy, fault), f"the fault ({name}) to fire")
            _watch_prefix(pair.p, pair.r, 1.0)
        _assert_converges(pair.p, pair.r)
        status = _status(pair)
        assert status["state"] == "following", status
        if must_reconnect:
            assert pair.proxy.stats()["connections_accepted"] > connections_before
            assert status["retries"] >= 1
        assert _rss_bytes(pair.replica) - rss_before < RSS_GROWTH_BYTES_MAX


@pytest.mark.timeout(120)
def test_reordered_answers_are_never_applied_out_of_order(tmp_path):
    """An answer is held (up to 300 ms) until the next one passes it. The replicator has at most
    one fetch in flight, so most holds find no partner and go alone (``reorders_unpaired``);
    the fault is repeated until one pair was really swapped."""
    with replication_through_proxies(tmp_path) as pair:
        pair.proxy.add_frame_fault(FrameFault("reorder", direction=TO_CLIENT, times=40,
                                              hold_ms=300))
        with Writer(pair.primary, pause=0.01):
            _wait_for(lambda: _mutated(pair.proxy, "reorder") >= 1, "a swapped pair")
            _watch_prefix(pair.p, pair.r, 0.5)
        _assert_converges(pair.p, pair.r)
        assert _status(pair)["state"] == "following"


@pytest.mark.timeout(120)
def test_an_answer_spliced_from_an_earlier_connection_is_harmless(tmp_path):
    with replication_through_proxies(tmp_path) as pair:
        fault = pair.proxy.add_frame_fault(FrameFault("splice", msg_type=Msg.EXPORT_TXS))
        with Writer(pair.primary, pause=0.01):
            _wait_for(lambda: pair.r.current_state().tx_id > 40, "live replication")
            pair.proxy.reset(refuse_new=False)           # a new connection, same request ids
            _wait_for(lambda: _fired(pair.proxy, fault), "the splice")
            _watch_prefix(pair.p, pair.r, 1.0)
        _assert_converges(pair.p, pair.r)
        assert _status(pair)["state"] == "following"


@pytest.mark.timeout(120)
def test_an_answer_spliced_from_another_server_is_rejected_and_replication_resumes(tmp_path):
    with running_node(tmp_path / "other") as other, \
            FaultProxy(other.host, other.port, seed=SEED, name="other") as recorder:
        with _login(other) as o:
            _write(o, 30)
        with _login(other) as o:
            o.create_database("copy", _follow_settings(recorder))
            o.use_database("copy")
            _wait_for(lambda: o.current_state().tx_id == 30, "the recording")
        foreign = [frame for frame in recorder.recorded_frames(TO_CLIENT)
                   if frame[5] == Msg.EXPORT_TXS][0]
    with replication_through_proxies(tmp_path / "mine") as pair:
        # taken as the answer to our request (its request id), in before the real answer, not
        # instead of it: a replaced answer is a lost one, which only the request timeout
        # notices (that case is the silent test's "drop frame")
        pair.proxy.add_frame_fault(FrameFault("splice", msg_type=Msg.EXPORT_TXS, frame=foreign,
                                              replace=False, adopt_request_id=True))
        with Writer(pair.primary, pause=0.01):
            _wait_for(lambda: _mutated(pair.proxy, "splice") == 1, "the splice")
            _watch_prefix(pair.p, pair.r, 1.0)
        status = _status(pair)
        assert status["state"] != "diverged" and status["retries"] >= 1, status   # noticed
        _assert_converges(pair.p, pair.r)


@pytest.mark.timeout(120)
def test_a_corrupted_timestamp_in_the_last_tx_of_an_answer_is_never_applied(tmp_path):
    with replication_through_proxies(tmp_path) as pair:
        pair.proxy.add_frame_fault(FrameFault("flip_body", msg_type=Msg.EXPORT_TXS, rehash=True,
                                              bit=_last_blob_bit(TS_OFFSET_IN_BLOB)))
        header = pair.p.set({b"one": b"tx"})             # a caught-up replica: one-blob answer
        _wait_for(lambda: _mutated(pair.proxy, "flip_body") == 1, "the flip")
        _wait_for(lambda: pair.r.current_state().tx_id >= header.id or
                  _status(pair)["retries"], "the replica to apply or refuse it")
        _assert_prefix(pair.p, pair.r)
        _write(pair.p, 5)
        _assert_converges(pair.p, pair.r, seconds=WAIT_SECONDS)


# --- backoff ------------------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_backoff_starts_over_after_the_replica_has_followed_again(tmp_path):
    with replication_through_proxies(tmp_path) as pair:
        recoveries = []
        for _ in range(4):
            pair.proxy.reset(refuse_new=False)          # one failure, then back at once
            start = time.monotonic()
            header = pair.p.set({b"after-reset": b"1"})
            _wait_for(lambda: pair.r.current_state().tx_id >= header.id, "the reconnect")
            recoveries.append(time.monotonic() - start)
            time.sleep(0.5)                              # following again for a while
        print("seconds to recover after each reset:", [round(s, 2) for s in recoveries])
        # the backoff starts over after each success: about its minimum (0.5 s) each time
        assert max(recoveries) < 2.5, recoveries


# --- R7: slow consumer ----------------------------------------------------------------------------

def _p50(latencies: List[float]) -> float:
    return statistics.median(latencies) if latencies else 0.0


@pytest.mark.timeout(150)
def test_a_bandwidth_capped_replica_lags_without_hurting_the_primary(tmp_path):
    cap_seconds = 6
    with replication_through_proxies(tmp_path) as pair:
        with Writer(pair.primary, pause=0) as writer:
            time.sleep(1.5)
            baseline = list(writer.latencies)
            rss_before = _rss_bytes(pair.primary)
            pair.proxy.set_bandwidth(BANDWIDTH_CAP_BPS, TO_CLIENT)
            start = len(writer.latencies)
            lag_seen = 0
            deadline = time.monotonic() + cap_seconds
            while time.monotonic() < deadline:
                # the real lag: the replica's own lag_txs knows the primary's tip only from
                # answers, which the cap delays too
                lag_seen = max(lag_seen, pair.p.current_state().tx_id
                               - pair.r.current_state().tx_id)
                _assert_prefix(pair.p, pair.r)
                time.sleep(0.2)
            capped = writer.latencies[start:]
            rss_during = _rss_bytes(pair.primary)
            pair.proxy.set_bandwidth(None)
        print(f"write p50 {_p50(baseline) * 1000:.1f} ms before, {_p50(capped) * 1000:.1f} ms "
              f"capped; lag up to {lag_seen} txs; primary RSS +{(rss_during - rss_before) >> 20} MiB")
        assert lag_seen > 100
        assert _p50(capped) < 3 * _p50(baseline) + 0.02
        assert rss_during - rss_before < RSS_GROWTH_BYTES_MAX
        _assert_converges(pair.p, pair.r)
        assert _status(pair)["lag_txs"] == 0
        assert pair.proxy.stats()["writes"][TO_CLIENT] > cap_seconds * 10   # the cap sliced


def _stopped_replica_does_not_hurt_the_primary(tmp_path, stop_seconds: float):
    with replication_through_proxies(tmp_path) as pair:
        with Writer(pair.primary, pause=0) as writer:
            time.sleep(1.5)
            baseline = list(writer.latencies)
            rss_before = _rss_bytes(pair.primary)
            replica_tx_before = pair.r.current_state().tx_id
            pair.replica.process.send_signal(signal.SIGSTOP)
            try:
                start = len(writer.latencies)
                time.sleep(stop_seconds)
                stopped = writer.latencies[start:]
                rss_during = _rss_bytes(pair.primary)
                primary_tx_at_cont = pair.p.current_state().tx_id
            finally:
                pair.replica.process.send_signal(signal.SIGCONT)
        print(f"write p50 {_p50(baseline) * 1000:.1f} ms before, {_p50(stopped) * 1000:.1f} ms "
              f"while the replica was stopped; primary RSS +{(rss_during - rss_before) >> 20} MiB")
        assert primary_tx_at_cont - replica_tx_before > 100          # the lag it had to make up
        assert _p50(stopped) < 3 * _p50(baseline) + 0.02
        assert rss_during - rss_before < RSS_GROWTH_BYTES_MAX
        _assert_converges(pair.p, pair.r)
        assert _status(pair)["lag_txs"] == 0


@pytest.mark.timeout(150)
def test_a_stopped_replica_catches_up_after_sigcont_without_hurting_the_primary(tmp_path):
    _stopped_replica_does_not_hurt_the_primary(tmp_path, stop_seconds=10)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_replica_stopped_for_two_minutes(tmp_path):
    _stopped_replica_does_not_hurt_the_primary(tmp_path, stop_seconds=120)
