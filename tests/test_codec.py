"""The codec against immudb's golden vectors, bad input, and the two implementations against each other.

Every test body runs on both codecs (``impl`` is ``immucore.codec.pure`` or ``immucore._native``);
the agreement tests run the pure codec as the oracle for the native one on random input.
"""
from __future__ import annotations

import hashlib
import inspect
import os
import random
import struct
import threading
import tracemalloc

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from immucore.codec import API, pure
from immucore.constants import (INDEX_ENTRY_OFFSET_UNKNOWN, INDEX_KEY_SIZE_BYTES_MAX,
                                INDEX_KEY_UNFOLDED_BYTES_MAX)
from immucore.errors import CorruptedDataError, IllegalArgumentsError
from immucore.flat_tx import FlatTx
from immucore.types import KVMetadata

try:
    from codec_vectors import (CHAIN_FILES, EMPTY_ALH, LIMITS, build_chain, header_tuple, hx,
                               impl_params, load_chain, outcome, peaks_for, pure_record_blob_len,
                               random_tx, require, require_native)
except ImportError:  # tests/ imported as a package
    from tests.codec_vectors import (CHAIN_FILES, EMPTY_ALH, LIMITS, build_chain, header_tuple,
                                     hx, impl_params, load_chain, outcome, peaks_for,
                                     pure_record_blob_len, random_tx, require, require_native)

DATA_ERRORS = (IllegalArgumentsError, CorruptedDataError)
H = lambda data: hashlib.sha256(data).digest()  # noqa: E731  (the independent oracle)


@pytest.fixture(params=impl_params())
def impl(request):
    return require(request.param)


@pytest.fixture(params=CHAIN_FILES)
def chain(request):
    return load_chain(request.param)


def chain_blobs(chain):
    return [hx(tx["export_blob"]) for tx in chain["txs"]]


# --- the module itself ---------------------------------------------------------------------------

def test_api_is_complete_with_the_same_signatures(impl):
    assert impl.IMPLEMENTATION in ("pure", "native")
    for name in API:
        fn = getattr(impl, name)
        assert list(inspect.signature(fn).parameters) == \
            list(inspect.signature(getattr(pure, name)).parameters), name


def test_native_is_the_native_codec():
    native = require_native()
    assert native.IMPLEMENTATION == "native"
    assert set(API) <= set(native.__all__)


# --- golden vectors ------------------------------------------------------------------------------

def test_vector_headers_inner_hashes_and_alhs(impl, chain):
    for tx in chain["txs"]:
        header = header_tuple(tx)
        assert impl.encode_header(*header) == hx(tx["header_bytes"])
        assert impl.decode_header(hx(tx["header_bytes"])) == header
        inner = impl.inner_hash(*header)
        assert inner == hx(tx["innerHash"])
        assert impl.alh(tx["id"], hx(tx["prevAlh"]), inner) == hx(tx["alh"])


def test_vector_entries_digests_eh_and_proofs(impl, chain):
    version = chain["header_version"]
    for tx in chain["txs"]:
        digests = []
        for e in tx["entries"]:
            stored_key, stored_value = hx(e["stored_key"]), hx(e["stored_value"])
            assert stored_key == b"\x00" + hx(e["key"])
            assert impl.sha256(stored_value) == hx(e["hValue"])
            digest = impl.entry_digest(version, stored_key, hx(e["metadata_bytes"]),
                                       hx(e["hValue"]))
            assert digest == hx(e["digest"])
            digests.append(digest)
        assert impl.entries_hash(digests) == hx(tx["eh"])
        for index, e in enumerate(tx["entries"]):
            proof = e["inclusion_proof"]
            assert (proof["leaf"], proof["width"]) == (index, len(digests))
            assert impl.htree_inclusion_proof(digests, index) == [hx(t) for t in proof["terms"]]


def test_vector_kv_metadata(impl, chain):
    for tx in chain["txs"]:
        for e in tx["entries"]:
            md = e["metadata"]
            expected = (md.get("deleted", False), md.get("expiresAt"), md.get("nonIndexable", False))
            raw = hx(e["metadata_bytes"])
            assert impl.kv_metadata_bytes(*expected) == raw
            assert impl.parse_kv_metadata(raw) == expected


def test_vector_aht_roots_after_each_tx(impl, chain):
    peaks = []
    assert impl.aht_root(peaks) == bytes(32)
    for tx in chain["txs"]:
        assert impl.aht_root(peaks) == hx(tx["blRoot"])
        nodes = impl.aht_append(peaks, tx["id"] - 1, hx(tx["alh"]))
        assert nodes[:32] == H(b"\x00" + hx(tx["alh"]))
        assert len(nodes) == 32 * (1 + _trailing_ones(tx["id"] - 1))
        assert nodes[-32:] == peaks[-1]
        assert impl.aht_root(peaks) == hx(chain["aht"]["roots"][str(tx["id"])])


def _trailing_ones(n: int) -> int:
    count = 0
    while n & 1:
        count, n = count + 1, n >> 1
    return count


def test_vector_linear_proofs_fold_with_alh(impl, chain):
    alhs = {tx["id"]: hx(tx["alh"]) for tx in chain["txs"]}
    for dual in chain["dual_proofs"]:
        linear = dual["linearProof"]
        terms = [hx(t) for t in linear["terms"]]
        acc = terms[0]
        for offset, term in enumerate(terms[1:], start=1):
            acc = impl.alh(linear["sourceTxId"] + offset, acc, term)
        assert acc == alhs[linear["targetTxId"]]


def test_vector_export_blobs_from_build_txs(impl, chain):
    results, peaks = build_chain(impl, chain)
    for tx, (header, alh, record, nodes) in zip(chain["txs"], results):
        assert header == header_tuple(tx)
        assert alh == hx(tx["alh"])
        blob = hx(tx["export_blob"])
        assert impl.record_export_blob(record) == blob
        hvalues = b"".join(hx(e["hValue"]) for e in tx["entries"])
        assert record == blob + hvalues + alh
        assert impl.record_alh(record) == alh
        assert nodes[:32] == H(b"\x00" + alh)
        for value in (header[1], header[6], header[8], alh, record, nodes):
            assert type(value) is bytes
    assert impl.aht_root(peaks) == hx(chain["aht"]["roots"][str(chain["txs"][-1]["id"])])


def test_vector_blobs_verify(impl, chain):
    for tx in chain["txs"]:
        header, alh = impl.verify_blob(hx(tx["export_blob"]), LIMITS)
        assert header == header_tuple(tx)
        assert alh == hx(tx["alh"])


def test_vector_blobs_replicate_to_the_same_chain(impl, chain):
    built, built_peaks = build_chain(impl, chain)
    peaks = []
    results = impl.replicate_blobs(chain_blobs(chain), 1, EMPTY_ALH, peaks, LIMITS)
    assert [r[1] for r in results] == [hx(tx["alh"]) for tx in chain["txs"]]
    assert results == built
    assert peaks == built_peaks


def test_vector_blobs_replicate_in_batches(impl, chain):
    blobs, peaks, prev, alhs = chain_blobs(chain), [], EMPTY_ALH, []
    for start in range(0, len(blobs), 5):
        batch = impl.replicate_blobs(blobs[start:start + 5], start + 1, prev, peaks, LIMITS)
        alhs += [r[1] for r in batch]
        prev = alhs[-1]
    assert alhs == [hx(tx["alh"]) for tx in chain["txs"]]


def test_replicate_accepts_blobs_without_trailer(impl, chain):
    blobs = [b[:-3] if i % 2 else b for i, b in enumerate(chain_blobs(chain))]
    results = impl.replicate_blobs(blobs, 1, EMPTY_ALH, [], LIMITS)
    assert [r[1] for r in results] == [hx(tx["alh"]) for tx in chain["txs"]]
    for blob, tx, (_, alh, record, _) in zip(blobs, chain["txs"], results):
        assert record == blob + b"".join(hx(e["hValue"]) for e in tx["entries"]) + alh
        assert [e[2] for e in impl.decode_record(record)[2]] == [
            hx(e["stored_value"]) for e in tx["entries"]]


