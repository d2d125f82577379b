# cython: language_level=3
"""The native codec: immudb's encodings and hashes in C, with the API of ``immucore.codec.pure``,
and the wire protocol's frame codec, with the API of ``immucore.protocol.frames``.

Every function here has the same arguments, results and exceptions as its twin in
``immucore/codec/pure.py`` (the frame codec's twins are in ``immucore/protocol/frames.py``), the
reference the tests compare against; the per-byte and per-entry work (parsing export blobs,
writing records, SHA-256 via OpenSSL's libcrypto, the entry hash tree, Alh, the AHT, XXH64 and
frames) is C. Python objects appear only at the API boundary. Formats:
docs/immudb-format.md (the § numbers in the .pxi files).

Where the pure codec lets Python raise ``struct.error`` (an integer that does not fit its field),
this module calls the same ``struct.Struct`` on the error path so the exception and its message
are the pure codec's. Lengths read from input are checked against the remaining buffer and the
limits before anything is allocated. Hashing of large batches runs without the GIL (from
NOGIL_BLOCKS_MIN blocks of work; below that, dropping the GIL costs more than it gives).

Where this module differs from the pure codec, on purpose, all on error paths:
  * A record too short for its own entry count raises CorruptedDataError("data is corrupted:
    record too short"); pure._record_blob_len raises struct.error or slices from the end.
  * An error leaves ``peaks`` as it was. pure.aht_append pops peaks before it finds too few, and
    pure.build_txs can raise IndexError/struct.error for a later tx after advancing peaks.
  * Read-only inputs (blobs, records, digests, hashes) may be any bytes-like object, e.g. an LMDB
    memoryview, read in place; results are always bytes.
  * answers.pxi's readers raise TypeError for input that is not bytes-like, as their pure twins
    do, but with CPython's buffer message (and BufferError for a non-contiguous view).
  * FrameDecoder.feed raises RuntimeError when called while a feed of the same decoder runs
    (another thread during a large body's hash without the GIL, or a re-entrant call), where
    the pure decoder has no such guard: the running feed is reading the buffer in place.

Files: util.pxi (byte order, integers, bytes, limits), hashing.pxi (SHA-256, htree, AHT),
header.pxi (kv metadata, tx header, inner hash, Alh), blob.pxi (export blobs: parse, verify,
build, replicate), record.pxi (records and the key index), frames.pxi (XXH64, encode_frame,
FrameDecoder: the wire protocol's frames), answers.pxi (a plain GET's key and answer, a SET's
answer and request: the fixed-shape bodies of the commonest messages).
"""
cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_CheckBuffer, PyObject_GetBuffer
from cpython.bytes cimport (PyBytes_AS_STRING, PyBytes_Check, PyBytes_CheckExact,
                            PyBytes_FromStringAndSize, PyBytes_GET_SIZE)
from cpython.long cimport PyLong_Check, PyLong_CheckExact, PyLong_FromUnsignedLongLong
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF
from libc.stdint cimport UINT64_MAX, int64_t, uint32_t, uint64_t
from libc.stdlib cimport qsort
from libc.string cimport memcmp, memcpy, memset

import math as _math
import struct as _struct

from immucore.constants import (DIGEST_SIZE as _DIGEST_SIZE_PY,
                                INDEX_KEY_SIZE_BYTES_MAX as _INDEX_KEY_SIZE_BYTES_MAX_PY,
                                INDEX_ENTRY_OFFSET_UNKNOWN as _INDEX_ENTRY_OFFSET_UNKNOWN_PY,
                                INDEX_KEY_UNFOLDED_BYTES_MAX as _INDEX_KEY_UNFOLDED_BYTES_MAX_PY,
                                KV_METADATA_SIZE_MAX as _KV_METADATA_SIZE_MAX_PY,
                                TX_METADATA_SIZE_MAX as _TX_METADATA_SIZE_MAX_PY)
from immucore.errors import CorruptedDataError, IllegalArgumentsError
from immucore.store.layout import INDEX_ROW as _INDEX_ROW_PY
from immucore.flat_tx import FlatTx as _FlatTx

IMPLEMENTATION = "native"

