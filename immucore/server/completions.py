"""Writer results handed to the event loop in one hop per commit, not one per write.

``asyncio.wrap_future`` schedules one ``call_soon_threadsafe`` (a loop wake-up and a handle) per
future, and chains callbacks both ways. A commit resolves all its writes at once on the
committer thread, so ``Completions`` queues them and wakes the loop once: under 32 connections
of single-entry sets that is one wake-up per ~8 writes.

Two forms: ``wrap`` gives an asyncio future of a writer's future (for handlers that await), and
``on_loop`` gives the writer an ``on_done(result, exception)`` callback that runs a function on
the loop (a SET, answered from its commit with no future at all).
"""
from __future__ import annotations

import asyncio
import collections
import functools
import logging
import threading
from concurrent.futures import Future

log = logging.getLogger("immucore.server")


class Completions:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._resolved: collections.deque = collections.deque()   # (deliver, its arguments)
        self._lock = threading.Lock()
        self._drain_scheduled = False

    def wrap(self, writer_future: Future) -> asyncio.Future:
        """An asyncio future with ``writer_future``'s outcome. Cancelling it cancels the write
        if the writer has not taken it yet (as ``wrap_future`` does)."""
        waiter = self._loop.create_future()
        waiter.add_done_callback(functools.partial(_cancel_with, writer_future))
        writer_future.add_done_callback(functools.partial(self._resolve, settle, waiter))
        return waiter

    def on_loop(self, deliver):
        """An ``on_done(result, exception)`` for the writer: ``deliver(result, exception)``
        then runs on the loop."""
        return functools.partial(self._resolve, deliver)

    def _resolve(self, deliver, *outcome):
        """On a writer thread (or on the loop, for a future already done): queue the delivery
        and wake the loop, once for everything queued until it drains."""
        self._resolved.append((deliver, outcome))
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
            deliver, outcome = resolved.popleft()
            try:
                deliver(*outcome)
            except Exception:  # noqa: BLE001 - one failed delivery must not strand the others
                log.exception("delivering a write's outcome failed")


def settle(waiter: asyncio.Future, source) -> None:
    """Give ``waiter`` the outcome of the finished ``source`` (a writer's or an asyncio future);
    a waiter already done (cancelled) keeps its own."""
    if waiter.done():
        return
    if source.cancelled():
        waiter.cancel()
        return
    exc = source.exception()
    if exc is not None:
        waiter.set_exception(exc)
    else:
        waiter.set_result(source.result())


def _cancel_with(writer_future: Future, waiter: asyncio.Future):
    if waiter.cancelled():
        writer_future.cancel()