def test_native_takes_any_bytes_like_and_returns_bytes(chain):
    """(pure needs bytes here: it hashes key slices and concatenates them to bytes)"""
    native = require_native()
    blobs = [bytearray(b) if i % 2 else memoryview(b) for i, b in enumerate(chain_blobs(chain))]
    results = native.replicate_blobs(blobs, 1, bytearray(EMPTY_ALH), [], LIMITS)
    assert results == build_chain(native, chain)[0]
    assert all(type(x) is bytes for r in results for x in (r[0][1], r[1], r[2], r[3]))
    record = memoryview(results[0][2])
    assert native.decode_record(record) == native.decode_record(bytes(record))
    assert type(native.decode_record(record)[2][0][0]) is bytes


def test_build_txs_many_txs_in_one_call_equals_one_by_one(impl):
    rnd = random.Random(7)
    txs = [random_tx(rnd, rnd.randint(1, 12), rnd.randint(1, 40), rnd.randint(0, 150))
           for _ in range(9)]
    peaks_a, peaks_b = peaks_for(37), peaks_for(37)
    together = impl.build_txs(1, 38, EMPTY_ALH, peaks_a, 5, txs, LIMITS)
    prev, apart = EMPTY_ALH, []
    for offset, tx in enumerate(txs):
        apart += impl.build_txs(1, 38 + offset, prev, peaks_b, 5, [tx], LIMITS)
        prev = apart[-1][1]
    assert together == apart
    assert peaks_a == peaks_b


# --- records and the key index -------------------------------------------------------------------

def test_records_round_trip(impl, chain):
    results, _ = build_chain(impl, chain)
    version = chain["header_version"]
    for tx, (header, alh, record, _) in zip(chain["txs"], results):
        decoded_header, decoded_alh, entries = impl.decode_record(record)
        assert decoded_header == header and decoded_alh == alh
        expected = [(hx(e["stored_key"]), hx(e["metadata_bytes"]), hx(e["stored_value"]),
                     hx(e["hValue"])) for e in tx["entries"]]
        assert entries == expected
        for index, entry in enumerate(expected):
            assert impl.record_entry(record, index) == entry
        assert impl.record_entry_count(record) == len(tx["entries"])
        assert impl.record_digests(record) == [hx(e["digest"]) for e in tx["entries"]]
        assert impl.record_digests(record) == [
            impl.entry_digest(version, k, md, hv) for k, md, _, hv in entries]


def test_record_entry_index_out_of_range(impl, chain):
    record = build_chain(impl, chain)[0][0][2]
    for index in (-1, 1, 2 ** 70):
        with pytest.raises(CorruptedDataError, match="entry index out of range"):
            impl.record_entry(record, index)


def located(impl, first_tx_id, records, rows) -> list:
    """Rows with their entry offset checked and cut off: the offset must lead ``record_entry_at``
    to the very entry the walk finds, in a record that holds the row's key there."""
    out = []
    for key, value in rows:
        assert len(value) == 14
        tx_id, index, offset = struct.unpack(">QHI", value)
        record = records[tx_id - first_tx_id]
        entry = impl.record_entry(record, index)
        assert impl.record_entry_at(record, index, offset) == entry
        assert impl.index_key(entry[0]) == key
        if offset != INDEX_ENTRY_OFFSET_UNKNOWN:
            assert record[offset + 2:offset + 2 + len(entry[0])] == entry[0]
        out.append((key, value[:10]))
    return out


def test_index_items_over_the_chain(impl, chain):
    results, _ = build_chain(impl, chain)
    records = [r[2] for r in results]
    expected = []
    for tx in chain["txs"]:
        for index, e in enumerate(tx["entries"]):
            if e["metadata"].get("nonIndexable"):
                continue
            expected.append((hx(e["stored_key"]), struct.pack(">QH", tx["id"], index)))
    assert located(impl, 1, records, impl.index_items(1, records)) == sorted(expected)
    assert impl.index_items(1, iter(records)) == impl.index_items(1, records)  # any iterable
    assert impl.index_items(1, []) == []
    assert len(impl.index_items(1, records)) < sum(len(tx["entries"]) for tx in chain["txs"]) \
        or chain["header_version"] == 0


def test_index_rows_are_laid_out_as_the_store_layout_says(impl, chain):
    """The rows each codec writes (the native one in C) are the rows ``store/layout.py``
    reads: parsed by it, rebuilt by it byte for byte, pointing at their entries; a truncated
    record's rows say "walk" (INDEX_ENTRY_OFFSET_UNKNOWN)."""
    from immucore.store import layout
    results, _ = build_chain(impl, chain)
    records = [r[2] for r in results]
    long_key = b"q" * 600
    (extra,) = impl.build_txs(1, len(records) + 1, EMPTY_ALH, [], 1,
                              [[(long_key, b"v", b""), (b"k", b"w", b"")]], LIMITS)
    records.append(extra[2])
    rows = impl.index_items(1, records)
    assert rows and rows == pure.index_items(1, records)      # the pure codec is the oracle
    for key, value in rows:
        assert len(value) == layout.INDEX_ROW.size
        tx_id, index, offset = layout.parse_index_row(value)
        assert layout.index_row(tx_id, index, offset) == value
        assert value[:8] == layout.tx_key(tx_id)            # rows of a key sort by tx id
        assert layout.index_rows_from(tx_id) <= value < layout.index_rows_from(tx_id + 1)
        entry = impl.record_entry_at(records[tx_id - 1], index, offset)
        assert impl.index_key(entry[0]) == key
    blob = impl.record_export_blob(records[-1])
    truncated = _truncated_blob(blob, [e[3] for e in impl.decode_record(records[-1])[2]])
    (sealed,) = impl.replicate_blobs([truncated], len(records), EMPTY_ALH, [], LIMITS)
    for _, value in impl.index_items(len(records), [sealed[2]]):
        assert layout.parse_index_row(value)[2] == INDEX_ENTRY_OFFSET_UNKNOWN
    old_row = struct.pack(">QH", 5, 3)                       # format 1: read, never written
    assert layout.parse_index_row(old_row) == (5, 3, INDEX_ENTRY_OFFSET_UNKNOWN)
    with pytest.raises(CorruptedDataError, match="index row of 9 bytes"):
        layout.parse_index_row(b"x" * 9)


def test_blob_tx_id_reads_the_id_of_the_header(impl, chain):
    for tx, blob in zip(chain["txs"], chain_blobs(chain)):
        assert impl.blob_tx_id(blob) == tx["id"]
        assert impl.blob_tx_id(memoryview(blob)) == tx["id"]      # a buffer, as LMDB gives
        assert impl.blob_tx_id(blob[:12]) == tx["id"]             # nothing after it is read
    assert impl.blob_tx_id(b"\0\0\0\x08" + b"\xff" * 8) == (1 << 64) - 1
    for short in (b"", b"\0\0\0\x08", bytes(11)):
        with pytest.raises(IllegalArgumentsError, match="export blob too short"):
            impl.blob_tx_id(short)


def test_index_key_folds_long_keys(impl):
    for size in (1, 100, INDEX_KEY_UNFOLDED_BYTES_MAX):
        key = bytes(range(256)) * 2
        assert impl.index_key(key[:size]) == key[:size]
    for size in (INDEX_KEY_UNFOLDED_BYTES_MAX + 1, INDEX_KEY_SIZE_BYTES_MAX, 1025, 65535):
        key = random.Random(size).randbytes(size)
        folded = impl.index_key(key)
        assert folded == key[:INDEX_KEY_UNFOLDED_BYTES_MAX] + H(key)
        assert len(folded) == INDEX_KEY_SIZE_BYTES_MAX


