"""``immuadmin replication push``: the external replicator of immudb's guide, as a command.

It copies every committed transaction a replica database lacks from a primary database, over two
connections: EXPORT_TXS batches from the primary (``--from-*`` flags) and REPLICATE_TX batches
into the replica of the logged-in session (the target must be a replica without a replicator).
Each batch is verified by the replica before it is applied; the next batch is fetched while the
previous one is applied. ``--follow`` keeps going as new commits arrive (long poll).

``--database X`` pushes into X through the saved session, which the node keeps on one database
for all its connections: the push switches it to X and back to the session's own database when
it ends (also on Ctrl-C), so the next command still runs where the login put it.
"""
from __future__ import annotations

import asyncio
import sys
import time

from ..client import AsyncClient
from ..constants import REPLICATION_BATCH_TXS, REPLICATION_WAIT_MS
from .common import connect_failure, session_client


class Progress:
    """One line, rewritten in place on a terminal; a line every few seconds otherwise."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.tty = stream.isatty()
        self.started = time.monotonic()
        self._last = 0.0

    def show(self, done: int, target: int, final: bool = False):
        now = time.monotonic()
        if not final and now - self._last < (0.2 if self.tty else 5.0):
            return
        self._last = now
        elapsed = max(now - self.started, 1e-9)
        width = 30
        filled = width if target <= 0 else min(width, width * done // max(target, 1))
        bar = "#" * filled + "-" * (width - filled)
        line = (f"[{bar}] {done:,}/{max(target, done):,} txs  {done / elapsed:,.0f} tx/s")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


async def push(source: dict, target: AsyncClient, follow: bool = False,
               progress: Progress = None) -> int:
    """Copy what ``target``'s database lacks from ``source`` (host, port, user, password,
    database); returns how many txs were applied."""
    primary = AsyncClient(source["host"], source["port"],
                          timeout=REPLICATION_WAIT_MS / 1000 + 30)
    try:
        try:
            await primary.login(source["user"], source["password"], source["database"])
        except OSError as exc:
            raise connect_failure(source["host"], source["port"], exc, "the primary") from None
        # an empty push first: the node refuses a target that follows a primary of its own
        # (or is no replica) before anything is fetched, even when there is nothing to copy
        await target.replicate_txs([])
        start_id = (await target.current_state()).tx_id + 1
        copied = 0

        async def fetch(first):
            wait_ms = REPLICATION_WAIT_MS if follow else 0
            return await primary.export_batch(first, REPLICATION_BATCH_TXS, wait_ms=wait_ms)

        pending = asyncio.ensure_future(fetch(start_id))
        try:
            while True:
                answer = await pending
                blobs, committed = answer["blobs"], answer["committed_tx_id"]
                if not blobs:
                    if not follow:
                        break
                    pending = asyncio.ensure_future(fetch(start_id + copied))
                    continue
                pending = asyncio.ensure_future(fetch(start_id + copied + len(blobs)))
                # the primary's Alh of the last tx: nothing else vouches for it on the way
                await target.replicate_txs(blobs, last_alh=answer.get("last_alh"))
                copied += len(blobs)
                if progress:
                    progress.show(start_id - 1 + copied, committed)
        finally:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        if progress:
            progress.show(start_id - 1 + copied, start_id - 1 + copied, final=True)
        return copied
    finally:
        await primary.close()


async def push_into_session(session, saved: dict, database, source: dict, *, follow: bool,
                            progress: Progress = None) -> int:
    """``push`` into the replica of the saved CLI session (``database``: another one of the
    node), leaving the session on the database it had."""
    doing = f"pushing from {source['host']}:{source['port']} into"
    async with session_client(session, saved, database, doing=doing) as target:
        return await push(source, target, follow=follow, progress=progress)
