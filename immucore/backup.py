"""immudb's hot-backup file: a writer, and a reader that trusts nothing it reads.

A backup is a sequence of records, one per tx, all integers big-endian (docs/backup.md)::

    "IMMUBACKUP"  u32 format version (1)  u64 tx id  u32 checksum length  u32 content length
    checksum: the tx's Alh (32 bytes)
    content:  u64 length of the export blob, then the blob (immudb's ExportTx stream content)

The reader checks every length against a limit in constants.py before it reads (so allocates)
anything, then what the file itself can vouch for: consecutive tx ids, the blob naming the
record's tx, and each record's checksum being the next blob's prevAlh. What only a database
can check (entry hashes, Eh, blRoot, the chain into its own log) the replicate path does when
the txs are applied; ``verify_records`` does it offline for ``--verify-only``.
"""
from __future__ import annotations

import struct
from typing import BinaryIO, Iterator, List, Optional, Tuple

from . import codec
from .constants import (BACKUP_CHECKSUM_BYTES, BACKUP_CONTENT_BYTES_MAX, BACKUP_FILE_BUFFER_BYTES,
                        KEY_SIZE_BYTES_MAX, TX_ENTRIES_MAX, VALUE_SIZE_BYTES_MAX)
from .errors import ImmucoreError

MAGIC = b"IMMUBACKUP"
FORMAT_VERSION = 1
# the fixed part of a record: magic, version, tx id, checksum length, content length
_HEAD = struct.Struct(">10sIQII")
HEAD_BYTES = _HEAD.size
# what the writer emits before the blob: the head, the 32-byte Alh and the blob's u64 length
_WRITE_HEAD = struct.Struct(f">10sIQII{BACKUP_CHECKSUM_BYTES}sQ")
_U64 = struct.Struct(">Q")
# An export blob starts with its header's u32 length, then the header: tx id, prevAlh, ...
# The reader reads those two fields, so a shorter blob is malformed.
_BLOB_TX_ID_AT, _BLOB_PREV_ALH_AT = 4, 12
_BLOB_BYTES_MIN = _BLOB_PREV_ALH_AT + 32

Record = Tuple[int, bytes, bytes]          # (tx id, Alh, export blob)
# --verify-only checks a file without its database: a tx passes if any database could hold it
OFFLINE_LIMITS = (TX_ENTRIES_MAX, KEY_SIZE_BYTES_MAX, VALUE_SIZE_BYTES_MAX)


class BackupFileError(ImmucoreError):
    """The backup file is not a well-formed, consecutive chain of records."""


def blob_tx_id(blob: bytes) -> int:
    return _U64.unpack_from(blob, _BLOB_TX_ID_AT)[0]


def blob_prev_alh(blob: bytes) -> bytes:
    return blob[_BLOB_PREV_ALH_AT:_BLOB_PREV_ALH_AT + 32]


class BackupWriter:
    """Writes records for chunks of an export stream (blobs and the Alh of the chunk's last tx):
    every other tx's Alh is the next blob's prevAlh, so nothing is hashed here."""

    def __init__(self, file: BinaryIO, prev_alh: Optional[bytes] = None):
        self.file = file
        self.last_tx_id = 0
        self._prev_alh = prev_alh          # the Alh of the tx before the next one written

    def write_chunk(self, blobs: List[bytes], last_alh: bytes) -> int:
        """Write one record per blob; returns the last tx id written."""
        if not blobs:
            return self.last_tx_id
        pack, unpack_from = _WRITE_HEAD.pack, _U64.unpack_from
        if self._prev_alh is not None and blob_prev_alh(blobs[0]) != self._prev_alh:
            raise BackupFileError(f"the node exported tx {blob_tx_id(blobs[0])} with a prevAlh "
                                  f"that is not the Alh of tx {self.last_tx_id}")
        # each tx's Alh is the next blob's prevAlh, the last one's the chunk's last_alh
        alhs = [blob[_BLOB_PREV_ALH_AT:_BLOB_PREV_ALH_AT + 32] for blob in blobs[1:]]
        alhs.append(last_alh)
        pieces = []
        for blob, alh in zip(blobs, alhs):
            size = len(blob)
            pieces.append(pack(MAGIC, FORMAT_VERSION, unpack_from(blob, _BLOB_TX_ID_AT)[0],
                               BACKUP_CHECKSUM_BYTES, 8 + size, alh, size))
            pieces.append(blob)             # the blob itself, not a copy
        self.file.writelines(pieces)
        self.last_tx_id = blob_tx_id(blobs[-1])
        self._prev_alh = last_alh
        return self.last_tx_id


def encode_record(tx_id: int, alh: bytes, blob: bytes) -> bytes:
    """One record (tests and tools; the writer streams the same bytes)."""
    return _WRITE_HEAD.pack(MAGIC, FORMAT_VERSION, tx_id, len(alh), 8 + len(blob), alh,
                            len(blob)) + blob