def test_index_items_sorts_by_key_then_tx_and_folds(impl):
    long_key = b"k" * 600
    txs = [[(b"b", b"1", b""), (b"a", b"1", b"")],
           [(b"a", b"2", b""), (long_key, b"x", b""), (b"c", b"", impl.kv_metadata_bytes(
               False, None, True))],
           [(b"ab", b"3", impl.kv_metadata_bytes(True, 9, False)), (long_key, b"y", b"")]]
    results = impl.build_txs(1, 1, EMPTY_ALH, [], 1, txs, LIMITS)
    records = [r[2] for r in results]
    rows = located(impl, 10, records, impl.index_items(10, records))
    folded = impl.index_key(b"\x00" + long_key)
    assert rows == [
        (b"\x00a", struct.pack(">QH", 10, 1)), (b"\x00a", struct.pack(">QH", 11, 0)),
        (b"\x00ab", struct.pack(">QH", 12, 0)), (b"\x00b", struct.pack(">QH", 10, 0)),
        (folded, struct.pack(">QH", 11, 1)), (folded, struct.pack(">QH", 12, 1)),
    ]


def test_index_items_sorts_keys_that_share_heads(impl):
    """Keys that are prefixes of each other, or differ only after 8 bytes or in zero bytes."""
    keys = [b"a", b"a\x00", b"a\x00\x00", b"\x00", b"\x00\x00", b"abcdefg", b"abcdefgh",
            b"abcdefg\x00", b"abcdefgh\x00", b"abcdefgh\x01", b"abcdefgg\xff", b"\xff" * 9,
            b"\xff" * 8, b"b" * 447, b"b" * 448, b"b" * 449, b"b" * 600]
    rnd = random.Random(9)
    txs = [[(k, b"v", b"") for k in rnd.sample(keys, len(keys))] for _ in range(3)]
    records = [r[2] for r in impl.build_txs(1, 1, EMPTY_ALH, [], 1, txs, LIMITS)]
    expected = sorted((impl.index_key(b"\x00" + k), struct.pack(">QH", 7 + t, i))
                      for t, tx in enumerate(txs) for i, (k, _, _) in enumerate(tx))
    assert located(impl, 7, records, impl.index_items(7, records)) == expected


def _truncated_blob(blob: bytes, hvalues: list) -> bytes:
    """The same tx exported by a primary whose values are truncated: hashes instead of values."""
    hdr_len = struct.unpack_from(">I", blob)[0]
    pos, parts = 4 + hdr_len, [blob[:4 + hdr_len]]
    for hvalue in hvalues:
        key_len = struct.unpack_from(">H", blob, pos)[0]
        md_len = struct.unpack_from(">H", blob, pos + 2 + key_len)[0]
        head = blob[pos:pos + 2 + key_len + 2 + md_len]
        pos += len(head)
        value_len = struct.unpack_from(">I", blob, pos)[0]
        pos += 4 + value_len
        parts += [head, struct.pack(">I", 32), hvalue]
    return b"".join(parts) + b"\x00\x01\x01"


def test_truncated_values_verify_replicate_and_decode(impl, chain):
    blobs = [_truncated_blob(hx(tx["export_blob"]), [hx(e["hValue"]) for e in tx["entries"]])
             for tx in chain["txs"]]
    for tx, blob in zip(chain["txs"], blobs):
        assert impl.verify_blob(blob, LIMITS)[1] == hx(tx["alh"])
    results = impl.replicate_blobs(blobs, 1, EMPTY_ALH, [], LIMITS)
    assert [r[1] for r in results] == [hx(tx["alh"]) for tx in chain["txs"]]
    for tx, (_, _, record, _) in zip(chain["txs"], results):
        entries = impl.decode_record(record)[2]
        assert [(k, v, hv) for k, _, v, hv in entries] == [
            (hx(e["stored_key"]), None, hx(e["hValue"])) for e in tx["entries"]]
        assert impl.record_digests(record) == [hx(e["digest"]) for e in tx["entries"]]
    # a truncated value's place is not worth keeping: its rows send reads to the walk
    records = [r[2] for r in results]
    rows = impl.index_items(1, records)
    assert rows and all(v[10:] == struct.pack(">I", INDEX_ENTRY_OFFSET_UNKNOWN) for _, v in rows)
    located(impl, 1, records, rows)


def test_record_entry_at_refuses_offsets_outside_the_entries(impl, chain):
    record = build_chain(impl, chain)[0][0][2]
    (_, value), = impl.index_items(1, [record])[:1]
    _, index, offset = struct.unpack(">QHI", value)
    blob_len = len(impl.record_export_blob(record))
    hdr_len = struct.unpack_from(">I", record)[0]
    for bad in (0, 3 + hdr_len, blob_len, blob_len + 40, INDEX_ENTRY_OFFSET_UNKNOWN - 1):
        with pytest.raises(CorruptedDataError, match="entry offset out of range"):
            impl.record_entry_at(record, index, bad)
    for bad_index in (-1, 1 << 16, 1 << 70):
        with pytest.raises(CorruptedDataError, match="entry index out of range"):
            impl.record_entry_at(record, bad_index, offset)


def test_large_batches_and_values_hash_without_the_gil_the_same(impl):
    rnd = random.Random(11)
    txs = [random_tx(rnd, 10, 32, 100) for _ in range(150)]
    txs.append([(b"big", rnd.randbytes(300_000), b"")])
    results = impl.build_txs(1, 1, EMPTY_ALH, [], 1, txs, LIMITS)
    oracle = pure.build_txs(1, 1, EMPTY_ALH, [], 1, txs, LIMITS)
    assert results == oracle
    peaks = []
    replicated = impl.replicate_blobs([impl.record_export_blob(r[2]) for r in results], 1,
                                      EMPTY_ALH, peaks, LIMITS)
    assert replicated == results
    assert impl.sha256(txs[-1][0][1]) == H(txs[-1][0][1])
    assert impl.sha256(bytearray(txs[-1][0][1])) == H(txs[-1][0][1])


def test_concurrent_replication_gives_each_thread_its_own_result(impl):
    rnd = random.Random(5)
    txs = [random_tx(rnd, 10, 32, 100) for _ in range(200)]
    expected = impl.build_txs(1, 1, EMPTY_ALH, [], 1, txs, LIMITS)
    blobs = [impl.record_export_blob(r[2]) for r in expected]
    outputs, errors = [None] * 4, []

    def work(slot):
        try:
            outputs[slot] = impl.replicate_blobs(blobs, 1, EMPTY_ALH, [], LIMITS)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(slot,)) for slot in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert all(output == expected for output in outputs)


# --- bad input: blobs ----------------------------------------------------------------------------

def _replicate_keeps_peaks(impl, blob, chain, tx_index):
    """replicate one vector blob onto the chain before it; peaks must be untouched on failure."""
    peaks = list(peaks_before(chain, tx_index))
    before = list(peaks)
    prev = hx(chain["txs"][tx_index]["prevAlh"])
    try:
        result = impl.replicate_blobs([blob], tx_index + 1, prev, peaks, LIMITS)
    except DATA_ERRORS as exc:
        assert peaks == before
        return ("raise", type(exc), str(exc))
    return ("ok", result, peaks)


_PEAKS_CACHE = {}


def peaks_before(chain, tx_index):
    """The AHT's peaks before vector tx ``tx_index`` (built once, with the pure codec)."""
    key = (chain["header_version"], tx_index)
    if key not in _PEAKS_CACHE:
        peaks = []
        for tx in chain["txs"][:tx_index]:
            pure.aht_append(peaks, tx["id"] - 1, hx(tx["alh"]))
        _PEAKS_CACHE[key] = peaks
    return _PEAKS_CACHE[key]


