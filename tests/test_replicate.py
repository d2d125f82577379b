"""Replication as a user of the API drives it: export blobs from a primary, apply them on a replica,
and every check immudb makes (entry count, Eh, ordering, blRoot, prevAlh) plus immucore's own
(all-or-nothing batches, idempotent re-apply, divergence, named limits)."""
from __future__ import annotations

import struct
import time

import pytest

from immucore import codec
from immucore.constants import REPLICATE_BATCH_TXS_MAX
from immucore.database import open_database
from immucore.errors import (CorruptedDataError, IllegalArgumentsError, KeyNotFoundError,
                             NotReplicaError, ReadOnlyReplicaError, ReplicaDivergedError,
                             TxNotFoundError)
from immucore.types import KVMetadata

from .test_database import (assert_chain_verifies, client_entry_digest, dual_proof_verifies,
                            inclusion_verifies)

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")

# Offsets of header fields inside an export blob of a v1 header without tx metadata
# (u32 header length, then immudb's TxHeader.Bytes).
ID_AT, PREV_ALH_AT, TS_AT, VERSION_AT, NENTRIES_AT = 4, 12, 44, 52, 56
EH_AT, BL_TX_ID_AT, BL_ROOT_AT, FIRST_ENTRY_AT = 60, 92, 100, 132


@pytest.fixture
def other(tmp_path):
    """A second primary, whose chain differs from ``db``'s from its first tx."""
    database = open_database(str(tmp_path / "other"), name="otherdb")
    yield database
    database.close()


def write_history(primary) -> None:
    """Seven txs using every kind of entry: plain, overwritten, deleted, non-indexable, expiring."""
    primary.set({b"a": b"1", b"b": b"2", b"c": b"3"})
    primary.set({b"a": b"1'"})
    primary.delete([b"b"])
    primary.set({b"hidden": b"h", b"shown": b"s"}, metadata={b"hidden": KVMetadata(
        non_indexable=True)})
    primary.set({b"gone": b"g"}, metadata=KVMetadata(expires_at=int(time.time()) - 10))
    primary.set({b"later": b"l"}, metadata=KVMetadata(expires_at=int(time.time()) + 3600))
    primary.set({b"k%02d" % i: b"v%d" % i for i in range(20)})


def exported(primary) -> list:
    return [primary.export_tx(i) for i in range(1, primary.current_state().tx_id + 1)]


def patched(blob: bytes, offset: int, new: bytes) -> bytes:
    return blob[:offset] + new + blob[offset + len(new):]


def flipped(blob: bytes, offset: int) -> bytes:
    return patched(blob, offset, bytes([blob[offset] ^ 0x01]))


# --- the happy path ------------------------------------------------------------------------------

def test_replicating_tx_by_tx_rebuilds_the_primary(db, replica):
    write_history(db)
    for tx_id, blob in enumerate(exported(db), start=1):
        header = replica.replicate_tx(blob)
        assert header == db.tx_by_id(tx_id).header
    assert replica.current_state().tx_id == db.current_state().tx_id
    assert replica.current_state().tx_hash == db.current_state().tx_hash
    assert replica.current_state().db == "replicadb"
    assert_replica_reads_like_primary(db, replica)


def test_replicating_in_one_batch_rebuilds_the_primary(db, replica):
    write_history(db)
    headers = replica.replicate_txs(exported(db))
    assert headers == [db.tx_by_id(i).header for i in range(1, len(headers) + 1)]
    assert replica.current_state().tx_hash == db.current_state().tx_hash
    assert_replica_reads_like_primary(db, replica)


def assert_replica_reads_like_primary(primary, replica):
    last = primary.current_state().tx_id
    assert [replica.tx_by_id(i) for i in range(1, last + 1)] == [
        primary.tx_by_id(i) for i in range(1, last + 1)]
    assert exported(replica) == exported(primary)          # byte-identical export blobs
    assert replica.scan() == primary.scan()
    assert replica.scan(prefix=b"k", desc=True, limit=5) == primary.scan(prefix=b"k", desc=True,
                                                                           limit=5)
    for key in (b"a", b"b", b"later", b"k07"):
        assert replica.history(key) == primary.history(key)
    assert replica.get(b"a", at_tx=1) == primary.get(b"a", at_tx=1)
    for key in (b"b", b"hidden", b"gone"):                 # deleted, non-indexable, expired
        with pytest.raises(KeyNotFoundError):
            replica.get(key)
    assert_chain_verifies(replica)


