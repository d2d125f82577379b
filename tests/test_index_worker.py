"""The key indexer in a worker process (store/index_worker.py), as the node runs it: the same
index as the thread's, readers that wait for it, a worker that dies and is restarted, maps one
process grows and the other adopts, and a worker that outlives its node writing nothing."""
from __future__ import annotations

import os
import signal
import time

import pytest

from immucore.database import open_database
from immucore.errors import KeyNotFoundError
from immucore.store.indexer import IndexMovedError, index_step, read_indexed_tx_id

from .nodes import running_node


def _wait_until(predicate, seconds=20.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


@pytest.fixture
def db(tmp_path):
    database = open_database(str(tmp_path / "db"), index_worker=True)
    yield database
    database.close()


def test_the_worker_indexes_what_the_thread_would(tmp_path, db):
    for n in range(30):
        db.set({b"k%d" % (n % 7): b"v%d" % n, b"only%d" % n: b"x"})
    db.delete([b"k3"])
    with open_database(str(tmp_path / "threaded")) as threaded:
        for n in range(30):
            threaded.set({b"k%d" % (n % 7): b"v%d" % n, b"only%d" % n: b"x"})
        threaded.delete([b"k3"])
        for key in [b"k%d" % n for n in range(7)] + [b"only%d" % n for n in range(30)]:
            if key == b"k3":
                for database in (db, threaded):
                    with pytest.raises(KeyNotFoundError):
                        database.get(key)
            else:
                assert db.get(key) == threaded.get(key)
            assert db.history(key) == threaded.history(key)
        assert db.scan(limit=100) == threaded.scan(limit=100)


def test_a_read_right_after_a_commit_waits_for_the_worker(db):
    for n in range(200):
        db.set({b"counter": b"%d" % n})
        assert db.get(b"counter").value == b"%d" % n


def test_a_killed_worker_is_restarted_and_indexing_goes_on(db):
    db.set({b"before": b"1"})
    assert db.get(b"before").value == b"1"
    first = db._indexer._process
    os.kill(first.pid, signal.SIGKILL)
    _wait_until(lambda: db._indexer._process is not first)
    assert "exited with code -9" in (db._indexer.last_error or "exited with code -9")
    db.set({b"after": b"2"})
    assert db.get(b"after").value == b"2"
    assert db._indexer.last_error is None          # cleared by the new worker's first step


def test_maps_grown_by_either_process_are_adopted_by_the_other(tmp_path):
    """Both environments start at 256 KiB: the node grows the log, the worker the index, and
    each side's next transaction adopts the other's size."""
    with open_database(str(tmp_path / "db"), index_worker=True,
                       map_size_bytes=256 * 1024) as db:
        for n in range(100):
            db.set({b"key-%06d-%06d-%s" % (n, i, b"k" * 24): os.urandom(64) for i in range(200)})
        assert db.get(b"key-%06d-%06d-%s" % (99, 199, b"k" * 24)).tx == 100
        assert db.get(b"key-%06d-%06d-%s" % (0, 0, b"k" * 24)).tx == 1
        # the worker grew the index past 256 KiB, and this process took the new size
        assert db._index_env.env.info()["map_size"] > 256 * 1024
        assert db._log.env.info()["map_size"] > 256 * 1024
    with open_database(str(tmp_path / "db")) as db:      # and the thread reads the same index
        assert len(db.scan(limit=1000)) == 1000 and db.get(
            b"key-%06d-%06d-%s" % (50, 50, b"k" * 24)).tx == 51


def test_a_step_begun_before_the_index_moved_writes_nothing(tmp_path):
    """What makes a worker outliving a killed node harmless: its step writes only if the
    stored position is still where the step began."""
    with open_database(str(tmp_path / "db")) as db:
        for n in range(5):
            db.set({b"k%d" % n: b"v"})
        db.get(b"k4")
        env, log_env = db._index_env, db._log
        assert read_indexed_tx_id(env) == 5
        with pytest.raises(IndexMovedError):
            index_step(env, log_env, 3, 5)          # a stale worker that thinks 2 is indexed
        assert read_indexed_tx_id(env) == 5


def test_closing_stops_the_worker(tmp_path):
    database = open_database(str(tmp_path / "db"), index_worker=True)
    database.set({b"a": b"1"})
    process = database._indexer._process
    database.close()
    assert process.poll() is not None


def _children(pid: int) -> list:
    children = []
    for task in os.listdir(f"/proc/{pid}/task"):           # a child belongs to its thread
        with open(f"/proc/{pid}/task/{task}/children") as f:
            children += [int(child) for child in f.read().split()]
    return children


def test_the_node_indexes_in_workers_that_exit_when_it_is_killed(tmp_path):
    with running_node(tmp_path) as node:
        workers = _children(node.process.pid)
        assert workers, "defaultdb has an index worker"
        for pid in workers:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert b"immucore.store.index_worker" in f.read()
        node.process.send_signal(signal.SIGKILL)
        node.process.wait()

        def gone():
            for pid in workers:
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                            return False
                except FileNotFoundError:
                    pass
            return True

        _wait_until(gone, 10)