def test_truncating_a_blob_anywhere_is_a_clean_error(impl, chain):
    for tx_index, tx in enumerate(chain["txs"]):
        blob = hx(tx["export_blob"])
        for cut in range(len(blob)):
            short = blob[:cut]
            if cut == len(blob) - 3:        # dropping exactly the (optional) trailer is valid
                assert impl.verify_blob(short, LIMITS)[1] == hx(tx["alh"])
                continue
            with pytest.raises(DATA_ERRORS):
                impl.verify_blob(short, LIMITS)
            result = _replicate_keeps_peaks(impl, short, chain, tx_index)
            assert result[0] == "raise"


def test_flipping_any_byte_of_a_blob_is_handled_like_pure(impl, chain):
    for tx_index, tx in enumerate(chain["txs"]):
        blob = hx(tx["export_blob"])
        for offset in range(len(blob)):
            for mask in (0x01, 0x80, 0xFF):
                bad = bytearray(blob)
                bad[offset] ^= mask
                bad = bytes(bad)
                got = _replicate_keeps_peaks(impl, bad, chain, tx_index)
                if impl is not pure:
                    assert got == _replicate_keeps_peaks(pure, bad, chain, tx_index)
                got_verify = outcome(impl.verify_blob, bad, LIMITS)
                if got_verify[0] == "raise":
                    assert issubclass(got_verify[1], DATA_ERRORS), got_verify
                if impl is not pure:
                    assert got_verify == outcome(pure.verify_blob, bad, LIMITS)


def _blob(header_fields: dict = None, entries=None, trailer=b"\x00\x01\x00", version=1,
          hdr_len=None):
    """A hand-made export blob (Eh and chain fields are dummies unless given)."""
    fields = dict(id=1, prev_alh=EMPTY_ALH, ts=0, version=version, metadata=b"", nentries=None,
                  eh=bytes(32), bl_tx_id=0, bl_root=bytes(32))
    fields.update(header_fields or {})
    entries = [(b"\x00k", b"", b"\x00v")] if entries is None else entries
    if fields["nentries"] is None:
        fields["nentries"] = len(entries)
    header = pure.encode_header(*fields.values())
    body = b"".join(struct.pack(">H", len(k)) + k + struct.pack(">H", len(md)) + md
                    + struct.pack(">I", len(v)) + v for k, md, v in entries)
    return struct.pack(">I", len(header) if hdr_len is None else hdr_len) + header + body + trailer


@pytest.mark.parametrize("blob, message", [
    (b"", "export blob too short"),
    (b"\x00\x00\x00", "export blob too short"),
    (struct.pack(">I", 0xFFFFFFFF) + bytes(200), "export blob header length out of range"),
    (struct.pack(">I", 397) + bytes(400), "export blob header length out of range"),
    (_blob(hdr_len=40), "tx header too short"),
    (_blob(version=0, hdr_len=125), "tx header v0 must be 124 bytes"),
    (_blob(hdr_len=127), "tx header v1 too short"),
    (_blob({"metadata": b"x"}, hdr_len=130), "tx header length does not match its metadata length"),
    (_blob({"nentries": 0xFFFFFFFF}), "4294967295 entries exceed the limit of 1024 entries per tx"),
    (_blob({"nentries": 2}, trailer=b""), "export blob truncated in an entry"),
    (_blob({"nentries": 2}), "export blob truncated in an entry key"),
    (_blob(entries=[(b"\x00k" * 100, b"", b"")])[:150], "export blob truncated in an entry key"),
    (_blob(trailer=b"")[:-4] + b"\xff\xff\xff\xff", "export blob truncated in an entry value"),
    (_blob(entries=[(b"\x00k", b"\x00" * 12, b"")]), "export blob kv metadata length out of range"),
    (_blob(trailer=b"\x00\x01"), "export blob has trailing bytes"),
    (_blob(trailer=b"\x00\x02\x00"), "export blob has trailing bytes"),
    (_blob(trailer=b"\x00\x01\x00\x00"), "export blob has trailing bytes"),
    (_blob(trailer=b"\x00\x01\x02"), "invalid truncation info"),
    (_blob(entries=[(b"", b"", b"\x00v")]), "key can not be empty"),
    (_blob(entries=[(b"\x00" * 1025, b"", b"")]), "key length 1025 exceeds the limit of 1024 bytes"),
    (_blob(trailer=b"\x00\x01\x01"), "truncated value must be a 32-byte hash"),
    (_blob(version=0, entries=[(b"\x00k", b"\x00", b"")]),
     "kv metadata is unsupported in tx header version 0"),
    (_blob({"id": 0}), "tx id must be at least 1"),
    (_blob({"nentries": 0}, entries=[]), "tx must have at least one entry"),
    (_blob({"bl_tx_id": 1}), "bl_tx_id must be lower than the tx id"),
    (_blob(entries=[(b"\x00k", b"", b"1"), (b"\x00k", b"", b"2")]), "duplicated key"),
    (_blob({"metadata": b"\x00" * 269}), "export blob header length out of range"),
])
def test_malformed_blobs_name_what_is_wrong(impl, blob, message):
    with pytest.raises(IllegalArgumentsError) as info:
        impl.verify_blob(blob, LIMITS)
    assert str(info.value) == f"illegal arguments: {message}"
    peaks = [bytes(32)]
    with pytest.raises(IllegalArgumentsError) as info:
        impl.replicate_blobs([blob], 1, EMPTY_ALH, peaks, LIMITS)
    assert str(info.value) == f"illegal arguments: {message}"
    assert peaks == [bytes(32)]


@pytest.mark.parametrize("md, message", [
    (b"\x05", "data is corrupted: unknown kv metadata attribute 5"),
    (b"\x02\x00", "data is corrupted: kv metadata attributes out of order"),
    (b"\x00\x00", "data is corrupted: kv metadata attributes out of order"),
    (b"\x01\x00\x00", "data is corrupted: truncated kv metadata"),
    (b"\x00" + b"\x01" + bytes(8) + b"\x02" + b"\x03", "data is corrupted: kv metadata too long"),
])
def test_bad_kv_metadata_is_corrupted_data(impl, md, message):
    with pytest.raises(CorruptedDataError, match=f"^{message}$"):
        impl.parse_kv_metadata(md)
    if len(md) <= 11:
        with pytest.raises(CorruptedDataError, match=f"^{message}$"):
            impl.verify_blob(_blob(entries=[(b"\x00k", md, b"")]), LIMITS)


def test_forged_lengths_allocate_nothing_big(impl):
    """Huge counts and lengths from the input are checked before anything is sized from them."""
    forged = [
        _blob({"nentries": 0xFFFFFFFF}, entries=[(b"\x00k", b"", b"")]),
        _blob(trailer=b"")[:-4] + b"\xff\xff\xff\xff",
        struct.pack(">I", 0xFFFFFFFF) + bytes(100),
    ]
    big_limits = (1 << 40, 1 << 40, 1 << 40)
    tracemalloc.start()
    try:
        for blob in forged:
            tracemalloc.reset_peak()
            with pytest.raises(IllegalArgumentsError):
                impl.verify_blob(blob, big_limits)
            with pytest.raises(IllegalArgumentsError):
                impl.replicate_blobs([blob], 1, EMPTY_ALH, [], big_limits)
            assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("limits, message", [
    ((2, 1024, 1024), "3 entries exceed the limit of 2 entries per tx"),
    ((8, 4, 1024), "key length 5 exceeds the limit of 4 bytes"),
    ((8, 1024, 3), "value length 4 exceeds the limit of 3 bytes"),
])
def test_limits_on_blobs_and_on_build(impl, limits, message):
    entries = [(b"kkkk", b"vvv", b""), (b"k2", b"v", b""), (b"k3", b"v", b"")]
    with pytest.raises(IllegalArgumentsError, match=f"^illegal arguments: {message}$"):
        impl.build_txs(1, 1, EMPTY_ALH, [], 1, [entries], limits)
    (result,) = impl.build_txs(1, 1, EMPTY_ALH, [], 1, [entries], LIMITS)
    blob = impl.record_export_blob(result[2])
    with pytest.raises(IllegalArgumentsError, match=f"^illegal arguments: {message}$"):
        impl.replicate_blobs([blob], 1, EMPTY_ALH, [], limits)


