"""Process faults against real nodes (docs/reliability.md R1, R2, R5, R8, R9, R10).

Each scenario starts real ``immucore`` processes (tests/nodes.py), drives writers that record
every operation in a History (tests/history.py), injects one kind of fault — SIGKILL of a
primary, of a replica or of the middle of a chain, a full disk, a promotion while the old primary
still writes, a skewed clock — and then runs the history checker: prefix property, no
acknowledged write lost, contiguous ids, convergence within a bound once the fault healed, and
every database of every stopped node reopening with a clean audit.

Seeds are printed (``-s`` shows them); ``IMMUCORE_FAULT_SEED`` replaces the default seeds.
Longer and more seeded runs are marked ``slow`` (``make test-slow``).
"""
import contextlib
import os
import random
import re
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest

from immucore.client import Client
from immucore.constants import FOLDER_LOCK_WAIT_SECONDS
from immucore.database import open_database
from immucore.errors import FolderInUseError

from .history import History, WriterPool, check_history, check_node_storage, check_storage, \
    wait_converged
from .nodes import NodeProcess, free_port, port_accepts, running_node
from .test_replication import _immuadmin, _wait_for

CLIENT_TIMEOUT_SECONDS = 10.0       # every client call; an op longer than this is a failure
CONVERGE_SECONDS = 45.0             # > REPLICATION_BACKOFF_SECONDS_MAX: a backoff may be due
WAIT_SECONDS = 20.0
REPLICATION_BATCH_TXS = 1000        # immucore.constants.REPLICATION_BATCH_TXS
FAKETIME_LIBRARY = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


def _seeds(*defaults):
    chosen = os.environ.get("IMMUCORE_FAULT_SEED")
    return [int(chosen)] if chosen else list(defaults)


def _rng(seed: int, what: str) -> random.Random:
    print(f"{what}: seed {seed} (IMMUCORE_FAULT_SEED={seed} to repeat)")
    return random.Random(seed)


# --- nodes and clients ------------------------------------------------------------------------

def _login(node, database: str = "defaultdb") -> Client:
    client = Client(node.host, node.port, timeout=CLIENT_TIMEOUT_SECONDS)
    try:
        client.login("immudb", "immudb", database)
    except BaseException:
        client.close()
        raise
    return client


def _connector(node, database: str = "defaultdb"):
    return lambda: _login(node, database)


def _replica_settings(primary, database: str = "defaultdb") -> dict:
    return {"replica": True, "primary_database": database, "primary_host": primary.host,
            "primary_port": primary.port, "primary_username": "immudb",
            "primary_password": "immudb"}


def _status(client, name: str):
    return next(d for d in client.list_databases() if d["name"] == name)["replication"]


def _describer(node, name: str):
    """For wait_converged's message: the replicator's status, read on a fresh connection."""
    def describe(_label):
        try:
            with _login(node) as client:
                return _status(client, name)
        except Exception as exc:  # noqa: BLE001 - the node may be the one that is down
            return f"status unavailable: {exc}"
    return describe




@contextlib.contextmanager
def _clients(*endpoints):
    """Logged-in clients for (node, database) pairs, closed at the end."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(_login(node, database)) for node, database in endpoints]


def _fill_embedded(path: str, txs: int, entries: int = 1, value_bytes: int = 8):
    """A primary's defaultdb written before its node starts: a backlog in seconds."""
    with open_database(path, name="defaultdb") as db:
        for start in range(0, txs, 1000):
            futures = [db.set_async({f"k{n}-{i}".encode(): os.urandom(value_bytes)
                                     for i in range(entries)})
                       for n in range(start, min(start + 1000, txs))]
            for future in futures:
                future.result()


# --- R1: SIGKILL the primary mid-stream -------------------------------------------------------

