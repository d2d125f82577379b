"""The pure-Python reference codec: immudb's encodings and hashes, written for clarity.

It is the oracle the native codec (``ext/immucore/_native.pyx``) is tested against and has the
same API, function for function. Formats: docs/immudb-format.md (its § numbers below).

Shapes used across the API:
  header tuple  (id, prev_alh, ts, version, metadata, nentries, eh, bl_tx_id, bl_root)
  record        export blob || hvalue of every entry (32 each) || alh (32)   (the store's tx record)
  peaks         list of the AHT's perfect-subtree roots, largest first (mutated by appends)
"""
from __future__ import annotations

import hashlib
import struct
from typing import Optional

from ..constants import (DIGEST_SIZE, INDEX_ENTRY_OFFSET_UNKNOWN, INDEX_KEY_UNFOLDED_BYTES_MAX,
                         KV_METADATA_SIZE_MAX, TX_METADATA_SIZE_MAX)
from ..errors import CorruptedDataError, IllegalArgumentsError
from ..flat_tx import FlatTx
from ..store.layout import index_row

IMPLEMENTATION = "pure"

_EMPTY_DIGEST = hashlib.sha256(b"").digest()
_ZERO_DIGEST = bytes(DIGEST_SIZE)
_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"
_KV_PREFIX = b"\x00"            # database-layer prefix of plain keys and values (§3)
_TRAILER_VALUES_PRESENT = b"\x00\x01\x00"
_TRAILER_VALUES_TRUNCATED = b"\x00\x01\x01"
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# --- KV metadata (§4) -------------------------------------------------------------------------

def kv_metadata_bytes(deleted: bool, expires_at, non_indexable: bool) -> bytes:
    out = b""
    if deleted:
        out += b"\x00"
    if expires_at is not None:
        out += b"\x01" + _U64.pack(expires_at)
    if non_indexable:
        out += b"\x02"
    return out


def parse_kv_metadata(raw: bytes):
    """(deleted, expires_at or None, non_indexable); attributes must come in code order."""
    if len(raw) > KV_METADATA_SIZE_MAX:
        raise CorruptedDataError("data is corrupted: kv metadata too long")
    deleted, expires_at, non_indexable = False, None, False
    pos, last_code = 0, -1
    while pos < len(raw):
        code = raw[pos]
        if code <= last_code:
            raise CorruptedDataError("data is corrupted: kv metadata attributes out of order")
        last_code = code
        pos += 1
        if code == 0:
            deleted = True
        elif code == 1:
            if pos + 8 > len(raw):
                raise CorruptedDataError("data is corrupted: truncated kv metadata")
            expires_at = _U64.unpack_from(raw, pos)[0]
            pos += 8
        elif code == 2:
            non_indexable = True
        else:
            raise CorruptedDataError(f"data is corrupted: unknown kv metadata attribute {code}")
    return deleted, expires_at, non_indexable


# --- headers, inner hash and Alh (§5, §8) -----------------------------------------------------

def _counts_bytes(version: int, metadata: bytes, nentries: int) -> bytes:
    if version == 0:
        if metadata:
            raise IllegalArgumentsError("metadata is unsupported when in 1.1 compatibility mode")
        return _U16.pack(nentries)
    if version == 1:
        return _U16.pack(len(metadata)) + metadata + _U32.pack(nentries)
    raise IllegalArgumentsError(f"unsupported tx header version {version}")


def encode_header(id, prev_alh, ts, version, metadata, nentries, eh, bl_tx_id, bl_root) -> bytes:
    return (_U64.pack(id) + prev_alh + _U64.pack(ts) + _U16.pack(version)
            + _counts_bytes(version, metadata, nentries) + eh + _U64.pack(bl_tx_id) + bl_root)


