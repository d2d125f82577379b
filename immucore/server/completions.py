"""Writer results handed to the event loop in one hop per commit, not one per write.

``asyncio.wrap_future`` schedules one ``call_soon_threadsafe`` (a loop wake-up and a handle) per
future, and chains callbacks both ways. A commit resolves all its writes at once on the
committer thread, so ``Completions`` queues them and wakes the loop once: under 32 connections
of single-entry sets that is one wake-up per ~8 writes.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import threading
from concurrent.futures import Future


class Completions:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._resolved: collections.deque = collections.deque()   # (loop future, writer future)
        self._lock = threading.Lock()
        self._drain_scheduled = False

    def wrap(self, writer_future: Future) -> asyncio.Future:
        """An asyncio future with ``writer_future``'s outcome. Cancelling it cancels the write
        if the writer has not taken it yet (as ``wrap_future`` does)."""
        waiter = self._loop.create_future()
        waiter.add_done_callback(functools.partial(_cancel_with, writer_future))
        writer_future.add_done_callback(functools.partial(self._resolve, waiter))
        return waiter

    def _resolve(self, waiter: asyncio.Future, writer_future: Future):
        """On the committer's thread (or at once, if already done)."""
        self._resolved.append((waiter, writer_future))
        with self._lock:
            if self._drain_scheduled:
                return
            self._drain_scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:          # the loop is closed: nobody is waiting any more
            pass

    def _drain(self):
        with self._lock:
            self._drain_scheduled = False
        resolved = self._resolved
        while resolved:
            waiter, writer_future = resolved.popleft()
            if waiter.done():
                continue
            if writer_future.cancelled():
                waiter.cancel()
                continue
            exc = writer_future.exception()
            if exc is not None:
                waiter.set_exception(exc)
            else:
                waiter.set_result(writer_future.result())


def _cancel_with(writer_future: Future, waiter: asyncio.Future):
    if waiter.cancelled():
        writer_future.cancel()
