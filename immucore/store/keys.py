"""The key index's read side: get, get-many, history and scan over ``<db>/index`` and the log.

Each call reads from one snapshot of each environment: the index's first, then the log's
(opened after it, so it holds every tx the index snapshot points at), whatever the number of
entries it returns. Waiting for the index to cover a read, and checking the caller's arguments,
are ``Database``'s; the layouts are ``store/layout.py``'s.
"""
from __future__ import annotations

import time
from typing import Callable, List, Optional

from .. import codec
from ..constants import INDEX_KEY_UNFOLDED_BYTES_MAX
from ..errors import (CorruptedDataError, IllegalArgumentsError, InvalidRevisionError,
                      KeyNotFoundError, TxNotFoundError)
from ..types import Entry, KVMetadata
from .layout import STORED_KEY_PREFIX, index_rows_from, parse_index_row, tx_key

# A folded index key keeps this many bytes of the stored key; the rest of it is a hash.
_INDEX_KEY_KEPT_BYTES = INDEX_KEY_UNFOLDED_BYTES_MAX


class KeyIndex:
    """Reads of the key index ``env`` and of the entries its rows point at in ``txs`` (a
    ``TxLog``); ``version()`` is the indexer's version (bumped by every step and rewind),
    on which a ``ReadBurst`` renews its index snapshot."""

    def __init__(self, env, txs, version: Callable[[], int]):
        self.env = env
        self._txs = txs
        self._version = version
        self._keys_db = env.dbs["keys"]

    # --- latest versions ----------------------------------------------------------------------

    def latest_rows(self, keys: list) -> list:
        """For each key, its latest version as ``(tx, key, value, metadata, revision)`` or the
        error its get raises (returned, not raised)."""
        # versions taken before the reads: inside a ReadBurst they renew a stale shared snapshot
        with self.env.read(version=self._version()) as itxn:
            cursor = itxn.cursor(self._keys_db)
            found = [_locate(cursor, key) for key in keys]
        if all(isinstance(where, Exception) for where in found):
            return found               # no log read at all (a burst holds no log guard)
        # opened after the index snapshot, so it holds every tx that snapshot points at
        with self._txs.env.read(buffers=True, version=self._txs.state()) as txn:
            tx_db, now = self._txs.env.dbs["tx"], time.time()
            return [where if isinstance(where, Exception)
                    else _row_at(txn, tx_db, where, now) for where in found]

    # --- one version --------------------------------------------------------------------------

    def entry(self, key: bytes, at_tx: int, at_revision: int):
        """``(Entry, entry index)`` of ``key`` as of ``at_tx``, at revision ``at_revision``, or
        its latest version; a deleted or expired one raises KeyNotFoundError."""
        stored = STORED_KEY_PREFIX + key
        index_key = codec.index_key(stored)
        with self.env.read(version=self._version()) as itxn:
            cursor = itxn.cursor(self._keys_db)
            if not cursor.set_key(index_key):
                raise KeyNotFoundError()
            count = cursor.count()
            if at_revision:
                revision = at_revision if at_revision > 0 else count + at_revision
                if not 0 < revision <= count:
                    raise InvalidRevisionError()
                for _ in range(revision - 1):
                    cursor.next_dup()
                row = cursor.value()
            elif at_tx:
                # versions are sorted by (tx id, entry index); find the last one at or before at_tx
                if cursor.set_range_dup(index_key, index_rows_from(at_tx + 1)):
                    if not cursor.prev_dup():
                        raise KeyNotFoundError()
                else:
                    cursor.last_dup()
                row = cursor.value()
                revision = 1                     # its revision: the versions before it, plus one
                while cursor.prev_dup():
                    revision += 1
            else:
                cursor.last_dup()
                row, revision = cursor.value(), count
            where = parse_index_row(row)
        with self._txs.env.read(buffers=True, version=self._txs.state()) as txn:
            return (self._entry_in(txn, stored, where, revision, include_deleted=False),
                    where[1])

    # --- many versions, many keys -------------------------------------------------------------

    def history(self, key: bytes, offset: int, limit: int, desc: bool) -> List[Entry]:
        """Versions ``offset`` .. ``offset + limit - 1`` of ``key`` (deleted ones included),
        from the oldest or, with ``desc``, the newest."""
        stored = STORED_KEY_PREFIX + key
        chosen = []
        with self.env.read() as itxn:
            cursor = itxn.cursor(self._keys_db)
            if not cursor.set_key(codec.index_key(stored)):
                raise KeyNotFoundError()
            count = cursor.count()
            if offset >= count:
                return []
            # walk only offset + limit versions, from the oldest or the newest end
            if desc:
                cursor.last_dup()
                step, revision = cursor.prev_dup, count
            else:
                step, revision = cursor.next_dup, 1
            for _ in range(offset):
                step()
                revision += -1 if desc else 1
            while len(chosen) < limit:
                chosen.append((revision, parse_index_row(cursor.value())))
                if not step():
                    break
                revision += -1 if desc else 1
        # one log snapshot for them all, opened after the index's
        with self._txs.env.read(buffers=True, version=self._txs.state()) as txn:
            return [self._entry_in(txn, stored, where, revision, include_deleted=True)
                    for revision, where in chosen]

    def scan(self, prefix: bytes, seek_key: bytes, end_key: bytes, desc: bool,
             limit: int) -> List[Entry]:
        """Latest live version of every key starting with ``prefix``, from ``seek_key`` to
        ``end_key`` (both inclusive when given), at most ``limit``."""
        stored_prefix = STORED_KEY_PREFIX + prefix
        # Folded index keys hold only the first bytes of their key: a longer prefix is walked by
        # those bytes, and each key found is then matched whole.
        index_prefix = stored_prefix[:_INDEX_KEY_KEPT_BYTES]
        match_whole_key = len(stored_prefix) > _INDEX_KEY_KEPT_BYTES
        seek = codec.index_key(STORED_KEY_PREFIX + seek_key) if seek_key else None
        end = codec.index_key(STORED_KEY_PREFIX + end_key) if end_key else None
        results: List[Entry] = []
        with self.env.read() as itxn:
            walk = _keys_desc if desc else _keys_asc
            versions = itxn.cursor(self._keys_db)
            # one log snapshot for the whole scan, opened after the index's
            with self._txs.env.read(buffers=True, version=self._txs.state()) as txn:
                now = time.time()
                for index_key in walk(itxn.cursor(self._keys_db), index_prefix, seek, end):
                    versions.set_key(index_key)
                    versions.last_dup()
                    try:
                        entry = self._entry_in(txn, None, parse_index_row(versions.value()),
                                               versions.count(), include_deleted=False,
                                               index_key=index_key, now=now)
                    except KeyNotFoundError:       # deleted or expired: not part of a scan
                        continue
                    if match_whole_key and not entry.key.startswith(prefix):
                        continue
                    results.append(entry)
                    if len(results) >= limit:
                        break
        return results

    # --- internals ----------------------------------------------------------------------------

    def _entry_in(self, txn, stored_key, where: tuple, revision: int, *, include_deleted: bool,
                  index_key: Optional[bytes] = None, now: Optional[float] = None) -> Entry:
        """The version ``where`` (a parsed index row) points at, read in log txn ``txn``; its
        key must be ``stored_key`` (or, when only the index key is known, a scan's, fold to
        ``index_key``): a corrupt row never returns another key's entry."""
        tx_id, entry_index, entry_offset = where
        # the entry is cut out without a copy
        key, md_raw, value, _ = codec.record_entry_at(self._txs.record_in(txn, tx_id),
                                                      entry_index, entry_offset)
        if (stored_key is not None and key != stored_key) or (
                index_key is not None and codec.index_key(key) != index_key):
            raise CorruptedDataError(f"data is corrupted: index points tx {tx_id} at another key")
        metadata = KVMetadata.from_bytes(md_raw)
        if not include_deleted and metadata is not None and (
                metadata.deleted or metadata.expired(time.time() if now is None else now)):
            raise KeyNotFoundError()
        if value is None:
            raise CorruptedDataError(f"value of tx {tx_id} was truncated on the primary")
        return Entry(tx_id, bytes(key[1:]), bytes(value[1:]), metadata, revision)