def _primary_killed_mid_stream(tmp_path, seed: int, rounds: int):
    rng = _rng(seed, "R1")
    history = History()
    with running_node(tmp_path / "p") as primary, running_node(tmp_path / "r") as replica:
        with _login(replica) as r:
            r.create_database("replicadb", _replica_settings(primary))
        for round_index in range(rounds):
            with WriterPool(history, _connector(primary), threads=3, name=f"r{round_index}-",
                            timeout_seconds=CLIENT_TIMEOUT_SECONDS):
                time.sleep(rng.uniform(0.2, 1.0))
                primary.kill()                          # kill -9 under full write load
                # while it is down: its storage reopens and audits clean
                down = check_node_storage(primary.dir)
                primary.start()
                time.sleep(rng.uniform(0.1, 0.4))       # writes resume on the new process
            with _login(primary) as p, _login(replica, "replicadb") as r:
                took = wait_converged(p, {"replica": r}, CONVERGE_SECONDS,
                                      describe=_describer(replica, "replicadb"))
                summary = check_history(history, p, {"replica": r})
            print(f"R1 round {round_index}: log at kill {down['defaultdb']}, converged in "
                  f"{took:.2f}s, {summary}")
            assert summary["ok"] > 0
    check_node_storage(primary.dir)
    check_node_storage(replica.dir)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("seed", _seeds(101))
def test_r1_primary_killed_mid_stream_loses_no_acknowledged_write(tmp_path, seed):
    _primary_killed_mid_stream(tmp_path, seed, rounds=5)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("seed", _seeds(201, 202))
def test_r1_primary_killed_fifty_times(tmp_path, seed):
    _primary_killed_mid_stream(tmp_path, seed, rounds=50)


# --- nodes with an environment of their own (a tracer, a fake clock) --------------------------

class EnvNode(NodeProcess):
    """A node started with extra environment variables (tests/nodes.py passes its own)."""

    def __init__(self, base_dir, extra_args=(), env=None):
        super().__init__(base_dir, extra_args)
        self.env = dict(env or {})

    def start(self):
        # Popen inherits os.environ; set ours only while the child is spawned.
        saved = {name: os.environ.get(name) for name in self.env}
        os.environ.update(self.env)
        try:
            super().start()
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


@contextlib.contextmanager
def _running(node: NodeProcess):
    node.start()
    try:
        yield node
    finally:
        node.stop()


# Loaded by the node's interpreter (sitecustomize on PYTHONPATH): every EXPORT_TXS request the
# node sends (its replicators' fetches) is appended to a file as its first tx id, so a test can
# see exactly where a restarted replica resumed. Traced at AsyncClient.call, the one method
# every request goes through.
_EXPORT_TRACER = textwrap.dedent("""
    import os
    from immucore import client as _client
    from immucore.protocol.messages import Msg as _Msg

    _path = os.environ["IMMUCORE_TEST_EXPORT_TRACE"]
    _call = _client.AsyncClient.call

    async def call(self, msg, body=None):
        if msg == _Msg.EXPORT_TXS:
            with open(_path, "a") as trace:
                trace.write(f"{body['first_tx_id']}\\n")
        return await _call(self, msg, body)

    _client.AsyncClient.call = call
""")


def _traced_replica(tmp_path) -> EnvNode:
    tracer_dir = tmp_path / "tracer"
    tracer_dir.mkdir()
    (tracer_dir / "sitecustomize.py").write_text(_EXPORT_TRACER)
    trace = tmp_path / "exports.trace"
    node = EnvNode(tmp_path / "r", env={"PYTHONPATH": str(tracer_dir),
                                        "IMMUCORE_TEST_EXPORT_TRACE": str(trace)})
    node.trace_path = str(trace)
    return node


def _traced_exports(node) -> list:
    with contextlib.suppress(FileNotFoundError), open(node.trace_path) as trace:
        return [int(line) for line in trace if line.strip().isdigit()]
    return []


def _metrics_args():
    port = free_port()
    return port, ("--metrics-server=true", f"--metrics-server-port={port}")


