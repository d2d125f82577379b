"""The store's mechanisms: map growth, group commit, index recovery, bad requests in a batch."""
import struct
import threading
import time

import lmdb
import pytest

from immucore import CorruptedDataError, IllegalArgumentsError, KeyNotFoundError, ReadOnlyReplicaError, codec
from immucore.database import open_database
from immucore.store.writer import CommitAbortedError
from immucore.store.layout import INDEXED_TX_KEY, ROW_FORMAT_KEY


def test_map_grows_when_full_while_readers_run(tmp_path):
    db = open_database(str(tmp_path / "db"), map_size_bytes=256 * 1024)
    stop = threading.Event()
    read_errors = []

    def reader():
        # Short sleeps between reads: busy Python loops would starve the writer of the GIL.
        while not stop.wait(0.0005):
            try:
                db.current_state()
                if db.current_state().tx_id:
                    db.tx_by_id(1)
            except Exception as exc:  # noqa: BLE001 - any error fails the test below
                read_errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for n in range(40):     # ~4 MiB into a 256 KiB map: several doublings
            db.set({f"k{n}-{i}".encode(): bytes(1000) for i in range(100)})
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not read_errors
    assert db._log.env.info()["map_size"] > 256 * 1024
    assert db.get(b"k39-99").value == bytes(1000)
    assert db.audit() == 40
    db.close()


def test_concurrent_writers_get_contiguous_ids_and_their_own_headers(tmp_path):
    db = open_database(str(tmp_path / "db"))
    results = {}

    def writer(worker):
        for n in range(50):
            key = f"w{worker}-{n}".encode()
            results[key] = db.set({key: key})

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = sorted(h.id for h in results.values())
    assert ids == list(range(1, 16 * 50 + 1))
    for key, header in results.items():     # each caller got the header of its own tx
        tx = db.tx_by_id(header.id)
        assert tx.header == header and tx.entries[0].key == b"\x00" + key
    assert db.audit() == 800
    db.close()


def test_a_write_with_on_done_reports_to_its_callback_instead_of_a_future(tmp_path):
    """The node's SET path: no future; the outcome, success or error, goes to on_done on a
    writer thread, and a callback that raises does not stop the writer."""
    import queue
    db = open_database(str(tmp_path / "db"), max_value_len=100)
    outcomes = {name: queue.Queue() for name in ("a", "bc", "dup", "big")}

    def report(name):
        return lambda headers, exc: outcomes[name].put((headers, exc, threading.current_thread()))

    assert db.set_async({b"a": b"1"}, on_done=report("a")) is None
    assert db.set_flat_async([b"b", b"2", b"c", b"3"], on_done=report("bc")) is None
    db.set_flat_async([b"dup", b"1", b"dup", b"2"], on_done=report("dup"))   # the codec's check
    db.set_flat_async([b"big", bytes(200)], on_done=report("big"))     # over max_value_len
    got = {name: q.get(timeout=10) for name, q in outcomes.items()}
    assert [(got[n][0][0][0], got[n][0][0][5], got[n][1]) for n in ("a", "bc")] == [
        (1, 1, None), (2, 2, None)]
    assert got["dup"][0] is None and "duplicated key" in str(got["dup"][1])
    assert got["big"][0] is None and "value length" in str(got["big"][1])
    assert all(t is not threading.current_thread() for _, _, t in got.values())

    def broken(headers, exc):
        raise RuntimeError("a broken callback")

    db.set_async({b"d": b"4"}, on_done=broken)
    assert db.set_async({b"e": b"5"}).result(timeout=10)[0][0] == 4     # the writer goes on
    assert db.get(b"b").value == b"2" and db.get(b"e").value == b"5"
    db.close()


def test_a_flat_set_is_checked_at_once_and_owns_its_list(tmp_path):
    """set_flat_async refuses a misshapen list before queueing it (a bad tx in the sealer costs
    its whole group commit a retry), and the caller may reuse its list as soon as it returns."""
    db = open_database(str(tmp_path / "db"))
    with pytest.raises(IllegalArgumentsError, match="alternate keys and values"):
        db.set_flat_async([b"odd"])
    with pytest.raises(IllegalArgumentsError, match="must be a list"):
        db.set_flat_async((b"k", b"v"))
    with pytest.raises(IllegalArgumentsError, match="one KVMetadata"):
        db.set_flat_async([b"k", b"v"], metadata={b"k": None})
    futures = []
    for n in range(50):
        kvs = [b"k%d" % n, b"v%d" % n]
        futures.append(db.set_flat_async(kvs))
        kvs[1] = b"changed"              # the caller reuses its list at once
        kvs.append(b"odd")
    assert all(f.result(timeout=10)[0][5] == 1 for f in futures)
    assert [db.get(b"k%d" % n).value for n in range(50)] == [b"v%d" % n for n in range(50)]
    db.close()