def _locate(cursor, key):
    """Where ``key``'s latest version is: ``(key, stored key, tx id, entry index, entry
    offset, revision)``, or the error its get raises (returned, not raised)."""
    try:
        if type(key) is not bytes:
            key = _bytes_key(key)
        stored = STORED_KEY_PREFIX + key
        if not cursor.set_key(codec.index_key(stored)):
            raise KeyNotFoundError()
        revision = cursor.count()
        cursor.last_dup()
        return (key, stored, *parse_index_row(cursor.value()), revision)
    except Exception as exc:  # noqa: BLE001 - this key's error, not its neighbours'
        return exc


def _bytes_key(key) -> bytes:
    if isinstance(key, (bytearray, memoryview)):
        return bytes(key)
    raise IllegalArgumentsError(f"key must be bytes, not {type(key).__name__}")


def _row_at(txn, tx_db, where: tuple, now: float):
    """The entry ``_locate`` found, as a row, or the error its get raises (returned)."""
    key, stored, tx_id, entry_index, entry_offset, revision = where
    try:
        record = txn.get(tx_key(tx_id), db=tx_db)
        if record is None:
            raise TxNotFoundError()
        key_read, md_raw, value, _ = codec.record_entry_at(record, entry_index, entry_offset)
        if key_read != stored:
            raise CorruptedDataError(
                f"data is corrupted: index points tx {tx_id} at another key")
        metadata = KVMetadata.from_bytes(md_raw)
        if metadata is not None and (metadata.deleted or metadata.expired(now)):
            raise KeyNotFoundError()
        if value is None:
            raise CorruptedDataError(f"value of tx {tx_id} was truncated on the primary")
    except Exception as exc:  # noqa: BLE001 - this key's error, not its neighbours'
        return exc
    return tx_id, key, bytes(value[1:]), metadata, revision


