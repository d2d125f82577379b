"""A replica's replication logic as a state machine without I/O (etcd/raft's shape).

Inputs are events — connected, primary checked, batch received, batch applied, discarded,
failed — and every input returns the commands a driver must carry out: check the primary, fetch,
apply, acknowledge, discard, back off, stop. The machine never touches a socket, a clock or the
disk, so the same code runs under the asyncio driver (``replicator.py``) and under the seeded
simulation of ``tests/test_replication_sim.py`` (drops, duplicates, reorders, crashes).

The rules it keeps:
  * txs are applied strictly in order, each batch starting at the local tip + 1; an answer for
    another position (a duplicate, a reordered or stale answer from an earlier connection) is
    ignored, never applied;
  * at most one fetch is in flight and at most ``queue_batches`` received batches (and
    ``queue_bytes``) wait for the apply, so memory is bounded whatever the primary's log size;
  * after any failure the next connection resumes at the last applied tx + 1 (nothing is
    fetched twice), after a capped exponential backoff with jitter;
  * on every (re)connect our tip must be on the primary with the same Alh; otherwise the logs
    diverged: replication stops for good, unless ``allow_discarding`` lets it drop the txs above
    the *floor* — the highest tx the primary ever told us was acknowledged to its clients — and
    the primary holds the floor with our Alh.
"""
from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from typing import Dict, List, Optional


# --- commands (what the driver must do) -------------------------------------------------------

@dataclass(frozen=True)
class CheckPrimary:
    """Fetch the primary's last tx id and its Alh at each of ``tx_ids`` (None where it has none)."""
    epoch: int
    tx_ids: tuple


@dataclass(frozen=True)
class Fetch:
    """Ask for up to ``count`` txs from ``first_tx_id``; a caught-up replica's request waits on
    the primary until the next commit (a standing request: the commit is pushed as it happens)."""
    epoch: int
    first_tx_id: int
    count: int


@dataclass(frozen=True)
class Apply:
    """Verify and durably apply ``blobs``; store ``floor_tx_id`` with them."""
    blobs: list
    first_tx_id: int
    last_tx_id: int
    floor_tx_id: int
    last_alh: Optional[bytes] = None     # the primary's Alh of the last tx: checked on apply


@dataclass(frozen=True)
class Ack:
    """Tell the primary (sync replication) that we durably hold every tx up to ``tx_id``."""
    epoch: int
    tx_id: int
    alh: bytes


@dataclass(frozen=True)
class Discard:
    """Drop every local tx after ``after_tx_id`` (only ever above the floor)."""
    after_tx_id: int


@dataclass(frozen=True)
class Backoff:
    """Close the connection, wait ``seconds``, connect and log in again."""
    seconds: float


@dataclass(frozen=True)
class Stop:
    """Terminal: replication of this database stops with ``reason``."""
    reason: str


# states a replica never leaves by itself (a settings update starts a new replicator):
# diverged logs, a replication loop, a stopped replicator
TERMINAL_STATES = ("diverged", "loop", "stopped")


@dataclass
class _Batch:
    first_tx_id: int
    last_tx_id: int
    blobs: list
    size_bytes: int
    floor_tx_id: int
    last_alh: Optional[bytes]