def decode_header(buf: bytes) -> tuple:
    """Parse exactly one serialized header (the whole of ``buf``) into a header tuple."""
    if len(buf) < 50:
        raise IllegalArgumentsError("tx header too short")
    id = _U64.unpack_from(buf, 0)[0]
    prev_alh = bytes(buf[8:40])
    ts = _U64.unpack_from(buf, 40)[0]
    version = _U16.unpack_from(buf, 48)[0]
    if version == 0:
        if len(buf) != 124:
            raise IllegalArgumentsError("tx header v0 must be 124 bytes")
        metadata, nentries, pos = b"", _U16.unpack_from(buf, 50)[0], 52
    elif version == 1:
        if len(buf) < 128:
            raise IllegalArgumentsError("tx header v1 too short")
        md_len = _U16.unpack_from(buf, 50)[0]
        if md_len > TX_METADATA_SIZE_MAX:
            raise IllegalArgumentsError("tx metadata too long")
        if len(buf) != 128 + md_len:
            raise IllegalArgumentsError("tx header length does not match its metadata length")
        metadata = bytes(buf[52:52 + md_len])
        nentries = _U32.unpack_from(buf, 52 + md_len)[0]
        pos = 56 + md_len
    else:
        raise IllegalArgumentsError("tx created with a newer version or data is corrupted")
    eh = bytes(buf[pos:pos + 32])
    bl_tx_id = _U64.unpack_from(buf, pos + 32)[0]
    bl_root = bytes(buf[pos + 40:pos + 72])
    if id < 1:
        raise IllegalArgumentsError("tx id must be at least 1")
    if nentries < 1:
        raise IllegalArgumentsError("tx must have at least one entry")
    if bl_tx_id >= id:
        raise IllegalArgumentsError("bl_tx_id must be lower than the tx id")
    return (id, prev_alh, ts, version, metadata, nentries, eh, bl_tx_id, bl_root)


def inner_hash(id, prev_alh, ts, version, metadata, nentries, eh, bl_tx_id, bl_root) -> bytes:
    return sha256(_U64.pack(ts) + _U16.pack(version) + _counts_bytes(version, metadata, nentries)
                  + eh + _U64.pack(bl_tx_id) + bl_root)


def alh(id: int, prev_alh: bytes, inner: bytes) -> bytes:
    return sha256(_U64.pack(id) + prev_alh + inner)


# --- entries and the per-tx hash tree (§6, §7) ------------------------------------------------

def entry_digest(version: int, key: bytes, metadata: bytes, hvalue: bytes) -> bytes:
    if version == 0:
        if metadata:
            raise IllegalArgumentsError("kv metadata is unsupported in tx header version 0")
        return sha256(key + hvalue)
    return sha256(_U16.pack(len(metadata)) + metadata + _U16.pack(len(key)) + key + hvalue)


def _htree_levels(digests):
    level = [sha256(_LEAF_PREFIX + d) for d in digests]
    levels = [level]
    while len(level) > 1:
        nxt = [sha256(_NODE_PREFIX + level[i] + level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])   # an odd last node is promoted unchanged
        levels.append(nxt)
        level = nxt
    return levels


def entries_hash(digests) -> bytes:
    if not digests:
        return _EMPTY_DIGEST
    return _htree_levels(digests)[-1][0]


def htree_inclusion_proof(digests, index: int) -> list:
    """The bottom-up audit path of entry ``index`` (RFC 6962 PATH over the entry digests)."""
    if not 0 <= index < len(digests):
        raise IllegalArgumentsError("entry index out of range")
    terms = []
    for level in _htree_levels(digests)[:-1]:
        sibling = index ^ 1
        if sibling < len(level):
            terms.append(level[sibling])
        index >>= 1
    return terms


# --- the append-only hash tree (§9) -----------------------------------------------------------

def aht_root(peaks) -> bytes:
    """Root over every leaf appended so far; 32 zero bytes for an empty tree (blRoot of tx 1)."""
    if not peaks:
        return _ZERO_DIGEST
    acc = peaks[-1]
    for peak in reversed(peaks[:-1]):
        acc = sha256(_NODE_PREFIX + peak + acc)
    return acc


def aht_append(peaks: list, leaf_count: int, alh_value: bytes) -> bytes:
    """Append one leaf; return the new nodes (leaf hash, then each new parent) concatenated."""
    node = sha256(_LEAF_PREFIX + alh_value)
    nodes = [node]
    index = leaf_count            # 0-based index of the new leaf
    while index & 1:
        node = sha256(_NODE_PREFIX + peaks.pop() + node)
        nodes.append(node)
        index >>= 1
    peaks.append(node)
    return b"".join(nodes)


# --- building, exporting and replicating transactions (§11) -----------------------------------

