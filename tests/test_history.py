"""The history checker (tests/history.py) catches each violation it exists for.

Histories and logs are built in real embedded databases: an honest run passes, and each kind of
bad history or bad log — a lost acknowledgement, a diverged or too long replica, a gap, a
duplicate, a broken chain, a flipped byte on disk, a hung op — fails with a message naming the
node and the tx id. A checker that cannot fail would be worthless.
"""
import os
import struct
import threading
import time

import lmdb
import pytest

from immucore.client import ConnectionClosedError
from immucore.database import open_database
from immucore.errors import IndexTimeoutError, ReadOnlyReplicaError

from .history import (FAIL, OK, UNKNOWN, History, WriterPool, check_acks_consistent,
                      check_history, check_node_storage, check_ops_ended, check_storage,
                      outcome_unknown, read_alhs, wait_converged)

_U64 = struct.Struct(">Q")


def _write(db, history: History, txs: int, prefix: str = "k"):
    for n in range(txs):
        history.record_set(db, {f"{prefix}{n}".encode(): b"payload-%04d" % n})


def _follower(tmp_path, name: str, source, upto: int):
    """A replica holding ``source``'s txs 1..upto."""
    replica = open_database(str(tmp_path / name), replica=True)
    if upto:
        replica.replicate_txs(source.export_txs(1, upto))
    return replica


@pytest.fixture
def primary(tmp_path):
    db = open_database(str(tmp_path / "primary"))
    yield db
    db.close()


@pytest.fixture
def history():
    return History()


def _forked(tmp_path, source, common: int, own: int):
    """A log sharing ``source``'s first ``common`` txs, then ``own`` txs of its own."""
    fork = _follower(tmp_path, "fork", source, common)
    fork.set_replica(False)
    _write(fork, History(), own, prefix="fork")
    return fork


def test_an_honest_history_passes(tmp_path, primary, history):
    _write(primary, history, 20)
    with _follower(tmp_path, "r1", primary, 20) as caught_up, \
            _follower(tmp_path, "r2", primary, 12) as behind:
        summary = check_history(history, primary, {"caught up": caught_up, "behind": behind})
    assert summary["primary_tx_id"] == 20 and summary[OK] == 20
    assert summary["replicas_tx_id"] == {"caught up": 20, "behind": 12}


def test_a_replica_diverged_mid_log_is_named_with_the_first_differing_tx(tmp_path, primary,
                                                                         history):
    _write(primary, history, 10)
    with _forked(tmp_path, primary, 3, 4) as fork, _follower(tmp_path, "r", fork, 7) as replica:
        with pytest.raises(AssertionError, match=r"replica B diverged from the primary at tx 4"):
            check_history(history, primary, {"replica B": replica})


def test_a_replica_longer_than_the_primary_is_not_a_prefix(tmp_path, primary, history):
    _write(primary, history, 10)
    with _follower(tmp_path, "short", primary, 5) as short_primary, \
            _follower(tmp_path, "r", primary, 10) as replica:
        with pytest.raises(AssertionError, match=r"r holds tx 10 but the primary ends at tx 5"):
            check_history(History(), short_primary, {"r": replica})


def test_an_acknowledged_tx_missing_from_the_primary_is_a_lost_write(tmp_path, primary,
                                                                     history):
    _write(primary, history, 20)
    # the primary as it would be had it lost its last 5 acknowledged txs
    with _follower(tmp_path, "lost-tail", primary, 15) as restarted:
        with pytest.raises(AssertionError, match=r"acknowledged write lost: op #15 .*tx 16.* "
                                                 r"but primary ends at tx 15"):
            check_history(history, restarted)


def test_an_acknowledged_tx_replaced_by_another_is_a_lost_write(tmp_path, primary, history):
    _write(primary, history, 6)
    with _forked(tmp_path, primary, 3, 3) as fork:
        with pytest.raises(AssertionError, match=r"acknowledged write lost: op #3 .*tx 4.*"
                                                 r"acknowledged with Alh"):
            check_history(history, fork, check_rejected=False)


def test_one_tx_acknowledged_to_two_writes_is_caught(primary, history):
    _write(primary, history, 3)
    twin = history.invoke("primary", [b"twin"])
    history.ok(twin, 2, history.ops[1].alh)
    with pytest.raises(AssertionError, match=r"tx 2 acknowledged twice: op #1 .* and op #3"):
        check_history(history, primary)


