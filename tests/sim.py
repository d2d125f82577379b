"""A deterministic simulation of one replica's replication (docs/reliability.md R13, VOPR-style).

``ReplicaMachine`` (immucore/replication/machine.py) is driven here the way ``Replicator`` drives
it, but every piece of I/O is a fake owned by one seeded ``random.Random``:

    * ``FakePrimary`` — a log of fake export blobs that keeps growing, and can be rewritten from
      some tx on (a failover to a node with another history);
    * the network — requests wait in a list; each step the seed picks which one the primary
      serves, which answer arrives (reordering), drops one (the driver reports ``failed``),
      keeps a copy of an answer to deliver it again (duplication), lets answers of a dead
      connection arrive late (stale), or partitions the replica for a while;
    * a fake clock — only ``Backoff`` moves it: nothing sleeps;
    * ``FakeReplicaStore`` — applies a batch all or nothing only if it starts at its tip + 1 and
      every blob chains onto its Alh (what ``replicate_txs`` verifies), keeps the discard floor,
      discards, and survives a crash with exactly what was durable: the machine is then rebuilt
      from the store's tip and floor, as a restarted process would.

The driver's contract is kept: an apply outlives its connection (its outcome is fed to the
machine even after ``failed``), a reconnect happens only once the running apply ended, and a
connection reports ``failed`` once (then its other requests are cancelled).

After every step ``Sim.check`` asserts the invariants (the store is a prefix of a log the primary
has had, ids are contiguous, no tx is applied twice, bounded memory, one fetch in flight); after
``heal`` the replica must reach the primary's tip — or stop, only if its log really diverged —
within a bounded number of steps. A failure raises ``SimFailure`` with the seed and the last steps.
"""
from __future__ import annotations

import hashlib
import random
from collections import deque
from dataclasses import dataclass
from typing import Dict, List, Optional

from immucore.replication import machine as m

ZERO_ALH = bytes(32)
TRACE_STEPS_MAX = 80              # steps shown when a seed fails
PAYLOAD_BYTES_MAX = 40            # fake blobs: 44-byte header + up to this much payload
BLOB_BYTES_MAX = 44 + 8 + PAYLOAD_BYTES_MAX


# --- fake export blobs: ids where the driver reads them, and a hash chain --------------------

def make_blob(tx_id: int, prev_alh: bytes, payload: bytes) -> bytes:
    """Like an immudb export blob where it matters here: the tx id at bytes 4..12 (the driver
    reads it there) and the previous tx's Alh inside, so a tx of another history never chains."""
    return b"\0\0\0\0" + tx_id.to_bytes(8, "big") + prev_alh + payload


def blob_tx_id(blob: bytes) -> int:
    return int.from_bytes(blob[4:12], "big")


def blob_prev_alh(blob: bytes) -> bytes:
    return blob[12:44]


def blob_alh(blob: bytes) -> bytes:
    return hashlib.sha256(blob).digest()


class SimFailure(AssertionError):
    pass


# --- the primary -------------------------------------------------------------------------------

class FakePrimary:
    def __init__(self, rng: random.Random):
        self._rng = rng
        self.histories: List[List[bytes]] = [[]]   # every log it has had; the last is current
        self.alhs = [ZERO_ALH]                      # alhs[i]: Alh of tx i of the current log
        self.acked_tx_id = 0                        # acknowledged to its clients

    @property
    def log(self) -> List[bytes]:
        return self.histories[-1]

    @property
    def tx_id(self) -> int:
        return len(self.log)

    def commit(self, count: int = 1):
        for _ in range(count):
            # the history number in the payload makes a rewritten tx differ from the old one
            payload = (b"h%d/" % len(self.histories)
                       + self._rng.randbytes(self._rng.randrange(PAYLOAD_BYTES_MAX)))
            blob = make_blob(self.tx_id + 1, self.alhs[-1], payload)
            self.log.append(blob)
            self.alhs.append(blob_alh(blob))
        # acknowledgements trail commits (sync replication waits for replicas)
        self.acked_tx_id = max(self.acked_tx_id, self.tx_id - self._rng.randrange(12))

    def rewrite(self, fork_tx_id: int, new_txs: int):
        """A failover to a node that has the same txs below ``fork_tx_id`` and others from it on.
        What the old node acknowledged at or above the fork is lost (the floor's reason)."""
        self.histories.append(self.log[:fork_tx_id - 1])
        del self.alhs[fork_tx_id:]
        self.acked_tx_id = min(self.acked_tx_id, fork_tx_id - 1)
        self.commit(new_txs)

    def export(self, first_tx_id: int, count: int) -> List[bytes]:
        return self.log[first_tx_id - 1:first_tx_id - 1 + count]

    def alh_at(self, tx_id: int) -> Optional[bytes]:
        return self.alhs[tx_id] if 0 < tx_id <= self.tx_id else None