def test_proofs_from_a_replica_verify_against_the_primarys_state(db, replica):
    write_history(db)
    trusted = db.current_state()
    db.set({b"after": b"trusted"})
    replica.replicate_txs(exported(db))
    verifiable = replica.verifiable_get(b"k05", prove_since_tx=trusted.tx_id)
    entry, tx = verifiable.entry, verifiable.verifiable_tx.tx
    assert entry == db.get(b"k05")
    digest = client_entry_digest(tx.header.version, entry.key, entry.value, entry.metadata)
    assert inclusion_verifies(verifiable.inclusion_proof, digest, tx.header.eh)
    assert dual_proof_verifies(verifiable.verifiable_tx.dual_proof, trusted.tx_id,
                               trusted.tx_id, trusted.tx_hash, trusted.tx_hash)
    newest = db.current_state()
    proof = replica.verifiable_tx_by_id(newest.tx_id, prove_since_tx=trusted.tx_id).dual_proof
    assert dual_proof_verifies(proof, trusted.tx_id, newest.tx_id, trusted.tx_hash,
                               newest.tx_hash)


def test_export_txs_returns_consecutive_export_blobs(db):
    write_history(db)
    assert db.export_txs(2, 3) == [db.export_tx(i) for i in (2, 3, 4)]
    assert db.export_txs(6, 100) == [db.export_tx(6), db.export_tx(7)]
    assert db.export_txs(8, 5) == []


def test_export_range_reads_blobs_last_alh_and_committed_id_from_one_snapshot(db):
    """While a writer commits, every export_range answer is one snapshot: its blobs reach
    exactly its committed id (count and size allowing), and its Alh is the last blob's."""
    import threading
    db.set({b"first": b"v"})
    stop, answers = threading.Event(), []

    def write():
        n = 0
        while not stop.is_set():
            db.set_async({b"k%d" % n: b"v"}).result()
            n += 1

    writers = [threading.Thread(target=write) for _ in range(4)]
    for writer in writers:
        writer.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and db.current_state().tx_id < 400:
            answers.append(db.export_range(1, 1 << 20, 1 << 30))
            time.sleep(0)          # let the writers' threads take the GIL
    finally:
        stop.set()
        for writer in writers:
            writer.join()
    assert answers[-1].committed_tx_id > answers[0].committed_tx_id + 100    # written meanwhile
    for export in answers:
        assert len(export.blobs) == export.committed_tx_id
        assert export.last_alh == db.alh_of(export.committed_tx_id)
        assert codec.blob_tx_id(export.blobs[-1]) == export.committed_tx_id
    first = db.export_range(2, 3)
    assert first.blobs == db.export_txs(2, 3) and first.last_alh == db.alh_of(4)
    none = db.export_range(db.current_state().tx_id + 1, 5)
    assert none.blobs == [] and none.last_alh is None
    assert none.committed_tx_id == db.current_state().tx_id


def test_a_replicated_batch_answers_its_last_alh(db, replica):
    """The writer hands back the Alh it computed for the batch's last tx (or verified, for a
    tx the replica held already): what the replicator acknowledges, never read back."""
    write_history(db)
    blobs = db.export_txs(1, 100)
    headers = replica.replicate_txs_async(blobs[:3]).result()
    assert [h[0] for h in headers] == [1, 2, 3] and headers.last_alh == db.alh_of(3)
    headers = replica.replicate_txs_async(blobs[1:5]).result()          # 2, 3 held already
    assert [h[0] for h in headers] == [2, 3, 4, 5] and headers.last_alh == db.alh_of(5)
    headers = replica.replicate_txs_async(blobs[:2]).result()           # every one held
    assert [h[0] for h in headers] == [1, 2] and headers.last_alh == db.alh_of(2)
    empty = replica.replicate_txs_async([]).result()
    assert list(empty) == [] and empty.last_alh is None


def test_an_export_blob_is_immudbs_layout(db):
    header = db.set({b"key": b"value"}, metadata=KVMetadata(expires_at=1893456000))
    blob = db.export_tx(1)
    header_bytes = header.to_bytes()
    assert blob[:4] == _U32.pack(len(header_bytes))
    assert blob[4:4 + len(header_bytes)] == header_bytes
    md = KVMetadata(expires_at=1893456000).to_bytes()
    entry = (b"\x00\x04" + b"\x00key" + struct.pack(">H", len(md)) + md + _U32.pack(6)
             + b"\x00value")
    assert blob[4 + len(header_bytes):] == entry + b"\x00\x01\x00"   # trailer: values present


