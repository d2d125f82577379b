"""Synchronous replication on a primary: which txs enough replicas durably hold.

Every replica acknowledges (REPLICA_ACK) the last tx it applied durably, with that tx's Alh; the
primary counts an acknowledgement only if the Alh is its own (a diverged replica never counts).
A write to a database with ``sync_acks`` = N is answered only once N distinct replicas hold its
tx; until then the caller waits, and after REPLICATION_SYNC_TIMEOUT_SECONDS it gets an error
saying the tx is durable on the primary but not yet replicated. The table lives in memory (after
a restart the replicas' next acknowledgements rebuild it) and holds at most REPLICAS_TRACKED_MAX
replicas, forgetting the one heard from least recently.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Callable, Dict, List, Tuple

from ..constants import REPLICAS_TRACKED_MAX
from ..errors import ImmucoreError


class ReplicationTimeoutError(ImmucoreError):
    """A sync commit was not acknowledged by enough replicas in time."""


class SyncAcks:
    """The acknowledgements of one primary database and the writes waiting for them."""

    def __init__(self, required_acks: Callable[[], int], replicas_max: int = REPLICAS_TRACKED_MAX):
        self._required = required_acks          # read on every check: acks change at run time
        self._replicas_max = replicas_max
        self._held: Dict[str, Tuple[int, float]] = {}    # replica id -> (tx id, last heard)
        self._waiters: List[tuple] = []                   # heap of (tx id, seq, future)
        self._abandoned = 0            # waiters in the heap that gave up (removed lazily)
        self._seq = itertools.count()
        self._closed_by: BaseException = None             # set by fail_all: nothing waits

    def held_by_quorum(self) -> int:
        """The highest tx that at least ``required`` replicas hold (0 if there are fewer)."""
        required = self._required()
        if required <= 0:
            return 0
        # list(): the metrics thread reads this while the event loop updates it
        held = sorted((tx_id for tx_id, _ in list(self._held.values())), reverse=True)
        return held[required - 1] if len(held) >= required else 0

    def replicas(self) -> Dict[str, int]:
        return {replica: tx_id for replica, (tx_id, _) in list(self._held.items())}

    def acknowledge(self, replica_id: str, tx_id: int) -> int:
        """Record that ``replica_id`` durably holds every tx up to ``tx_id``; returns the quorum."""
        previous = self._held.get(replica_id, (0, 0.0))[0]
        self._held[replica_id] = (max(previous, tx_id), time.monotonic())
        if len(self._held) > self._replicas_max:
            oldest = min(self._held, key=lambda r: self._held[r][1])
            del self._held[oldest]
        self.recheck()
        return self.held_by_quorum()

    def recheck(self):
        """Answer every waiting write the quorum now covers (after an ack or a settings change)."""
        if not self._waiters:
            return
        quorum = self.held_by_quorum() if self._required() > 0 else float("inf")
        while self._waiters and self._waiters[0][0] <= quorum:
            _, _, future = heapq.heappop(self._waiters)
            if future.done():
                self._abandoned = max(self._abandoned - 1, 0)
            else:
                future.set_result(None)

    def holds(self, tx_id: int) -> bool:
        """Whether ``wait(tx_id)`` would return at once (no acks required, or the quorum
        already holds it)."""
        return self._closed_by is None and (
            self._required() <= 0 or self.held_by_quorum() >= tx_id)

    async def wait(self, tx_id: int, timeout_seconds: float):
        if self._closed_by is not None:
            raise self._closed_by
        if self.holds(tx_id):
            return
        required = self._required()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        heapq.heappush(self._waiters, (tx_id, next(self._seq), future))
        # a timer on the future itself: far cheaper per write than wait_for(shield(...))
        timer = loop.call_later(timeout_seconds, _expire, future)
        try:
            await future
        except asyncio.TimeoutError:
            self._abandoned += 1
            if self._abandoned > len(self._waiters) // 2:
                # compact now and then (not per timeout: that would be quadratic), so a long
                # outage cannot grow the heap without bound
                self._waiters = [w for w in self._waiters if not w[2].done()]
                heapq.heapify(self._waiters)
                self._abandoned = 0
            held = sum(1 for t, _ in self._held.values() if t >= tx_id)
            raise ReplicationTimeoutError(
                f"tx {tx_id} is durable on the primary but only {held} of {required} sync "
                f"replicas acknowledged it within {timeout_seconds:g}s") from None
        finally:
            timer.cancel()
            future.cancel()

    def fail_all(self, exc: BaseException):
        """The database is closing or no longer a primary: nobody waits for acknowledgements
        that cannot come, now or later (writes still committing get ``exc`` at once)."""
        self._closed_by = exc
        waiters, self._waiters = self._waiters, []
        self._abandoned = 0
        for _, _, future in waiters:
            if not future.done():
                future.set_exception(exc)


def _expire(future):
    if not future.done():
        future.set_exception(asyncio.TimeoutError())