# --- the replica's store -----------------------------------------------------------------------

class ApplyError(Exception):
    def __init__(self, message: str, diverged: bool = False):
        super().__init__(message)
        self.diverged = diverged


class FakeReplicaStore:
    """What ``Database`` does for a replica, in memory; everything in it is durable."""

    def __init__(self):
        self.log: List[bytes] = []
        self.alhs = [ZERO_ALH]
        self.floor_tx_id = 0
        self.times_applied: Dict[int, int] = {}    # tx id -> applies since it was last discarded

    @property
    def tx_id(self) -> int:
        return len(self.log)

    @property
    def discard_floor(self) -> int:
        return min(self.floor_tx_id, self.tx_id)

    def alh_at(self, tx_id: int) -> Optional[bytes]:
        return self.alhs[tx_id] if 0 <= tx_id <= self.tx_id else None

    def apply(self, blobs: List[bytes], floor_tx_id: int):
        """All or nothing; a tx that does not chain is refused like the codec refuses it (an
        IllegalArgumentsError, not a divergence: the machine's check on reconnect decides)."""
        alh, tx_id = self.alhs[-1], self.tx_id
        for blob in blobs:
            tx_id += 1
            if blob_tx_id(blob) != tx_id:
                raise ApplyError(f"expected tx {tx_id}, got tx {blob_tx_id(blob)}")
            if blob_prev_alh(blob) != alh:
                raise ApplyError(f"attempt to commit a tx with invalid prevAlh at tx {tx_id}")
            alh = blob_alh(blob)
        for blob in blobs:
            self.log.append(blob)
            self.alhs.append(blob_alh(blob))
            self.times_applied[self.tx_id] = self.times_applied.get(self.tx_id, 0) + 1
        self.floor_tx_id = max(self.floor_tx_id, floor_tx_id)   # the writer keeps the max too

    def discard_after(self, tx_id: int):
        if tx_id < self.discard_floor:
            raise ApplyError(f"tx {tx_id} is below the discard floor {self.discard_floor}")
        for gone in range(tx_id + 1, self.tx_id + 1):
            self.times_applied.pop(gone, None)
        del self.log[tx_id:]
        del self.alhs[tx_id + 1:]


# --- the network ---------------------------------------------------------------------------

@dataclass
class Request:
    """One request of the driver and, once the primary served it, the event its answer feeds."""
    conn: int
    command: object
    answer: Optional[tuple] = None
    copy: bool = False                 # a duplicate of an answer already delivered
    superseded: bool = False           # a duplicate answer was taken in its place


@dataclass
class Faults:
    """Per-step probabilities (the rest of a step serves, delivers and applies)."""
    drop: float = 0.04
    duplicate: float = 0.1
    stale_kept: float = 0.5            # a dead connection's fetch answers still arrive
    long_poll_timeout: float = 0.3     # a caught-up fetch is answered empty
    login_fails: float = 0.1
    apply_fails: float = 0.04
    crash: float = 0.01
    partition: float = 0.01
    partition_heals: float = 0.1
    rewrite: float = 0.0               # the divergence variant sets it
    commit: float = 0.3


NO_FAULTS = Faults(drop=0, duplicate=0, stale_kept=0, long_poll_timeout=0, login_fails=0,
                   apply_fails=0, crash=0, partition=0, rewrite=0, commit=0)


@dataclass
class Config:
    batch_txs: int
    queue_batches: int
    queue_bytes: int
    allow_discarding: bool
    initial_txs: int
    backoff_seconds_min: float = 0.5
    backoff_seconds_max: float = 30.0

    @classmethod
    def draw(cls, rng: random.Random, allow_discarding: bool = False) -> "Config":
        return cls(batch_txs=rng.randint(1, 6), queue_batches=rng.randint(1, 3),
                   queue_bytes=rng.choice([BLOB_BYTES_MAX, 200, 400, 1 << 20]),
                   allow_discarding=allow_discarding, initial_txs=rng.randrange(30))


# --- the simulated driver -------------------------------------------------------------------