def test_a_v0_primary_replicates_too(tmp_path, replica):
    with open_database(str(tmp_path / "v0"), header_version=0) as primary:
        for i in range(5):
            primary.set({b"k%d" % i: b"v", b"same": b"%d" % i})
        replica.replicate_txs(exported(primary))
        assert replica.current_state().tx_hash == primary.current_state().tx_hash
        assert replica.tx_by_id(3).header.version == 0
        assert replica.get(b"same") == primary.get(b"same")


# --- re-applying and divergence ------------------------------------------------------------------

def test_reapplying_a_committed_tx_is_a_no_op_returning_its_header(db, replica):
    write_history(db)
    blobs = exported(db)
    replica.replicate_txs(blobs[:4])
    state = replica.current_state()
    assert replica.replicate_tx(blobs[1]) == db.tx_by_id(2).header
    assert replica.replicate_txs(blobs[:4]) == [db.tx_by_id(i).header for i in range(1, 5)]
    assert replica.current_state() == state
    # a batch overlapping what the replica holds applies only the new part
    headers = replica.replicate_txs(blobs[2:])
    assert headers == [db.tx_by_id(i).header for i in range(3, len(blobs) + 1)]
    assert replica.current_state().tx_hash == db.current_state().tx_hash
    assert [e.tx for e in replica.history(b"a")] == [1, 2]       # nothing indexed twice


def test_a_different_tx_at_a_committed_id_is_divergence(db, other, replica):
    db.set({b"a": b"primary"})
    db.set({b"b": b"primary"})
    other.set({b"a": b"other"})
    other.set({b"b": b"other"})
    replica.replicate_txs(exported(db))
    state = replica.current_state()
    with pytest.raises(ReplicaDivergedError, match="diverged"):
        replica.replicate_tx(other.export_tx(1))
    with pytest.raises(ReplicaDivergedError):
        replica.replicate_txs([db.export_tx(1), other.export_tx(2)])
    assert replica.current_state() == state
    assert replica.get(b"a").value == b"primary"


def test_a_tx_of_another_chain_at_the_next_id_is_refused(db, other, replica):
    db.set({b"a": b"primary"})
    other.set({b"a": b"other"})
    other.set({b"b": b"other"})
    replica.replicate_tx(db.export_tx(1))
    with pytest.raises(IllegalArgumentsError, match="blRoot|prevAlh"):
        replica.replicate_tx(other.export_tx(2))
    assert replica.current_state().tx_id == 1


# --- ordering and all-or-nothing -----------------------------------------------------------------

def test_out_of_order_replication_is_refused(db, replica):
    write_history(db)
    blobs = exported(db)
    with pytest.raises(IllegalArgumentsError, match="wrong order") as info:
        replica.replicate_tx(blobs[1])
    assert str(info.value).startswith("illegal arguments: ")
    assert replica.current_state().tx_id == 0
    with pytest.raises(IllegalArgumentsError, match="wrong order"):
        replica.replicate_txs([blobs[0], blobs[2]])               # a gap
    with pytest.raises(IllegalArgumentsError, match="wrong order"):
        replica.replicate_txs([blobs[1], blobs[0]])               # swapped
    assert replica.current_state().tx_id == 0
    replica.replicate_txs(blobs[:3])
    with pytest.raises(IllegalArgumentsError, match="wrong order"):
        replica.replicate_txs([blobs[3], blobs[3]])               # the same new tx twice
    assert replica.current_state().tx_id == 3


def test_a_batch_with_one_bad_blob_writes_nothing(db, replica):
    write_history(db)
    blobs = exported(db)
    bad_last = blobs[:-1] + [flipped(blobs[-1], len(blobs[-1]) - 4)]     # a value byte
    with pytest.raises(IllegalArgumentsError, match="Eh"):
        replica.replicate_txs(bad_last)
    assert replica.current_state().tx_id == 0
    assert replica.current_state().tx_hash == codec.sha256(b"")
    with pytest.raises(TxNotFoundError):
        replica.tx_by_id(1)
    with pytest.raises(KeyNotFoundError):
        replica.get(b"a")
    assert replica.replicate_txs(blobs)[-1] == db.tx_by_id(len(blobs)).header
    assert replica.current_state().tx_hash == db.current_state().tx_hash


# --- malformed blobs -----------------------------------------------------------------------------

