"""The key indexer in a worker process (store/index_worker.py), as the node runs it: the same
index as the thread's, readers that wait for it, a worker that dies and is restarted, maps one
process grows and the other adopts, and a worker that outlives its node writing nothing."""
from __future__ import annotations

import os
import signal
import time
import urllib.request

import pytest

from immucore.client import Client
from immucore.constants import INDEX_WORKER_RESTARTS_MAX
from immucore.database import open_database
from immucore.errors import IndexFailedError, KeyNotFoundError
from immucore.store.indexer import IndexMovedError, index_step, read_indexed_tx_id

from .nodes import free_port, running_node
from .test_cli import Shell


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
    assert db._indexer.restarts == 1 and first.returncode == -signal.SIGKILL
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


def test_a_burst_read_meeting_a_map_the_worker_grew_is_served_again(tmp_path):
    """Adopting a grown map waits for every reader of this process: a read inside a burst that
    holds a guard says BurstWouldBlock (the connection serves it again outside the burst)
    instead of waiting for itself."""
    from immucore.store.env import BurstWouldBlock, ReadBurst
    with open_database(str(tmp_path / "db"), index_worker=True,
                       map_size_bytes=256 * 1024, durable=False) as db:
        db.set({b"k": b"v"})
        db.get(b"k")
        with ReadBurst():
            with pytest.raises(KeyNotFoundError):
                db.get(b"missing")                      # the burst holds the index guard
            for n in range(40):                         # the worker grows the index map
                db.set({b"x-%06d-%06d-%s" % (n, i, b"k" * 24): os.urandom(64)
                        for i in range(200)})
            _wait_until(lambda: db._indexer.indexed_tx_id == db._writer.state.tx_id)
            with pytest.raises(BurstWouldBlock):
                db.history(b"k")
        assert [e.value for e in db.history(b"k")] == [b"v"]


def test_the_worker_never_indexes_past_the_published_commit(tmp_path):
    """A read renews its log snapshot when the writer publishes a commit; an index row for a tx
    LMDB holds but the writer has not published yet would point past that snapshot."""
    from immucore.store.env import ReadBurst
    with open_database(str(tmp_path / "db"), index_worker=True, durable=False) as db:
        db.set({b"k": b"v1"})
        db.set({b"other": b"o"})
        db.get(b"k")
        write, slow = db._log.write, []

        def slow_write(body):            # LMDB has committed; the writer publishes 0.5 s later
            result = write(body)
            if slow:
                time.sleep(0.5)
            return result

        db._log.write = slow_write
        with ReadBurst():
            assert db.get(b"other").value == b"o"             # log snapshot at tx 2
            slow.append(True)
            setter = __import__("threading").Thread(target=db.set, args=({b"k": b"v2"},))
            setter.start()
            time.sleep(0.1)
            db._indexer._send(b"h", 0)                      # a read elsewhere hurries it
            time.sleep(0.2)
            assert db._indexer.indexed_tx_id == 2              # tx 3 not published yet
            setter.join()
            _wait_until(lambda: db._indexer.indexed_tx_id == 3)
            assert db.get(b"k").value == b"v2"                 # both snapshots renewed


def _reader_pids(env) -> set:
    """The processes holding reader slots (LMDB's table: "pid thread txnid" rows)."""
    return {int(row.split()[0]) for row in env.env.readers().splitlines()
            if row.split() and row.split()[0].isdigit()}


def test_reader_slots_of_dead_processes_are_cleared_when_a_worker_dies(db):
    """A process killed inside a read transaction leaves its LMDB reader slot, and while the
    node keeps the environment open LMDB never reuses the pages freed after that snapshot:
    when a worker dies (the process most likely to), the node clears such slots."""
    import subprocess
    import sys
    db.set({b"a": b"1"})
    path = os.path.join(db.path, "index")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import lmdb, time\n"
         f"env = lmdb.open({path!r}, max_dbs=2)\ntxn = env.begin()\n"
         "print('reading', flush=True)\ntime.sleep(60)"], stdout=subprocess.PIPE)
    assert holder.stdout.readline() == b"reading\n"
    holder.kill()
    holder.wait()
    assert holder.pid in _reader_pids(db._index_env)               # stale, not cleared yet
    first = db._indexer._process
    os.kill(first.pid, signal.SIGKILL)
    _wait_until(lambda: db._indexer._process is not first)
    assert holder.pid not in _reader_pids(db._index_env)


def test_a_commit_whose_poke_found_the_pipe_full_is_still_indexed(db):
    """Pokes carry the committed tx id; one dropped on a full pipe is sent again after the
    worker's next step, so the worker never stops short of the last commit."""
    db.set({b"a": b"1"})
    db.get(b"a")
    indexer = db._indexer
    send = indexer._send

    def full_pipe(kind, value=None, must_arrive=True):
        if kind == b"p" and not getattr(full_pipe, "let_through", False):
            indexer._poke_dropped = True         # what _send does on EAGAIN
            return
        send(kind, value, must_arrive)

    indexer._send = full_pipe
    db.set({b"b": b"2"})                          # its poke is "dropped"
    full_pipe.let_through = True
    indexer._on_line(f"indexed {indexer.indexed_tx_id}")   # the worker's next report
    _wait_until(lambda: indexer.indexed_tx_id == 2, 5)