# --- bad input: replication's chain checks -------------------------------------------------------

def test_replicate_chain_checks_leave_peaks_unchanged(impl, chain):
    blobs = chain_blobs(chain)
    ids = [tx["id"] for tx in chain["txs"]]
    good_peaks = list(peaks_before(chain, 2))
    prev = hx(chain["txs"][2]["prevAlh"])
    cases = [
        # (blobs, first_id, prev_alh, message)
        (blobs[3:5], 3, prev, "attempt to commit a tx in wrong order: expected tx 3, got tx 4"),
        (blobs[2:5], 4, prev, "attempt to commit a tx in wrong order: expected tx 4, got tx 3"),
        ([blobs[2], blobs[4]], 3, prev,
         "attempt to commit a tx in wrong order: expected tx 4, got tx 5"),
        (blobs[2:4], 3, EMPTY_ALH, "attempt to commit a tx with invalid prevAlh at tx 3"),
        (blobs[2:4], 3, bytearray(prev[:31]), "attempt to commit a tx with invalid prevAlh at tx 3"),
    ]
    for batch, first_id, prev_alh, message in cases:
        peaks = list(good_peaks)
        with pytest.raises(IllegalArgumentsError, match=f"^illegal arguments: {message}$"):
            impl.replicate_blobs(batch, first_id, prev_alh, peaks, LIMITS)
        assert peaks == good_peaks
    # blRoot: the right tx onto a different tree
    peaks = [bytes(32)] * len(good_peaks)
    with pytest.raises(IllegalArgumentsError,
                       match="^illegal arguments: attempt to commit a tx with invalid blRoot at tx 3$"):
        impl.replicate_blobs(blobs[2:4], 3, prev, peaks, LIMITS)
    assert peaks == [bytes(32)] * len(good_peaks)
    assert ids[2] == 3


def _reexport(impl, blob: bytes, **changes) -> bytes:
    """A blob whose header fields are changed (and still self-consistent in length)."""
    hdr_len = struct.unpack_from(">I", blob)[0]
    header = list(impl.decode_header(blob[4:4 + hdr_len]))
    names = ("id", "prev_alh", "ts", "version", "metadata", "nentries", "eh", "bl_tx_id",
             "bl_root")
    for name, value in changes.items():
        header[names.index(name)] = value
    new_header = pure.encode_header(*header)
    return struct.pack(">I", len(new_header)) + new_header + blob[4 + hdr_len:]


def test_replicate_wrong_eh_and_bl_tx_id(impl, chain):
    blob = chain_blobs(chain)[4]
    peaks = list(peaks_before(chain, 4))
    prev = hx(chain["txs"][4]["prevAlh"])
    before = list(peaks)
    with pytest.raises(IllegalArgumentsError,
                       match="^illegal arguments: entries hash \\(Eh\\) differs at tx 5$"):
        impl.replicate_blobs([_reexport(impl, blob, eh=bytes(32))], 5, prev, peaks, LIMITS)
    with pytest.raises(IllegalArgumentsError, match="^illegal arguments: entries hash"):
        impl.verify_blob(_reexport(impl, blob, eh=bytes(32)), LIMITS)
    with pytest.raises(IllegalArgumentsError, match="^illegal arguments: tx 5 links to bl_tx_id 3; "
                                                    "immucore requires bl_tx_id = id - 1$"):
        impl.replicate_blobs([_reexport(impl, blob, bl_tx_id=3)], 5, prev, peaks, LIMITS)
    assert peaks == before


def test_replicate_reports_the_first_failure_in_chain_order(impl, chain):
    """A chain error in blob 1 wins over a parse error in blob 2; a good prefix changes nothing."""
    blobs = chain_blobs(chain)
    peaks = []
    with pytest.raises(IllegalArgumentsError, match="wrong order: expected tx 2, got tx 3"):
        impl.replicate_blobs([blobs[0], blobs[2], b"junk"], 1, EMPTY_ALH, peaks, LIMITS)
    with pytest.raises(IllegalArgumentsError, match="export blob too short"):
        impl.replicate_blobs([blobs[0], blobs[1], b"jun"], 1, EMPTY_ALH, peaks, LIMITS)
    with pytest.raises(TypeError):
        impl.replicate_blobs([blobs[0], 42], 1, EMPTY_ALH, peaks, LIMITS)
    assert peaks == []
    assert impl.replicate_blobs([], 1, EMPTY_ALH, peaks, LIMITS) == []
    assert peaks == []


def test_replicate_with_a_short_peaks_list_fails_without_touching_it(impl, chain):
    blobs = chain_blobs(chain)
    peaks = [hx(chain["txs"][0]["alh"])]      # wrong tree: tx 3 needs 1 peak, tx 4 merges 2
    with pytest.raises((IllegalArgumentsError, IndexError)):
        impl.replicate_blobs(blobs[2:4], 3, hx(chain["txs"][2]["prevAlh"]), peaks, LIMITS)
    assert peaks == [hx(chain["txs"][0]["alh"])]


# --- bad input: build_txs ------------------------------------------------------------------------

@pytest.mark.parametrize("version, txs, message", [
    (1, [[]], "no entries provided"),
    (1, [[(b"k", b"v", b"")], []], "no entries provided"),
    (1, [[(b"k", b"1", b""), (b"", b"2", b"")]], "key can not be empty"),
    (1, [[(b"k", b"1", b""), (b"k", b"2", b"")]], "duplicated key"),
    (1, [[(b"a", b"1", b"")], [(b"k", b"1", b""), (b"j", b"1", b""), (b"k", b"2", b"")]],
     "duplicated key"),
    (1, [[(b"k" * 1024, b"v", b"")]], "key length 1025 exceeds the limit of 1024 bytes"),
    (1, [[(b"k", b"v", b"\x00" * 12)]], "kv metadata too long"),
    (0, [[(b"k", b"v", b"\x00")]], "kv metadata is unsupported in tx header version 0"),
    (2, [[(b"k", b"v", b"")]], "unsupported tx header version 2"),
    (1, [[(b"k%d" % i, b"", b"") for i in range(1025)]],
     "1025 entries exceed the limit of 1024 entries per tx"),
])
def test_build_txs_rejects_before_touching_peaks(impl, version, txs, message):
    peaks = peaks_for(5)
    before = list(peaks)
    with pytest.raises(IllegalArgumentsError, match=f"^illegal arguments: {message}$"):
        impl.build_txs(version, 6, EMPTY_ALH, peaks, 1, txs, LIMITS)
    assert peaks == before


# --- FlatTx: a tx as the wire carries it ------------------------------------------------------

def _flat(tx: list) -> FlatTx:
    """The FlatTx of a tx whose entries all carry the same metadata."""
    return FlatTx([x for key, value, _ in tx for x in (key, value)], tx[0][2])