def _malformed(blob: bytes) -> dict:
    """Damaged copies of the export blob of tx 2 (a v1 header, no tx metadata, one entry)."""
    hdr_len = _U32.unpack_from(blob, 0)[0]
    assert hdr_len == FIRST_ENTRY_AT - 4 and blob[VERSION_AT:VERSION_AT + 2] == b"\x00\x01"
    return {
        "empty": b"",
        "three bytes": blob[:3],
        "header cut": blob[:60],
        "header length huge": patched(blob, 0, _U32.pack(0xFFFFFFFF)),
        "header length short": patched(blob, 0, _U32.pack(hdr_len - 1)),
        "unknown header version": patched(blob, VERSION_AT, b"\x00\x07"),
        "zero entries": patched(blob, NENTRIES_AT, _U32.pack(0)),
        "more entries than sent": patched(blob, NENTRIES_AT, _U32.pack(2)),
        "entry count over the limit": patched(blob, NENTRIES_AT, _U32.pack(1025)),
        "key length past the end": patched(blob, FIRST_ENTRY_AT, b"\xff\xff"),
        "value cut": blob[:-4],
        "trailer cut": blob[:-1],
        "trailing byte": blob + b"\x00",
        "bad truncation flag": blob[:-1] + b"\x02",
        "value changed": flipped(blob, len(blob) - 4),
        "Eh changed": flipped(blob, EH_AT),
        "prevAlh changed": flipped(blob, PREV_ALH_AT),
        "blRoot changed": flipped(blob, BL_ROOT_AT),
        "bl_tx_id zero": patched(blob, BL_TX_ID_AT, _U64.pack(0)),
        "id zero": patched(blob, ID_AT, _U64.pack(0)),
        "id ahead": patched(blob, ID_AT, _U64.pack(3)),
        "id far ahead": patched(blob, ID_AT, _U64.pack(1 << 63)),
    }


def test_every_malformed_blob_is_illegal_arguments_and_writes_nothing(db, replica):
    db.set({b"first": b"1"})
    db.set({b"second": b"2"})
    replica.replicate_tx(db.export_tx(1))
    state = replica.current_state()
    good = db.export_tx(2)
    for name, blob in _malformed(good).items():
        with pytest.raises(IllegalArgumentsError) as info:
            replica.replicate_tx(blob)
        assert str(info.value).startswith("illegal arguments: "), name
        assert replica.current_state() == state, name
        with pytest.raises(IllegalArgumentsError):
            replica.replicate_txs([blob, good])
        assert replica.current_state() == state, name
    assert replica.replicate_tx(good) == db.tx_by_id(2).header      # the real one still applies


@pytest.mark.parametrize("blob", [None, "text", 5, [1, 2]])
def test_a_blob_that_is_not_bytes_is_illegal_arguments(replica, blob):
    with pytest.raises(IllegalArgumentsError, match="export blob must be bytes"):
        replica.replicate_txs([blob])
    assert replica.current_state().tx_id == 0


def test_a_blob_may_be_any_bytes_like_object(db, replica):
    db.set({b"a": b"1"})
    db.set({b"b": b"2"})
    replica.replicate_tx(bytearray(db.export_tx(1)))
    replica.replicate_tx(memoryview(db.export_tx(2)))
    assert replica.current_state().tx_hash == db.current_state().tx_hash


@pytest.mark.parametrize("damage, message", [
    ("Eh changed", "Eh"), ("value changed", "Eh"), ("id ahead", "wrong order"),
    ("blRoot changed", "blRoot"), ("prevAlh changed", "prevAlh")])
def test_each_chain_check_names_what_failed(db, replica, damage, message):
    db.set({b"first": b"1"})
    db.set({b"second": b"2"})
    replica.replicate_tx(db.export_tx(1))
    with pytest.raises(IllegalArgumentsError, match=message):
        replica.replicate_tx(_malformed(db.export_tx(2))[damage])


def test_a_malformed_copy_of_a_committed_tx_is_refused_too(db, replica):
    db.set({b"first": b"1"})
    db.set({b"second": b"2"})
    replica.replicate_txs(exported(db))
    state = replica.current_state()
    with pytest.raises(IllegalArgumentsError):
        replica.replicate_tx(flipped(db.export_tx(2), len(db.export_tx(2)) - 4))
    with pytest.raises(IllegalArgumentsError):
        replica.replicate_tx(db.export_tx(2)[:40])
    assert replica.current_state() == state


# --- limits --------------------------------------------------------------------------------------

def test_too_many_blobs_in_one_batch_are_refused_before_any_is_read(replica):
    with pytest.raises(IllegalArgumentsError, match=str(REPLICATE_BATCH_TXS_MAX)):
        replica.replicate_txs([b""] * (REPLICATE_BATCH_TXS_MAX + 1))
    assert replica.current_state().tx_id == 0