class Sim:
    def __init__(self, seed: int, config: Config, faults: Faults):
        self.seed = seed
        self.rng = random.Random(seed)
        self.config, self.faults = config, faults
        self.primary = FakePrimary(self.rng)
        self.primary.commit(config.initial_txs)
        self.store = FakeReplicaStore()
        self.clock_seconds = 0.0
        self.trace: deque = deque(maxlen=TRACE_STEPS_MAX)
        self.steps = 0
        self.network: List[Request] = []
        self.conn = 0
        self.conn_alive = False
        self.partitioned = False
        self.applying: Optional[m.Apply] = None
        self.discarding: Optional[m.Discard] = None
        self.backoff_seconds: Optional[float] = None
        self.stop_reason: Optional[str] = None
        self.stop_justified: Optional[str] = None   # why the logs differed when it stopped
        self.rewrites_left = 2
        self.ids_checked = 0                        # store txs whose id check passed
        self.discards = 0
        self.machine = self._boot()
        self._connect()

    # --- process lifecycle ---------------------------------------------------------------

    def _boot(self) -> m.ReplicaMachine:
        """A (re)started process: the machine knows only what the store made durable."""
        c = self.config
        self.floor_seen = self.store.discard_floor
        return m.ReplicaMachine(
            self.store.tx_id, self.store.alh_at(self.store.tx_id), self.store.discard_floor,
            batch_txs=c.batch_txs, queue_batches=c.queue_batches, queue_bytes=c.queue_bytes,
            backoff_seconds_min=c.backoff_seconds_min, backoff_seconds_max=c.backoff_seconds_max,
            allow_discarding=c.allow_discarding, rng=random.Random(self.rng.random()))

    def crash(self):
        """The replica's process dies: a running apply or discard made it to disk or not, every
        connection is gone, and the new process starts from the store."""
        self._log("crash")
        if self.applying is not None and self.rng.random() < 0.5:
            self._apply_to_store(self.applying)
        if self.discarding is not None and self.rng.random() < 0.5:
            self.store.discard_after(self.discarding.after_tx_id)
        self.applying = self.discarding = self.backoff_seconds = None
        self.network.clear()
        self.conn_alive = False
        self.stop_reason = self.stop_justified = None
        self.machine = self._boot()
        self._connect()

    # --- feeding the machine and carrying out its commands -------------------------------

    def _feed(self, event: str, *args) -> list:
        commands = getattr(self.machine, event)(*args)
        self._log(_FedEvent(event, args, commands, self.machine.state))
        for command in commands:
            self._execute(command)
        return commands

    def _execute(self, command):
        if isinstance(command, (m.Fetch, m.CheckPrimary, m.Ack)):
            self._require(self.conn_alive, f"{_short(command)} without a live connection")
            if isinstance(command, m.Ack):         # sync replication counts it: must be durable
                self._require(self.store.alh_at(command.tx_id) == command.alh,
                              f"ack of tx {command.tx_id} the store does not hold")
            self.network.append(Request(self.conn, command))
        elif isinstance(command, m.Apply):
            self._check_apply(command)
            self.applying = command
        elif isinstance(command, m.Discard):
            self._require(command.after_tx_id >= self.store.discard_floor,
                          f"{command} below the store's floor {self.store.discard_floor}")
            self.discarding = command
        elif isinstance(command, m.Backoff):
            self._drop_connection()
            # a second failure while waiting (an apply failing) waits once more, like the driver
            self.backoff_seconds = (self.backoff_seconds or 0.0) + command.seconds
        elif isinstance(command, m.Stop):
            self._drop_connection()
            self.stop_reason = command.reason
            self.stop_justified = self._divergence()
            self._require(self.stop_justified is not None,
                          f"stopped ({command.reason}) though the replica's log can follow "
                          f"the primary's")
            if self.applying is not None:          # the driver awaits it, feeds nothing
                self._finish_apply(feed=False)
        else:
            raise SimFailure(f"unknown command {command!r}")

    def _check_apply(self, command: m.Apply):
        """The machine must ask for exactly the next txs, chaining onto what the store holds:
        anything else would apply a tx twice, leave a gap or mix two histories."""
        self._require(self.applying is None, "two applies at once")
        ids = [blob_tx_id(b) for b in command.blobs]
        self._require(ids == list(range(command.first_tx_id, command.last_tx_id + 1)),
                      f"apply of txs {ids} announced as {command.first_tx_id}.."
                      f"{command.last_tx_id}")
        self._require(command.first_tx_id == self.store.tx_id + 1,
                      f"apply from tx {command.first_tx_id}, store at tx {self.store.tx_id}")
        self._require(blob_prev_alh(command.blobs[0]) == self.store.alhs[-1],
                      f"apply of tx {command.first_tx_id} of another history")

    def _drop_connection(self):
        """Close the connection: its requests are cancelled — but answers of a dead connection's
        fetches may still reach the machine (a harsher network than the driver's)."""
        self.conn_alive = False
        self.network = [r for r in self.network
                        if r.conn != self.conn or (isinstance(r.command, m.Fetch)
                                                   and self.rng.random() < self.faults.stale_kept)]

    def _connect(self):
        if self.partitioned or self.rng.random() < self.faults.login_fails:
            self._feed("failed", "ConnectionError: cannot log in")
            return
        self.conn += 1
        self.conn_alive = True
        self._feed("connected")

    def _fail_connection(self, why: str, diverged: bool = False):
        self._drop_connection()
        self._feed("failed", why, diverged)

    # --- actions: one is chosen per step ---------------------------------------------------

    def actions(self) -> list:
        f = self.faults
        out = []
        if self.stop_reason is None:
            if self.backoff_seconds is not None and self.applying is None:
                out.append(self.reconnect)
            if any(self._servable(r) for r in self.network):
                out.append(self.serve)
            if any(r.answer is not None for r in self.network):
                out.append(self.deliver)
            if self.applying is not None:
                out.append(self.finish_apply)
            if self.discarding is not None:
                out.append(self.finish_discard)
            if self.network and (f.drop or self.partitioned):
                out.append(self.drop)
        if f.commit:
            out.append(self.commit)
        if f.partition or self.partitioned:
            out.append(self.toggle_partition)
        if f.crash:
            out.append(self.crash)
        if f.rewrite and self.rewrites_left and self.primary.tx_id:
            out.append(self.rewrite)
        return out

    def step(self) -> bool:
        """One step; False once nothing can happen any more."""
        actions = self.actions()
        if not actions:
            return False
        rare = self._rare_weights()
        self.do(self.rng.choices(actions, [rare.get(a, 1.0) for a in actions])[0])
        return True

    def do(self, action):
        """Run one of ``actions()`` (the seed or hypothesis chose it) and check the invariants."""
        action()
        self.steps += 1
        self.check()

    def _rare_weights(self) -> dict:
        """Faults and commits are weighted against 1.0 for serving, delivering and applying."""
        f = self.faults
        return {self.commit: f.commit, self.crash: f.crash, self.rewrite: f.rewrite,
                self.drop: f.drop if not self.partitioned else 0.3,
                self.toggle_partition: f.partition_heals if self.partitioned else f.partition}

    def commit(self):
        self.primary.commit(self.rng.randint(1, 3))
        self._log(f"primary commits up to tx {self.primary.tx_id}")

    def rewrite(self):
        # near the tip mostly: where a lagging replica's floor is often below the fork
        fork = self.rng.randint(max(1, self.primary.tx_id - 12), self.primary.tx_id)
        self.rewrites_left -= 1
        self.primary.rewrite(fork, self.rng.randrange(8))
        self._log(f"failover: primary's log differs from tx {fork} on, now at tx "
                  f"{self.primary.tx_id}")
        if self.conn_alive:                      # the old primary is gone
            self._fail_connection("ConnectionResetError: primary failed over")

    def toggle_partition(self):
        self.partitioned = not self.partitioned
        self._log("partition" if self.partitioned else "partition heals")

    def _servable(self, r: Request) -> bool:
        if r.answer is not None or (self.partitioned and r.conn == self.conn):
            return False
        if isinstance(r.command, m.Fetch):     # a caught-up fetch waits for a commit
            return (r.command.first_tx_id <= self.primary.tx_id
                    or self.faults.long_poll_timeout > 0)
        return True

    def serve(self):
        """The primary answers one request (in any order: that is the reordering)."""
        r = self.rng.choice([r for r in self.network if self._servable(r)])
        c, p = r.command, self.primary
        if isinstance(c, m.Fetch):
            blobs = p.export(c.first_tx_id, c.count)
            last = blob_tx_id(blobs[-1]) if blobs else c.first_tx_id - 1
            r.answer = ("received", c.epoch, c.first_tx_id, blobs, last, p.tx_id, p.acked_tx_id)
        elif isinstance(c, m.CheckPrimary):
            r.answer = ("primary_checked", c.epoch, p.tx_id, {t: p.alh_at(t) for t in c.tx_ids})
        else:                                   # Ack: the server checks our Alh at that tx
            r.answer = ("acked",) if p.alh_at(c.tx_id) == c.alh else (
                "failed", f"ReplicaDivergedError: tx {c.tx_id} differs", True)
        self._log(lambda: f"primary serves {_short(c)}")

    def deliver(self):
        r = self.rng.choice([r for r in self.network if r.answer is not None])
        if self.rng.random() < self.faults.duplicate:
            self.network.append(Request(r.conn, r.command, r.answer, copy=True))
        self.network.remove(r)
        event, *args = r.answer
        if r.conn != self.conn or not self.conn_alive:
            self._require(event == "received", f"{event} answer of a cancelled request")
            commands = self._feed(event, *args)
            self._require(not commands, f"a stale answer (connection {r.conn}) was used")
        elif event == "primary_checked":
            # the driver reads our Alhs when the answer arrives
            local = {t: self.store.alh_at(t) for t in r.command.tx_ids}
            self._feed(event, *args, local)
        elif event == "received":
            twins = [t for t in self.network if t.conn == r.conn and not t.copy
                     and isinstance(t.command, m.Fetch)
                     and t.command.first_tx_id == r.command.first_tx_id]
            queued = len(self.machine._queue)
            if self._feed(event, *args) or len(self.machine._queue) > queued:
                self._supersede(twins)
        elif event == "failed":
            self._fail_connection(*args)
        else:
            self._log(f"ack of tx {r.command.tx_id} answered")

    def _supersede(self, twins: List[Request]):
        """An answer was taken for the fetch at its position: when it was a duplicate (or the
        answer to an earlier fetch of the same position), the fetch still pending there is
        answered already — its own answer will be ignored — so it no longer counts in flight."""
        for r in twins:
            r.superseded = True

    def drop(self):
        """A request is lost or times out: a live connection reports ``failed`` (once)."""
        r = self.rng.choice(self.network)
        self.network.remove(r)
        self._log(lambda: f"network drops {_short(r.command)} of connection {r.conn}")
        if r.conn == self.conn and self.conn_alive and not r.copy:   # a lost duplicate is harmless
            self._fail_connection("TimeoutError: no answer from primary")

    def finish_apply(self):
        self._finish_apply(feed=True)

    def _finish_apply(self, feed: bool):
        command, self.applying = self.applying, None
        if self.rng.random() < self.faults.apply_fails:
            error = ApplyError("OSError: No space left on device")
        else:
            error = self._apply_to_store(command)
        self._log(f"apply of txs {command.first_tx_id}..{command.last_tx_id}: "
                  f"{error or 'durable'}")
        if not feed:
            return
        if error is None:
            self._feed("applied", command.last_tx_id, self.store.alhs[-1])
        else:
            self._feed("apply_failed", str(error), error.diverged)

    def _apply_to_store(self, command: m.Apply) -> Optional[ApplyError]:
        try:
            self.store.apply(command.blobs, command.floor_tx_id)
        except ApplyError as exc:
            return exc
        return None

    def finish_discard(self):
        command, self.discarding = self.discarding, None
        self.store.discard_after(command.after_tx_id)
        self.discards += 1
        self._feed("discarded", self.store.tx_id, self.store.alhs[-1])

    def reconnect(self):
        """The driver waited out the backoff (after the running apply ended) and connects."""
        self.clock_seconds += self.backoff_seconds
        self.backoff_seconds = None
        self._connect()

    # --- what must hold after every step ---------------------------------------------------

    def check(self):
        store, machine, c = self.store, self.machine, self.config
        self._require(any(store.log == h[:store.tx_id] for h in self.primary.histories),
                      "the store is not a prefix of any log the primary has had")
        # ids: only the txs applied since the last step are new (a discard only cuts)
        self.ids_checked = min(self.ids_checked, store.tx_id)
        for tx_id in range(self.ids_checked + 1, store.tx_id + 1):
            self._require(blob_tx_id(store.log[tx_id - 1]) == tx_id,
                          f"the store holds tx {blob_tx_id(store.log[tx_id - 1])} at {tx_id}")
            self._require(store.times_applied[tx_id] == 1, f"tx {tx_id} applied twice")
        self.ids_checked = store.tx_id
        self._require(len(machine._queue) <= c.queue_batches,
                      f"{len(machine._queue)} batches queued, limit {c.queue_batches}")
        self._require(machine.queued_bytes < c.queue_bytes + c.batch_txs * BLOB_BYTES_MAX,
                      f"{machine.queued_bytes} bytes queued, limit {c.queue_bytes} + one batch")
        # a request is in flight until its answer is delivered (copies and superseded ones aside)
        in_flight = [r for r in self.network
                     if self.conn_alive and r.conn == self.conn and isinstance(r.command, m.Fetch)
                     and not r.copy and not r.superseded]
        self._require(len(in_flight) <= 1, f"{len(in_flight)} fetches in flight")
        self._require(self.floor_seen <= machine.floor_tx_id <= machine.local_tx_id,
                      f"floor {machine.floor_tx_id} went down or above the tip")
        self.floor_seen = machine.floor_tx_id
        self._require(machine.local_tx_id <= store.tx_id, "the machine is ahead of the store")

    def _divergence(self) -> Optional[str]:
        """Why the replica cannot follow the current primary, or None if it can."""
        store, log = self.store, self.primary.log
        if store.log == log[:store.tx_id]:
            return None
        floor = store.discard_floor
        if self.config.allow_discarding and store.log[:floor] == log[:floor]:
            return None                           # it had to discard down to the floor
        return f"store at tx {store.tx_id} (floor {floor}) is not on the primary's log"

    # --- healing and convergence ---------------------------------------------------------

    def heal(self):
        self._log("faults heal")
        self.faults = NO_FAULTS
        self.partitioned = False

    def run_until_quiet(self, steps_max: int) -> int:
        steps = 0
        while self.step():
            steps += 1
            if steps > steps_max:
                raise self.failure(f"no convergence within {steps_max} steps after the faults "
                                   f"healed (store at tx {self.store.tx_id}, primary at tx "
                                   f"{self.primary.tx_id}, machine {self.machine.state})")
        return steps

    def check_converged(self):
        if self.stop_reason is not None:
            return                                # justified when it stopped
        self._require(self.store.log == self.primary.log,
                      f"quiet at tx {self.store.tx_id}, primary at tx {self.primary.tx_id} "
                      f"(machine {self.machine.state}: {self.machine.last_error})")
        self._require(self.machine.state == "following", f"quiet in {self.machine.state}")

    # --- reporting ------------------------------------------------------------------------

    def _log(self, text):
        """A string, an event or a function making one: rendered only if the seed fails."""
        self.trace.append((self.steps, self.clock_seconds, text))

    def _require(self, ok: bool, what: str):
        if not ok:
            raise self.failure(what)

    def failure(self, what: str) -> SimFailure:
        steps = [f"{step:5d} t={clock:8.2f}  {text() if callable(text) else text}"
                 for step, clock, text in self.trace]
        return SimFailure(f"seed {self.seed}: {what}\n  {self.config}\n  last steps:\n    "
                          + "\n    ".join(steps))