def test_a_write_acknowledged_after_another_but_ordered_before_it_is_caught(history):
    first = history.invoke("db", [b"a"])
    history.ok(first, 7, b"\x01" * 32)
    second = history.invoke("db", [b"b"])             # invoked after the first was acked
    history.ok(second, 5, b"\x02" * 32)
    with pytest.raises(AssertionError, match=r"op #1 .*invoked after op #0 .*earlier tx id"):
        check_acks_consistent([first, second])
    overlapping = History()                            # concurrent ops may commit in any order
    a, b = overlapping.invoke("db", [b"a"]), overlapping.invoke("db", [b"b"])
    overlapping.ok(b, 1, b"\x01" * 32)
    overlapping.ok(a, 2, b"\x02" * 32)
    check_acks_consistent([a, b])


def test_an_op_that_never_ended_or_ran_over_its_timeout_is_a_liveness_failure(history):
    hung = history.invoke("db", [b"a"], timeout_seconds=5)
    with pytest.raises(AssertionError, match=r"op #0 \(invoke, primary/db.*never ended"):
        check_ops_ended(history.snapshot())
    history.unknown(hung, TimeoutError("no answer"))
    hung.ended_at = hung.invoked_at + 9                # as if it had taken 9 s
    with pytest.raises(AssertionError, match=r"op #0 .*took 9.00s, over its timeout of 5s"):
        check_ops_ended(history.snapshot(), slack_seconds=2)


def test_a_refused_write_found_in_the_primary_is_caught(primary, history):
    _write(primary, history, 3)
    refused = history.invoke("defaultdb", [b"k1"])
    history.fail(refused, ReadOnlyReplicaError())
    with pytest.raises(AssertionError, match=r"op #3 .*was refused .* key b'k1' is in the "
                                             r"primary at tx 2"):
        check_history(history, primary)


def test_sync_mode_requires_each_ack_on_enough_replicas(tmp_path, primary, history):
    _write(primary, history, 10)
    with _follower(tmp_path, "a", primary, 10) as a, _follower(tmp_path, "b", primary, 8) as b:
        check_history(history, primary, {"a": a, "b": b}, sync_acks=1)
        with pytest.raises(AssertionError, match=r"op #8 .*tx 9.* is on 1 replica\(s\) \['a'\], "
                                                 r"fewer than the 2"):
            check_history(history, primary, {"a": a, "b": b}, sync_acks=2)


def _remove_tx_on_disk(path: str, tx_id: int):
    """Delete one tx's record from a closed database's log, as a torn storage would."""
    env = lmdb.open(os.path.join(path, "log"), max_dbs=3, subdir=True)
    try:
        with env.begin(write=True) as txn:
            assert txn.delete(_U64.pack(tx_id), db=env.open_db(b"tx", txn=txn))
    finally:
        env.close()


def _rewrite_tx_on_disk(path: str, tx_id: int, old: bytes, new: bytes):
    env = lmdb.open(os.path.join(path, "log"), max_dbs=3, subdir=True)
    try:
        with env.begin(write=True) as txn:
            tx_db = env.open_db(b"tx", txn=txn)
            record = txn.get(_U64.pack(tx_id), db=tx_db)
            assert record.count(old) == 1
            txn.put(_U64.pack(tx_id), record.replace(old, new), db=tx_db)
    finally:
        env.close()


def test_a_gap_in_a_log_is_caught_by_the_reader_and_by_the_audit(tmp_path, history):
    path = str(tmp_path / "gappy")
    with open_database(path) as db:
        _write(db, history, 10)
    _remove_tx_on_disk(path, 5)
    with open_database(path) as db:            # opens: only the log's tail is checked on open
        with pytest.raises(AssertionError, match=r"gappy: tx ids not contiguous \(gap\): "
                                                 r"expected tx 5, the log holds tx 6"):
            read_alhs(db, "gappy", 10)
    with pytest.raises(AssertionError, match=r"gappy: audit failed: TxNotFoundError"):
        check_storage(path, "gappy")


def test_a_flipped_byte_on_disk_is_caught_by_the_reader_and_by_the_audit(tmp_path, history):
    path = str(tmp_path / "flipped")
    with open_database(path) as db:
        _write(db, history, 10)
    _rewrite_tx_on_disk(path, 3, b"payload-0002", b"payload-XXXX")
    with open_database(path) as db:
        with pytest.raises(AssertionError, match=r"flipped: tx 3 does not verify: .*Eh"):
            read_alhs(db, "flipped", 10)
    with pytest.raises(AssertionError, match=r"flipped: audit failed: CorruptedDataError"):
        check_storage(path, "flipped")


