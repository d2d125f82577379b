"""The one thread that writes the transaction log: group commit of many txs per LMDB transaction.

Callers (any thread, or the event loop through ``asyncio.wrap_future``) submit work and get a
``concurrent.futures.Future``. The writer takes every request waiting in its queue (up to
COMMIT_BATCH_TXS_MAX / COMMIT_BATCH_BYTES_MAX), seals them into chained transactions with the
codec, appends them with one LMDB write transaction and one fsync, then resolves the futures. A
future resolves only after the commit is durable, so "acknowledged" means "on disk". The chain
state (last id, last Alh, AHT peaks) is owned by this thread and only replaced after a commit.
"""
from __future__ import annotations

import logging
import queue
import struct
import threading
import time
from concurrent.futures import Future
from typing import Callable, List, Optional

from .. import codec
from ..constants import COMMIT_BATCH_BYTES_MAX, COMMIT_BATCH_TXS_MAX, WRITE_QUEUE_TXS_MAX
from ..errors import DatabaseClosedError, IllegalArgumentsError, ReplicaDivergedError

log = logging.getLogger("immucore.writer")
_U64 = struct.Struct(">Q")
_SET, _REPLICATE, _STOP = "set", "replicate", "stop"


class ChainState:
    """What the next tx links to; replaced as a whole so readers never see half of it."""
    __slots__ = ("tx_id", "alh", "peaks")

    def __init__(self, tx_id: int, alh: bytes, peaks: list):
        self.tx_id, self.alh, self.peaks = tx_id, alh, peaks


class _Request:
    __slots__ = ("kind", "payload", "future", "size_bytes", "tx_count", "present")

    def __init__(self, kind, payload, size_bytes=0, tx_count=1):
        self.kind, self.payload, self.future = kind, payload, Future()
        self.size_bytes, self.tx_count = size_bytes, tx_count
        self.present = []      # replicate: headers of txs the log already held (no-ops)