@pytest.mark.parametrize("md", [b"", KVMetadata(non_indexable=True).to_bytes()])
def test_a_flat_tx_seals_exactly_as_its_tuples(impl, md):
    rnd = random.Random(11)
    txs = [[(key, value, md) for key, value, _ in random_tx(rnd, n, 20, 60)] for n in (1, 7, 300)]
    peaks_a, peaks_b = peaks_for(41), peaks_for(41)
    as_tuples = impl.build_txs(1, 42, EMPTY_ALH, peaks_a, 9, txs, LIMITS)
    # flat and tuple txs may share one call (a batch of SETs from different clients)
    mixed = [_flat(txs[0]), txs[1], _flat(txs[2])]
    assert impl.build_txs(1, 42, EMPTY_ALH, peaks_b, 9, mixed, LIMITS) == as_tuples
    assert peaks_a == peaks_b


@pytest.mark.parametrize("tx, message", [
    (FlatTx([], b""), "no entries provided"),
    (FlatTx([b"k"], b""), "kvs_flat must alternate keys and values"),
    (FlatTx((b"k", b"v"), b""), "kvs_flat must be a list"),
    (FlatTx([b"k", b"v"], None), "keys, values and metadata must be bytes"),
    (FlatTx([b"k", "v"], b""), "keys, values and metadata must be bytes"),
    (FlatTx([b"", b"v"], b""), "key can not be empty"),
    (FlatTx([b"k", b"1", b"k", b"2"], b""), "duplicated key"),
    (FlatTx([b"k", b"v"], b"\x00" * 12), "kv metadata too long"),
    (FlatTx([b"k", b"1", b"j", b"2"], b"\x05"),
     "invalid kv metadata: data is corrupted: unknown kv metadata attribute 5"),
    (FlatTx([x for i in range(1025) for x in (b"k%d" % i, b"")], b""),
     "1025 entries exceed the limit of 1024 entries per tx"),
])
def test_a_bad_flat_tx_fails_as_in_pure_before_touching_peaks(impl, tx, message):
    peaks = peaks_for(5)
    before = list(peaks)
    with pytest.raises(IllegalArgumentsError, match=f"^illegal arguments: {message}$"):
        impl.build_txs(1, 6, EMPTY_ALH, peaks, 1, [[(b"ok", b"v", b"")], tx], LIMITS)
    assert peaks == before


def test_a_flat_tx_in_header_version_0_takes_no_metadata(impl):
    with pytest.raises(IllegalArgumentsError, match="unsupported in tx header version 0"):
        impl.build_txs(0, 1, EMPTY_ALH, [], 1, [FlatTx([b"k", b"v"], b"\x00")], LIMITS)
    assert len(impl.build_txs(0, 1, EMPTY_ALH, [], 1, [FlatTx([b"k", b"v"], b"")], LIMITS)) == 1


class _TruthyEmpty(list):
    def __bool__(self):
        return True


def test_build_txs_of_a_truthy_empty_tx_matches_pure(impl):
    """Only such an object gets past `if not entries` with no entries; its Eh is H(""), as in pure."""
    (header, alh, record, nodes), = impl.build_txs(1, 1, EMPTY_ALH, [], 1, [_TruthyEmpty()], LIMITS)
    assert header[5] == 0 and header[6] == H(b"")
    assert (header, alh, record, nodes) == pure.build_txs(1, 1, EMPTY_ALH, [], 1, [_TruthyEmpty()],
                                                          LIMITS)[0]


def test_build_txs_duplicate_detection_on_large_txs(impl):
    keys = [b"key-%04d" % i for i in range(600)]
    entries = [(k, b"v", b"") for k in keys]
    assert len(impl.build_txs(1, 1, EMPTY_ALH, [], 1, [entries], LIMITS)) == 1
    entries.append((keys[317], b"again", b""))
    with pytest.raises(IllegalArgumentsError, match="duplicated key"):
        impl.build_txs(1, 1, EMPTY_ALH, [], 1, [entries], LIMITS)


@pytest.mark.parametrize("entry, message", [
    ([b"k", b"v", b""], "each entry must be a (key, value, metadata) tuple"),
    ((b"k", b"v"), "each entry must be a (key, value, metadata) tuple"),
    ((bytearray(b"k"), b"v", b""), "keys, values and metadata must be bytes"),
    ((b"k", memoryview(b"v"), b""), "keys, values and metadata must be bytes"),
    ((b"k", b"v", None), "keys, values and metadata must be bytes"),
    ((b"k", "v", b""), "keys, values and metadata must be bytes"),
])
def test_build_txs_checks_entry_types(impl, entry, message):
    peaks = peaks_for(2)
    with pytest.raises(IllegalArgumentsError) as info:
        impl.build_txs(1, 3, EMPTY_ALH, peaks, 1, [[(b"a", b"b", b""), entry]], LIMITS)
    assert str(info.value) == f"illegal arguments: {message}"
    assert peaks == peaks_for(2)


def test_build_txs_returns_bytes(impl):
    (header, alh, record, nodes), = impl.build_txs(
        1, 1, bytearray(EMPTY_ALH), [], 3, [[(b"k", b"v", b"")]], LIMITS)
    (expected,) = pure.build_txs(1, 1, EMPTY_ALH, [], 3, [[(b"k", b"v", b"")]], LIMITS)
    assert (header, alh, record, nodes) == expected
    assert all(type(x) is bytes for x in (alh, record, nodes, header[6], header[8]))


def test_out_of_range_integers_raise_structs_own_error(impl):
    header = (1, EMPTY_ALH, 0, 1, b"", 1, bytes(32), 0, bytes(32))
    for index, bad in ((0, -1), (0, 1 << 64), (2, -5), (3, 1 << 16), (5, 1 << 32), (7, -1)):
        args = list(header)
        args[index] = bad
        expected = outcome(pure.encode_header, *args)
        assert expected[0] == "raise" and expected[1] is struct.error
        assert outcome(impl.encode_header, *args) == expected
    with pytest.raises(struct.error):
        impl.kv_metadata_bytes(False, -1, False)
    with pytest.raises(struct.error):
        impl.build_txs(1, 0, EMPTY_ALH, [], 1, [[(b"k", b"v", b"")]], LIMITS)
    with pytest.raises(struct.error):
        impl.build_txs(1, 1, EMPTY_ALH, [], 1 << 64, [[(b"k", b"v", b"")]], LIMITS)


def test_aht_append_with_too_few_peaks(impl):
    peaks = [bytes(32)]
    with pytest.raises(IndexError):
        impl.aht_append(peaks, 3, bytes(32))       # leaf index 3 merges two peaks
    with pytest.raises(IndexError):
        impl.build_txs(1, 4, EMPTY_ALH, [bytes(32)], 1, [[(b"k", b"v", b"")]], LIMITS)


def test_native_leaves_peaks_untouched_when_an_append_cannot_happen():
    native = require_native()
    peaks = [bytes(32)]
    with pytest.raises(IndexError):
        native.aht_append(peaks, 3, bytes(32))
    assert peaks == [bytes(32)]
    with pytest.raises(IndexError):      # leaf index 3 merges two peaks; there is one
        native.build_txs(1, 4, EMPTY_ALH, peaks, 1, [[(b"k", b"v", b"")]] * 3, LIMITS)
    assert peaks == [bytes(32)]
    with pytest.raises(IndexError):      # tx 2 and 3 are fine, tx 4 (leaf index 3) is not
        native.build_txs(1, 2, EMPTY_ALH, [], 1, [[(b"k", b"v", b"")]] * 3, LIMITS)


# --- bad input: headers and records --------------------------------------------------------------

@pytest.mark.parametrize("header, message", [
    (bytes(49), "tx header too short"),
    (bytes(48) + b"\x00\x00" + bytes(73), "tx header v0 must be 124 bytes"),
    (bytes(48) + b"\x00\x01" + bytes(76), "tx header v1 too short"),
    (bytes(48) + b"\x00\x01" + b"\x01\x0d" + bytes(400), "tx metadata too long"),
    (bytes(48) + b"\x00\x01" + b"\x00\x01" + bytes(76), "tx header length does not match its "
                                                        "metadata length"),
    (bytes(48) + b"\x00\x02" + bytes(76), "tx created with a newer version or data is corrupted"),
    (bytes(48) + b"\x00\x01" + bytes(78), "tx id must be at least 1"),
])
def test_decode_header_errors(impl, header, message):
    with pytest.raises(IllegalArgumentsError, match=f"^illegal arguments: {message}$"):
        impl.decode_header(header)