def test_one_bad_request_in_a_group_commit_fails_alone(tmp_path):
    db = open_database(str(tmp_path / "db"), max_value_len=100)
    futures = [db.set_async({f"ok{n}".encode(): b"v"}) for n in range(20)]
    bad = db.set_async({b"too-big": bytes(200)})
    futures += [db.set_async({f"ok{n}".encode(): b"v"}) for n in range(20, 40)]
    with pytest.raises(IllegalArgumentsError, match="value length"):
        bad.result()
    assert all(len(f.result()) == 1 for f in futures)
    assert db.current_state().tx_id == 40
    assert db.audit() == 40
    db.close()


def test_index_ahead_of_log_is_rebuilt(tmp_path):
    path = str(tmp_path / "db")
    with open_database(path) as db:
        for n in range(5):
            db.set({f"k{n}".encode(): b"v"})
    env = lmdb.open(str(tmp_path / "db" / "index"), max_dbs=2)
    meta = env.open_db(b"meta")
    with env.begin(write=True) as txn:
        txn.put(INDEXED_TX_KEY, struct.pack(">Q", 999), db=meta)
    env.close()
    with open_database(path) as db:
        assert db.get(b"k4").tx == 5
        assert db.indexed_tx_id == 5


def test_index_of_an_older_row_format_is_rebuilt(tmp_path):
    """Rows written before entry offsets existed (u64 tx || u16 index, no format key) are
    replaced by rebuilt ones instead of being misread."""
    path = str(tmp_path / "db")
    with open_database(path) as db:
        db.set({b"a": b"1", b"b": b"2"})
        db.set({b"a": b"3"})
    env = lmdb.open(str(tmp_path / "db" / "index"), max_dbs=2)
    keys, meta = env.open_db(b"keys", dupsort=True), env.open_db(b"meta")
    with env.begin(write=True) as txn:
        rows = list(txn.cursor(db=keys))
        txn.drop(keys, delete=False)
        for key, value in rows:
            txn.put(key, value[:10], db=keys, dupdata=True)
        txn.delete(ROW_FORMAT_KEY, db=meta)
    env.close()
    with open_database(path) as db:
        assert db.get(b"a").value == b"3" and db.get(b"b").value == b"2"
        assert [e.value for e in db.history(b"a")] == [b"1", b"3"]
        assert db.get(b"a", at_tx=1).value == b"1"
    env = lmdb.open(str(tmp_path / "db" / "index"), max_dbs=2)
    keys = env.open_db(b"keys", dupsort=True)
    with env.begin() as txn:
        assert {len(v) for _, v in txn.cursor(db=keys)} == {14}
    env.close()


def _rewrite_index_rows(path, rewrite):
    """Replace every key-index row ``(key, value)`` by ``rewrite(key, value)`` (the format key
    stays, so the rows are read as they are, not rebuilt)."""
    env = lmdb.open(path, max_dbs=2)
    keys = env.open_db(b"keys", dupsort=True)
    with env.begin(write=True) as txn:
        rows = list(txn.cursor(db=keys))
        txn.drop(keys, delete=False)
        for key, value in rows:
            txn.put(key, rewrite(key, value), db=keys, dupdata=True)
    env.close()


def test_latest_get_reads_rows_without_an_offset(tmp_path):
    """A row past the 4 GiB offset limit has no offset (10 bytes): a plain get walks the record."""
    path = str(tmp_path / "db")
    with open_database(path) as db:
        db.set({b"a": b"1", b"b": b"2"})
        db.delete([b"b"])
    _rewrite_index_rows(str(tmp_path / "db" / "index"), lambda key, value: value[:10])
    with open_database(path) as db:
        assert db.get(b"a").value == b"1" and db.get(b"a").revision == 1
        with pytest.raises(KeyNotFoundError):
            db.get(b"b")


def test_latest_get_refuses_a_row_pointing_at_another_key(tmp_path):
    path = str(tmp_path / "db")
    with open_database(path) as db:
        db.set({b"a": b"1"})
        db.set({b"b": b"2"})
        db.get(b"b")                          # the index holds both rows
        with db._index_env.read() as txn:
            b_row = bytes(txn.get(codec.index_key(b"\x00b"), db=db._index_env.dbs["keys"]))
    _rewrite_index_rows(str(tmp_path / "db" / "index"), lambda key, value: b_row)
    with open_database(path) as db:
        assert db.get(b"b").value == b"2"
        with pytest.raises(CorruptedDataError, match="another key"):
            db.get(b"a")


def test_reads_see_writes_made_before_them(tmp_path):
    with open_database(str(tmp_path / "db")) as db:
        for n in range(200):
            db.set({b"counter": str(n).encode()})
            assert db.get(b"counter").value == str(n).encode()