def _export_requests(metrics_port: int, database: str = "defaultdb") -> int:
    """EXPORT_TXS (and EXPORT_TX) requests the node served on ``database``: its 'admin' kind
    in immucore_requests (immucore/server/metrics.py)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    found = re.search(r'^immucore_requests_total\{db="%s",kind="admin"\} (\S+)$' % database,
                      text, re.MULTILINE)
    return int(float(found.group(1))) if found else 0


# --- R2: SIGKILL a replica mid-apply, restart, resume ----------------------------------------

BACKLOG_TXS = 30_000


def _check_resumed_after(exports_after_restart: list, durable: int):
    assert exports_after_restart, "the restarted replica sent no EXPORT_TXS"
    assert exports_after_restart[0] == durable + 1, (
        f"the restarted replica asked first for tx {exports_after_restart[0]}, not its last "
        f"durable tx + 1 = {durable + 1}")
    assert all(b >= a for a, b in zip(exports_after_restart, exports_after_restart[1:])), \
        f"the replica went back in the log: {exports_after_restart}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", _seeds(301, 302))
def test_r2_replica_killed_mid_catch_up_resumes_at_its_last_durable_tx(tmp_path, seed):
    _replica_killed_mid_catch_up(tmp_path, seed)


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", _seeds(*range(303, 313)))
def test_r2_replica_killed_mid_catch_up_more_seeds(tmp_path, seed):
    _replica_killed_mid_catch_up(tmp_path, seed)


def _replica_killed_mid_catch_up(tmp_path, seed: int):
    rng = _rng(seed, "R2 backlog")
    metrics_port, metrics_args = _metrics_args()
    primary = NodeProcess(tmp_path / "p", metrics_args)
    _fill_embedded(os.path.join(primary.dir, "defaultdb"), BACKLOG_TXS, entries=4)
    replica = _traced_replica(tmp_path)
    with _running(primary), _running(replica):
        with _login(replica) as r:
            r.create_database("replicadb", _replica_settings(primary))
            r.use_database("replicadb")
            cut = rng.randrange(BACKLOG_TXS // 2, BACKLOG_TXS * 4 // 5)
            _wait_for(lambda: r.current_state().tx_id >= cut, f"catch-up past tx {cut}")
        replica.kill()                                   # kill -9 in the middle of applying
        exports_before = len(_traced_exports(replica))
        requests_before = _export_requests(metrics_port)
        durable = check_storage(os.path.join(replica.dir, "replicadb"))   # audits the prefix
        replica.start()
        with _login(primary) as p, _login(replica, "replicadb") as r:
            wait_converged(p, {"replica": r}, CONVERGE_SECONDS,
                           describe=_describer(replica, "replicadb"))
            # counted before check_history, whose own exports are admin requests too
            requests_to_resume = _export_requests(metrics_port) - requests_before
            check_history(History(), p, {"replica": r})
        resumed = _traced_exports(replica)[exports_before:]
        print(f"R2 backlog: killed at >= {cut}, durable {durable}, resumed with exports "
              f"{resumed[:5]}..., primary served {requests_to_resume} exports")
        _check_resumed_after(resumed, durable)
        assert durable < BACKLOG_TXS, "the replica was killed after its catch-up"
        # The trace above is the exact proof; the primary's own count agrees: a re-download
        # from tx 1 would cost it at least one export per batch of the whole backlog (acks are
        # counted apart, as replica_ack: they had made this bound fail for an early kill).
        assert requests_to_resume < BACKLOG_TXS // REPLICATION_BATCH_TXS
    check_node_storage(replica.dir)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", _seeds(311))
def test_r2_replica_killed_while_following_live_writes_resumes_without_duplicates(tmp_path,
                                                                                  seed):
    rng = _rng(seed, "R2 live")
    history = History()
    replica = _traced_replica(tmp_path)
    with running_node(tmp_path / "p") as primary, _running(replica):
        with _login(replica) as r:
            r.create_database("replicadb", _replica_settings(primary))
        with WriterPool(history, _connector(primary), threads=3,
                        timeout_seconds=CLIENT_TIMEOUT_SECONDS):
            for _ in range(3):                           # three kills under live writes
                time.sleep(rng.uniform(0.2, 0.8))
                replica.kill()
                exports_before = len(_traced_exports(replica))
                durable = check_storage(os.path.join(replica.dir, "replicadb"))
                replica.start()
                _wait_for(lambda: len(_traced_exports(replica)) > exports_before,
                          "the restarted replica's first fetch")
                _check_resumed_after(_traced_exports(replica)[exports_before:], durable)
        with _login(primary) as p, _login(replica, "replicadb") as r:
            wait_converged(p, {"replica": r}, CONVERGE_SECONDS,
                           describe=_describer(replica, "replicadb"))
            print(f"R2 live: {check_history(history, p, {'replica': r})}")
    check_node_storage(replica.dir)
    check_node_storage(primary.dir)


# --- R5: disk full ----------------------------------------------------------------------------

def _mount(*args):
    return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def _tmpfs(path: str, size: str):
    """A tmpfs of ``size`` at ``path`` (a real ENOSPC when full), always unmounted after."""
    os.makedirs(path, exist_ok=True)
    mounted = _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", path)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root needed): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", path], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", path], capture_output=True)


def _grow_tmpfs(path: str, size: str):
    grown = _mount("-o", f"remount,size={size}", path)
    assert grown.returncode == 0, grown.stderr


def _free_bytes(path: str) -> int:
    return shutil.disk_usage(path).free


def _ballast(path: str, leave_free_bytes: int) -> str:
    """Fill the file system of ``path`` up to ``leave_free_bytes`` free; returns the file."""
    ballast = os.path.join(path, "ballast")
    with open(ballast, "wb") as f:
        f.write(b"\0" * max(_free_bytes(path) - leave_free_bytes, 0))
    return ballast


@pytest.mark.timeout(180)
def test_r5_replica_disk_full_stops_applying_cleanly_and_resumes_after_space_returns(tmp_path):
    primary = NodeProcess(tmp_path / "p")
    _fill_embedded(os.path.join(primary.dir, "defaultdb"), 4000, entries=4, value_bytes=1024)
    replica = NodeProcess(tmp_path / "r")
    with _tmpfs(replica.dir, "10m"), _running(primary), _running(replica):
        with _login(replica) as r:
            r.create_database("replicadb", _replica_settings(primary))
            status = _wait_for(lambda: (_status(r, "replicadb") or {}).get("last_error") and
                               _status(r, "replicadb"), "the disk-full error in the status")
            print(f"R5 replica: status when the disk filled: {status}")
            assert status["state"] in ("retrying", "error"), status
            r.use_database("replicadb")
            stalled_at = r.current_state().tx_id
            assert 0 < stalled_at < 4000, "the tmpfs should fill mid catch-up"
            # the node still serves: reads of what it holds, its status
            assert r.tx_by_id(stalled_at).header.id == stalled_at
            time.sleep(1.0)
            assert r.current_state().tx_id == stalled_at, "applied past a full disk"
        _grow_tmpfs(replica.dir, "256m")
        with _login(primary) as p, _login(replica, "replicadb") as r:
            took = wait_converged(p, {"replica": r}, CONVERGE_SECONDS,
                                  describe=_describer(replica, "replicadb"))
            check_history(History(), p, {"replica": r})
            print(f"R5 replica: stalled at tx {stalled_at}, converged {took:.2f}s after the "
                  f"remount")
        assert replica.stop() == 0
        check_node_storage(replica.dir)


@pytest.mark.timeout(180)
def test_r5_primary_disk_full_refuses_writes_cleanly_and_recovers_when_space_returns(tmp_path):
    history = History()
    primary = NodeProcess(tmp_path / "p")
    with _tmpfs(primary.dir, "16m"), _running(primary), running_node(tmp_path / "r") as replica:
        with _login(replica) as r:
            r.create_database("replicadb", _replica_settings(primary))
        ballast = _ballast(primary.dir, leave_free_bytes=1 << 20)
        with WriterPool(history, _connector(primary), threads=3, value_bytes=16 << 10,
                        timeout_seconds=CLIENT_TIMEOUT_SECONDS):
            _wait_for(lambda: history.counts()["fail"] >= 10, "writes refused on a full disk",
                      seconds=60)
            os.remove(ballast)                              # space returns
            refused_until = len(history.snapshot())
            _wait_for(lambda: any(op.status == "ok" for op in history.snapshot()[refused_until:]),
                      "writes accepted again after the ballast was deleted", seconds=60)
        errors = sorted({op.error for op in history.snapshot() if op.status == "fail"})
        print(f"R5 primary: {history.counts()}, errors: {errors[:3]}")
        with _login(primary) as p, _login(replica, "replicadb") as r:
            wait_converged(p, {"replica": r}, CONVERGE_SECONDS,
                           describe=_describer(replica, "replicadb"))
            check_history(history, p, {"replica": r})           # refused writes are absent
        assert primary.stop() == 0
        check_node_storage(primary.dir)


@pytest.mark.timeout(60)
def test_r5_a_write_refused_on_a_full_disk_says_the_disk_is_full(tmp_path):
    primary = NodeProcess(tmp_path / "p")
    with _tmpfs(primary.dir, "4m"), _running(primary):
        _ballast(primary.dir, leave_free_bytes=64 << 10)
        with _login(primary) as p:
            with pytest.raises(Exception) as refused:
                p.set({b"big": os.urandom(512 << 10)})
        print(f"R5: a write on a full disk is refused with {refused.value!r}")
        assert re.search(r"no space|disk full|storage full", str(refused.value), re.I), \
            str(refused.value)


# --- R8: a chain and a direct replica, the middle of the chain killed -------------------------

@pytest.mark.timeout(180)
@pytest.mark.parametrize("seed", _seeds(801))
def test_r8_killing_the_middle_of_a_chain_under_concurrent_writers_converges(tmp_path, seed):
    _middle_of_a_chain_killed(tmp_path, seed, kills=2)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("seed", _seeds(802, 803, 804))
def test_r8_middle_of_a_chain_killed_ten_times(tmp_path, seed):
    _middle_of_a_chain_killed(tmp_path, seed, kills=10)


def _middle_of_a_chain_killed(tmp_path, seed: int, kills: int):
    rng = _rng(seed, "R8")
    history = History()
    with running_node(tmp_path / "p") as primary, running_node(tmp_path / "a") as middle, \
            running_node(tmp_path / "b") as leaf, running_node(tmp_path / "c") as direct:
        with _clients((middle, "defaultdb"), (leaf, "defaultdb"), (direct, "defaultdb")) as \
                (a, b, c):
            a.create_database("replicadb", _replica_settings(primary))
            b.create_database("replicadb2", _replica_settings(middle, "replicadb"))
            c.create_database("replicadb", _replica_settings(primary))
        # four writers, multi-key txs among them
        with WriterPool(history, _connector(primary), threads=4, keys_per_tx=3,
                        timeout_seconds=CLIENT_TIMEOUT_SECONDS):
            for _ in range(kills):
                time.sleep(rng.uniform(0.3, 1.0))
                middle.kill()
                time.sleep(rng.uniform(0.0, 0.5))       # the leaf's primary is down a while
                middle.start()
            time.sleep(rng.uniform(0.2, 0.5))
        with _clients((primary, "defaultdb"), (middle, "replicadb"), (leaf, "replicadb2"),
                      (direct, "replicadb")) as (p, a, b, c):
            replicas = {"A (middle)": a, "B (leaf)": b, "C (direct)": c}
            took = wait_converged(p, replicas, CONVERGE_SECONDS,
                                  describe=_describer(leaf, "replicadb2"))
            summary = check_history(history, p, replicas)
            print(f"R8: converged in {took:.2f}s, {summary}")
    for node in (primary, middle, leaf, direct):
        check_node_storage(node.dir)


# --- R10: promotion while the old primary still writes, then the old primary re-pointed ------

def _write_some(client, txs: int, prefix: str):
    for n in range(txs):
        client.set({f"{prefix}{n}".encode(): b"v"})


@pytest.mark.timeout(120)
@pytest.mark.parametrize("old_primary_txs, new_primary_txs", [(5, 3), (3, 5), (0, 4)],
                         ids=["old-primary-ahead", "new-primary-ahead", "old-primary-idle"])
def test_r10_a_promoted_replica_and_its_old_primary_are_never_silently_merged(
        tmp_path, old_primary_txs, new_primary_txs):
    with running_node(tmp_path / "old") as old, running_node(tmp_path / "new") as new:
        with _login(old) as o, _login(new) as n:
            o.create_database("appdb")
            n.create_database("appdb", _replica_settings(old, "appdb"))
            o.use_database("appdb")
            _write_some(o, 10, "before")
            n.use_database("appdb")
            wait_converged(o, {"new": n}, WAIT_SECONDS)
            # promotion, as the operator would run it
            promoted = _immuadmin(new, tmp_path / "home", "login", "immudb", stdin="immudb\n")
            assert promoted.returncode == 0, promoted.stderr
            promoted = _immuadmin(new, tmp_path / "home", "database", "update", "appdb",
                                  "--replication-enabled=false")
            assert promoted.returncode == 0, promoted.stderr
            _write_some(o, old_primary_txs, "old")      # the old primary still takes writes
            _write_some(n, new_primary_txs, "new")
            old_state = o.current_state()
            # the old primary re-pointed as a replica of the promoted one
            o.use_database("defaultdb")
            o.update_database("appdb", _replica_settings(new, "appdb"))
            o.use_database("appdb")
            if old_primary_txs == 0:
                # its log is a prefix of the new primary's: following is correct
                wait_converged(n, {"old": o}, CONVERGE_SECONDS,
                               describe=_describer(old, "appdb"))
                check_history(History(), n, {"old": o})
                return
            status = _wait_for(lambda: (_status(o, "appdb") or {}).get("state") == "diverged"
                               and _status(o, "appdb"), "the divergence to be reported",
                               seconds=CONVERGE_SECONDS)
            assert "diverged" in status["last_error"], status
            time.sleep(1.0)                             # terminal: nothing merged meanwhile
            assert o.current_state() == old_state
            assert _status(o, "appdb")["state"] == "diverged"
        listed = _immuadmin(old, tmp_path / "home-old", "login", "immudb", stdin="immudb\n")
        assert listed.returncode == 0, listed.stderr
        listed = _immuadmin(old, tmp_path / "home-old", "database", "list")
        assert listed.returncode == 0 and "diverged" in listed.stdout, listed.stdout
    check_node_storage(old.dir)
    check_node_storage(new.dir)


# --- R9: a node under a skewed clock (libfaketime) --------------------------------------------

DAY_SECONDS = 24 * 3600


def _faketime_env(tmp_path, spec: str) -> dict:
    """libfaketime settings: a fixed offset, or ``jump`` — real time until the test writes
    +1d into the timestamp file mid-run (a wall-clock step, as NTP makes; monotonic real)."""
    env = {"LD_PRELOAD": FAKETIME_LIBRARY}
    if spec == "jump":
        clock_file = tmp_path / "faketime"
        clock_file.write_text("+0\n")
        env.update(FAKETIME_TIMESTAMP_FILE=str(clock_file), FAKETIME_NO_CACHE="1",
                   FAKETIME_DONT_FAKE_MONOTONIC="1")
    else:
        env["FAKETIME"] = spec
    return env


def _clock_offset_seconds(node) -> float:
    """The node's clock minus ours, read from the ts of a tx it writes in a scratch database."""
    with _login(node) as client:
        client.create_database("clockdb", if_not_exists=True)
        client.use_database("clockdb")
        return client.set({b"now": b"?"}).ts - time.time()