@pytest.mark.parametrize("codec", impl_params())
def test_records_too_short_for_their_counts_are_corrupted_data(codec):
    codec = require(codec)
    (_, _, record, _), = pure.build_txs(1, 1, EMPTY_ALH, [], 1, [[(b"k", b"v", b"")]], LIMITS)
    for cut in (0, 10, 55, 57):
        with pytest.raises(CorruptedDataError, match="^data is corrupted: record too short$"):
            codec.decode_record(record[:cut])


def test_native_rejects_records_shorter_than_their_hashes():
    native = require_native()
    (_, _, record, _), = pure.build_txs(1, 1, EMPTY_ALH, [], 1, [[(b"k", b"v", b"")]] , LIMITS)
    forged = bytearray(record)
    struct.pack_into(">I", forged, 4 + 52, 0xFFFFFFFF)     # nentries of the v1 header
    for fn in (native.decode_record, native.record_export_blob, native.record_digests):
        with pytest.raises(CorruptedDataError, match="record too short"):
            fn(bytes(forged))


def test_truncated_and_flipped_records_never_crash(impl, chain):
    results, _ = build_chain(pure, chain)
    for _, _, record, _ in results[:4]:
        variants = [record[:cut] for cut in range(len(record))]
        for offset in range(len(record)):
            flipped = bytearray(record)
            flipped[offset] ^= 0x41
            variants.append(bytes(flipped))
        for variant in variants:
            if pure_record_blob_len(variant) is None:
                got = outcome(impl.decode_record, variant)
                assert got[:2] == ("raise", CorruptedDataError)
                continue
            for fn in (impl.decode_record, impl.record_digests, impl.record_export_blob):
                got = outcome(fn, variant)
                if got[0] == "raise":
                    assert issubclass(got[1], DATA_ERRORS), got
                if impl is not pure:
                    assert got == outcome(getattr(pure, fn.__name__), variant)
            got = outcome(impl.index_items, 1, [variant])
            if impl is not pure:
                assert got == outcome(pure.index_items, 1, [variant])


# --- the two codecs agree on random input --------------------------------------------------------

# IMMUCORE_CODEC_EXAMPLES=5000 for a long hunt; the default keeps the whole file under ~10 s.
AGREE = settings(max_examples=int(os.environ.get("IMMUCORE_CODEC_EXAMPLES", "150")), deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

kv_md = st.one_of(
    st.just(b""),
    st.builds(pure.kv_metadata_bytes, st.booleans(),
              st.one_of(st.none(), st.integers(0, (1 << 64) - 1)), st.booleans()),
    st.binary(max_size=12),              # build_txs does not parse kv metadata (see pure)
)
entry = st.tuples(st.binary(max_size=24), st.binary(max_size=160), kv_md)
# a tx as the wire carries it: keys and values in one list (odd lengths, and now and then a
# stray non-bytes item or metadata), one metadata for all of its entries
flat_kvs = st.lists(st.one_of(st.binary(max_size=24), st.binary(max_size=160)), max_size=24)
flat_kvs_stray = st.tuples(flat_kvs, st.sampled_from(["text", None, 7])).map(
    lambda pair: pair[0] + [pair[1]])
flat_tx = st.builds(FlatTx, st.one_of(flat_kvs, flat_kvs, flat_kvs, flat_kvs_stray),
                    st.one_of(kv_md, kv_md, kv_md, st.just(None)))
txs_strategy = st.lists(st.one_of(st.lists(entry, min_size=0, max_size=12), flat_tx),
                        min_size=0, max_size=5)
limits_strategy = st.one_of(st.just(LIMITS), st.tuples(st.integers(0, 12), st.integers(0, 30),
                                                       st.integers(0, 200)))


def _same(native_outcome, pure_outcome):
    """Same result, or the same exception type with the same message."""
    event("ok" if pure_outcome[0] == "ok" else f"{pure_outcome[1].__name__}: {pure_outcome[2][:48]}")
    assert native_outcome == pure_outcome


@AGREE
@given(version=st.sampled_from([0, 1, 1, 2]), leaves=st.integers(0, 5000),
       prev=st.binary(min_size=32, max_size=32), ts=st.integers(0, (1 << 64) - 1),
       txs=txs_strategy, limits=limits_strategy, wrong_peaks=st.booleans())
def test_build_txs_agrees(version, leaves, prev, ts, txs, limits, wrong_peaks):
    native = require_native()
    peaks_n = peaks_for(leaves + (1 if wrong_peaks else 0), seed=leaves)
    peaks_p = list(peaks_n)
    got = outcome(native.build_txs, version, leaves + 1, prev, peaks_n, ts, txs, limits)
    want = outcome(pure.build_txs, version, leaves + 1, prev, peaks_p, ts, txs, limits)
    _same(got, want)
    if got[0] == "ok" or got[1] is IllegalArgumentsError:
        assert peaks_n == peaks_p
    else:   # pure may have advanced peaks before a late error; native never does
        assert peaks_n == peaks_for(leaves + (1 if wrong_peaks else 0), seed=leaves)


@AGREE
@given(first_id=st.sampled_from([1, 2, 7, (1 << 64) - 2, (1 << 64) - 1, 1 << 64, 0, -3]),
       txs=st.lists(st.lists(entry, min_size=1, max_size=3), min_size=1, max_size=3))
def test_build_txs_agrees_at_the_edges_of_the_id_range(first_id, txs):
    native = require_native()
    leaves = max(first_id - 1, 0)
    peaks = peaks_for(leaves)
    got = outcome(native.build_txs, 1, first_id, EMPTY_ALH, list(peaks), 9, txs, LIMITS)
    want = outcome(pure.build_txs, 1, first_id, EMPTY_ALH, list(peaks), 9, txs, LIMITS)
    _same(got, want)


@st.composite
def chain_and_mutation(draw):
    version = draw(st.sampled_from([0, 1]))
    txs = draw(st.lists(st.lists(st.tuples(st.binary(min_size=1, max_size=20),
                                           st.binary(max_size=120),
                                           st.sampled_from([b"", b"\x00", b"\x02",
                                                            b"\x01" + bytes(8)])),
                                 min_size=1, max_size=8), min_size=1, max_size=6))
    if version == 0:
        txs = [[(k, v, b"") for k, v, _ in tx] for tx in txs]
    txs = [list({k: (k, v, md) for k, v, md in tx}.values()) for tx in txs]   # unique keys
    leaves = draw(st.integers(0, 3000))
    built = pure.build_txs(version, leaves + 1, EMPTY_ALH, peaks_for(leaves), 5, txs, LIMITS)
    blobs = [pure.record_export_blob(r[2]) for r in built]
    kind = draw(st.sampled_from(["none", "flip", "truncate", "swap", "drop", "truncated-values",
                                 "junk"]))
    index = draw(st.integers(0, len(blobs) - 1))
    blob = bytearray(blobs[index])
    if kind == "flip":
        blob[draw(st.integers(0, len(blob) - 1))] ^= draw(st.integers(1, 255))
        blobs[index] = bytes(blob)
    elif kind == "truncate":
        blobs[index] = bytes(blob[:draw(st.integers(0, len(blob) - 1))])
    elif kind == "swap" and len(blobs) > 1:
        blobs[0], blobs[-1] = blobs[-1], blobs[0]
    elif kind == "drop" and len(blobs) > 1:
        del blobs[index]
    elif kind == "truncated-values":
        hvalues = [[hv for _, _, _, hv in pure.decode_record(r[2])[2]] for r in built]
        blobs = [_truncated_blob(b, hv) for b, hv in zip(blobs, hvalues)]
    elif kind == "junk":
        blobs[index] = draw(st.binary(max_size=300))
    return leaves, built, blobs


@AGREE
@given(case=chain_and_mutation(), limits=limits_strategy)
def test_replicate_blobs_and_verify_blob_agree(case, limits):
    native = require_native()
    leaves, built, blobs = case
    peaks_n, peaks_p = peaks_for(leaves), peaks_for(leaves)
    got = outcome(native.replicate_blobs, blobs, leaves + 1, EMPTY_ALH, peaks_n, limits)
    _same(got, outcome(pure.replicate_blobs, blobs, leaves + 1, EMPTY_ALH, peaks_p, limits))
    assert peaks_n == peaks_p
    if got[0] == "raise":
        assert issubclass(got[1], DATA_ERRORS) and peaks_n == peaks_for(leaves)
    for blob in blobs:
        _same(outcome(native.verify_blob, blob, limits), outcome(pure.verify_blob, blob, limits))


@AGREE
@given(case=chain_and_mutation(), first_tx_id=st.integers(0, 1 << 40),
       flip=st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)))