def test_workers_import_the_package_the_node_runs_whatever_the_current_directory(tmp_path):
    """A node started as a user does (the installed `immucore` script) from a folder holding
    another `immucore` package: its index workers must not import that one (they would die on
    it and be restarted forever, and every read of a user database time out)."""
    decoy = tmp_path / "cwd" / "immucore"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text(
        'raise ImportError("the decoy immucore in the current directory was imported")\n')
    with running_node(tmp_path / "node", console_script=True, cwd=str(tmp_path / "cwd")) as node, \
            Client(node.host, node.port, timeout=15) as client:
        client.login("immudb", "immudb")
        client.create_database("userdb")
        client.create_database("userreplica", {
            "replica": True, "primary_database": "userdb", "primary_host": node.host,
            "primary_port": node.port, "primary_username": "immudb",
            "primary_password": "immudb"})
        client.use_database("userdb")
        tx = client.set({b"key": b"value"})
        assert client.get(b"key").value == b"value"
        client.use_database("userreplica")
        _wait_until(lambda: client.current_state().tx_id >= tx.id)
        assert client.get(b"key").value == b"value"
        client.use_database("defaultdb")
        client.set({b"default": b"1"})
        assert client.get(b"default").value == b"1"
    assert "decoy" not in node.log() and "restarting it" not in node.log(), node.log()


def _maps(pid: int, path_end: str) -> bool:
    """Whether process ``pid`` has a file ending in ``path_end`` mapped (or has ended)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return any(line.rstrip().endswith(path_end) for line in f)
    except (FileNotFoundError, ProcessLookupError):
        return True


def _index_of(client, name: str) -> dict:
    return next(d for d in client.list_databases() if d["name"] == name)["index"]


def _crash_worker_until_it_fails(client, name: str) -> int:
    """SIGSEGV the database's index worker (faulthandler leaves its stack on stderr) each time
    the node starts a new one, until the node gives up on it; how many crashes that took."""
    crashes = 0
    while True:
        index = _index_of(client, name)
        if index["error"]:
            return crashes
        assert crashes <= INDEX_WORKER_RESTARTS_MAX, f"still restarted: {index}"
        pid = index["worker_pid"]
        # once it has mapped its index it runs the worker's code (faulthandler on): before,
        # the crash would leave nothing on stderr
        _wait_until(lambda: _maps(pid, os.path.join(name, "index", "data.mdb")))
        os.kill(pid, signal.SIGSEGV)
        crashes += 1
        _wait_until(lambda: _index_of(client, name)["error"] or
                    _index_of(client, name)["worker_pid"] not in (None, pid))


def test_a_worker_that_keeps_dying_fails_its_database_loudly_and_only_it(tmp_path):
    metrics_port = free_port()
    with running_node(tmp_path / "node", "--metrics-server=true",
                      f"--metrics-server-port={metrics_port}") as node, \
            Client(node.host, node.port) as client:
        client.login("immudb", "immudb")
        for name in ("crashing", "healthy"):
            client.create_database(name)
            client.use_database(name)
            client.set({b"before": name.encode()})
        client.use_database("crashing")
        assert client.get(b"before").value == b"crashing"

        assert _crash_worker_until_it_fails(client, "crashing") == INDEX_WORKER_RESTARTS_MAX + 1
        error = _index_of(client, "crashing")["error"]
        assert f"exited {INDEX_WORKER_RESTARTS_MAX + 1} times" in error
        assert "the last was killed by SIGSEGV (code -11)" in error
        # the worker's last stderr line, as the node logged it
        logged = [line.split("index worker of crashing: ", 1)[1] for line in
                  node.log().splitlines() if "index worker of crashing: " in line]
        assert logged and error.endswith(f"its last stderr line: {logged[-1].strip()}"), error
        assert f"{error}; reads of crashing fail until it is loaded again" in node.log()

        shell = Shell(node, tmp_path / "home")
        shell.ok("immuadmin", "login", "immudb", stdin="immudb\n")
        listed = shell.ok("immuadmin", "database", "list")
        row = next(line for line in listed.splitlines() if line.startswith("crashing "))
        assert row.endswith(f"ERROR: {error}"), listed
        assert next(line for line in listed.splitlines()
                    if line.startswith("healthy ")).endswith(" ok"), listed
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                         timeout=10).read().decode()
        assert 'immucore_index_worker_failed{db="crashing",error="index worker of crashing ' \
            'exited' in metrics
        assert 'immucore_index_worker_failed{db="healthy",error=""} 0.0' in metrics
        assert (f'immucore_index_worker_restarts_total{{db="crashing"}} '
                f'{float(INDEX_WORKER_RESTARTS_MAX)}') in metrics

        # reads fail at once naming the cause, whether the index covers them or not
        for write_first in (False, True):
            if write_first:
                client.set({b"after": b"1"})
            started = time.monotonic()
            with pytest.raises(IndexFailedError) as failed:
                client.get(b"before")
            assert failed.value.code == "index_failed" and error in str(failed.value)
            assert time.monotonic() - started < 5
        client.use_database("healthy")
        client.set({b"still": b"served"})
        assert client.get(b"still").value == b"served"
        assert client.get(b"before").value == b"healthy"

        # the operator's way back: load it again (in place, as for defaultdb), or unload + load
        shell.ok("immuadmin", "database", "load", "crashing")
        client.use_database("crashing")
        assert client.get(b"after").value == b"1"
        assert _index_of(client, "crashing")["error"] is None
        assert _crash_worker_until_it_fails(client, "crashing") == INDEX_WORKER_RESTARTS_MAX + 1
        shell.ok("immuadmin", "database", "unload", "crashing")
        shell.ok("immuadmin", "database", "load", "crashing")
        client.use_database("crashing")
        assert client.get(b"after").value == b"1"
        assert _index_of(client, "crashing") == {
            "worker_pid": _index_of(client, "crashing")["worker_pid"], "restarts": 0,
            "error": None}
