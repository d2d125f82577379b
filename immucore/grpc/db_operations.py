"""immudb's database operations that immucore answers in its own way: ``TxScan``, ``Count`` and
``CountAll``, and ``FlushIndex``/``CompactIndex``, which have nothing to do on immucore's LMDB
index (docs/grpc.md says what each does here).

A mixin of ImmuService (service.py), behind the same checks as every call (``_db``'s permit,
checked again after each wait).
"""
from __future__ import annotations

from ..constants import SCAN_RESULTS_MAX
from ..errors import ImmucoreError
from . import convert, schema
from .streaming import served


class DbOperations:
    @served
    async def TxScan(self, request, context):
        """Up to ``limit`` txs (immudb's maximum result size when 0) from ``initialTx`` up, or
        down with ``desc``. Entries come as digests, as in TxById (``entriesSpec`` is not
        taken). ``sinceTx`` and ``noWait`` are accepted and change nothing: immudb waits for its
        index there, and immucore reads txs from its log, which needs no index."""
        db, permit = self._db(context, "read")
        if request.limit > SCAN_RESULTS_MAX:
            raise ImmucoreError(            # immudb's ErrResultSizeLimitExceeded, word for word
                f"result size limit exceeded: the specified limit ({request.limit}) is larger "
                f"than the maximum allowed one ({SCAN_RESULTS_MAX})")
        limit = request.limit or SCAN_RESULTS_MAX

        def scan():
            last = db.current_state().tx_id
            first = request.initialTx or (last if request.desc else 1)
            ids = (range(min(first, last), 0, -1) if request.desc
                   else range(max(first, 1), last + 1))
            return [db.tx_by_id(tx_id) for tx_id in ids[:limit]]

        txs = await self._read(scan)
        permit.check()
        return schema.TxList(txs=[convert.tx(t) for t in txs])

    async def _count(self, context, prefix: bytes) -> "schema.EntryCount":
        """The live keys under ``prefix``, counted a scan's page at a time (bounded memory)."""
        db, permit = self._db(context, "read")

        def count():
            total, seek = 0, b""
            while True:
                page = db.scan(prefix=prefix, seek_key=seek, limit=SCAN_RESULTS_MAX)
                fresh = [e for e in page if e.key != seek] if seek else page
                total += len(fresh)
                if len(page) < SCAN_RESULTS_MAX or not fresh:
                    return total
                seek = page[-1].key

        total = await self._read(count)        # a long walk: never on the event loop
        permit.check()
        return schema.EntryCount(count=total)

    @served
    async def Count(self, request, context):
        return await self._count(context, request.prefix)

    @served
    async def CountAll(self, request, context):
        return await self._count(context, b"")

    @served
    async def FlushIndex(self, request, context):
        """immucore's key index is LMDB, committed by its worker batch by batch: there is no
        in-memory index to flush and no intermediate data to clean up. Admin, as in immudb."""
        db, _ = self._db(context, "admin")
        return schema.FlushIndexResponse(database=db.name)

    @served
    async def CompactIndex(self, request, context):
        """LMDB reuses the pages it frees: the index never needs a compaction. Admin, as in
        immudb."""
        self._db(context, "admin")
        return schema.Empty()
