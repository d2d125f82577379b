"""Replication between real nodes on loopback: a replica database follows its primary.

Each test starts real ``immucore`` processes (tests/nodes.py) and drives them with the client.
"""
import asyncio
import os
import random
import subprocess
import sys
import time

import pytest

from immucore.client import AsyncClient, Client
from immucore.database import open_database
from immucore.errors import (CorruptedDataError, IllegalArgumentsError, ReadOnlyReplicaError,
                             ReplicationLoopError)

from .nodes import running_node

WAIT_SECONDS = 20


def _login(node, database="defaultdb"):
    client = Client(node.host, node.port)
    client.login("immudb", "immudb", database)
    return client


def _replica_settings(primary, database="defaultdb", **extra):
    return {"replica": True, "primary_database": database, "primary_host": primary.host,
            "primary_port": primary.port, "primary_username": "immudb",
            "primary_password": "immudb", **extra}


def _wait_for(predicate, what: str, seconds: float = WAIT_SECONDS):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _immuadmin(node, home, *args, stdin=""):
    """Run ``immuadmin`` against ``node`` with its token file kept under ``home``."""
    env = dict(os.environ, IMMUCORE_CLI_HOME=str(home))
    os.makedirs(home, exist_ok=True)
    return subprocess.run([sys.executable, "-m", "immucore.cli.immuadmin", "-a", node.host,
                           "-p", str(node.port), *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=60)


async def _fill(node, txs: int):
    """``txs`` single-entry transactions, pipelined on one connection."""
    client = AsyncClient(node.host, node.port)
    await client.login("immudb", "immudb")
    for start in range(0, txs, 100):
        await asyncio.gather(*(client.set({f"k{n}".encode(): b"v"})
                               for n in range(start, min(start + 100, txs))))
    await client.close()


def _status(client, name):
    return next(d for d in client.list_databases() if d["name"] == name)["replication"]


def test_replica_follows_its_primary_and_refuses_writes(tmp_path):
    with running_node(tmp_path / "p") as primary, running_node(tmp_path / "r") as replica:
        with _login(primary) as p, _login(replica) as r:
            for n in range(100):
                p.set({f"k{n}".encode(): b"v" * 10})
            r.create_database("replicadb", _replica_settings(primary))
            r.use_database("replicadb")
            _wait_for(lambda: r.current_state().tx_id == 100, "catch-up")
            assert r.current_state().tx_hash == p.current_state().tx_hash
            # a caught-up replica is woken by the next commit (long poll), not a polling delay
            start = time.monotonic()
            header = p.set({b"live": b"1"})
            _wait_for(lambda: r.current_state().tx_id >= header.id, "live tx")
            assert time.monotonic() - start < 1.0
            assert r.get(b"live").value == b"1"
            assert r.verified_get(b"k7").value == b"v" * 10
            with pytest.raises(ReadOnlyReplicaError,
                               match="database is read-only because it's a replica"):
                r.set({b"x": b"y"})
            status = _status(r, "replicadb")
            assert status["state"] == "following" and status["lag_txs"] == 0
            assert status["lag_seconds"] == 0


def test_the_largest_tx_allowed_replicates_and_a_bigger_one_is_refused_when_written(tmp_path):
    """R12's giant tx: with no chunked transfer, every tx must fit one export answer, so the
    node refuses a SET whose values pass TX_VALUES_BYTES_MAX with a clear error (the connection
    stays usable) and a replica receives a tx at the limit in one frame."""
    from immucore.constants import TX_VALUES_BYTES_MAX
    half = bytes(TX_VALUES_BYTES_MAX // 2)
    with running_node(tmp_path / "p") as primary, running_node(tmp_path / "r") as replica:
        with _login(primary) as p, _login(replica) as r:
            with pytest.raises(IllegalArgumentsError, match="over the limit of"):
                p.set({b"a": half, b"b": half + b"\x00"})
            header = p.set({b"a": half, b"b": half})
            r.create_database("replicadb", _replica_settings(primary))
            r.use_database("replicadb")
            _wait_for(lambda: r.current_state().tx_id == header.id, "the largest tx")
            assert r.current_state().tx_hash == p.current_state().tx_hash
            assert r.get(b"b").value == half
            assert _status(r, "replicadb")["last_error"] in (None, "")


def test_replication_resumes_after_either_side_restarts(tmp_path):
    with running_node(tmp_path / "p") as primary, running_node(tmp_path / "r") as replica:
        with _login(primary) as p, _login(replica) as r:
            p.set({b"a": b"1"})
            r.create_database("replicadb", _replica_settings(primary))
        replica.restart()                                  # settings persist in systemdb
        with _login(primary) as p, _login(replica, "replicadb") as r:
            p.set({b"b": b"2"})
            _wait_for(lambda: r.current_state().tx_id == 2, "after replica restart")
        primary.restart()                                  # the replica reconnects
        with _login(primary) as p, _login(replica, "replicadb") as r:
            header = p.set({b"c": b"3"})
            _wait_for(lambda: r.current_state().tx_id == header.id, "after primary restart",
                      seconds=40)
            assert r.current_state().tx_hash == p.current_state().tx_hash


def test_wrong_credentials_are_reported_and_fixing_them_recovers(tmp_path):
    with running_node(tmp_path / "p") as primary, running_node(tmp_path / "r") as replica:
        with _login(primary) as p, _login(replica) as r:
            p.set({b"a": b"1"})
            r.create_database("replicadb", _replica_settings(primary,
                                                             primary_password="wrong"))
            status = _wait_for(lambda: (_status(r, "replicadb") or {}).get("last_error") and
                               _status(r, "replicadb"), "the error to show")
            assert "invalid user name or password" in status["last_error"]
            assert status["state"] == "retrying"
            r.update_database("replicadb", {"primary_password": "immudb"})
            r.use_database("replicadb")
            _wait_for(lambda: r.current_state().tx_id == 1, "recovery")


def test_replica_of_a_replica_gets_everything(tmp_path):
    with running_node(tmp_path / "p") as primary, running_node(tmp_path / "m") as middle, \
            running_node(tmp_path / "l") as last:
        with _login(primary) as p, _login(middle) as m, _login(last) as leaf:
            m.create_database("replicadb", _replica_settings(primary))
            leaf.create_database("replicadb2", _replica_settings(middle, "replicadb"))
            for n in range(30):
                p.set({f"k{n}".encode(): b"v"})
            leaf.use_database("replicadb2")
            _wait_for(lambda: leaf.current_state().tx_id == 30, "the chain")
            assert leaf.current_state().tx_hash == p.current_state().tx_hash


def test_divergence_is_detected_and_stops_replication(tmp_path):
    with running_node(tmp_path / "a") as first, running_node(tmp_path / "b") as second, \
            running_node(tmp_path / "r") as replica:
        with _login(first) as a, _login(second) as b, _login(replica) as r:
            a.set({b"history": b"A"})
            for n in range(3):
                b.set({f"other{n}".encode(): b"B"})
            r.create_database("replicadb", _replica_settings(first))
            r.use_database("replicadb")
            _wait_for(lambda: r.current_state().tx_id == 1, "first primary")
            # re-pointed at a primary whose tx 1 is another tx: never merged, stopped
            r.update_database("replicadb", {"primary_host": second.host,
                                            "primary_port": second.port})
            status = _wait_for(lambda: (_status(r, "replicadb") or {}).get("state") == "diverged"
                               and _status(r, "replicadb"), "divergence")
            assert "diverged" in status["last_error"]
            assert status["lag_txs"] is None and status["lag_seconds"] is None   # no prefix
            time.sleep(0.5)
            assert r.current_state().tx_id == 1


def test_an_external_process_can_push_transactions_into_a_replica(tmp_path):
    with running_node(tmp_path / "p") as primary, running_node(tmp_path / "r") as replica:
        with _login(primary) as p, _login(replica) as r:
            for n in range(20):
                p.set({f"k{n}".encode(): b"v"})
            # replica with no primary address: no replicator, fed from outside (ReplicateTx)
            r.create_database("pushed", {"replica": True})
            r.use_database("pushed")
            assert _status(r, "pushed") is None
            r.replicate_txs(p.export_txs(1, 10))
            r.replicate_txs(p.export_txs(5, 100))          # overlapping: already held = no-op
            assert r.current_state().tx_hash == p.current_state().tx_hash
            # with the Alh EXPORT_TXS announces for its last tx, a wrong last tx is refused
            p.set({b"later": b"1"})
            answer = p.export_batch(21, 10)
            with pytest.raises(CorruptedDataError):
                r.replicate_txs(answer["blobs"], last_alh=bytes(32))
            with pytest.raises(IllegalArgumentsError, match="last_alh"):
                r.replicate_txs(answer["blobs"], last_alh=b"short")
            r.replicate_txs(answer["blobs"], last_alh=answer["last_alh"])
            assert r.current_state().tx_hash == p.current_state().tx_hash


def test_server_level_replication_with_the_guide_flags(tmp_path):
    """`immucore --replication-enabled=true --replication-follower-username=immudb
    --replication-follower-password=immudb --replication-master-address=127.0.0.1`: systemdb and
    defaultdb follow the primary's (users included); the replica node manages no databases."""
    with running_node(tmp_path / "p") as primary:
        with _login(primary) as p:
            p.set({b"from-primary": b"1"})
            p.create_user("reader", "Reader1!pw", "read", "defaultdb")
        flags = ("--replication-enabled=true", "--replication-follower-username=immudb",
                 "--replication-follower-password=immudb",
                 f"--replication-master-address={primary.host}",
                 f"--replication-master-port={primary.port}")
        with running_node(tmp_path / "r", *flags) as replica:
            def logged_in():
                with Client(replica.host, replica.port) as client:
                    try:
                        return bool(client.login("reader", "Reader1!pw"))
                    except Exception:  # noqa: BLE001 - systemdb not replicated yet
                        return False
            _wait_for(logged_in, "users replicated from the primary's systemdb")
            with _login(replica) as r:
                _wait_for(lambda: r.current_state().tx_id == 1, "defaultdb replicated")
                assert r.get(b"from-primary").value == b"1"
                with pytest.raises(ReadOnlyReplicaError):
                    r.set({b"x": b"y"})
                with pytest.raises(Exception, match="server-level replica"):
                    r.create_database("newdb")


def test_promoting_a_replica_makes_it_writable(tmp_path):
    with running_node(tmp_path / "p") as primary, running_node(tmp_path / "r") as replica:
        with _login(primary) as p, _login(replica) as r:
            p.set({b"a": b"1"})
            r.create_database("replicadb", _replica_settings(primary))
            r.use_database("replicadb")
            _wait_for(lambda: r.current_state().tx_id == 1, "catch-up")
            r.update_database("replicadb", {"replica": False})      # promotion
            assert _status(r, "replicadb") is None                   # no replicator any more
            header = r.set({b"b": b"2"})
            assert header.id == 2 and header.prev_alh == p.current_state().tx_hash


def test_immuadmin_replication_push_copies_what_an_external_replica_lacks(tmp_path):
    with running_node(tmp_path / "p") as primary, running_node(tmp_path / "r") as replica:
        asyncio.run(_fill(primary, 1100))          # more than one batch of 1000
        with _login(replica) as r:
            r.create_database("external", {"replica": True})
        def admin(*args, stdin=""):
            return _immuadmin(replica, tmp_path / "home", *args, stdin=stdin)

        assert admin("login", "immudb", "--database", "external", stdin="immudb\n").returncode == 0
        done = admin("replication", "push", "--from-address", primary.host,
                     "--from-port", str(primary.port), "--from-password", "immudb")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "1100 transactions replicated"
        assert "txs" in done.stderr                     # the progress line
        again = admin("replication", "push", "--from-address", primary.host,
                      "--from-port", str(primary.port), "--from-password", "immudb")
        assert again.stdout.strip() == "0 transactions replicated"
        with _login(primary) as p, _login(replica, "external") as r:
            assert r.current_state().tx_hash == p.current_state().tx_hash


def test_replicator_tool_creates_a_follower_for_every_database_of_the_main_node(tmp_path):
    with running_node(tmp_path / "main") as main_node, running_node(tmp_path / "rep") as rep:
        with _login(main_node) as m:
            m.create_database("orders")
            m.use_database("orders")
            m.set({b"order-1": b"paid"})
            m.use_database("defaultdb")
            m.set({b"d": b"1"})
        command = [sys.executable, "-m", "immucore.cli.replicator",
                   "-master-addr", main_node.host, "-master-port", str(main_node.port),
                   "-replica-addr", rep.host, "-replica-port", str(rep.port),
                   "-follower-pass", "Follower1!pw", "-once"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        with _login(rep) as r:
            names = {d["name"] for d in r.list_databases()}
            assert {"orders", "defaultdbbak"} <= names
            r.use_database("orders")
            _wait_for(lambda: r.current_state().tx_id == 1, "orders replicated")
            assert r.get(b"order-1").value == b"paid"
            r.use_database("defaultdbbak")
            _wait_for(lambda: r.current_state().tx_id == 1, "defaultdb into defaultdbbak")
        again = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "0 database(s) created" in again.stderr


def _replicator(main_node, rep, *args, env=None):
    command = [sys.executable, "-m", "immucore.cli.replicator",
               "-master-addr", main_node.host, "-master-port", str(main_node.port),
               "-replica-addr", rep.host, "-replica-port", str(rep.port), "-once", *args]
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("FOLLOWER_PASSWORD", "MASTER_PASSWORD", "REPLICA_PASSWORD")}
    return subprocess.run(command, capture_output=True, text=True, timeout=60,
                          env=environment | (env or {}))


def test_replicator_tool_has_no_follower_password_default_and_refuses_the_published_one(tmp_path):
    """immudb-tools' default follower password is public: with it (or with none) anyone could
    log in to the main node as the follower, admin on every database. Nothing is created."""
    with running_node(tmp_path / "main") as main_node, running_node(tmp_path / "rep") as rep:
        missing = _replicator(main_node, rep)
        assert missing.returncode == 2 and "-follower-pass (or FOLLOWER_PASSWORD) is required" \
            in missing.stderr
        published = _replicator(main_node, rep, env={"FOLLOWER_PASSWORD": "zyQQurat.0"})
        assert published.returncode == 2 and "published default" in published.stderr
        assert "-allow-well-known-follower-pass" in published.stderr
        with _login(main_node) as m, _login(rep) as r:
            assert [u["user"] for u in m.list_users()] == ["immudb"]
            assert "defaultdbbak" not in {d["name"] for d in r.list_databases()}
        accepted = _replicator(main_node, rep, "-follower-pass", "zyQQurat.0",
                               "-allow-well-known-follower-pass")
        assert accepted.returncode == 0, accepted.stderr
        with _login(rep) as r:
            assert "defaultdbbak" in {d["name"] for d in r.list_databases()}


def test_replicator_tool_checks_the_follower_login_before_creating_a_replica(tmp_path):
    """A follower that already exists with another password: the tool says the main node
    refused it, and creates no replica that would retry for ever."""
    with running_node(tmp_path / "main") as main_node, running_node(tmp_path / "rep") as rep:
        with _login(main_node) as m:
            m.create_user("follower", "Other1!pass", "read", "defaultdb")
        done = _replicator(main_node, rep, "-follower-pass", "Follower1!pw")
        assert done.returncode == 1
        assert (f"main node {main_node.address} refused the login of follower on database "
                "defaultdb: invalid user name or password") in done.stderr
        assert "database(s) created" not in done.stderr
        with _login(rep) as r:
            assert "defaultdbbak" not in {d["name"] for d in r.list_databases()}
        with _login(main_node) as m:             # nothing granted to an account not ours
            follower = {u["user"]: u for u in m.list_users()}["follower"]
            assert follower["permissions"] == {"defaultdb": "read"}
        wrong_replica = _replicator(main_node, rep, "-follower-pass", "Other1!pass",
                                    "-replica-pass", "wrong")
        assert wrong_replica.returncode == 1
        assert f"replica node {rep.address} refused the login of immudb" in wrong_replica.stderr
        fixed = _replicator(main_node, rep, "-follower-pass", "Other1!pass")
        assert fixed.returncode == 0 and "1 database(s) created" in fixed.stderr
        with _login(main_node) as m, _login(rep, "defaultdbbak") as r:
            header = m.set({b"k": b"v"})
            _wait_for(lambda: r.current_state().tx_id == header.id, "the follower to copy")


def test_replicator_tool_help_shows_the_whole_description_and_every_default(tmp_path):
    env = {k: v for k, v in os.environ.items()} | {"MASTER_PASSWORD": "Secret1!master"}
    shown = subprocess.run([sys.executable, "-m", "immucore.cli.replicator", "--help"],
                           capture_output=True, text=True, timeout=60, env=env)
    assert shown.returncode == 0
    text = " ".join(shown.stdout.split())
    assert "keep a replica of every database of a main node on a replica node, after " \
           "immudb-tools' replicator" in text
    for default in ("main node port (default: 3322)", "(default: follower)",
                    "(default: $MASTER_PASSWORD, else immudb)", "(default: 3600)",
                    "(default: auto)", "(default: 100)", "(default: 10)",
                    "$FOLLOWER_PASSWORD; required when it is not set"):
        assert default in text
    assert "Secret1!master" not in shown.stdout


def test_the_guide_command_creates_a_replica_that_follows_defaultdb_on_the_same_node(tmp_path):
    with running_node(tmp_path / "n") as node:
        def admin(*args, stdin=""):
            return _immuadmin(node, tmp_path / "home", *args, stdin=stdin)

        assert admin("login", "immudb", stdin="immudb\n").stdout == "logged in\n"
        created = admin("database", "create", "--replication-enabled=true",
                        "--replication-follower-username=immudb",
                        "--replication-follower-password=immudb",
                        "--replication-master-database=defaultdb", "replicadb")
        assert created.stdout == "database 'replicadb' {replica: true} successfully created\n"
        with _login(node) as client:
            client.set({b"hello": b"world"})
            client.use_database("replicadb")
            _wait_for(lambda: client.current_state().tx_id == 1, "the replica to follow")
            assert client.get(b"hello").value == b"world"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_replica_killed_mid_catch_up_resumes_without_gaps_or_duplicates(tmp_path, seed):
    with running_node(tmp_path / "p") as primary, running_node(tmp_path / "r") as replica:
        asyncio.run(_fill(primary, 3000))
        with _login(replica) as r:
            r.create_database("replicadb", _replica_settings(primary))
            r.use_database("replicadb")
            cut = random.Random(seed).randrange(200, 2800)
            _wait_for(lambda: r.current_state().tx_id >= cut, "part of the catch-up")
        replica.kill()                                   # kill -9 in the middle of applying
        replica.start()
        with _login(primary) as p, _login(replica, "replicadb") as r:
            _wait_for(lambda: r.current_state().tx_id == 3000, "the rest after the crash")
            assert r.current_state().tx_hash == p.current_state().tx_hash
        replica.stop()
        with open_database(os.path.join(replica.dir, "replicadb"), replica=True) as db:
            assert db.audit() == 3000                    # every tx re-verified from the log


def test_a_replica_that_would_follow_itself_on_its_own_node_is_refused(tmp_path):
    with running_node(tmp_path / "n") as node, _login(node) as client:
        for host in (node.host, "localhost"):
            with pytest.raises(ReplicationLoopError, match="'selfish' would follow itself"):
                client.create_database("selfish", _replica_settings(node, "selfish",
                                                                    primary_host=host))
        client.create_database("a")
        client.create_database("b", _replica_settings(node, "a"))
        client.create_database("c", _replica_settings(node, "b"))
        with pytest.raises(ReplicationLoopError, match=r"a -> c -> b -> a"):
            client.update_database("a", _replica_settings(node, "c"))
        names = {d["name"]: d for d in client.list_databases()}
        assert "selfish" not in names and names["a"]["replica"] is False


def test_a_replication_loop_across_nodes_stops_both_replicas_with_state_loop(tmp_path):
    """A on one node follows B on another, which follows A: each sees itself in its primary's
    chain (EXPORT_TXS says who the primary follows) and stops, instead of following for ever."""
    with running_node(tmp_path / "one") as one, running_node(tmp_path / "two") as two:
        with _login(one) as first, _login(two) as second:
            first.create_database("a")
            second.create_database("b", _replica_settings(one, "a"))
            _wait_for(lambda: (_status(second, "b") or {}).get("state") == "following",
                      "b to follow a")
            first.update_database("a", _replica_settings(two, "b"))
            for client, name in ((first, "a"), (second, "b")):
                status = _wait_for(lambda: (_status(client, name) or {}).get("state") == "loop"
                                   and _status(client, name), f"{name} to stop in a loop",
                                   seconds=40)
                assert "replication loop" in status["last_error"]


def test_replica_settings_are_checked_when_they_are_made(tmp_path):
    with running_node(tmp_path / "p") as primary, running_node(tmp_path / "r") as replica:
        with _login(primary) as p, _login(replica) as r:
            with pytest.raises(IllegalArgumentsError, match="PrimaryDatabase"):
                r.create_database("sneaky", _replica_settings(primary, "../systemdb"))
            with pytest.raises(IllegalArgumentsError, match="no primary_username and no "
                                                            "primary_password"):
                r.create_database("anonymous", _replica_settings(
                    primary, primary_username="", primary_password=""))
            assert not {"sneaky", "anonymous"} & {d["name"] for d in r.list_databases()}
            # a follower that may only read: accepted (the primary is elsewhere), and the
            # error says what it lacks
            p.create_user("reader", "Reader1!pw", "read", "defaultdb")
            r.create_database("readonly", _replica_settings(
                primary, primary_username="reader", primary_password="Reader1!pw"))
            status = _wait_for(lambda: (_status(r, "readonly") or {}).get("last_error") and
                               _status(r, "readonly"), "the permission error")
            assert ("user reader needs admin on database defaultdb of the primary "
                    f"{primary.host}:{primary.port}") in status["last_error"]


def test_a_replica_that_follows_a_primary_takes_no_pushes(tmp_path):
    """REPLICATE_TX (and `immuadmin replication push --database`) into a replica with its own
    replicator is refused: foreign txs would be served as its primary's, lag 0."""
    with running_node(tmp_path / "n") as node:
        with _login(node) as client:
            client.create_database("main")                          # the primary: empty
            client.create_database("other")
            client.create_database("replicadb", _replica_settings(node, "main"))
            client.use_database("other")
            for n in range(3):
                client.set({b"foreign%d" % n: b"x"})
            blobs = client.export_txs(1, 10)
            client.use_database("replicadb")
            with pytest.raises(Exception, match="follows its primary") as refused:
                client.replicate_txs(blobs)
            assert getattr(refused.value, "code", None) == "following_replica"
            assert client.current_state().tx_id == 0
        home = tmp_path / "home"
        assert _immuadmin(node, home, "login", "immudb", stdin="immudb\n").returncode == 0
        pushed = _immuadmin(node, home, "replication", "push", "--from-address", node.host,
                            "--from-port", str(node.port), "--from-password", "immudb",
                            "--from-database", "other", "--database", "replicadb")
        assert pushed.returncode != 0 and "follows its primary" in pushed.stderr, pushed
        with _login(node, "replicadb") as replica:
            assert replica.current_state().tx_id == 0


def _scrape(port: int) -> str:
    import urllib.request
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def test_the_lag_is_unknown_until_the_primary_is_reached_and_kept_while_it_is_gone(tmp_path):
    """A replica that never reached its primary (a wrong password) has no lag: no sample in
    the metrics, `lag unknown` in `database list` — not 0. Once followed, the lag is 0 and
    the last contact recent; with the primary gone the last known lag stays, and the seconds
    since the last contact grow."""
    from .nodes import free_port
    metrics = free_port()
    with running_node(tmp_path / "p") as primary, \
            running_node(tmp_path / "r", "--metrics-server=true",
                         f"--metrics-server-port={metrics}") as replica:
        with _login(primary) as p, _login(replica) as r:
            for n in range(5):
                p.set({b"k%d" % n: b"v"})
            r.create_database("replicadb", _replica_settings(primary, primary_password="wrong"))
            status = _wait_for(lambda: (s := _status(r, "replicadb"))["retries"] and s,
                               "a failed login")
            assert status["lag_txs"] is None and status["lag_seconds"] is None
            assert status["primary_committed_tx_id"] is None
            assert status["seconds_since_last_contact"] is None
            scraped = _scrape(metrics)
            assert 'immucore_replication_state{db="replicadb",state="retrying"} 1.0' in scraped
            for name in ("immudb_replication_lag", "immucore_replication_lag_seconds",
                         "immudb_replication_primary_committed_tx_id",
                         "immucore_replication_seconds_since_last_contact"):
                assert f'{name}{{db="replicadb"}}' not in scraped, name
            home = tmp_path / "home"
            assert _immuadmin(replica, home, "login", "immudb", stdin="immudb\n").returncode == 0
            listed = _immuadmin(replica, home, "database", "list")
            assert "lag unknown" in listed.stdout and "lag 0" not in listed.stdout, listed
            r.update_database("replicadb", {"primary_password": "immudb"})
            _wait_for(lambda: (_status(r, "replicadb") or {}).get("lag_txs") == 0, "caught up")
            status = _status(r, "replicadb")
            assert status["state"] == "following" and status["primary_committed_tx_id"] == 5
            assert status["seconds_since_last_contact"] < 15
            scraped = _scrape(metrics)
            assert 'immudb_replication_lag{db="replicadb"} 0.0' in scraped
            assert 'immudb_replication_primary_committed_tx_id{db="replicadb"} 5.0' in scraped
            assert 'immucore_replication_seconds_since_last_contact{db="replicadb"}' in scraped
        primary.stop()
        with _login(replica) as r:
            status = _wait_for(lambda: (s := _status(r, "replicadb"))["state"] == "retrying"
                               and s, "the primary gone")
            time.sleep(1.5)
            status = _status(r, "replicadb")
            assert status["lag_txs"] == 0 and status["primary_committed_tx_id"] == 5
            assert status["seconds_since_last_contact"] >= 1.5
            listed = _immuadmin(replica, tmp_path / "home", "database", "list")
            assert "lag 0 txs 0.0s as of" in listed.stdout, listed.stdout