def test_records_agree(case, first_tx_id, flip):
    native = require_native()
    _, built, _ = case
    records = [r[2] for r in built]
    flipped = bytearray(records[-1])
    flipped[int(flip[0] * len(flipped))] ^= flip[1]
    if pure_record_blob_len(bytes(flipped)) is not None:   # see pure_record_blob_len
        records.append(bytes(flipped))
    # where the intact records' entries start: the flipped copy is then read at real offsets
    entry_offsets = sorted({struct.unpack(">QHI", v)[2]
                            for _, v in pure.index_items(1, records[:len(built)])})[:8]
    for record in records:
        for fn in ("decode_record", "record_digests", "record_export_blob", "record_alh",
                   "record_entry_count"):
            _same(outcome(getattr(native, fn), record), outcome(getattr(pure, fn), record))
        for index in (0, 1, 7):
            _same(outcome(native.record_entry, record, index),
                  outcome(pure.record_entry, record, index))
            for offset in (0, 4, 130, 200, 1000, INDEX_ENTRY_OFFSET_UNKNOWN, *entry_offsets):
                _same(outcome(native.record_entry_at, record, index, offset),
                      outcome(pure.record_entry_at, record, index, offset))
    _same(outcome(native.index_items, first_tx_id, records),
          outcome(pure.index_items, first_tx_id, records))


@AGREE
@given(data=st.binary(max_size=5000), digests=st.lists(st.binary(min_size=0, max_size=40),
                                                       max_size=70),
       index=st.integers(-2, 80))
def test_hashes_and_htree_agree(data, digests, index):
    native = require_native()
    assert native.sha256(data) == pure.sha256(data) == H(data)
    _same(outcome(native.entries_hash, digests), outcome(pure.entries_hash, digests))
    _same(outcome(native.htree_inclusion_proof, digests, index),
          outcome(pure.htree_inclusion_proof, digests, index))
    _same(outcome(native.aht_root, digests), outcome(pure.aht_root, digests))


@AGREE
@given(n=st.integers(1, 300), seed=st.integers(0, 1 << 30))
def test_htree_inclusion_proofs_verify_against_eh(n, seed):
    """Walks every audit path with the verifier of docs/immudb-format.md §7: each leads to Eh."""
    native = require_native()
    rnd = random.Random(seed)
    digests = [rnd.randbytes(32) for _ in range(n)]
    eh = native.entries_hash(digests)
    for leaf in sorted({0, n - 1, rnd.randrange(n)}):
        acc, i, r = H(b"\x00" + digests[leaf]), leaf, n - 1
        for term in native.htree_inclusion_proof(digests, leaf):
            if i % 2 == 0 and i != r:
                acc = H(b"\x01" + acc + term)
            else:
                acc = H(b"\x01" + term + acc)
            i, r = i >> 1, r >> 1
        assert i == r and acc == eh


@AGREE
@given(peaks=st.lists(st.binary(min_size=32, max_size=32), max_size=12),
       leaf_count=st.integers(-3, (1 << 64) + 5), value=st.binary(max_size=64))
def test_aht_append_agrees(peaks, leaf_count, value):
    native = require_native()
    peaks_n, peaks_p = list(peaks), list(peaks)
    got = outcome(native.aht_append, peaks_n, leaf_count, value)
    _same(got, outcome(pure.aht_append, peaks_p, leaf_count, value))
    if got[0] == "ok":
        assert peaks_n == peaks_p
    else:
        assert peaks_n == peaks


@AGREE
@given(peaks=st.lists(st.binary(max_size=70), min_size=1, max_size=4),
       txs=st.lists(st.lists(entry, min_size=1, max_size=3), min_size=1, max_size=3),
       prev=st.binary(max_size=40))
def test_odd_sized_peaks_and_prev_alh_agree(peaks, txs, prev):
    """pure accepts peaks and a prevAlh of any length (it only concatenates them); so does native."""
    native = require_native()
    leaves = (1 << len(peaks)) - 1            # one peak per 1-bit: the stack depth is right
    peaks_n, peaks_p = list(peaks), list(peaks)
    _same(outcome(native.build_txs, 1, leaves + 1, prev, peaks_n, 3, txs, LIMITS),
          outcome(pure.build_txs, 1, leaves + 1, prev, peaks_p, 3, txs, LIMITS))
    assert peaks_n == peaks_p
    _same(outcome(native.aht_root, peaks), outcome(pure.aht_root, peaks))


@AGREE
@given(raw=st.binary(max_size=14), header=st.binary(max_size=420),
       fields=st.tuples(st.integers(0, (1 << 64) - 1), st.binary(max_size=40),
                        st.integers(0, (1 << 64) - 1), st.sampled_from([0, 1, 2, 65535]),
                        st.binary(max_size=20), st.integers(0, (1 << 32) - 1),
                        st.binary(max_size=40), st.integers(0, (1 << 64) - 1),
                        st.binary(max_size=40)))
def test_metadata_and_headers_agree(raw, header, fields):
    native = require_native()
    _same(outcome(native.parse_kv_metadata, raw), outcome(pure.parse_kv_metadata, raw))
    _same(outcome(native.decode_header, header), outcome(pure.decode_header, header))
    _same(outcome(native.encode_header, *fields), outcome(pure.encode_header, *fields))
    _same(outcome(native.inner_hash, *fields), outcome(pure.inner_hash, *fields))
    _same(outcome(native.alh, fields[0], fields[1], fields[4]),
          outcome(pure.alh, fields[0], fields[1], fields[4]))
    encoded = outcome(pure.encode_header, *fields)
    if encoded[0] == "ok":
        _same(outcome(native.decode_header, encoded[1]), outcome(pure.decode_header, encoded[1]))
    for version in (0, 1, 3):
        _same(outcome(native.entry_digest, version, fields[1], raw, fields[6]),
              outcome(pure.entry_digest, version, fields[1], raw, fields[6]))


@AGREE
@given(deleted=st.booleans(), expires_at=st.one_of(st.none(), st.integers(-1, 1 << 64)),
       non_indexable=st.booleans())
def test_kv_metadata_bytes_agrees(deleted, expires_at, non_indexable):
    native = require_native()
    got = outcome(native.kv_metadata_bytes, deleted, expires_at, non_indexable)
    _same(got, outcome(pure.kv_metadata_bytes, deleted, expires_at, non_indexable))
    if got[0] == "ok":
        assert native.parse_kv_metadata(got[1]) == (deleted, expires_at, non_indexable)