def _check_entry(key: bytes, value_len: int, metadata: bytes, limits) -> None:
    entries_max, key_max, value_max = limits
    if not key:
        raise IllegalArgumentsError("key can not be empty")
    if len(key) > key_max:
        raise IllegalArgumentsError(f"key length {len(key)} exceeds the limit of {key_max} bytes")
    if value_len > value_max:
        raise IllegalArgumentsError(
            f"value length {value_len} exceeds the limit of {value_max} bytes")
    if len(metadata) > KV_METADATA_SIZE_MAX:
        raise IllegalArgumentsError("kv metadata too long")


def _seal(version, tx_id, prev_alh, ts, peaks, entries, hvalues, truncated):
    """Hash one tx's entries and chain it: returns (header tuple, alh, record, aht nodes)."""
    digests = [entry_digest(version, k, md, hv) for (k, md, _), hv in zip(entries, hvalues)]
    eh = entries_hash(digests)
    header = (tx_id, prev_alh, ts, version, b"", len(entries), eh, tx_id - 1, aht_root(peaks))
    tx_alh = alh(tx_id, prev_alh, inner_hash(*header))
    blob = _export_blob(header, entries, truncated)
    nodes = aht_append(peaks, tx_id - 1, tx_alh)
    return header, tx_alh, blob + b"".join(hvalues) + tx_alh, nodes


def _export_blob(header, entries, truncated) -> bytes:
    hdr = encode_header(*header)
    parts = [_U32.pack(len(hdr)), hdr]
    for key, md, value in entries:
        parts += [_U16.pack(len(key)), key, _U16.pack(len(md)), md, _U32.pack(len(value)), value]
    parts.append(_TRAILER_VALUES_TRUNCATED if truncated else _TRAILER_VALUES_PRESENT)
    return b"".join(parts)


def build_txs(version: int, first_id: int, prev_alh: bytes, peaks: list, ts: int, txs, limits):
    """Turn callers' writes into chained transactions.

    ``txs`` is a list of transactions, each a list of ``(key, value, kv_metadata_bytes)`` with the
    caller's (unprefixed) key and value, or a ``FlatTx``. Returns a list of ``(header, alh,
    record, aht_nodes)``; ``peaks`` is advanced past every new tx. Nothing is returned if any tx
    is invalid.
    """
    # Validate everything before hashing anything, so one bad tx cannot leave peaks half-advanced.
    prepared = []
    for entries in txs:
        if type(entries) is FlatTx:
            entries = _flat_entries(entries)
        if not entries:
            raise IllegalArgumentsError("no entries provided")
        if len(entries) > limits[0]:
            raise IllegalArgumentsError(
                f"{len(entries)} entries exceed the limit of {limits[0]} entries per tx")
        stored = []
        for entry in entries:
            if type(entry) is not tuple or len(entry) != 3:
                raise IllegalArgumentsError("each entry must be a (key, value, metadata) tuple")
            key, value, md = entry
            if type(key) is not bytes or type(value) is not bytes or type(md) is not bytes:
                raise IllegalArgumentsError("keys, values and metadata must be bytes")
            if not key:
                raise IllegalArgumentsError("key can not be empty")
            stored_key, stored_value = _KV_PREFIX + key, _KV_PREFIX + value
            _check_entry(stored_key, len(stored_value), md, limits)
            if md:
                try:        # metadata that does not parse would seal an unreadable tx
                    parse_kv_metadata(md)
                except CorruptedDataError as exc:
                    raise IllegalArgumentsError(f"invalid kv metadata: {exc}") from None
            if version == 0 and md:
                raise IllegalArgumentsError("kv metadata is unsupported in tx header version 0")
            stored.append((stored_key, md, stored_value))
        if len({k for k, _, _ in stored}) != len(stored):
            raise IllegalArgumentsError("duplicated key")
        prepared.append(stored)
    out = []
    tx_id = first_id
    for stored in prepared:
        hvalues = [sha256(v) for _, _, v in stored]
        sealed = _seal(version, tx_id, prev_alh, ts, peaks, stored, hvalues, False)
        out.append(sealed)
        prev_alh = sealed[1]
        tx_id += 1
    return out


def _flat_entries(tx: FlatTx) -> list:
    """A FlatTx as (key, value, metadata) tuples, with the native codec's checks and messages."""
    kvs, md = tx
    if type(kvs) is not list:
        raise IllegalArgumentsError("kvs_flat must be a list")
    if len(kvs) % 2:
        raise IllegalArgumentsError("kvs_flat must alternate keys and values")
    if type(md) is not bytes:
        raise IllegalArgumentsError("keys, values and metadata must be bytes")
    pairs = iter(list(kvs))
    return [(key, value, md) for key, value in zip(pairs, pairs)]