def test_settings_persist_and_header_version_is_fixed(tmp_path):
    path = str(tmp_path / "db")
    with open_database(path, header_version=0, replica=True) as db:
        assert db.is_replica and db.header_version == 0
    with open_database(path) as db:
        assert db.is_replica and db.header_version == 0
        db.set_replica(False)
        header = db.set({b"k": b"v"})
        assert header.version == 0
    with pytest.raises(IllegalArgumentsError, match="can not be changed"):
        open_database(path, header_version=1)
    with open_database(path) as db:
        assert not db.is_replica


def test_codec_in_use_is_reported():
    assert codec.IMPLEMENTATION in ("native", "pure")


def test_a_failed_commit_aborts_what_was_chained_onto_it_and_the_chain_stays_whole(tmp_path):
    """Fault injection at the LMDB write: the batch fails, the batch sealed on top of it while it
    was being written is aborted (never written with a broken prevAlh), and later writes chain
    onto what is on disk."""
    db = open_database(str(tmp_path / "db"))
    real_write = db._log.write
    calls = {"n": 0}
    all_submitted = threading.Event()

    def failing_write(body):
        calls["n"] += 1
        if calls["n"] == 2:
            # hold until every chained write was submitted and taken by the sealer, and a
            # batch sealed on us: on a loaded machine some would otherwise come after the
            # failure, chain onto what is on disk and (rightly) commit
            deadline = time.monotonic() + 10
            all_submitted.wait(10)
            while (not db._writer._queue.empty() or db._writer._sealed.qsize() == 0) \
                    and time.monotonic() < deadline:
                time.sleep(0.001)
            raise OSError(28, "No space left on device (injected)")
        return real_write(body)

    db._log.write = failing_write
    first = db.set_async({b"first": b"v"})
    first.result()
    failing = db.set_async({b"fails": b"v"})
    while calls["n"] < 2:
        time.sleep(0.001)
    chained = [db.set_async({f"chained{n}".encode(): b"v"}) for n in range(20)]
    all_submitted.set()
    with pytest.raises(OSError, match="injected"):
        failing.result()
    for future in chained:
        with pytest.raises(CommitAbortedError):
            future.result()
    header = db.set({b"after": b"ok"})
    assert header.id == 2 and header.prev_alh == db.tx_by_id(1).header.alh()
    assert db.audit() == 2
    with pytest.raises(KeyNotFoundError):
        db.get(b"chained0")
    db.close()


def test_a_cancelled_write_does_not_stop_the_writer(tmp_path):
    db = open_database(str(tmp_path / "db"))
    futures = [db.set_async({f"k{n}".encode(): b"v"}) for n in range(200)]
    cancelled = sum(f.cancel() for f in futures[100:])   # some may already be running
    done = [f.result(10) for f in futures if not f.cancelled()]
    assert len(done) == 200 - cancelled
    assert db.set({b"after": b"ok"}).id == len(done) + 1
    db.close()


def test_role_change_is_ordered_with_queued_writes(tmp_path):
    db = open_database(str(tmp_path / "db"))
    before = [db.set_async({f"b{n}".encode(): b"v"}) for n in range(500)]
    db.set_replica(True)
    assert all(len(f.result()) == 1 for f in before)          # queued before: committed
    with pytest.raises(ReadOnlyReplicaError):
        db.set({b"after": b"v"})
    assert db.current_state().tx_id == 500
    db.close()


def test_a_durable_database_opens_every_environment_with_lmdb_syncing(tmp_path):
    """R3: nothing a durable database acknowledges rests on unsynced pages. The log fsyncs data
    and meta pages; the index (derived, rebuilt from the log) skips only the meta-page sync;
    no environment uses writemap or map_async."""
    database = open_database(str(tmp_path / "db"))
    try:
        log_flags = database._log.env.flags()
        index_flags = database._index_env.env.flags()
    finally:
        database.close()
    assert log_flags["sync"] and log_flags["metasync"]
    assert index_flags["sync"] and not index_flags["metasync"]
    for flags in (log_flags, index_flags):
        assert not flags["writemap"] and not flags["map_async"]


def test_indexer_gathers_commits_until_a_read_waits(tmp_path, monkeypatch):
    """With no reader waiting the indexer lets commits gather (INDEX_GATHER_SECONDS); a read that
    needs them ends the gathering at once instead of waiting it out."""
    monkeypatch.setattr("immucore.store.indexer.INDEX_GATHER_SECONDS", 30.0)
    with open_database(str(tmp_path / "db")) as db:
        db.set({b"first": b"1"})        # the indexer wakes on this commit and starts gathering
        time.sleep(0.3)
        assert db.indexed_tx_id == 0, "indexed without gathering"
        for n in range(5):
            db.set({f"k{n}".encode(): b"v"})
        start = time.monotonic()
        assert db.get(b"k4").value == b"v"
        assert time.monotonic() - start < 5.0
        assert db.indexed_tx_id == 6     # one step indexed every gathered commit


