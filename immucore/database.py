"""``Database``: one immudb-compatible database in a folder, and ``open_database``.

Layout of the folder (details in docs/storage.md, every key and value in store/layout.py):
  log/    LMDB environment: ``tx`` (u64 id -> record), ``aht`` (u64 id -> AHT nodes), ``meta``
  index/  LMDB environment: ``keys`` (key -> versions, DUPSORT), ``meta`` (indexed tx id)
Writes go through the writer thread (group commit); the key index follows asynchronously.
This module is the API: argument checks, roles and lifecycle. The log is read by
store/log.py, the key index by store/keys.py, proofs and the audit are store/proofs.py's.
"""
from __future__ import annotations

import operator
import os
from typing import Iterable, List, Optional, Union

from . import codec
from .constants import (HEADER_VERSION_DEFAULT, INDEX_WAIT_SECONDS_DEFAULT, KEY_SIZE_BYTES_MAX,
                        REPLICATE_BATCH_BYTES_MAX, REPLICATE_BATCH_TXS_MAX, SCAN_RESULTS_MAX,
                        TX_ENTRIES_MAX, TX_EXPORT_BLOB_BYTES_MAX, TX_VALUES_BYTES_MAX,
                        VALUE_SIZE_BYTES_MAX)
from .errors import (CorruptedDataError, DatabaseClosedError, IllegalArgumentsError,
                     IndexFailedError, NotReplicaError, ReadOnlyReplicaError, TxNotFoundError)
from .flat_tx import FlatTx
from .store import proofs
from .store.env import INDEX_DBS, LOG_DBS, BurstWouldBlock, LmdbEnv, holding_burst
from .store.folder_lock import FolderLock
from .store.index_worker import WorkerIndexer
from .store.indexer import Indexer
from .store.keys import KeyIndex
from .store.layout import LOG_FORMAT as _FORMAT
from .store.layout import SETTINGS_KEY as _SETTINGS_KEY
from .store.layout import encode_settings
from .store.log import ExportRange, TxLog
from .store.writer import ChainState, Writer
from .types import (DualProof, Entry, KVMetadata, State, Tx, TxEntry, TxHeader, VerifiableEntry,
                    VerifiableTx)


KVs = Union[dict, Iterable]
Metadata = Union[None, KVMetadata, dict]


def open_database(path: str, **options) -> "Database":
    """Open (creating if needed) the database kept in folder ``path``.

    Options: ``name`` (default: the folder's name), ``replica`` (None keeps the stored role;
    True/False sets and stores it), ``durable`` (default True: every acknowledged write is
    fsynced), ``header_version`` (1; 0 writes immudb 1.1 headers, fixed at creation),
    ``max_tx_entries``, ``max_key_len``, ``max_value_len`` (immudb's defaults),
    ``index_wait_seconds`` (how long a read waits for the key index), ``map_size_bytes``,
    ``index_worker`` (index in a process of its own instead of a thread: what the node does).

    The folder is locked while the database is open (``<path>/immucore.lock``): another opening
    of it, in any process, is refused with ``FolderInUseError`` naming the folder and the pid.
    """
    return Database(path, **options)