def _walk_entry(blob: bytes, size: int, pos: int):
    """(key, md, value, where the next entry starts) of the entry at ``pos``; each length is
    checked against what is left of the first ``size`` bytes."""
    if pos + 2 > size:
        raise IllegalArgumentsError("export blob truncated in an entry")
    key_len = _U16.unpack_from(blob, pos)[0]
    pos += 2
    if pos + key_len + 2 > size:
        raise IllegalArgumentsError("export blob truncated in an entry key")
    key = blob[pos:pos + key_len]
    pos += key_len
    md_len = _U16.unpack_from(blob, pos)[0]
    pos += 2
    if md_len > KV_METADATA_SIZE_MAX or pos + md_len + 4 > size:
        raise IllegalArgumentsError("export blob kv metadata length out of range")
    md = blob[pos:pos + md_len]
    pos += md_len
    value_len = _U32.unpack_from(blob, pos)[0]
    pos += 4
    if value_len > size - pos:
        raise IllegalArgumentsError("export blob truncated in an entry value")
    return key, md, blob[pos:pos + value_len], pos + value_len


def _parse_blob(blob: bytes, limits, check_duplicates: bool = True,
                checked_entry: Optional[int] = None):
    """(header tuple, [(key, md, value-or-hvalue)], truncated) with every length checked.
    Stored records skip the duplicate-key check: it was made when the tx was written. With
    ``checked_entry``, only that entry's limits and metadata are checked (a read of one entry of
    a stored record; the walk still checks every length against what is left of the blob)."""
    size = len(blob)
    if size < 4:
        raise IllegalArgumentsError("export blob too short")
    hdr_len = _U32.unpack_from(blob, 0)[0]
    if hdr_len > size - 4 or hdr_len > 128 + TX_METADATA_SIZE_MAX:
        raise IllegalArgumentsError("export blob header length out of range")
    header = decode_header(blob[4:4 + hdr_len])
    nentries = header[5]
    if nentries > limits[0]:
        raise IllegalArgumentsError(
            f"{nentries} entries exceed the limit of {limits[0]} entries per tx")
    pos = 4 + hdr_len
    entries = []
    for _ in range(nentries):
        key, md, value, pos = _walk_entry(blob, size, pos)
        entries.append((key, md, value))
    truncated = False
    if pos != size:  # the trailer is optional (older primaries)
        if size - pos != 3 or _U16.unpack_from(blob, pos)[0] != 1:
            raise IllegalArgumentsError("export blob has trailing bytes")
        flag = blob[pos + 2]
        if flag > 1:
            raise IllegalArgumentsError("invalid truncation info")
        truncated = flag == 1
    checked = entries
    if checked_entry is not None:
        checked = entries[checked_entry:checked_entry + 1] if checked_entry >= 0 else []
    for key, md, value in checked:
        _check_entry(key, 0 if truncated else len(value), md, limits)
        if truncated and len(value) != DIGEST_SIZE:
            raise IllegalArgumentsError("truncated value must be a 32-byte hash")
        if header[3] == 0 and md:
            raise IllegalArgumentsError("kv metadata is unsupported in tx header version 0")
        parse_kv_metadata(md)
    if check_duplicates and len({k for k, _, _ in entries}) != nentries:
        raise IllegalArgumentsError("duplicated key")
    return header, entries, truncated


def blob_tx_id(blob) -> int:
    """The tx id an export blob's header starts with (``u32 hdrLen || u64 id || ...``), nothing
    else checked: what a replica needs to place a blob before it verifies it."""
    if len(blob) < 12:
        raise IllegalArgumentsError("export blob too short")
    return _U64.unpack_from(blob, 4)[0]


def verify_blob(blob: bytes, limits):
    """Parse an export blob and check its entries against its Eh: returns (header, alh)."""
    header, entries, truncated = _parse_blob(blob, limits)
    hvalues = [v if truncated else sha256(v) for _, _, v in entries]
    digests = [entry_digest(header[3], k, md, hv) for (k, md, _), hv in zip(entries, hvalues)]
    if entries_hash(digests) != header[6]:
        raise IllegalArgumentsError("entries hash (Eh) differs")
    return header, alh(header[0], header[1], inner_hash(*header))


