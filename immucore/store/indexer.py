"""The asynchronous key index: a thread that follows the log and indexes committed txs.

The log is the source of truth and is written first; the index lives in its own LMDB
environment (``<db>/index``) so that its commits, with their random-page write amplification,
never hold the log's write lock. Rows ``index_key -> u64 tx_id || u16 entry_index || u32
entry_offset`` (``layout.INDEX_ROW``: where the entry starts in its record: a get reads that entry, not the whole tx)
sit in a DUPSORT database (a key's versions sorted by tx), written sorted with ``putmulti``; the
highest indexed tx id is stored in the same LMDB transaction, so after a crash the index resumes
exactly where its last commit ended. Reads that need a tx wait on ``wait_for`` (immudb's
``SinceTx``). Measurements behind this design: docs/storage.md.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable, Optional

from .. import codec
from ..constants import (INDEX_BATCH_ENTRIES_MAX, INDEX_GATHER_SECONDS, INDEX_GATHER_TXS_MAX,
                         INDEX_THREAD_NICE)
from ..errors import DatabaseClosedError, IndexFailedError, IndexTimeoutError
from .layout import (INDEXED_TX_KEY, ROW_FORMAT, ROW_FORMAT_KEY, pack_tx_id, tx_id_of_key, tx_key,
                     unpack_tx_id)

log = logging.getLogger("immucore.indexer")
_RECORD_BYTES_PER_BATCH_MAX = 64 << 20   # bounds the memory of one indexing step
_RETRY_SECONDS_MAX = 5.0
_REWIND_CHUNK_TXS = 1000                 # txs whose keys one discard step forgets


class Indexer:
    # the worker's (WorkerIndexer) view of its process; a thread neither fails for good nor has one
    failed: Optional[str] = None
    restarts = 0
    worker_pid: Optional[int] = None

    def __init__(self, index_env, log_env, *, committed_tx_id: Callable[[], int], name: str):
        self._env = index_env
        self._log_env = log_env
        self._committed_tx_id = committed_tx_id
        self._cond = threading.Condition()
        self._stopping = False
        self._paused = False       # a discard is cutting the log back: index nothing meanwhile
        self._stepping = False     # an indexing step is running (outside the condition's lock)
        self._readers_waiting = 0  # reads blocked in wait_for: index now, do not gather
        self.version = 0           # bumped after every change of the index (burst reads renew)
        self.last_error: Optional[str] = None
        self.indexed_tx_id = prepare_index(index_env, committed_tx_id(), name)
        self._thread = threading.Thread(target=self._run, name=f"immucore-indexer-{name}",
                                        daemon=True)
        self._thread.start()

    def notify(self):
        """Called by the writer after each commit."""
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, tx_id: int, timeout_seconds: float):
        """Block until every tx up to ``tx_id`` is indexed."""
        if self.indexed_tx_id >= tx_id:
            return
        deadline = time.monotonic() + timeout_seconds
        with self._cond:
            self._readers_waiting += 1
            self._cond.notify_all()          # an indexer gathering commits starts its step now
            try:
                wait_indexed_locked(self, tx_id, deadline, timeout_seconds)
            finally:
                self._readers_waiting -= 1

    def close(self):
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()

    def restart(self) -> bool:
        return False            # a thread retries for ever: it never fails for good

    def _run(self):
        failures = 0
        _lower_priority()
        while True:
            with self._cond:
                while not self._stopping and (
                        self._paused or self.indexed_tx_id >= self._committed_tx_id()):
                    self._cond.wait()
                if self._stopping:
                    return
                if not self._gather_locked():
                    continue
                self._stepping = True
            try:
                self._index_step()
                failures = 0
                self.last_error = None
            except Exception as exc:  # noqa: BLE001 - kept visible, retried with backoff
                failures += 1
                self.last_error = str(exc)
                log.error("indexing failed (%d in a row): %s", failures, exc)
                # the whole backoff: readers' and commits' notifications must not cut it short
                # into a retry storm while indexing keeps failing (a full disk, say)
                deadline = time.monotonic() + min(0.01 * 2 ** failures, _RETRY_SECONDS_MAX)
                with self._cond:
                    while not self._stopping and (remaining := deadline - time.monotonic()) > 0:
                        self._cond.wait(remaining)
            finally:
                with self._cond:
                    self._stepping = False
                    self._cond.notify_all()

    def _gather_locked(self) -> bool:
        """Let commits gather for up to INDEX_GATHER_SECONDS (or INDEX_GATHER_TXS_MAX txs) so one
        step indexes them all; a read waiting for the index ends the gathering at once. False
        when a pause or stop came meanwhile."""
        deadline = time.monotonic() + INDEX_GATHER_SECONDS
        while (not self._readers_waiting and not self._stopping and not self._paused
               and self._committed_tx_id() - self.indexed_tx_id < INDEX_GATHER_TXS_MAX):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._cond.wait(remaining)
        return not self._stopping and not self._paused

    def pause_and_rewind(self, tx_id: int):
        """Stop indexing, and forget the keys of every indexed tx after ``tx_id`` (read from
        the log, which still holds them). ``resume`` restarts indexing."""
        with self._cond:
            self._paused = True
            while self._stepping:
                self._cond.wait()
        rewind_index(self._env, self._log_env, tx_id, self)

    def resume(self):
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def _index_step(self):
        last = index_step(self._env, self._log_env, self.indexed_tx_id + 1,
                          self._committed_tx_id())
        with self._cond:
            self.version += 1              # first: a reader that sees the new id must renew
            self.indexed_tx_id = last
            self._cond.notify_all()


def wait_indexed_locked(indexer, tx_id: int, deadline: float, timeout_seconds: float):
    """Wait, holding ``indexer._cond``, until ``indexer`` (a thread's or a worker's) has
    indexed ``tx_id``; IndexTimeoutError with its last error at ``deadline``, IndexFailedError
    at once when the indexer stopped for good."""
    while indexer.indexed_tx_id < tx_id:
        if indexer._stopping:
            raise DatabaseClosedError()
        if indexer.failed is not None:
            raise IndexFailedError(indexer.failed)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            detail = f" (last error: {indexer.last_error})" if indexer.last_error else ""
            raise IndexTimeoutError(
                f"index did not reach tx {tx_id} within {timeout_seconds:g}s; indexed up "
                f"to tx {indexer.indexed_tx_id}{detail}")
        indexer._cond.wait(remaining)


class IndexMovedError(RuntimeError):
    """The index's stored position is not where this step began (another process rewound it):
    the step wrote nothing."""


def read_indexed_tx_id(index_env) -> int:
    with index_env.read() as txn:
        return unpack_tx_id(txn.get(INDEXED_TX_KEY, db=index_env.dbs["meta"]))


def prepare_index(index_env, committed_tx_id: int, name: str) -> int:
    """Check the index before it is followed: rows of an older layout, or an index ahead of its
    log, are dropped (it is rebuilt from the log). Returns the highest indexed tx."""
    meta_db = index_env.dbs["meta"]
    indexed = read_indexed_tx_id(index_env)
    with index_env.read() as txn:
        row_format = txn.get(ROW_FORMAT_KEY, db=meta_db)
    if row_format != ROW_FORMAT and indexed:
        # Rows of an older layout (without entry offsets): the index is derived data, so it
        # is rebuilt from the log rather than read two ways.
        log.warning("index of %s has an older row format; rebuilding it", name)
        index_env.write(_drop_all(index_env))
        indexed = 0
    if row_format != ROW_FORMAT:
        index_env.write(lambda txn: txn.put(ROW_FORMAT_KEY, ROW_FORMAT, db=meta_db))
    if indexed > committed_tx_id:
        # The index claims txs the log does not hold (a log restored from an older copy):
        # it cannot be trusted, so it is rebuilt from the log.
        log.warning("index of %s is ahead of its log (%d > %d); rebuilding it", name,
                    indexed, committed_tx_id)
        index_env.write(_drop_all(index_env))
        indexed = 0
    return indexed


def _drop_all(index_env):
    def write(txn):
        txn.drop(index_env.dbs["keys"], delete=False)
        txn.delete(INDEXED_TX_KEY, db=index_env.dbs["meta"])
    return write


def index_step(index_env, log_env, first: int, last_wanted: int) -> int:
    """Index the committed txs from ``first`` on (up to ``last_wanted``, INDEX_BATCH_ENTRIES_MAX
    entries and _RECORD_BYTES_PER_BATCH_MAX bytes) in one index transaction, which also
    stores the new position; returns the last tx indexed."""
    records, entries, size = [], 0, 0
    with log_env.read() as txn:
        cursor = txn.cursor(log_env.dbs["tx"])
        if cursor.set_key(tx_key(first)):
            for key, record in cursor:
                tx_id = tx_id_of_key(key)
                if tx_id > last_wanted:
                    break
                records.append(record)
                entries += codec.record_entry_count(record)
                size += len(record)
                if entries >= INDEX_BATCH_ENTRIES_MAX or size >= _RECORD_BYTES_PER_BATCH_MAX:
                    break
    if not records:
        raise RuntimeError(f"log has no tx {first} although tx {last_wanted} is committed")
    rows = codec.index_items(first, records)
    last = first + len(records) - 1
    keys_db, meta_db = index_env.dbs["keys"], index_env.dbs["meta"]

    def write(txn):
        stored = txn.get(INDEXED_TX_KEY, db=meta_db)
        if unpack_tx_id(stored) != first - 1:
            raise IndexMovedError(f"the index moved: this step began after tx {first - 1}")
        txn.cursor(keys_db).putmulti(rows, dupdata=True, overwrite=True)
        txn.put(INDEXED_TX_KEY, pack_tx_id(last), db=meta_db)

    index_env.write(write)
    return last


def rewind_index(index_env, log_env, tx_id: int, indexer) -> None:
    """Forget the keys of every indexed tx after ``tx_id`` (read from the log, which still holds
    them), from the top down, a bounded chunk per index transaction; ``indexer``'s position
    (under its ``_cond``, version first) follows each chunk. Indexing must be paused."""
    meta_db, keys_db, tx_db = index_env.dbs["meta"], index_env.dbs["keys"], log_env.dbs["tx"]
    if indexer.indexed_tx_id <= tx_id:
        return
    while indexer.indexed_tx_id > tx_id:
        first = max(tx_id + 1, indexer.indexed_tx_id - _REWIND_CHUNK_TXS + 1)
        last = indexer.indexed_tx_id
        with log_env.read() as txn:
            records = [bytes(txn.get(tx_key(t), db=tx_db)) for t in range(first, last + 1)]
        rows = codec.index_items(first, records)
        remaining = first - 1

        def write(txn):
            for key, value in rows:
                txn.delete(key, value, db=keys_db)
            if remaining:
                txn.put(INDEXED_TX_KEY, pack_tx_id(remaining), db=meta_db)
            else:
                txn.delete(INDEXED_TX_KEY, db=meta_db)

        index_env.write(write)
        with indexer._cond:
            indexer.version += 1          # first: a reader that sees the new id must renew
            indexer.indexed_tx_id = remaining
    # The index skips the meta-page fsync; the log's cut that follows must never survive a
    # power loss that this rewind does not.
    index_env.sync()


def _lower_priority():
    """Linux schedules threads separately: the indexer yields the CPU to the writer and the
    event loop (acknowledgements first; the index catches up when they are idle)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), INDEX_THREAD_NICE)
    except (AttributeError, OSError):
        pass