class ReplicaMachine:
    def __init__(self, local_tx_id: int, local_alh: bytes, floor_tx_id: int, *,
                 batch_txs: int, queue_batches: int, queue_bytes: int,
                 backoff_seconds_min: float, backoff_seconds_max: float,
                 allow_discarding: bool = False, rng: Optional[random.Random] = None,
                 primary: str = "primary"):
        if queue_batches < 1 or batch_txs < 1:
            raise ValueError("queue_batches and batch_txs must be at least 1")
        self.local_tx_id, self.local_alh = local_tx_id, local_alh
        self.floor_tx_id = min(floor_tx_id, local_tx_id)
        self.primary = primary
        self.state = "starting"
        self.epoch = 0                      # one per connection: older answers are stale
        self.primary_committed_tx_id = 0
        # whether the primary ever told us its last tx (CheckPrimary, an EXPORT_TXS answer):
        # until then the lag is unknown, not 0
        self.primary_known = False
        self.failures_in_a_row = 0
        self.retries = 0
        self.last_error: Optional[str] = None
        self._batch_txs = batch_txs
        self._queue_batches, self._queue_bytes = queue_batches, queue_bytes
        self._backoff = (backoff_seconds_min, backoff_seconds_max)
        self._allow_discarding = allow_discarding
        self._rng = rng or random.Random()
        self._queue: deque = deque()        # received, waiting for the apply
        self._applying: Optional[_Batch] = None
        self._fetching = False
        self._next_fetch_tx_id = local_tx_id + 1

    # --- what the status shows -------------------------------------------------------------

    @property
    def lag_txs(self) -> Optional[int]:
        """Txs the primary had (as last heard) that we lack; None while unknown: the primary
        never reached, or the logs diverged (no prefix to count from)."""
        if not self.primary_known or self.state == "diverged":
            return None
        return max(self.primary_committed_tx_id - self.local_tx_id, 0)

    @property
    def queued_bytes(self) -> int:
        return sum(b.size_bytes for b in self._queue)

    # --- events ------------------------------------------------------------------------------

    def connected(self) -> list:
        """A new connection to the primary is logged in."""
        if self.state in TERMINAL_STATES:
            return []
        self.epoch += 1
        self._fetching = False
        self._queue.clear()
        self._next_fetch_tx_id = self._tip_tx_id() + 1
        if self.local_tx_id == 0 and self._applying is None:
            return self._follow()
        self.state = "checking"
        ids = (self.local_tx_id,) if self.floor_tx_id in (0, self.local_tx_id) else (
            self.local_tx_id, self.floor_tx_id)
        return [CheckPrimary(self.epoch, ids)]

    def primary_checked(self, epoch: int, primary_tx_id: int,
                        primary_alhs: Dict[int, Optional[bytes]],
                        local_alhs: Dict[int, bytes]) -> list:
        """The primary's last tx and its Alh at the ids CheckPrimary asked for; ``local_alhs``
        are ours at the same ids."""
        if self.state != "checking" or epoch != self.epoch:
            return []
        self.primary_committed_tx_id, self.primary_known = primary_tx_id, True
        local = self.local_tx_id
        if primary_alhs.get(local) == local_alhs.get(local):
            return self._follow(ack=True)
        if primary_tx_id < local:
            why = f"replica is at tx {local}, primary {self.primary} only at tx {primary_tx_id}"
        else:
            why = f"tx {local} has a different Alh on {self.primary}"
        floor = self.floor_tx_id
        if (self._allow_discarding and floor < local
                and (floor == 0 or primary_alhs.get(floor) == local_alhs.get(floor))):
            self.state = "discarding"
            self.last_error = f"discarding txs after {floor}: {why}"
            return [Discard(floor)]
        return self._stop(f"replica diverged from primary: {why}"
                          + (f" (txs up to {floor} were acknowledged by the primary and are never "
                             "discarded)" if self._allow_discarding else ""))

    def discarded(self, tx_id: int, alh: bytes) -> list:
        """The store dropped every tx after ``tx_id``: recorded whatever happened meanwhile (a
        connection failure must not leave us believing in txs that are gone)."""
        self.local_tx_id, self.local_alh = tx_id, alh
        self._next_fetch_tx_id = tx_id + 1
        if self.state != "discarding":
            return []
        return self._follow(ack=True)

    def received(self, epoch: int, first_tx_id: int, blobs: list, last_tx_id: int,
                 committed_tx_id: int, acked_tx_id: int,
                 last_alh: Optional[bytes] = None) -> list:
        """An EXPORT_TXS answer. ``acked_tx_id``: the primary's highest tx acknowledged to its
        clients (everything committed on an async primary; what enough replicas hold on a sync
        one) — our floor may rise to it."""
        if epoch != self.epoch or self.state != "following" or not self._fetching \
                or first_tx_id != self._next_fetch_tx_id:
            return []                       # stale, duplicated or out of order: ignored
        self._fetching = False
        self.primary_committed_tx_id = max(self.primary_committed_tx_id, committed_tx_id)
        self.primary_known = True
        if blobs:
            if last_tx_id != first_tx_id + len(blobs) - 1:
                return self.failed(f"primary sent txs {first_tx_id}..{last_tx_id} as "
                                   f"{len(blobs)} blobs")
            self._queue.append(_Batch(first_tx_id, last_tx_id, blobs, sum(map(len, blobs)),
                                      min(acked_tx_id, last_tx_id), last_alh))
            self._next_fetch_tx_id = last_tx_id + 1
        return self._pump()

    def applied(self, last_tx_id: int, alh: bytes) -> list:
        """The batch being applied is durable (applies outlive connections: no epoch here)."""
        batch, self._applying = self._applying, None
        if batch is None or batch.last_tx_id != last_tx_id:
            return []
        self.local_tx_id, self.local_alh = last_tx_id, alh
        self.floor_tx_id = max(self.floor_tx_id, batch.floor_tx_id)
        self.failures_in_a_row = 0          # only durable progress resets the backoff
        out = []
        if self.state == "following":
            out.append(Ack(self.epoch, last_tx_id, alh))
        return out + self._pump()

    def apply_failed(self, error: str, diverged: bool = False) -> list:
        """A batch failed verification or could not be written: nothing of it was applied."""
        self._applying = None
        if diverged:
            return self._stop(error)
        return self.failed(f"apply failed: {error}")

    def failed(self, error: str, diverged: bool = False) -> list:
        """The connection or a request failed; in-flight answers become stale."""
        if diverged:
            return self._stop(error)
        if self.state in TERMINAL_STATES:
            return []
        self.epoch += 1
        self._fetching = False
        self._queue.clear()
        self.failures_in_a_row += 1
        self.retries += 1
        self.state, self.last_error = "retrying", error
        low, high = self._backoff
        # the exponent is capped first: 2 ** 1024 would not even convert to a float
        delay = min(low * 2 ** min(self.failures_in_a_row - 1, 62), high)
        return [Backoff(delay * self._rng.uniform(0.9, 1.0))]

    def loop_detected(self, reason: str) -> list:
        """The primary is (through replicas) a follower of this database: stop for good."""
        if self.state in TERMINAL_STATES:
            return []
        return self._stop(reason, state="loop")

    def stopped(self) -> None:
        if self.state not in ("diverged", "loop"):
            self.state = "stopped"

    # --- internals ---------------------------------------------------------------------------

    def _tip_tx_id(self) -> int:
        return self._applying.last_tx_id if self._applying else self.local_tx_id

    def _follow(self, ack: bool = False) -> list:
        """Follow the primary; after a (re)connect, first tell it what we hold: an ack lost
        with the last connection, or a primary restarted since, must not leave a sync write
        waiting for a tx we have."""
        self.state, self.last_error = "following", None
        out = [Ack(self.epoch, self.local_tx_id, self.local_alh)] if ack and self.local_tx_id else []
        return out + self._pump()

    def _pump(self) -> List[object]:
        out: List[object] = []
        if self._applying is None and self._queue:
            batch = self._applying = self._queue.popleft()
            out.append(Apply(batch.blobs, batch.first_tx_id, batch.last_tx_id, batch.floor_tx_id,
                             batch.last_alh))
        if (self.state == "following" and not self._fetching
                and len(self._queue) < self._queue_batches
                and self.queued_bytes < self._queue_bytes):
            self._fetching = True
            out.append(Fetch(self.epoch, self._next_fetch_tx_id, self._batch_txs))
        return out

    def _stop(self, reason: str, state: str = "diverged") -> list:
        self.epoch += 1
        self._fetching = False
        self._queue.clear()
        self.state, self.last_error = state, reason
        return [Stop(reason)]