def replicate_blobs(blobs, first_id: int, prev_alh: bytes, peaks: list, limits):
    """Verify exported txs against the local chain and seal them, as ``build_txs`` does.

    Checks, in immudb's order: entry count, Eh, ordering (ids from ``first_id`` without gaps),
    blRoot (equal to the local AHT root at id-1: immucore links every tx to its predecessor) and
    prevAlh. The resulting Alh is the primary's. Returns the same tuples as ``build_txs``.
    Raises before touching ``peaks`` if any blob fails.
    """
    checked = []
    tx_id, chain_alh = first_id, prev_alh
    work_peaks = list(peaks)
    for blob in blobs:
        header, entries, truncated = _parse_blob(blob, limits)
        version = header[3]
        hvalues = [v if truncated else sha256(v) for _, _, v in entries]
        digests = [entry_digest(version, k, md, hv) for (k, md, _), hv in zip(entries, hvalues)]
        if entries_hash(digests) != header[6]:
            raise IllegalArgumentsError(f"entries hash (Eh) differs at tx {header[0]}")
        if header[0] != tx_id:
            raise IllegalArgumentsError(
                f"attempt to commit a tx in wrong order: expected tx {tx_id}, got tx {header[0]}")
        if header[7] != tx_id - 1:
            raise IllegalArgumentsError(
                f"tx {tx_id} links to bl_tx_id {header[7]}; immucore requires bl_tx_id = id - 1")
        if header[8] != aht_root(work_peaks):
            raise IllegalArgumentsError(f"attempt to commit a tx with invalid blRoot at tx {tx_id}")
        if header[1] != chain_alh:
            raise IllegalArgumentsError(f"attempt to commit a tx with invalid prevAlh at tx {tx_id}")
        tx_alh = alh(tx_id, chain_alh, inner_hash(*header))
        nodes = aht_append(work_peaks, tx_id - 1, tx_alh)
        checked.append((header, tx_alh, bytes(blob) + b"".join(hvalues) + tx_alh, nodes))
        chain_alh = tx_alh
        tx_id += 1
    peaks[:] = work_peaks
    return checked


# --- reading records back ---------------------------------------------------------------------

_RECORD_LIMITS = (1 << 32, 1 << 16, 1 << 32)     # a stored record's own counts, checked on write


def record_entry_count(record: bytes) -> int:
    """The entry count in a record's header, read at its fixed offsets (no parse)."""
    if len(record) < 4 + 52:
        raise CorruptedDataError("data is corrupted: record too short")
    if _U16.unpack_from(record, 4 + 48)[0] == 0:      # header starts after the u32 hdrLen
        return _U16.unpack_from(record, 4 + 50)[0]
    md_len = _U16.unpack_from(record, 4 + 50)[0]
    if len(record) < 4 + 56 + md_len:
        raise CorruptedDataError("data is corrupted: record too short")
    return _U32.unpack_from(record, 4 + 52 + md_len)[0]


def _record_blob_len(record: bytes) -> int:
    """A record's export blob is followed by one hvalue per entry and the alh."""
    nentries = record_entry_count(record)
    blob_len = len(record) - DIGEST_SIZE * (nentries + 1)
    if blob_len < 0:
        raise CorruptedDataError("data is corrupted: record too short")
    return blob_len


def record_export_blob(record: bytes) -> bytes:
    return bytes(record[:_record_blob_len(record)])


def record_alh(record: bytes) -> bytes:
    return bytes(record[-DIGEST_SIZE:])


def decode_record(record: bytes):
    """(header, alh, [(stored_key, md, value or None if truncated, hvalue)])."""
    record = bytes(record)      # results are bytes, never views into the caller's buffer
    blob_len = _record_blob_len(record)
    header, entries, truncated = _parse_blob(record[:blob_len], _RECORD_LIMITS,
                                             check_duplicates=False)
    hvalues = record[blob_len:-DIGEST_SIZE]
    out = [(k, md, None if truncated else v, hvalues[i * 32:(i + 1) * 32])
           for i, (k, md, v) in enumerate(entries)]
    return header, record[-DIGEST_SIZE:], out