class _Spliced:
    """A log source answering with blobs rearranged by ``edit`` (a duplicate, a splice)."""

    def __init__(self, db, edit):
        self.db, self.edit = db, edit

    def current_state(self):
        return self.db.current_state()

    def export_txs(self, first, count):
        return self.edit(self.db.export_txs(first, count))


def test_a_duplicated_tx_and_a_broken_chain_are_caught(tmp_path, primary, history):
    _write(primary, history, 6)
    doubled = _Spliced(primary, lambda blobs: blobs[:3] + blobs[2:])
    with pytest.raises(AssertionError, match=r"dup: tx ids not contiguous \(duplicate\): "
                                             r"expected tx 4, the log holds tx 3"):
        read_alhs(doubled, "dup", 6)
    with _forked(tmp_path, primary, 3, 3) as fork:
        # ids 1..6 contiguous, but tx 5 comes from a log whose tx 4 is another tx
        spliced = _Spliced(primary, lambda blobs: blobs[:4] + fork.export_txs(5, 2))
        with pytest.raises(AssertionError, match=r"spliced: tx 5 is not chained to tx 4"):
            read_alhs(spliced, "spliced", 6)


def test_wait_converged_waits_for_a_replica_and_names_one_that_stays_behind(tmp_path, primary,
                                                                            history):
    _write(primary, history, 10)
    with _follower(tmp_path, "late", primary, 4) as late:
        catch_up = threading.Timer(0.2, lambda: late.replicate_txs(primary.export_txs(5, 10)))
        catch_up.start()
        try:
            took = wait_converged(primary, {"late": late}, timeout_seconds=10)
        finally:
            catch_up.join()
        assert 0.1 < took < 10
    with _follower(tmp_path, "stuck", primary, 4) as stuck:
        with pytest.raises(AssertionError, match=r"did not converge to the primary's tx 10 "
                                                 r"within 0.3s: stuck at tx 4 \(status: x\)"):
            wait_converged(primary, {"stuck": stuck}, timeout_seconds=0.3,
                           describe=lambda label: "status: x")


def test_node_storage_checks_every_database_folder(tmp_path):
    node_dir = tmp_path / "node"
    for name in ("systemdb", "defaultdb", "appdb"):
        with open_database(str(node_dir / name)) as db:
            db.set({b"k": name.encode()})
    assert check_node_storage(str(node_dir)) == {"appdb": 1, "defaultdb": 1, "systemdb": 1}
    _rewrite_tx_on_disk(str(node_dir / "appdb"), 1, b"appdb", b"APPDB")
    with pytest.raises(AssertionError, match=r"node/appdb: (audit failed|does not reopen)"):
        check_node_storage(str(node_dir))


def test_outcomes_are_classified_by_whether_the_node_answered():
    assert outcome_unknown(ConnectionClosedError("connection closed by the node"))
    assert outcome_unknown(TimeoutError("SET got no answer within 5s"))
    assert outcome_unknown(ConnectionResetError())
    assert not outcome_unknown(ReadOnlyReplicaError())       # the node said no: it did not happen
    assert not outcome_unknown(IndexTimeoutError("index"))


class _FlakyConnection:
    """An embedded database behind a 'connection' that drops every 7th write before it is
    sent and refuses every 11th: the pool must record each outcome and carry on."""
    calls = 0
    lock = threading.Lock()

    def __init__(self, db):
        self.db, self.database = db, db.name

    def set(self, kvs):
        with self.lock:
            type(self).calls += 1
            n = type(self).calls
        if n % 7 == 0:
            raise ConnectionClosedError("connection to the node failed")
        if n % 11 == 0:
            raise ReadOnlyReplicaError()
        return self.db.set(kvs)

    def close(self):
        pass


def test_the_writer_pool_records_every_outcome_and_the_history_checks(primary):
    history = History()
    with WriterPool(history, lambda: _FlakyConnection(primary), threads=3, keys_per_tx=3):
        deadline = time.monotonic() + 10
        while history.counts()[OK] < 60 and time.monotonic() < deadline:
            time.sleep(0.01)
    counts = history.counts()
    assert counts[OK] >= 60 and counts[UNKNOWN] > 0 and counts[FAIL] > 0
    assert counts["invoke"] == 0                      # stop() waits for every op to end
    summary = check_history(history, primary)
    assert summary["primary_tx_id"] == counts[OK]     # nothing was half-applied