@pytest.mark.skipif(not os.path.exists(FAKETIME_LIBRARY),
                    reason="libfaketime not installed (Debian package 'faketime')")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("skewed, spec, expected_offset_seconds", [
    ("replica", "+1d", DAY_SECONDS), ("replica", "-365d", -365 * DAY_SECONDS),
    ("primary", "-365d", -365 * DAY_SECONDS), ("replica", "jump", DAY_SECONDS)])
def test_r9_a_skewed_clock_does_not_change_what_is_replicated(tmp_path, skewed, spec,
                                                              expected_offset_seconds):
    history = History()
    env = _faketime_env(tmp_path, spec)
    primary = EnvNode(tmp_path / "p", env=env if skewed == "primary" else {})
    replica = EnvNode(tmp_path / "r", env=env if skewed == "replica" else {})
    with _running(primary), _running(replica):
        with _login(replica) as r:
            r.create_database("replicadb", _replica_settings(primary))
        with WriterPool(history, _connector(primary), threads=2,
                        timeout_seconds=CLIENT_TIMEOUT_SECONDS):
            time.sleep(0.5)
            if spec == "jump":
                (tmp_path / "faketime").write_text("+1d\n")     # the clock steps a day ahead
            time.sleep(0.5)
        skewed_node = primary if skewed == "primary" else replica
        offset = _clock_offset_seconds(skewed_node)
        assert abs(offset - expected_offset_seconds) < 120, \
            f"the {skewed}'s clock is off by {offset:.0f}s, not the faked offset"
        with _login(primary) as p, _login(replica, "replicadb") as r:
            wait_converged(p, {"replica": r}, CONVERGE_SECONDS,
                           describe=_describer(replica, "replicadb"))
            summary = check_history(history, p, {"replica": r})    # same Alh at every tx
            last = summary["primary_tx_id"]
            assert r.tx_by_id(last).header.ts == p.tx_by_id(last).header.ts   # primary's ts
            print(f"R9 {skewed} {spec}: clock offset {offset:.0f}s, {summary}")
    check_node_storage(replica.dir)