def record_entry(record: bytes, index: int):
    """One entry of a record: (stored_key, md, value or None, hvalue).

    Every entry's lengths are checked, but only the wanted entry's limits and metadata, since
    the whole tx was checked when it was written (gets use ``record_entry_at``).
    """
    record = bytes(record)
    blob_len = _record_blob_len(record)
    _, entries, truncated = _parse_blob(record[:blob_len], _RECORD_LIMITS,
                                        check_duplicates=False, checked_entry=index)
    if not 0 <= index < len(entries):
        raise CorruptedDataError("data is corrupted: entry index out of range")
    key, md, value = entries[index]
    hvalue = record[blob_len + index * DIGEST_SIZE:blob_len + (index + 1) * DIGEST_SIZE]
    return key, md, None if truncated else value, hvalue


def record_entry_at(record: bytes, index: int, offset: int):
    """``record_entry`` for an entry whose start the key index gave (``entry_offset``): one entry
    is read, not the whole record walked. The offset is checked to lie among the entries and the
    entry's lengths against what is left; the caller checks that the key is the one it wanted.
    ``INDEX_ENTRY_OFFSET_UNKNOWN`` (truncated values, or a record past 4 GiB) walks the record."""
    if offset == INDEX_ENTRY_OFFSET_UNKNOWN:
        return record_entry(record, index)
    record = bytes(record)
    size = _record_blob_len(record)
    hdr_len = _U32.unpack_from(record, 0)[0] if size >= 4 else size
    if hdr_len > size - 4 or hdr_len > 128 + TX_METADATA_SIZE_MAX:
        raise CorruptedDataError("data is corrupted: record header length out of range")
    header = decode_header(record[4:4 + hdr_len])
    if not 0 <= index < header[5]:
        raise CorruptedDataError("data is corrupted: entry index out of range")
    if not 4 + hdr_len <= offset < size:
        raise CorruptedDataError("data is corrupted: entry offset out of range")
    key, md, value, _ = _walk_entry(record, size, offset)
    _check_entry(key, len(value), md, _RECORD_LIMITS)
    if header[3] == 0 and md:
        raise IllegalArgumentsError("kv metadata is unsupported in tx header version 0")
    parse_kv_metadata(md)
    hvalue = record[size + index * DIGEST_SIZE:size + (index + 1) * DIGEST_SIZE]
    return key, md, value, hvalue


def record_digests(record: bytes) -> list:
    """Entry digests of a record, in tx order (for entry inclusion proofs)."""
    header, _, entries = decode_record(record)
    return [entry_digest(header[3], k, md, hv) for k, md, _, hv in entries]


# --- the key index ----------------------------------------------------------------------------

def index_key(stored_key: bytes) -> bytes:
    """The LMDB key under which a stored key is indexed (long keys are folded with their hash)."""
    if len(stored_key) <= INDEX_KEY_UNFOLDED_BYTES_MAX:
        return bytes(stored_key)
    return bytes(stored_key[:INDEX_KEY_UNFOLDED_BYTES_MAX]) + sha256(stored_key)


def index_items(first_tx_id: int, records) -> list:
    """Index rows for consecutive records, sorted:
    ``(index_key, u64 tx_id || u16 entry_index || u32 entry_offset)`` (``layout.INDEX_ROW``).

    ``entry_offset`` is where the entry starts in its record (``record_entry_at``), or
    INDEX_ENTRY_OFFSET_UNKNOWN. Non-indexable entries are skipped; deleted ones are indexed (a
    read then reports the key as missing). Sorted by (key, tx) so the LMDB cursor walks the
    B-tree in order.
    """
    rows = []
    for n, record in enumerate(records):
        tx_id = first_tx_id + n
        header, _, entries = decode_record(record)
        offset = 4 + _U32.unpack_from(record, 0)[0]
        for entry_index, (key, md, value, _) in enumerate(entries):
            entry_offset = offset if value is not None else INDEX_ENTRY_OFFSET_UNKNOWN
            offset += 2 + len(key) + 2 + len(md) + 4 + (DIGEST_SIZE if value is None
                                                         else len(value))
            if md and parse_kv_metadata(md)[2]:
                continue
            rows.append((index_key(key), index_row(tx_id, entry_index,
                                                   min(entry_offset, INDEX_ENTRY_OFFSET_UNKNOWN))))
    rows.sort()
    return rows