class Writer:
    def __init__(self, log_env, state: ChainState, *, header_version: int, limits: tuple,
                 read_alh: Callable[[int], bytes], on_commit: Callable[[ChainState], None],
                 name: str):
        self._env = log_env
        self._tx_db = log_env.dbs["tx"]
        self._aht_db = log_env.dbs["aht"]
        self.state = state
        self._header_version = header_version
        self._limits = limits
        self._read_alh = read_alh
        self._on_commit = on_commit
        self._queue: "queue.Queue[_Request]" = queue.Queue(maxsize=WRITE_QUEUE_TXS_MAX)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"immucore-writer-{name}",
                                        daemon=True)
        self._thread.start()

    # --- API used by Database (any thread) ----------------------------------------------------

    def submit_set(self, entries: list, size_bytes: int) -> Future:
        """One tx: ``entries`` is a list of (key, value, kv_metadata_bytes)."""
        return self._submit(_Request(_SET, entries, size_bytes))

    def submit_replicate(self, blobs: list) -> Future:
        return self._submit(_Request(_REPLICATE, blobs, sum(map(len, blobs)), len(blobs)))

    def close(self):
        if self._closed:
            return
        self._closed = True
        self._queue.put(_Request(_STOP, None))
        self._thread.join()

    def _submit(self, request: _Request) -> Future:
        if self._closed:
            raise DatabaseClosedError()
        self._queue.put(request)
        return request.future

    # --- the writer thread ------------------------------------------------------------------

    def _run(self):
        pending: Optional[_Request] = None
        while True:
            first = pending or self._queue.get()
            pending = None
            if first.kind == _STOP:
                self._fail_queued()
                return
            batch: List[_Request] = [first]
            txs, size = first.tx_count, first.size_bytes
            # Group commit: everything already waiting of the same kind joins this batch.
            while txs < COMMIT_BATCH_TXS_MAX and size < COMMIT_BATCH_BYTES_MAX:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt.kind != first.kind:
                    pending = nxt
                    break
                batch.append(nxt)
                txs += nxt.tx_count
                size += nxt.size_bytes
            if first.kind == _SET:
                self._commit_sets(batch)
            else:
                for request in batch:     # each replicate request is all-or-nothing on its own
                    self._commit_replicate(request)

    def _fail_queued(self):
        while True:
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                return
            if request.kind != _STOP:
                request.future.set_exception(DatabaseClosedError())

    def _commit_sets(self, batch: List[_Request]):
        state = self.state
        peaks = list(state.peaks)
        try:
            sealed = codec.build_txs(self._header_version, state.tx_id + 1, state.alh, peaks,
                                     int(time.time()), [r.payload for r in batch], self._limits)
        except IllegalArgumentsError as exc:
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            # One bad request must not fail its neighbours: find the bad ones by sealing each on
            # a scratch chain, fail them, and commit the rest together (still one fsync).
            good = []
            for request in batch:
                try:
                    codec.build_txs(self._header_version, 1, state.alh, [], 0,
                                    [request.payload], self._limits)
                    good.append(request)
                except IllegalArgumentsError as bad:
                    request.future.set_exception(bad)
            if good:
                self._commit_sets(good)
            return
        self._append(batch, sealed, peaks)

    def _commit_replicate(self, request: _Request):
        try:
            request.present, blobs = self._skip_present(request.payload)
            peaks = list(self.state.peaks)
            sealed = codec.replicate_blobs(blobs, self.state.tx_id + 1, self.state.alh, peaks,
                                           self._limits)
        except Exception as exc:       # noqa: BLE001 - reported to the caller, nothing written
            request.future.set_exception(exc)
            return
        self._append([request], sealed, peaks)

    def _skip_present(self, blobs: list) -> list:
        """Split off blobs of txs this log already holds; a different Alh there is divergence."""
        last = self.state.tx_id
        start, present = 0, []
        for blob in blobs:
            if len(blob) < 12:
                raise IllegalArgumentsError("export blob too short")
            tx_id = _U64.unpack_from(blob, 4)[0]
            if tx_id == 0 or tx_id > last:
                break
            header, blob_alh = codec.verify_blob(blob, self._limits)
            if blob_alh != self._read_alh(tx_id):
                raise ReplicaDivergedError(
                    f"replica diverged from primary: tx {tx_id} is already committed here "
                    f"with a different Alh")
            present.append(header)
            start += 1
        return present, blobs[start:]

    def _append(self, batch: List[_Request], sealed: list, peaks: list):
        """Write sealed txs in one LMDB transaction, then resolve the batch's futures."""
        if sealed:
            tx_rows = [(_U64.pack(header[0]), record) for header, _, record, _ in sealed]
            aht_rows = [(_U64.pack(header[0]), nodes) for header, _, _, nodes in sealed]

            def write(txn):
                added = txn.cursor(self._tx_db).putmulti(tx_rows, append=True)[1]
                added += txn.cursor(self._aht_db).putmulti(aht_rows, append=True)[1]
                if added != 2 * len(sealed):   # append=True refuses out-of-order ids
                    raise RuntimeError(f"log append wrote {added} of {2 * len(sealed)} rows")

            try:
                self._env.write(write)
            except Exception as exc:       # noqa: BLE001 - disk full, I/O error: nothing acked
                log.error("commit of %d txs failed: %s", len(sealed), exc)
                for request in batch:
                    request.future.set_exception(exc)
                return
            last_header, last_alh = sealed[-1][0], sealed[-1][1]
            self.state = ChainState(last_header[0], last_alh, peaks)
            self._on_commit(self.state)
        # Hand each caller its own headers: a set gets one, a replicate call one per new tx.
        position = 0
        for request in batch:
            count = len(sealed) if request.kind == _REPLICATE else 1
            headers = request.present + [item[0] for item in sealed[position:position + count]]
            position += count
            request.future.set_result(headers)