# --- one process per data folder ---------------------------------------------------------------

def _node_command(data_dir: str, port: int) -> list:
    return [sys.executable, "-m", "immucore", "--dir", data_dir, "--address", "127.0.0.1",
            "--port", str(port), "--metrics-server=false"]


def _wait_for_text(path, text: str, seconds: float, process: subprocess.Popen) -> str:
    deadline = time.monotonic() + seconds
    while True:
        written = path.read_text(errors="replace") if path.exists() else ""
        if text in written:
            return written
        assert process.poll() is None, f"exited with {process.returncode}:\n{written}"
        assert time.monotonic() < deadline, f"no {text!r} within {seconds}s:\n{written}"
        time.sleep(0.05)


def test_a_second_node_on_a_data_folder_is_refused_naming_the_folder_and_the_holder(tmp_path):
    with running_node(tmp_path / "a") as node, _login(node) as client:
        for n in range(5):
            client.set({f"k{n}".encode(): b"v"})
        folder = os.path.abspath(node.dir)
        other_port = free_port()
        second = subprocess.Popen(_node_command(node.dir, other_port), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT)
        try:
            output, _ = second.communicate(timeout=FOLDER_LOCK_WAIT_SECONDS + WAIT_SECONDS)
        finally:
            if second.poll() is None:           # it started beside the first: a failure
                second.kill()
                second.wait()
        output = output.decode(errors="replace")
        assert second.returncode != 0, output
        assert (f"data folder {folder} is in use by another process (pid {node.process.pid})"
                in output), output
        assert "listening on" not in output and not port_accepts("127.0.0.1", other_port)
        # the first node never noticed: its state is whole and it still writes
        assert client.current_state().tx_id == 5
        assert client.set({b"after": b"v"}).id == 6
        # a script opening one of its databases is refused as well, naming the node
        with pytest.raises(FolderInUseError, match=re.escape(
                f"database folder {folder}/defaultdb is in use by another process "
                f"(pid {node.process.pid})")):
            open_database(os.path.join(node.dir, "defaultdb"))
        assert client.set({b"still": b"v"}).id == 7
    assert check_node_storage(node.dir)["defaultdb"] == 7