def test_read_burst_shares_transactions_and_still_sees_commits(tmp_path):
    """Gets inside a ReadBurst share one read transaction per environment, renewed when a
    commit (or an index step) happened since: a read still sees what was committed before it."""
    from immucore.store import env as env_module
    with open_database(str(tmp_path / "db")) as db:
        db.set({b"a": b"1", b"b": b"2"})
        with env_module.ReadBurst():
            assert db.get(b"a").value == b"1"
            held = dict(env_module._burst.txns)
            assert set(held) == {db._log, db._index_env}
            assert db.get(b"b").value == b"2"
            assert {e: t[0] for e, t in env_module._burst.txns.items()} == \
                {e: t[0] for e, t in held.items()}          # the same transactions, shared
            header = db.set({b"a": b"3"})
            if db.indexed_tx_id < header.id:
                # a read that would wait for the index while the burst holds guards refuses to
                with pytest.raises(env_module.BurstWouldBlock):
                    db.get(b"a")
                db._indexer.wait_for(header.id, 10)
            assert db.get(b"a").value == b"3"                # renewed after the commit
            assert env_module._burst.txns[db._log][0] is not held[db._log][0]
        assert getattr(env_module._burst, "txns", None) is None
        assert db._log._readers == 0 and db._index_env._readers == 0


def test_map_growth_waits_for_a_read_burst_without_deadlock(tmp_path):
    """A burst holds its guards until it ends; a map resize meanwhile waits for it. The burst's
    own thread can still open other reads of that environment (it must not wait for the resize
    that waits for it), and a read of another environment being resized refuses to wait
    (BurstWouldBlock: the request is served again outside the burst)."""
    from immucore.store import env as env_module
    with open_database(str(tmp_path / "db")) as db:
        db.set({b"a": b"1"})
        size_before = db._log.env.info()["map_size"]
        grown = threading.Event()
        with env_module.ReadBurst():
            assert db.get(b"a").value == b"1"
            grower = threading.Thread(target=lambda: (db._log._grow(), grown.set()))
            grower.start()
            deadline = time.monotonic() + 5
            while not db._log._resizing and time.monotonic() < deadline:
                time.sleep(0.01)
            assert db._log._resizing and not grown.is_set()    # waiting for this burst
            assert db.tx_by_id(1).header.id == 1               # a plain read still runs
        grower.join(10)
        assert grown.is_set()
        assert db._log.env.info()["map_size"] > size_before
        assert db.get(b"a").value == b"1"
        # a burst holding only the log must not wait for a resize of the index
        index_env = db._index_env
        with env_module.ReadBurst():
            with db._log.read(buffers=True, version=db._writer.state):
                pass
            with index_env._guard:
                index_env._resizing = True                     # as if the index were growing
            try:
                with pytest.raises(env_module.BurstWouldBlock):
                    with index_env.read():
                        pass
            finally:
                with index_env._guard:
                    index_env._resizing = False
                    index_env._guard.notify_all()
        assert db._log._readers == 0 and index_env._readers == 0


def test_write_queue_is_bounded_busy_or_blocking(tmp_path, monkeypatch):
    """The write queue holds WRITE_QUEUE_TXS_MAX requests: past that a non-blocking submit (the
    event loop's) gets WriterBusyError and a blocking one waits for room, then commits."""
    from immucore.store import writer as writer_module
    monkeypatch.setattr(writer_module, "WRITE_QUEUE_TXS_MAX", 4)
    with open_database(str(tmp_path / "db")) as db:
        log_env = db._log
        with log_env._guard:              # stall the committer: its write waits for a "resize"
            log_env._resizing = True
        futures = []
        try:
            # the sealer drains the queue until its pipeline to the stalled committer is full:
            # the queue is full for good once submits keep failing
            busy_in_a_row, deadline = 0, time.monotonic() + 10
            while busy_in_a_row < 3:
                assert time.monotonic() < deadline, "the write queue never stayed full"
                try:
                    futures.append(db.set_async({f"k{len(futures)}".encode(): b"v"},
                                                block=False))
                    busy_in_a_row = 0
                except writer_module.WriterBusyError as exc:
                    assert "write queue full (4 requests waiting)" in str(exc)
                    busy_in_a_row += 1
                    time.sleep(0.1)
            blocked = threading.Thread(target=lambda: futures.append(db.set_async({b"x": b"y"})))
            blocked.start()
            blocked.join(0.3)
            assert blocked.is_alive()               # waiting for room, not failing
        finally:
            with log_env._guard:
                log_env._resizing = False
                log_env._guard.notify_all()
        blocked.join(10)
        assert not blocked.is_alive()
        assert all(len(f.result(10)) == 1 for f in futures)
        assert db.get(b"x").value == b"y"
