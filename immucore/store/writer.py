"""The writer: the only code that appends to the transaction log, as a two-stage pipeline.

Callers (any thread, or the event loop through ``server/completions.py``) submit work and get a
``concurrent.futures.Future``, or pass an ``on_done`` callback instead (the node's SETs). Stage 1,
the *sealer* thread, takes every request waiting in the queue (group commit, bounded by
COMMIT_BATCH_TXS_MAX / COMMIT_BATCH_BYTES_MAX) and seals it with the codec into chained
transactions (hashing runs in C without the GIL). Stage 2, the *committer* thread, appends every
sealed batch waiting for it with one LMDB write transaction and one fsync, then settles the
requests. While one commit is fsynced the next batches are hashed, so the two costs overlap
instead of adding up, and batches sealed during a commit share the next one. At most
COMMIT_PIPELINE_BATCHES sealed batches wait between the stages.

A request is settled (its future resolved, its callback called) only after its commit is
durable: "acknowledged" means "on disk". If a commit fails, every batch sealed after it (it
chains onto the failed one) fails too, and the sealer restarts from the last committed state: a
*generation* number tells stale batches apart.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable, List, Optional

from .. import codec
from ..constants import (COMMIT_BATCH_BYTES_MAX, COMMIT_BATCH_TXS_MAX, COMMIT_PIPELINE_BATCHES,
                         WRITE_QUEUE_TXS_MAX)
from ..errors import (CorruptedDataError, DatabaseClosedError, IllegalArgumentsError,
                      ImmucoreError,
                      ReadOnlyReplicaError, ReplicaDivergedError)
from .layout import DISCARD_FLOOR_KEY, pack_tx_id, tx_key, unpack_tx_id

log = logging.getLogger("immucore.writer")
_SET, _REPLICATE, _ROLE, _TRUNCATE, _STOP = "set", "replicate", "role", "truncate", "stop"


class WriterBusyError(ImmucoreError):
    """The write queue is full; the caller should retry later."""


class CommitAbortedError(ImmucoreError):
    """An earlier commit this tx was chained onto failed; nothing of it was written."""


class ChainState:
    """What the next tx links to; replaced as a whole so readers never see half of it."""
    __slots__ = ("tx_id", "alh", "peaks")

    def __init__(self, tx_id: int, alh: bytes, peaks: list):
        self.tx_id, self.alh, self.peaks = tx_id, alh, peaks


class ReplicatedHeaders(list):
    """A replicate request's outcome: the header tuple of every tx of its batch (those the log
    already held first) and ``last_alh``, the last one's Alh as the sealer computed (or, for a
    tx the log held, verified) it; None for an empty batch. The replicator acknowledges it
    without reading it back from LMDB."""
    __slots__ = ("last_alh",)


class _Request:
    """One submitted write. Its outcome goes to its ``future``, or, for a caller that passed
    ``on_done`` (the node's SET path), to ``on_done(result, exception)`` on the thread that
    settles it: no future at all, which saves the stdlib future's Condition and its locking
    (about 5 µs of the loop's and the writer threads' time per single-entry SET)."""
    __slots__ = ("kind", "payload", "future", "on_done", "size_bytes", "tx_count", "present",
                 "present_alh", "floor", "last_alh")

    def __init__(self, kind, payload, size_bytes=0, tx_count=1, floor=0, last_alh=None,
                 on_done=None):
        self.kind, self.payload = kind, payload
        self.future = Future() if on_done is None else None
        self.on_done = on_done
        self.size_bytes, self.tx_count = size_bytes, tx_count
        self.present = []      # replicate: headers of txs the log already held (no-ops)
        self.present_alh = None    # replicate: the last of those txs' Alh
        self.floor = floor     # replicate: the discard floor stored with the batch
        self.last_alh = last_alh   # replicate: the Alh the primary says the last tx has

    def start(self) -> bool:
        """False for a request its caller cancelled meanwhile (marking a future running makes
        any later cancel() a no-op, so its outcome can always be set)."""
        return self.future is None or self.future.set_running_or_notify_cancel()

    def succeed(self, result) -> None:
        if self.future is not None:
            self.future.set_result(result)
        else:
            self._call_back(result, None)

    def fail(self, exc: BaseException) -> None:
        if self.future is not None:
            self.future.set_exception(exc)
        else:
            self._call_back(None, exc)

    def _call_back(self, result, exc) -> None:
        try:
            self.on_done(result, exc)
        except Exception:  # noqa: BLE001 - a caller's callback must not stop the writer
            log.exception("a write's on_done callback failed")


class _Sealed:
    """A batch between the stages: its requests, their sealed txs and the state after them."""
    __slots__ = ("requests", "sealed", "state", "generation")

    def __init__(self, requests, sealed, state, generation):
        self.requests, self.sealed, self.state, self.generation = (requests, sealed, state,
                                                                   generation)


class Writer:
    def __init__(self, log_env, state: ChainState, *, header_version: int, limits: tuple,
                 read_alh: Callable[[int], bytes], on_commit: Callable[[ChainState], None],
                 name: str, read_only: bool = False):
        self._env = log_env
        self._tx_db = log_env.dbs["tx"]
        self._aht_db = log_env.dbs["aht"]
        self._meta_db = log_env.dbs["meta"]
        with log_env.read() as txn:
            self.floor_tx_id = unpack_tx_id(txn.get(DISCARD_FLOOR_KEY, db=self._meta_db))
        self.state = state                 # committed: what readers see
        self._sealed_state = state         # sealer's tip: committed + batches in the pipeline
        self._sealer_generation = 0
        self._generation = 0               # bumped by the committer when a commit fails
        self._header_version = header_version
        self._limits = limits
        self._read_alh = read_alh
        self._on_commit = on_commit
        # A SimpleQueue (C, no Python-level Condition per put) bounded by ``_queued``, counted
        # under ``_close_lock``; submitters wait on ``_space`` only when it is full.
        self._queue: "queue.SimpleQueue[_Request]" = queue.SimpleQueue()
        self._queued = 0
        self._waiting_for_space = 0
        self._sealed: "queue.Queue[Optional[_Sealed]]" = queue.Queue(
            maxsize=COMMIT_PIPELINE_BATCHES)
        self._closed = False
        self._close_lock = threading.Lock()   # "still open?", the count and the put together
        self._space = threading.Condition(self._close_lock)
        self._read_only = read_only           # sealer's view of the role, ordered with writes
        self._sealer = threading.Thread(target=self._run_sealer, name=f"immucore-sealer-{name}",
                                        daemon=True)
        self._committer = threading.Thread(target=self._run_committer,
                                           name=f"immucore-committer-{name}", daemon=True)
        self._sealer.start()
        self._committer.start()

    # --- API used by Database (any thread) ----------------------------------------------------

    def submit_set(self, entries, size_bytes: int, block: bool = True,
                   on_done=None) -> Optional[Future]:
        """One tx: ``entries`` is a list of (key, value, kv_metadata_bytes) or a FlatTx. With
        ``block=False`` a full queue raises WriterBusyError instead of waiting (the event loop
        must not wait). With ``on_done`` the outcome goes to ``on_done(headers, exception)`` on
        a writer thread, and no future is returned."""
        return self._submit(_Request(_SET, entries, size_bytes, on_done=on_done), block)

    def submit_replicate(self, blobs: list, size_bytes: int, floor_tx_id: int = 0,
                         last_alh: Optional[bytes] = None) -> Future:
        """Verify and append exported txs, all or nothing; ``size_bytes`` is their total (the
        caller summed it for its own limit check: counted once)."""
        return self._submit(_Request(_REPLICATE, blobs, size_bytes, len(blobs),
                                     floor=floor_tx_id, last_alh=last_alh))

    def truncate(self, after_tx_id: int, load_state: Callable[[], ChainState]) -> Future:
        """Delete every tx after ``after_tx_id`` from the log (a replica discarding
        precommitted txs), in order with the writes; ``load_state`` re-reads the new tail."""
        return self._submit(_Request(_TRUNCATE, (after_tx_id, load_state), tx_count=0))

    def set_read_only(self, read_only: bool) -> None:
        """Change the role in order with the writes: sets queued before it still commit, sets
        queued after it on a replica fail with ReadOnlyReplicaError."""
        self._submit(_Request(_ROLE, bool(read_only), tx_count=0)).result()

    def close(self):
        """Finish everything queued, then stop both threads."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._queued += 1
            self._queue.put(_Request(_STOP, None))
            self._space.notify_all()          # submitters waiting for room: closed now
        self._sealer.join()
        self._committer.join()

    def _submit(self, request: _Request, block: bool = True) -> Optional[Future]:
        with self._close_lock:
            while True:
                if self._closed:
                    raise DatabaseClosedError()
                if self._queued < WRITE_QUEUE_TXS_MAX:
                    break
                if not block:
                    raise WriterBusyError(
                        f"write queue full ({WRITE_QUEUE_TXS_MAX} requests waiting); "
                        "retry later")
                self._waiting_for_space += 1
                try:
                    self._space.wait()
                finally:
                    self._waiting_for_space -= 1
            self._queued += 1
            self._queue.put(request)
        return request.future

    def _take(self, block: bool) -> _Request:
        """The next queued request (``queue.Empty`` when none and not ``block``)."""
        request = self._queue.get() if block else self._queue.get_nowait()
        with self._close_lock:
            self._queued -= 1
            if self._waiting_for_space:
                self._space.notify()
        return request

    # --- stage 1: sealing -------------------------------------------------------------------

    def _run_sealer(self):
        pending: Optional[_Request] = None
        while True:
            first = pending or self._next_request(block=True)
            pending = None
            if first is None:
                continue
            if first.kind == _STOP:
                self._fail_queued()
                self._sealed.put(None)
                return
            if first.kind == _ROLE:
                was_read_only, self._read_only = self._read_only, first.payload
                if first.payload and not was_read_only:
                    # becoming a replica: every tx committed so far was acknowledged to this
                    # node's clients, so the committer raises the discard floor to them all
                    self._sealed.put(_Sealed([first], [], None, self._sealer_generation))
                else:
                    first.succeed([])
                continue
            if first.kind == _TRUNCATE:
                # the committer truncates after every batch before it; the chain then restarts
                # from the new tail, so the sealer waits for it
                self._sealed.put(_Sealed([first], [], None, self._sealer_generation))
                try:
                    first.future.exception()
                finally:
                    self._sealed_state = self.state
                continue
            batch: List[_Request] = [first]
            txs, size = first.tx_count, first.size_bytes
            # Group commit: everything already waiting of the same kind joins this batch.
            while txs < COMMIT_BATCH_TXS_MAX and size < COMMIT_BATCH_BYTES_MAX:
                try:
                    nxt = self._next_request(block=False)
                except queue.Empty:
                    break
                if nxt is None:
                    continue
                if nxt.kind != first.kind:
                    pending = nxt
                    break
                batch.append(nxt)
                txs += nxt.tx_count
                size += nxt.size_bytes
            if self._sealer_generation != self._generation:
                # a commit failed: restart the chain from what is really on disk
                self._sealer_generation = self._generation
                self._sealed_state = self.state
            if first.kind == _SET:
                if self._read_only:
                    for request in batch:
                        request.fail(ReadOnlyReplicaError())
                    continue
                self._seal_sets(batch)
            else:
                for request in batch:     # each replicate request is all-or-nothing on its own
                    self._seal_replicate(request)

    def _next_request(self, block: bool) -> Optional[_Request]:
        """The next request, or None for one its caller cancelled meanwhile."""
        request = self._take(block)
        if request.kind != _STOP and not request.start():
            return None
        return request

    def _fail_queued(self):
        while True:
            try:
                request = self._take(block=False)
            except queue.Empty:
                return
            if request.kind != _STOP and request.start():
                request.fail(DatabaseClosedError())

    def _seal_sets(self, batch: List[_Request]):
        tip = self._sealed_state
        peaks = list(tip.peaks)
        try:
            sealed = codec.build_txs(self._header_version, tip.tx_id + 1, tip.alh, peaks,
                                     int(time.time()), [r.payload for r in batch], self._limits)
        except IllegalArgumentsError as exc:
            if len(batch) == 1:
                batch[0].fail(exc)
                return
            # One bad request must not fail its neighbours: find the bad ones by sealing each on
            # a scratch chain, fail them, and seal the rest together (still one fsync).
            good = []
            for request in batch:
                try:
                    codec.build_txs(self._header_version, 1, tip.alh, [], 0,
                                    [request.payload], self._limits)
                    good.append(request)
                except IllegalArgumentsError as bad:
                    request.fail(bad)
            if good:
                self._seal_sets(good)
            return
        self._hand_over(batch, sealed, peaks)

    def _seal_replicate(self, request: _Request):
        try:
            request.present, request.present_alh, blobs = self._skip_present(request.payload)
            tip = self._sealed_state
            peaks = list(tip.peaks)
            sealed = codec.replicate_blobs(blobs, tip.tx_id + 1, tip.alh, peaks, self._limits)
            # Within a batch each tx's Alh is vouched for by the next one's prevAlh; the last
            # one's only by the primary's word, checked here before anything is written.
            if request.last_alh is not None and sealed and sealed[-1][1] != request.last_alh:
                raise CorruptedDataError(
                    f"tx {sealed[-1][0][0]} does not have the Alh its primary announced: "
                    "altered in transit")
        except Exception as exc:       # noqa: BLE001 - reported to the caller, nothing written
            request.fail(exc)
            return
        self._hand_over([request], sealed, peaks)

    def _skip_present(self, blobs: list):
        """Split off blobs of txs this log already holds; a different Alh there is divergence."""
        committed, tip = self.state.tx_id, self._sealed_state.tx_id
        start, present, alh = 0, [], None
        for blob in blobs:
            tx_id = codec.blob_tx_id(blob)
            if tx_id == 0 or tx_id > tip:
                break
            if tx_id > committed:
                raise IllegalArgumentsError(
                    f"tx {tx_id} is being committed by an earlier request; retry after it")
            header, blob_alh = codec.verify_blob(blob, self._limits)
            if blob_alh != self._read_alh(tx_id):
                raise ReplicaDivergedError(
                    f"replica diverged from primary: tx {tx_id} is already committed here "
                    f"with a different Alh")
            present.append(header)
            alh = blob_alh
            start += 1
        return present, alh, blobs[start:]

    def _hand_over(self, batch: List[_Request], sealed: list, peaks: list):
        if sealed:
            last_header, last_alh = sealed[-1][0], sealed[-1][1]
            self._sealed_state = ChainState(last_header[0], last_alh, peaks)
        self._sealed.put(_Sealed(batch, sealed, self._sealed_state, self._sealer_generation))

    # --- stage 2: committing ----------------------------------------------------------------

    def _run_committer(self):
        while True:
            items = [self._sealed.get()]
            # Every batch sealed while the last commit ran joins this one: one fsync for all.
            while items[-1] is not None:
                try:
                    items.append(self._sealed.get_nowait())
                except queue.Empty:
                    break
            stopping = items[-1] is None
            group = []
            for item in items:
                if item is None:
                    continue
                if item.generation != self._generation:
                    for request in item.requests:
                        request.fail(CommitAbortedError(
                            "commit aborted: an earlier commit this tx was chained onto failed"))
                elif item.requests[0].kind in (_TRUNCATE, _ROLE):
                    if group:
                        self._commit(group)
                        group = []
                    if item.requests[0].kind == _TRUNCATE:
                        self._truncate(item.requests[0])
                    else:
                        self._raise_floor_to_tip(item.requests[0])
                else:
                    group.append(item)
            if group:
                self._commit(group)
            if stopping:
                return

    def _raise_floor_to_tip(self, request: _Request):
        tip = self.state.tx_id
        try:
            if tip > self.floor_tx_id:
                self._env.write(lambda txn: txn.put(DISCARD_FLOOR_KEY, pack_tx_id(tip),
                                                            db=self._meta_db))
                self.floor_tx_id = tip
        except Exception as exc:  # noqa: BLE001 - reported to the caller
            request.fail(exc)
            return
        request.succeed([])

    def _truncate(self, request: _Request):
        after_tx_id, load_state = request.payload
        if after_tx_id < self.floor_tx_id:     # checked again here, in order with every write
            request.fail(IllegalArgumentsError(
                f"only precommitted transactions can be discarded: tx {after_tx_id} is below "
                f"the discard floor {self.floor_tx_id}"))
            return

        def write(txn):
            for db in (self._tx_db, self._aht_db):
                cursor = txn.cursor(db)
                doomed = ([key for key, _ in cursor]
                          if cursor.set_range(tx_key(after_tx_id + 1)) else [])
                for key in doomed:
                    txn.delete(key, db=db)

        try:
            self._env.write(write)
            self.state = load_state()
        except Exception as exc:  # noqa: BLE001 - reported to the caller
            request.fail(exc)
            return
        request.succeed([])

    def _commit(self, items: List[_Sealed]):
        """Write the items' sealed txs in one LMDB transaction, then settle their requests."""
        sealed = [tx for item in items for tx in item.sealed]
        if sealed:
            tx_rows = [(tx_key(header[0]), record) for header, _, record, _ in sealed]
            aht_rows = [(tx_key(header[0]), nodes) for header, _, _, nodes in sealed]

            floor = max((r.floor for item in items for r in item.requests), default=0)
            floor = floor if floor > self.floor_tx_id else 0

            def write(txn):
                added = txn.cursor(self._tx_db).putmulti(tx_rows, append=True)[1]
                added += txn.cursor(self._aht_db).putmulti(aht_rows, append=True)[1]
                if added != 2 * len(sealed):   # append=True refuses out-of-order ids
                    raise RuntimeError(f"log append wrote {added} of {2 * len(sealed)} rows")
                if floor:
                    txn.put(DISCARD_FLOOR_KEY, pack_tx_id(floor), db=self._meta_db)

            try:
                self._env.write(write)
            except Exception as exc:       # noqa: BLE001 - disk full, I/O error: nothing acked
                log.error("commit of %d txs failed: %s", len(sealed), exc)
                self._generation += 1      # batches sealed after these are now stale
                for item in items:
                    for request in item.requests:
                        request.fail(exc)
                return
            self.state = items[-1].state
            self.floor_tx_id = max(self.floor_tx_id, floor)
            self._on_commit(self.state)
        # Hand each caller its own headers: a set gets one, a replicate call one per new tx.
        for item in items:
            position = 0
            for request in item.requests:
                if request.kind == _REPLICATE:     # a replicate request is its item's only one
                    headers = ReplicatedHeaders(request.present)
                    headers.extend(s[0] for s in item.sealed)
                    headers.last_alh = (item.sealed[-1][1] if item.sealed
                                        else request.present_alh)
                    request.succeed(headers)
                    continue
                request.succeed([s[0] for s in item.sealed[position:position + 1]])
                position += 1
