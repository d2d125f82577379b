"""Every LMDB key and value layout of a database folder, in one place (docs/storage.md).

The writer, the indexer (thread or worker process) and every reader go through these names, so
a layout is written down once. The native codec writes index rows itself
(``ext/immucore/record.pxi``, ``index_items``); its sizes are named in ``_native.pyx``
(``INDEX_ROW_*``) and checked against ``INDEX_ROW`` here when the extension is imported.

All integers are big-endian.
"""
from __future__ import annotations

import json
import struct

from ..constants import DIGEST_SIZE, INDEX_ENTRY_OFFSET_UNKNOWN
from ..errors import CorruptedDataError

U64 = struct.Struct(">Q")
U64_MAX = (1 << 64) - 1

# --- <db>/log -----------------------------------------------------------------------------------
# ``tx``: u64 tx id -> the tx record = export blob || hvalue x NEntries || Alh
# ``aht``: u64 tx id -> the AHT nodes that tx completed, DIGEST_SIZE bytes per level from 0 up
# ``meta``: the keys below
SETTINGS_KEY = b"settings"          # JSON {"format", "header_version", "replica"}
LOG_FORMAT = "immucore-1"           # the settings' "format"
DISCARD_FLOOR_KEY = b"discard_floor"   # u64: a replica never discards at or below it


def encode_settings(settings: dict) -> bytes:
    return json.dumps(settings, sort_keys=True).encode()


def decode_settings(raw):
    """The stored settings, or None for a log that has none yet."""
    return json.loads(raw) if raw else None


def tx_key(tx_id: int) -> bytes:
    """The key of tx ``tx_id`` in ``tx`` and in ``aht`` (big-endian: LMDB's order is id order)."""
    return U64.pack(tx_id)


def tx_id_of_key(key) -> int:
    return U64.unpack(key)[0]


def record_alh(record) -> bytes:
    """The Alh a tx record ends with."""
    return bytes(record[-DIGEST_SIZE:])


def aht_node(nodes, level: int):
    """The node of height ``level`` in a tx's ``aht`` value, or None if it holds no such node."""
    if nodes is None or len(nodes) < (level + 1) * DIGEST_SIZE:
        return None
    return bytes(nodes[level * DIGEST_SIZE:(level + 1) * DIGEST_SIZE])


def pack_tx_id(tx_id: int) -> bytes:
    """A meta value holding a tx id (the discard floor, the indexed-up-to mark)."""
    return U64.pack(tx_id)


def unpack_tx_id(raw) -> int:
    """A meta value holding a tx id; an absent one (None) is 0."""
    return U64.unpack(raw)[0] if raw else 0


# --- <db>/index ---------------------------------------------------------------------------------
# ``keys`` (DUPSORT): index key -> INDEX_ROW per version, sorted (tx id, entry index)
# ``meta``: the keys below
INDEXED_TX_KEY = b"indexed_tx"      # u64: every tx up to this one is indexed
ROW_FORMAT_KEY = b"row_format"
ROW_FORMAT = b"2"                   # rows carry entry_offset; an index without it is rebuilt
STORED_KEY_PREFIX = b"\x00"         # the database layer's prefix of every stored key
INDEX_ROW = struct.Struct(">QHI")   # tx id, entry index, entry offset (or ..._UNKNOWN)
INDEX_ROW_OLD = struct.Struct(">QH")   # format 1, without the offset (read, never written)


def index_row(tx_id: int, entry_index: int, entry_offset: int) -> bytes:
    return INDEX_ROW.pack(tx_id, entry_index, entry_offset)


def parse_index_row(row) -> tuple:
    """``(tx id, entry index, entry offset)`` of an index row (offset UNKNOWN for format 1)."""
    if len(row) == INDEX_ROW.size:
        return INDEX_ROW.unpack(row)
    if len(row) == INDEX_ROW_OLD.size:
        return (*INDEX_ROW_OLD.unpack(row), INDEX_ENTRY_OFFSET_UNKNOWN)
    raise CorruptedDataError(f"data is corrupted: an index row of {len(row)} bytes")


def index_rows_from(tx_id: int) -> bytes:
    """The smallest row of tx ``tx_id`` or later, for seeking among a key's versions."""
    return U64.pack(min(tx_id, U64_MAX))