def test_a_replica_with_lower_limits_refuses_bigger_txs_by_name(db, tmp_path):
    db.set({b"short": b"v"})
    db.set({b"k" * 20: b"v"})
    db.set({b"a": b"v", b"b": b"v", b"c": b"v"})
    db.set({b"big": b"v" * 100})
    with open_database(str(tmp_path / "small"), replica=True, max_tx_entries=2, max_key_len=16,
                       max_value_len=64) as small:
        small.replicate_tx(db.export_tx(1))
        cases = [(2, "key length 21 exceeds the limit of 16 bytes"),
                 (3, "3 entries exceed the limit of 2 entries"),
                 (4, "value length 101 exceeds the limit of 64 bytes")]
        for tx_id, message in cases:
            with pytest.raises(IllegalArgumentsError, match=message):
                small.replicate_tx(db.export_tx(tx_id))
        assert small.current_state().tx_id == 1


def test_a_replica_refuses_a_tx_it_could_not_pass_on_in_one_frame(replica):
    """A blob over TX_EXPORT_BLOB_BYTES_MAX (pushed, or from a primary written before the tx
    limit) is refused before anything is parsed: a replica of this replica could never get
    it in one EXPORT_TXS answer."""
    from immucore.constants import TX_EXPORT_BLOB_BYTES_MAX
    too_long = bytes(TX_EXPORT_BLOB_BYTES_MAX + 1)
    with pytest.raises(IllegalArgumentsError,
                       match=f"of {TX_EXPORT_BLOB_BYTES_MAX + 1} bytes exceeds the limit of "
                             f"{TX_EXPORT_BLOB_BYTES_MAX} bytes: this replica could not pass"):
        replica.replicate_txs_async([too_long])
    assert replica.current_state().tx_id == 0


# --- roles ---------------------------------------------------------------------------------------

def test_replicate_on_a_primary_is_refused(db):
    db.set({b"a": b"1"})
    blob = db.export_tx(1)
    with pytest.raises(NotReplicaError):
        db.replicate_tx(blob)
    with pytest.raises(NotReplicaError):
        db.replicate_txs([blob])
    assert db.current_state().tx_id == 1


def test_a_replica_refuses_writes_but_accepts_replication(db, replica):
    db.set({b"a": b"1"})
    replica.replicate_tx(db.export_tx(1))
    with pytest.raises(ReadOnlyReplicaError) as info:
        replica.set({b"a": b"2"})
    assert str(info.value) == "database is read-only because it's a replica"
    with pytest.raises(ReadOnlyReplicaError):
        replica.delete([b"a"])
    assert replica.get(b"a").value == b"1"


def test_a_promoted_replica_extends_the_replicated_chain(db, replica):
    write_history(db)
    replica.replicate_txs(exported(db))
    trusted = replica.current_state()
    replica.set_replica(False)
    header = replica.set({b"own": b"write"})
    assert header.id == trusted.tx_id + 1 and header.prev_alh == trusted.tx_hash
    assert_chain_verifies(replica)
    with pytest.raises(NotReplicaError):
        replica.replicate_tx(db.export_tx(1))


def test_a_replica_reopened_keeps_its_data_and_goes_on_replicating(db, tmp_path):
    write_history(db)
    blobs = exported(db)
    path = str(tmp_path / "r2")
    with open_database(path, replica=True) as replica:
        replica.replicate_txs(blobs[:4])
        state = replica.current_state()
    with open_database(path) as replica:
        assert replica.is_replica and replica.current_state() == state
        assert replica.get(b"a").value == b"1'"
        assert replica.replicate_tx(blobs[3]) == db.tx_by_id(4).header     # still a no-op
        replica.replicate_txs(blobs[4:])
        assert replica.current_state().tx_hash == db.current_state().tx_hash
        assert replica.scan() == db.scan()


def test_a_batch_whose_last_tx_is_not_the_announced_one_writes_nothing(db, replica):
    """Within a batch every tx's Alh is vouched for by the next one's prevAlh; the last one's only
    by the Alh its primary announced (EXPORT_TXS last_alh)."""
    write_history(db)
    blobs = exported(db)
    last = db.current_state()
    with pytest.raises(CorruptedDataError, match="does not have the Alh its primary announced"):
        replica.replicate_txs_async(blobs, last_alh=bytes(32)).result()
    assert replica.current_state().tx_id == 0
    # the same batch with a last tx altered in its timestamp (hashes otherwise)
    altered = blobs[:-1] + [patched(blobs[-1], TS_AT, b"\x00" * 8)]
    with pytest.raises(CorruptedDataError):
        replica.replicate_txs_async(altered, last_alh=last.tx_hash).result()
    assert replica.current_state().tx_id == 0
    replica.replicate_txs_async(blobs, last_alh=last.tx_hash).result()
    assert replica.current_state().tx_hash == last.tx_hash