@dataclass
class _FedEvent:
    event: str
    args: tuple
    commands: list
    state: str

    def __str__(self):
        return f"{self.event}{_short(self.args)} -> {_short(self.commands)} [{self.state}]"


def _short(value) -> str:
    """Commands and events for the trace: blobs shown as tx ids, Alhs as 4 hex digits."""
    if isinstance(value, m.Apply):
        return (f"Apply({value.first_tx_id}..{value.last_tx_id}, "
                f"floor={value.floor_tx_id})")
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, bytes) and len(v) > 32 for v in value):
            return f"txs{[blob_tx_id(v) for v in value]}"
        inner = ", ".join(_short(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    if isinstance(value, bytes):
        return value[:2].hex()
    if isinstance(value, m.Ack):
        return f"Ack(epoch={value.epoch}, tx={value.tx_id})"
    return repr(value)


def run_seed(seed: int, *, divergence: bool = False, fault_steps: int = 300) -> Sim:
    """One seeded run: faults for ``fault_steps`` steps, then heal and converge."""
    rng = random.Random(seed)
    config = Config.draw(rng, allow_discarding=divergence and rng.random() < 0.6)
    faults = Faults(rewrite=0.01 if divergence else 0.0)
    sim = Sim(seed, config, faults)
    for _ in range(fault_steps):
        if not sim.step():
            break
    sim.heal()
    lag_batches = -(-(sim.primary.tx_id - sim.store.tx_id) // config.batch_txs)
    sim.run_until_quiet(steps_max=50 + 8 * max(lag_batches, 0) + 4 * len(sim.network))
    sim.check_converged()
    return sim