__all__ = ("IMPLEMENTATION", "sha256", "kv_metadata_bytes", "parse_kv_metadata", "encode_header",
           "decode_header", "inner_hash", "alh", "entry_digest", "entries_hash",
           "htree_inclusion_proof", "aht_root", "aht_append", "build_txs", "blob_tx_id", "verify_blob",
           "replicate_blobs", "record_export_blob", "record_alh", "decode_record", "record_entry",
           "record_entry_at", "record_entry_count", "record_digests", "index_key", "index_items", "xxh64_intdigest",
           "encode_frame", "FrameDecoder", "plain_get_key", "encode_entry_answer",
           "encode_header_answer", "decode_header_answer", "encode_flat_set_request")

# The format's sizes (docs/immudb-format.md §2), as C constants; checked against
# immucore.constants below.
cdef enum:
    DIGEST = 32
    KV_MD_MAX = 11                  # KV_METADATA_SIZE_MAX
    TX_MD_MAX = 268                 # TX_METADATA_SIZE_MAX
    HEADER_V0_SIZE = 124
    HEADER_V1_SIZE_MIN = 128
    INDEX_KEY_MAX = 480             # INDEX_KEY_SIZE_BYTES_MAX: a folded key's size
    INDEX_KEY_UNFOLDED_MAX = 448    # INDEX_KEY_UNFOLDED_BYTES_MAX: longer keys are folded
    ENTRY_SIZE_MIN = 8              # u16 kLen + u16 mdLen + u32 vLen: an entry's smallest encoding
    # An index row's value (immucore/store/layout.py INDEX_ROW, docs/storage.md), which
    # index_items writes: u64 tx_id || u16 entry_index || u32 entry_offset.
    INDEX_ROW_SIZE = 14
    INDEX_ROW_ENTRY_INDEX_AT = 8
    INDEX_ROW_ENTRY_OFFSET_AT = 10
    # Work (in 64-byte SHA-256 blocks) from which a call hashes without the GIL: ~70 us of hashing.
    # Below it, releasing and re-taking the GIL costs more than it lets other threads gain (and a
    # re-take can wait a whole switch interval behind a busy thread).
    NOGIL_BLOCKS_MIN = 1024


# An index row's entry_offset when the entry must be found by walking its record (constants.py).
cdef uint32_t ENTRY_OFFSET_UNKNOWN = _INDEX_ENTRY_OFFSET_UNKNOWN_PY


def _check_constants():
    for name, mine, theirs in (("DIGEST_SIZE", DIGEST, _DIGEST_SIZE_PY),
                               ("KV_METADATA_SIZE_MAX", KV_MD_MAX, _KV_METADATA_SIZE_MAX_PY),
                               ("TX_METADATA_SIZE_MAX", TX_MD_MAX, _TX_METADATA_SIZE_MAX_PY),
                               ("INDEX_KEY_SIZE_BYTES_MAX", INDEX_KEY_MAX,
                                _INDEX_KEY_SIZE_BYTES_MAX_PY),
                               ("INDEX_KEY_UNFOLDED_BYTES_MAX", INDEX_KEY_UNFOLDED_MAX,
                                _INDEX_KEY_UNFOLDED_BYTES_MAX_PY)):
        if mine != theirs:
            raise ImportError(f"immucore._native was built with {name}={mine} but "
                              f"immucore.constants says {theirs}; rebuild the extension")
    # the index row as immucore.store.layout lays it out: the same size and field offsets
    if (_INDEX_ROW_PY.format.lstrip(">") != "QHI" or _INDEX_ROW_PY.size != INDEX_ROW_SIZE
            or _struct.calcsize(">Q") != INDEX_ROW_ENTRY_INDEX_AT
            or _struct.calcsize(">QH") != INDEX_ROW_ENTRY_OFFSET_AT):
        raise ImportError(f"immucore._native writes {INDEX_ROW_SIZE}-byte index rows "
                          f"(u64, u16 at {INDEX_ROW_ENTRY_INDEX_AT}, u32 at "
                          f"{INDEX_ROW_ENTRY_OFFSET_AT}) but immucore.store.layout says "
                          f"{_INDEX_ROW_PY.format!r}; rebuild the extension")


_check_constants()

include "util.pxi"
include "hashing.pxi"
include "header.pxi"
include "blob.pxi"
include "record.pxi"
include "frames.pxi"
include "answers.pxi"