def _keys_asc(cursor, stored_prefix: bytes, seek: Optional[bytes], end: Optional[bytes]):
    """Distinct index keys with ``stored_prefix`` from ``seek`` up to ``end``, ascending."""
    start = max(stored_prefix, seek) if seek else stored_prefix
    if not cursor.set_range(start):
        return
    while True:
        key = bytes(cursor.key())
        if not key.startswith(stored_prefix) or (end is not None and key > end):
            return
        yield key
        if not cursor.next_nodup():
            return


def _keys_desc(cursor, stored_prefix: bytes, seek: Optional[bytes], end: Optional[bytes]):
    """Distinct index keys with ``stored_prefix`` from ``seek`` down to ``end``, descending."""
    upper = seek if seek else _prefix_end(stored_prefix)
    if upper is None or not cursor.set_range(upper):
        positioned = cursor.last()            # every key is below the upper bound
    elif seek and bytes(cursor.key()) == seek:
        positioned = True                     # seek is inclusive
    else:
        positioned = cursor.prev_nodup()      # set_range landed above the bound
    while positioned:
        key = bytes(cursor.key())
        if key < stored_prefix or (end is not None and key < end):
            return
        if key.startswith(stored_prefix):
            yield key
        positioned = cursor.prev_nodup()


def _prefix_end(prefix: bytes) -> Optional[bytes]:
    """The smallest key greater than every key starting with ``prefix`` (None: no such key)."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return None
    return trimmed[:-1] + bytes([trimmed[-1] + 1])