class Database:
    def __init__(self, path: str, *, name: Optional[str] = None, replica: Optional[bool] = None,
                 durable: bool = True, header_version: Optional[int] = None,
                 max_tx_entries: int = TX_ENTRIES_MAX, max_key_len: int = KEY_SIZE_BYTES_MAX,
                 max_value_len: int = VALUE_SIZE_BYTES_MAX,
                 index_wait_seconds: float = INDEX_WAIT_SECONDS_DEFAULT,
                 map_size_bytes: int = 0, index_worker: bool = False):
        if not 0 < max_tx_entries <= TX_ENTRIES_MAX:
            raise IllegalArgumentsError(f"max_tx_entries must be in 1..{TX_ENTRIES_MAX}")
        if not 0 < max_key_len <= KEY_SIZE_BYTES_MAX:
            raise IllegalArgumentsError(f"max_key_len must be in 1..{KEY_SIZE_BYTES_MAX}")
        if not 0 <= max_value_len <= VALUE_SIZE_BYTES_MAX:
            raise IllegalArgumentsError(f"max_value_len must be in 0..{VALUE_SIZE_BYTES_MAX}")
        self.path = os.path.abspath(path)
        self.name = name or os.path.basename(self.path.rstrip(os.sep))
        self._limits = (max_tx_entries, max_key_len, max_value_len)
        self._index_wait_seconds = index_wait_seconds
        self._closed = False
        self._log = self._index_env = self._writer = self._indexer = None
        self._folder_lock = None
        self._commit_listeners = []
        try:
            os.makedirs(self.path, exist_ok=True)
            # before any environment is opened: a second opening (another process, or this
            # one again) would run its own writer and index on the same files
            self._folder_lock = FolderLock(self.path, "database folder").acquire()
            self._log = LmdbEnv(os.path.join(self.path, "log"), LOG_DBS,
                                durable=durable, map_size_bytes=map_size_bytes)
            # The index is derived from the log: losing its last commit in a crash only means
            # re-indexing those txs, so it skips LMDB's second (meta page) fsync.
            self._index_env = LmdbEnv(os.path.join(self.path, "index"), INDEX_DBS,
                                      durable=durable, map_size_bytes=map_size_bytes,
                                      metasync=False)
            self._txs = TxLog(self._log, lambda: self._writer.state)
            self._settings = self._load_settings(replica, header_version)
            state = self._txs.load_chain_state()
            # The writer starts idle: nothing is submitted before the indexer below exists.
            self._writer = Writer(self._log, state,
                                  header_version=self._settings["header_version"],
                                  limits=self._limits, read_alh=self._txs.alh,
                                  on_commit=self._on_commit, name=self.name,
                                  read_only=self._settings["replica"])
            if index_worker:
                self._indexer = WorkerIndexer(self._index_env, self._log, name=self.name,
                                              committed_tx_id=lambda: self._writer.state.tx_id,
                                              path=self.path, durable=durable,
                                              map_size_bytes=map_size_bytes)
            else:
                self._indexer = Indexer(self._index_env, self._log, name=self.name,
                                        committed_tx_id=lambda: self._writer.state.tx_id)
            self._keys = KeyIndex(self._index_env, self._txs, lambda: self._indexer.version)
        except BaseException:
            self._release()     # no thread left running, no environment left open
            raise

    def _release(self):
        """Stop the writer (it finishes what is queued), then the indexer, then close both
        environments (each waits for its readers), and only then let the folder go."""
        try:
            for part in (self._writer, self._indexer, self._index_env, self._log):
                if part is not None:
                    part.close()
        finally:
            if self._folder_lock is not None:
                self._folder_lock.release()

    def _on_commit(self, state: ChainState) -> None:
        self._indexer.notify()
        for listener in self._commit_listeners:
            listener(state.tx_id)

    def add_commit_listener(self, listener) -> None:
        """Call ``listener(tx_id)`` after every commit, on the committer thread: it must only
        hand the news on (e.g. ``loop.call_soon_threadsafe``), never block."""
        self._commit_listeners.append(listener)

    # --- settings and recovery ------------------------------------------------------------

    def _load_settings(self, replica, header_version) -> dict:
        stored = self._txs.settings()
        settings = dict(stored) if stored else {"format": _FORMAT, "replica": False,
                                                "header_version": HEADER_VERSION_DEFAULT}
        if settings.get("format") != _FORMAT:
            raise CorruptedDataError(f"{self.path} holds an unknown format {settings.get('format')}")
        if header_version is not None and stored and header_version != settings["header_version"]:
            raise IllegalArgumentsError("header_version can not be changed after database creation")
        if header_version is not None:
            if header_version not in (0, 1):
                raise IllegalArgumentsError("header_version must be 0 or 1")
            settings["header_version"] = header_version
        if replica is not None:
            settings["replica"] = bool(replica)
        if settings != stored:
            encoded = encode_settings(settings)
            self._log.write(lambda txn: txn.put(_SETTINGS_KEY, encoded, db=self._log.dbs["meta"]))
        return settings

    # --- properties -----------------------------------------------------------------------

    @property
    def is_replica(self) -> bool:
        return self._settings["replica"]

    @property
    def header_version(self) -> int:
        return self._settings["header_version"]

    def index_status(self) -> dict:
        """The key index's worker for `database list`: ``worker_pid`` (None: a thread, or not
        running), ``restarts`` and ``error`` (None, or why it stopped for good)."""
        indexer = self._indexer
        return {"worker_pid": indexer.worker_pid, "restarts": indexer.restarts,
                "error": indexer.failed}

    def restart_index(self) -> bool:
        """Start the index worker again after it failed for good; False if it had not."""
        self._check_open()
        return self._indexer.restart()

    @property
    def indexed_tx_id(self) -> int:
        """The highest tx the key index covers (``current_state().tx_id`` minus the index lag)."""
        return self._indexer.indexed_tx_id

    def set_replica(self, replica: bool) -> None:
        """Switch role (promotion/demotion); stored, so it survives a restart. Ordered with the
        writes: those submitted before the switch still commit, later ones are refused. A
        demoted primary's discard floor rises to its last tx: it acknowledged them all."""
        self._check_open()
        self._writer.set_read_only(bool(replica))
        self._settings = self._load_settings(bool(replica), None)

    # --- writes ---------------------------------------------------------------------------

    def set(self, kvs: KVs, *, metadata: Metadata = None) -> TxHeader:
        """Write ``kvs`` (a dict or (key, value) pairs) as one transaction; durable on return."""
        return TxHeader(*self.set_async(kvs, metadata=metadata).result()[0])

    def delete(self, keys: Iterable[bytes]) -> TxHeader:
        """One transaction marking every key deleted (reads then report it missing)."""
        return TxHeader(*self.delete_async(keys).result()[0])

    def set_async(self, kvs: KVs, *, metadata: Metadata = None, block: bool = True,
                  on_done=None):
        """Like ``set`` but returns a ``concurrent.futures.Future`` of the header list. With
        ``block=False`` a full write queue raises ``WriterBusyError`` instead of waiting. With
        ``on_done``, ``on_done(headers, exception)`` gets the outcome instead, on a writer
        thread (it must be quick and must not block), and None is returned."""
        self._check_writable()
        entries, size = _entries(kvs, metadata)
        size = self._tx_values(size, map(_value_of, entries))
        return self._writer.submit_set(entries, size, block, on_done)

    def set_flat_async(self, kvs_flat: list, *, metadata: Optional[KVMetadata] = None,
                       block: bool = True, on_done=None):
        """``set_async`` for keys and values alternating in one list, ``[k1, v1, k2, v2, ...]``
        (what the wire carries), with one ``metadata`` for every entry. The codec checks and lays
        the list out in C: no Python work per entry here."""
        self._check_writable()
        if type(kvs_flat) is not list:
            raise IllegalArgumentsError("kvs_flat must be a list")
        if len(kvs_flat) % 2:       # here, not in the sealer: a bad tx there costs its batch
            raise IllegalArgumentsError("kvs_flat must alternate keys and values")
        if metadata is not None and not isinstance(metadata, KVMetadata):
            raise IllegalArgumentsError("metadata must be one KVMetadata for every entry")
        md = metadata.to_bytes() if metadata is not None else b""
        kvs_flat = list(kvs_flat)      # ours now: the caller may reuse its list at once
        values = kvs_flat[1::2]
        try:
            size = sum(map(len, values))     # for the writer's batch bound and the tx limit
        except TypeError:
            raise IllegalArgumentsError("keys, values and metadata must be bytes") from None
        size = self._tx_values(size, values)
        return self._writer.submit_set(FlatTx(kvs_flat, md), size, block, on_done)

    def delete_async(self, keys: Iterable[bytes], *, block: bool = True):
        """Like ``delete`` but returns a ``concurrent.futures.Future`` of the header list."""
        self._check_writable()
        deleted = KVMetadata(deleted=True).to_bytes()
        entries = [(_bytes(k, "key"), b"", deleted) for k in keys]
        return self._writer.submit_set(entries, 0, block)

    def verifiable_set(self, kvs: KVs, *, prove_since_tx: int,
                       metadata: Metadata = None) -> VerifiableTx:
        self._check_prove_since(prove_since_tx)
        header = self.set(kvs, metadata=metadata)
        return self.verifiable_tx_by_id(header.id, prove_since_tx=prove_since_tx)

    # --- replication ----------------------------------------------------------------------

    def export_tx(self, tx_id: int) -> bytes:
        """The exact immudb export blob of a committed tx (values present)."""
        return codec.record_export_blob(self._record(tx_id))

    def export_txs(self, first_tx_id: int, count: int,
                   size_bytes_max: int = REPLICATE_BATCH_BYTES_MAX) -> List[bytes]:
        """Export blobs of up to ``count`` consecutive committed txs from ``first_tx_id``,
        stopping before their total passes ``size_bytes_max`` (at least one blob is returned)."""
        return self.export_range(first_tx_id, count, size_bytes_max).blobs

    def export_range(self, first_tx_id: int, count: int,
                     size_bytes_max: int = REPLICATE_BATCH_BYTES_MAX) -> ExportRange:
        """``export_txs`` with the last blob's Alh and the last committed tx id, all three
        from one snapshot of the log (what a primary answers a replica's EXPORT_TXS with)."""
        self._check_open()
        if not isinstance(first_tx_id, int) or first_tx_id < 1 or count < 0:
            raise IllegalArgumentsError("first_tx_id must be positive and count not negative")
        return self._txs.export_range(first_tx_id, count, size_bytes_max)

    def replicate_tx(self, blob: bytes) -> TxHeader:
        return self.replicate_txs([blob])[0]

    def replicate_txs(self, blobs: List[bytes]) -> List[TxHeader]:
        """Verify and apply exported txs, all or nothing, in one LMDB transaction.

        Txs this database already holds with the same Alh are no-ops (immudb's "tx already
        committed"); a different Alh raises ``ReplicaDivergedError``.
        """
        return [TxHeader(*h) for h in self.replicate_txs_async(blobs).result()]

    def replicate_txs_async(self, blobs: List[bytes], floor_tx_id: int = 0,
                            last_alh: Optional[bytes] = None):
        """Like ``replicate_txs`` but returns a ``concurrent.futures.Future`` of header tuples
        (a list whose ``last_alh`` is the last tx's Alh, None for no blobs), so a replicator
        can keep the next batch hashing while this one is fsynced.
        ``floor_tx_id``: the primary acknowledged every tx up to it to its clients; stored with
        the batch, it bounds what ``discard_txs_after`` may ever drop. ``last_alh``: the Alh
        the primary announced for the last blob's tx; a batch whose last tx hashes otherwise
        was altered after the primary read it and is refused whole."""
        self._check_open()
        if not self.is_replica:
            raise NotReplicaError()
        if len(blobs) > REPLICATE_BATCH_TXS_MAX:
            raise IllegalArgumentsError(
                f"{len(blobs)} txs exceed the limit of {REPLICATE_BATCH_TXS_MAX} per batch")
        blobs = [_bytes(b, "export blob") for b in blobs]
        longest = max(map(len, blobs), default=0)
        if longest > TX_EXPORT_BLOB_BYTES_MAX:
            raise IllegalArgumentsError(
                f"an exported tx of {longest} bytes exceeds the limit of "
                f"{TX_EXPORT_BLOB_BYTES_MAX} bytes: this replica could not pass it on in one "
                "frame")
        size = sum(map(len, blobs))
        if size > REPLICATE_BATCH_BYTES_MAX:
            raise IllegalArgumentsError(
                f"{size} bytes exceed the limit of {REPLICATE_BATCH_BYTES_MAX} bytes per batch")
        return self._writer.submit_replicate(blobs, size, floor_tx_id, last_alh)

    @property
    def discard_floor(self) -> int:
        """The highest tx this replica's primary told it was acknowledged to clients."""
        return min(self._writer.floor_tx_id, self._writer.state.tx_id)

    def discard_txs_after(self, tx_id: int) -> State:
        """Drop every tx after ``tx_id`` — a replica discarding precommitted txs that its new
        primary does not have (``--replication-allow-tx-discarding``). Only txs above the
        discard floor go: those the primary acknowledged to its clients never do. The index
        forgets their keys first, then the log and its hash tree are cut back."""
        self._check_open()
        if not self.is_replica:
            raise NotReplicaError()
        if tx_id < self.discard_floor:
            raise IllegalArgumentsError(
                f"only precommitted transactions can be discarded: tx {tx_id} is below the "
                f"discard floor {self.discard_floor}")
        if tx_id < self._writer.state.tx_id:
            try:          # a failed pause or rewind must not leave indexing paused either
                self._indexer.pause_and_rewind(tx_id)
                self._writer.truncate(tx_id, self._txs.load_chain_state).result()
            finally:
                self._indexer.resume()
        return self.current_state()

    def alh_of(self, tx_id: int) -> bytes:
        """The Alh of committed tx ``tx_id``."""
        if not 0 < tx_id <= self._writer.state.tx_id:
            raise TxNotFoundError(f"tx {tx_id} not found")
        return self._txs.alh(tx_id)

    # --- reads ----------------------------------------------------------------------------

    def current_state(self) -> State:
        state = self._writer.state
        return State(self.name, state.tx_id, state.alh)

    def tx_by_id(self, tx_id: int) -> Tx:
        return _tx_from_record(self._record(tx_id))

    def get(self, key: bytes, *, at_tx: int = 0, since_tx: int = 0,
            at_revision: int = 0) -> Entry:
        """The key's value: latest, as of ``at_tx``, or at revision ``at_revision`` (1-based;
        negative counts back from the latest: -1 is the one before it). Deleted or expired
        keys read as missing (``key not found``); a revision the key does not have is
        ``invalid key revision number``, as in immudb."""
        if at_tx or since_tx or at_revision:
            return self._get_entry(key, at_tx=at_tx, since_tx=since_tx,
                                   at_revision=at_revision)[0]
        return self._latest(key)

    def history(self, key: bytes, *, offset: int = 0, limit: int = 0,
                desc: bool = False) -> List[Entry]:
        """Every version of ``key`` (deleted ones included, with their metadata)."""
        key = _bytes(key, "key")
        if offset < 0 or limit < 0:
            raise IllegalArgumentsError("offset and limit must not be negative")
        limit = self._result_limit(limit)
        self._wait_index(0)
        return self._keys.history(key, offset, limit, desc)

    def scan(self, *, prefix: bytes = b"", seek_key: bytes = b"", end_key: bytes = b"",
             desc: bool = False, limit: int = 0, since_tx: int = 0) -> List[Entry]:
        """Latest live value of every key starting with ``prefix``, in key order.

        Iteration starts at ``seek_key`` and stops after ``end_key`` (both inclusive, as given;
        with ``desc`` it walks down from ``seek_key`` to ``end_key``). Keys longer than
        INDEX_KEY_UNFOLDED_BYTES_MAX bytes are ordered by their first bytes and a hash
        (docs/storage.md).
        """
        prefix, seek_key, end_key = (_bytes(prefix, "prefix"), _bytes(seek_key, "seek_key"),
                                     _bytes(end_key, "end_key"))
        if limit < 0:
            raise IllegalArgumentsError("limit must not be negative")
        limit = self._result_limit(limit)
        self._wait_index(since_tx)
        return self._keys.scan(prefix, seek_key, end_key, desc, limit)

    def verifiable_tx_by_id(self, tx_id: int, *, prove_since_tx: int) -> VerifiableTx:
        self._check_prove_since(prove_since_tx)
        tx = self.tx_by_id(tx_id)
        return VerifiableTx(tx, self._dual_proof_for(tx.header, prove_since_tx))

    def verifiable_get(self, key: bytes, *, prove_since_tx: int, at_tx: int = 0,
                       since_tx: int = 0, at_revision: int = 0) -> VerifiableEntry:
        self._check_prove_since(prove_since_tx)
        entry, entry_index = self._get_entry(key, at_tx=at_tx, since_tx=since_tx,
                                             at_revision=at_revision)
        record = self._record(entry.tx)
        tx = _tx_from_record(record)
        proof = proofs.entry_inclusion_proof(record, entry_index)
        return VerifiableEntry(entry, VerifiableTx(tx, self._dual_proof_for(tx.header,
                                                                            prove_since_tx)),
                               proof)

    # --- proofs ---------------------------------------------------------------------------

    def _dual_proof_for(self, tx_header: TxHeader, prove_since_tx: int) -> DualProof:
        """immudb's rule: prove from the client's trusted tx to this one, or back if it is newer."""
        root = tx_header if prove_since_tx in (0, tx_header.id) else \
            self.tx_by_id(prove_since_tx).header
        if prove_since_tx <= tx_header.id:
            return self.dual_proof(root, tx_header)
        return self.dual_proof(tx_header, root)

    def dual_proof(self, source: TxHeader, target: TxHeader) -> DualProof:
        """immudb's DualProof (v1) linking tx header ``source`` to ``target``."""
        return proofs.dual_proof(self._txs, source, target)

    def audit(self, batch_txs: int = 1000) -> int:
        """Re-verify the whole log from tx 1: every Eh, Alh, blRoot and stored AHT node.

        Returns the number of txs checked; raises CorruptedDataError at the first mismatch.
        Reads in batches, so its memory stays bounded whatever the log size.
        """
        self._check_open()
        return proofs.audit(self._txs, self._writer.state.tx_id, self._limits, batch_txs)

    # --- internals ------------------------------------------------------------------------

    def _get_entry(self, key, *, at_tx, since_tx, at_revision):
        key = _bytes(key, "key")
        if min(at_tx, since_tx) < 0:
            raise IllegalArgumentsError("at_tx and since_tx must not be negative")
        if at_tx and at_revision:
            raise IllegalArgumentsError("at_tx and at_revision can not be used together")
        self._wait_index(max(at_tx, since_tx))
        return self._keys.entry(key, at_tx, at_revision)

    def get_many(self, keys: Iterable[bytes]) -> List[Union[Entry, Exception]]:
        """``get`` of each key's latest version, all read from one snapshot (a pipelined burst
        of gets): for each key, in order, its Entry or the error its ``get`` would raise
        (KeyNotFoundError for a missing, deleted or expired key; whatever else reading that
        key raised). Waits for the index like ``get``; an error of the whole read (a closed
        database) is raised."""
        return [row if isinstance(row, Exception) else Entry(*row)
                for row in self.latest_rows(keys)]

    def latest_rows(self, keys: Iterable[bytes]) -> list:
        """``get_many`` with each Entry as its fields' tuple ``(tx, key, value, metadata,
        revision)``: the node encodes an answer straight from it (building the frozen Entry
        cost a tenth of a get)."""
        keys = list(keys)
        if (self._closed or self._indexer.indexed_tx_id < self._writer.state.tx_id
                or self._indexer.failed is not None):
            self._wait_index(0)        # raises if closed or failed; waits (or BurstWouldBlock)
        return self._keys.latest_rows(keys)

    def _latest(self, key) -> Entry:
        """``get`` of the latest version, nearly every get."""
        row = self.latest_rows((key,))[0]
        if isinstance(row, Exception):
            raise row
        return Entry(*row)

    def _record(self, tx_id: int) -> bytes:
        self._check_open()
        if not isinstance(tx_id, int) or tx_id < 1:
            raise IllegalArgumentsError("tx id must be a positive integer")
        return self._txs.record(tx_id)

    def index_covers(self, since_tx: int = 0) -> bool:
        """Whether a read with ``since_tx`` would run without waiting for the index."""
        return (self._indexer.indexed_tx_id >= max(since_tx, self._writer.state.tx_id)
                and self._indexer.failed is None)

    def _wait_index(self, since_tx: int):
        """Reads see every tx committed before they started (or ``since_tx``, if later).
        None at all once the index failed for good: one read served and the next refused
        (as soon as a write passes the index) would be worse than a clear error."""
        self._check_open()
        if self._indexer.failed is not None:
            raise IndexFailedError(self._indexer.failed)
        committed = self._writer.state.tx_id
        if since_tx > committed:
            raise IllegalArgumentsError(
                f"since_tx {since_tx} is beyond the last committed tx {committed}")
        needed = max(since_tx, committed)
        if self._indexer.indexed_tx_id < needed and holding_burst():
            raise BurstWouldBlock()     # never wait while a burst holds guards: served again
        self._indexer.wait_for(needed, self._index_wait_seconds)

    def _result_limit(self, limit: int) -> int:
        if limit > SCAN_RESULTS_MAX:
            raise IllegalArgumentsError(
                f"limit {limit} exceeds the maximum of {SCAN_RESULTS_MAX} results per request")
        return limit or SCAN_RESULTS_MAX

    def _check_prove_since(self, prove_since_tx: int):
        if not 0 <= prove_since_tx <= self._writer.state.tx_id:
            raise IllegalArgumentsError(
                f"prove_since_tx {prove_since_tx} is not a committed tx "
                f"(last is {self._writer.state.tx_id})")

    def _check_open(self):
        if self._closed:
            raise DatabaseClosedError()

    def _tx_values(self, size: int, values) -> int:
        """``size``, a tx's value bytes, if within TX_VALUES_BYTES_MAX: a bigger tx could be
        committed but never exported to a replica in one frame, so it is refused now. A value
        over this database's own limit is left to the codec, whose error names it."""
        if size > TX_VALUES_BYTES_MAX and max(map(len, values)) < self._limits[2]:
            raise IllegalArgumentsError(
                f"the values of one tx total {size} bytes, over the limit of "
                f"{TX_VALUES_BYTES_MAX} bytes (every tx must fit one frame when replicated): "
                "split it into several txs")
        return size

    def _check_writable(self):
        self._check_open()
        if self.is_replica:
            raise ReadOnlyReplicaError()

    # --- lifecycle ------------------------------------------------------------------------

    def close(self):
        """Finish queued writes and the index step under way, then close both environments."""
        if self._closed:
            return
        self._release()
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- helpers ------------------------------------------------------------------------------