def test_a_start_overlapping_the_old_nodes_stop_waits_for_it_then_serves(tmp_path):
    """A restart whose new process starts before the old one has let go (a supervisor that
    does not wait): it waits for the folder, then serves everything the old one wrote."""
    with running_node(tmp_path / "a") as node:
        with _login(node) as client:
            for n in range(5):
                client.set({f"k{n}".encode(): b"v"})
        log_path = tmp_path / "next.log"
        with open(log_path, "wb") as log:
            successor = subprocess.Popen(_node_command(node.dir, node.port), stdout=log,
                                         stderr=subprocess.STDOUT)
        try:
            _wait_for_text(log_path, f"data folder {os.path.abspath(node.dir)} is in use by "
                           f"another process (pid {node.process.pid}): waiting up to",
                           WAIT_SECONDS, successor)
            with _login(node) as client:         # the old node is untouched meanwhile
                assert client.set({b"during": b"v"}).id == 6
            assert node.stop() == 0
            written = _wait_for_text(log_path, "listening on", WAIT_SECONDS, successor)
            assert "cannot" not in written, written
            with _login(node) as client:          # the same port, now the successor's
                assert client.current_state().tx_id == 6
                assert client.get(b"during").value == b"v"
                assert client.set({b"after": b"v"}).id == 7
        finally:
            successor.terminate()
            successor.wait(WAIT_SECONDS)
    assert check_node_storage(node.dir)["defaultdb"] == 7