class BackupReader:
    """Records of a backup file or stream, each checked before it is returned."""

    def __init__(self, file: BinaryIO, name: str = "backup file"):
        self.file, self.name = file, name
        self.offset = 0                    # of the next record
        self.last_tx_id = 0                # of the last record returned
        self.last_alh: Optional[bytes] = None
        self._held: Optional[Record] = None     # read by a batch it did not fit
        self._buf, self._pos = b"", 0           # read ahead of the next record
        self._read = getattr(file, "read1", file.read)

    def _bad(self, at: int, what: str) -> BackupFileError:
        return BackupFileError(f"malformed {self.name}: {what} (record at byte {at})")

    def _available(self, need: int) -> int:
        """Make ``need`` unread bytes available in the buffer, reading (one read at a time:
        a pipe is not waited on for more than it has) until they are or the input ends;
        returns how many are available. ``need`` was bounded by the caller."""
        have = len(self._buf) - self._pos
        if have >= need:
            return have
        parts = [self._buf[self._pos:]]        # joined once: a big tx is not copied per read
        while have < need:
            more = self._read(max(BACKUP_FILE_BUFFER_BYTES, need - have))
            if not more:
                break
            parts.append(more)
            have += len(more)
        self._buf, self._pos = b"".join(parts), 0
        return have

    def next_record(self) -> Optional[Record]:
        """The next record, or None at the end of the file (between records)."""
        if self._held is not None:
            record, self._held = self._held, None
            return record
        at = self.offset
        have = self._available(HEAD_BYTES)
        if have == 0:
            return None
        if have < HEAD_BYTES:
            raise BackupFileError(f"truncated {self.name}: the record at byte {at} ends after "
                                  f"{have} bytes, inside its {HEAD_BYTES}-byte header")
        buf, pos = self._buf, self._pos
        magic, version, tx_id, checksum_len, content_len = _HEAD.unpack_from(buf, pos)
        if magic != MAGIC:
            raise self._bad(at, f"does not start with {MAGIC.decode()!r}")
        if version != FORMAT_VERSION:
            raise self._bad(at, f"format version {version}, this immuadmin reads version "
                                f"{FORMAT_VERSION}")
        if checksum_len != BACKUP_CHECKSUM_BYTES:
            raise self._bad(at, f"tx {tx_id}'s checksum is {checksum_len} bytes, an Alh is "
                                f"{BACKUP_CHECKSUM_BYTES}")
        if content_len > BACKUP_CONTENT_BYTES_MAX:
            raise self._bad(at, f"tx {tx_id}'s content of {content_len} bytes exceeds the "
                                f"limit of {BACKUP_CONTENT_BYTES_MAX} bytes")
        if content_len < 8 + _BLOB_BYTES_MIN:
            raise self._bad(at, f"tx {tx_id}'s content of {content_len} bytes is too short "
                                "for an exported tx")
        total = HEAD_BYTES + checksum_len + content_len          # bounded just above
        have = self._available(total)
        if have < total:
            raise BackupFileError(f"truncated {self.name}: the record at byte {at} ends after "
                                  f"{have} of its {total} bytes")
        buf, pos = self._buf, self._pos
        body = pos + HEAD_BYTES
        blob_len = _U64.unpack_from(buf, body + checksum_len)[0]
        if blob_len != content_len - 8:
            raise self._bad(at, f"tx {tx_id}'s content says its tx is {blob_len} bytes, the "
                                f"record holds {content_len - 8}")
        alh = buf[body:body + checksum_len]
        blob = buf[body + checksum_len + 8:pos + total]
        self._pos = pos + total
        self.offset += total
        if blob_tx_id(blob) != tx_id:
            raise self._bad(at, f"the record of tx {tx_id} holds tx {blob_tx_id(blob)}")
        if self.last_tx_id:
            if tx_id != self.last_tx_id + 1:
                raise BackupFileError(f"incorrect transaction order in file: tx {tx_id} "
                                      f"follows tx {self.last_tx_id} (record at byte {at})")
            if blob_prev_alh(blob) != self.last_alh:
                raise BackupFileError(
                    f"altered {self.name}: tx {tx_id}'s prevAlh is not the checksum of tx "
                    f"{self.last_tx_id} in the file (record at byte {at})")
        self.last_tx_id, self.last_alh = tx_id, alh
        return tx_id, alh, blob

    def hold(self, record: Record):
        """Give a record back: the next ``next_record`` returns it again."""
        self._held = record

    def __iter__(self) -> Iterator[Record]:
        while True:
            record = self.next_record()
            if record is None:
                return
            yield record

    def batch(self, txs_max: int, bytes_max: int) -> List[Record]:
        """Up to ``txs_max`` records of up to ``bytes_max`` blob bytes (at least one record
        unless the file ended); empty at the end of the file."""
        records, size = [], 0
        while len(records) < txs_max:
            record = self.next_record()
            if record is None:
                break
            if records and size + len(record[2]) > bytes_max:
                self.hold(record)
                break
            records.append(record)
            size += len(record[2])
        return records


def verify_records(reader: BackupReader, limits=OFFLINE_LIMITS) -> Tuple[int, int]:
    """Read the whole file and check every tx offline: its entries against its Eh, its Alh
    against the record's checksum and, when the file starts at tx 1, its blRoot (the Merkle
    root of every Alh before it). Returns (first, last) tx id; (0, 0) for an empty file."""
    first = last = 0
    peaks: list = []
    for tx_id, alh, blob in reader:
        try:
            header, computed = codec.verify_blob(blob, limits)
        except ImmucoreError as exc:
            raise BackupFileError(f"tx {tx_id} in {reader.name} is corrupted: {exc}") from None
        if computed != alh:
            raise BackupFileError(f"transaction checksums don't match: tx {tx_id} in "
                                  f"{reader.name} does not hash to its checksum")
        if not first:
            first = tx_id
        if first == 1:
            if header[8] != codec.aht_root(peaks):
                raise BackupFileError(f"tx {tx_id} in {reader.name} has an invalid blRoot")
            codec.aht_append(peaks, tx_id - 1, alh)
        last = tx_id
    return first, last