def _bytes(value, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise IllegalArgumentsError(f"{what} must be bytes, not {type(value).__name__}")


_value_of = operator.itemgetter(1)


def _entries(kvs: KVs, metadata: Metadata):
    """(key, value, kv metadata bytes) per entry, and the tx's value bytes (for batch bounds).

    Built with one comprehension and no per-entry checks: the codec checks types, sizes and
    duplicates in C, so a 1000-entry tx costs Python one list, not a thousand branches.
    """
    items = kvs.items() if isinstance(kvs, dict) else kvs
    try:
        if isinstance(metadata, dict):
            md_for = {k: m.to_bytes() for k, m in metadata.items()}
            entries = [(k, v, md_for.get(k, b"")) for k, v in items]
        else:
            md = metadata.to_bytes() if metadata is not None else b""
            entries = [(k, v, md) for k, v in items]
        # Every value counts toward the writer's batch bound, however the pairs came.
        size = sum(map(len, map(_value_of, entries)))
    except (TypeError, ValueError) as exc:
        raise IllegalArgumentsError(
            f"kvs must be a dict or a list of (key, value) pairs of bytes ({exc})") from None
    return entries, size


def _tx_from_record(record) -> Tx:
    header, _, entries = codec.decode_record(record)
    return Tx(TxHeader(*header), tuple(
        TxEntry(bytes(k), bytes(hv), 0 if v is None else len(v), KVMetadata.from_bytes(md))
        for k, md, v, hv in entries))
