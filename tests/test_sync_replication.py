"""Synchronous replication and tx discarding between real nodes on loopback.

A primary database with ``sync_replication`` and ``sync_acks`` N answers a write only once N
replicas durably hold its tx; replicas acknowledge what they applied (REPLICA_ACK). A replica
with ``allow_tx_discarding`` that finds its log ahead of a new primary drops only the txs that
its old primary never acknowledged to clients.
"""
from __future__ import annotations

import re
import threading
import time
import urllib.request

import pytest

from immucore.client import Client
from immucore.errors import IllegalArgumentsError, ReplicaDivergedError
from immucore.protocol.messages import RemoteError

from .nodes import free_port, running_node
from .test_replication import _login, _replica_settings, _status, _wait_for

SYNC_FLAGS = ("--replication-sync-enabled=true", "--replication-sync-acks=1",
              "--replication-sync-timeout=1.5")


def _sync_db(acks: int) -> dict:
    return {"sync_replication": True, "sync_acks": acks}


def _write_in_background(node, database: str, kvs: dict):
    """One write on its own connection and thread (it may wait for acks); its outcome lands in
    the returned dict as ``header`` or ``error``."""
    result = {}

    def write():
        try:
            with _login(node, database) as writer:
                result["header"] = writer.set(kvs)
        except Exception as exc:  # noqa: BLE001 - the caller asserts on it
            result["error"] = exc

    thread = threading.Thread(target=write)
    thread.start()
    return thread, result


def _metrics(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def test_a_sync_write_is_answered_only_once_a_replica_holds_it(tmp_path):
    primary_metrics, replica_metrics = free_port(), free_port()
    with running_node(tmp_path / "p", *SYNC_FLAGS, "--metrics-server=true",
                      f"--metrics-server-port={primary_metrics}") as primary, \
            running_node(tmp_path / "r", "--metrics-server=true",
                         f"--metrics-server-port={replica_metrics}") as replica:
        with _login(primary) as p, _login(replica) as r:
            # no replica yet: the write is durable on the primary but fails, saying why
            started = time.monotonic()
            with pytest.raises(RemoteError, match="only 0 of 1 sync replicas") as failure:
                p.set({b"alone": b"1"})
            assert failure.value.code == "replication_timeout"
            assert 1.4 < time.monotonic() - started < 5
            assert p.current_state().tx_id == 1
            r.create_database("replicadb", _replica_settings(primary))
            r.use_database("replicadb")
            for n in range(20):
                header = p.set({b"k%d" % n: b"v"})
                # acknowledged means the replica already holds it, durably
                assert r.current_state().tx_id >= header.id
            assert r.current_state().tx_hash == p.current_state().tx_hash
            last = p.current_state().tx_id
            assert f'immucore_replication_sync_quorum_tx_id{{db="defaultdb"}} {last}.0' in \
                _metrics(primary_metrics)
            scraped = _metrics(replica_metrics)
            assert 'immucore_replication_state{db="replicadb",state="following"} 1.0' in scraped
            assert 'immudb_replication_lag{db="replicadb"} 0.0' in scraped
            assert 'immudb_replication_replicators{db="replicadb"} 1.0' in scraped
            assert 'immudb_replication_replicators_active{db="replicadb"} 1.0' in scraped
            assert 'immudb_replication_replicators_retry_delay{db="replicadb"} 0.0' in scraped
            applied = re.search(r'immudb_replication_commit_time_count\{db="replicadb"\} (\S+)',
                                scraped)
            assert applied and float(applied.group(1)) >= 1, scraped


def test_sync_acks_change_at_run_time_and_release_waiting_writes(tmp_path):
    with running_node(tmp_path / "p", "--replication-sync-timeout=20") as primary, \
            running_node(tmp_path / "r") as replica:
        with _login(primary) as p, _login(replica) as r:
            p.create_database("syncdb", _sync_db(2))
            r.create_database("replicadb", _replica_settings(primary, "syncdb"))
            p.use_database("syncdb")
            thread, result = _write_in_background(primary, "syncdb", {b"waits": b"for two"})
            time.sleep(1.0)
            assert thread.is_alive(), f"answered with one replica of two: {result}"
            p.update_database("syncdb", {"sync_acks": 1})
            thread.join(10)
            assert not thread.is_alive() and "header" in result, result
            r.use_database("replicadb")
            _wait_for(lambda: r.current_state().tx_id >= result["header"].id, "replica")


def test_shutdown_never_hangs_on_writes_waiting_for_acks(tmp_path):
    with running_node(tmp_path / "p", *SYNC_FLAGS[:2], "--replication-sync-timeout=60") as node:
        errors = []

        def write():
            try:
                with _login(node) as client:
                    client.set({b"never": b"acked"})
            except Exception as exc:  # noqa: BLE001 - asserted below
                errors.append(exc)

        thread = threading.Thread(target=write)
        thread.start()
        time.sleep(0.5)
        started = time.monotonic()
        assert node.stop() == 0
        assert time.monotonic() - started < 10
        thread.join(10)
        assert errors, "the waiting write was answered as if replicated"


def test_demoting_a_sync_primary_fails_its_waiting_writes(tmp_path):
    with running_node(tmp_path / "p", "--replication-sync-timeout=30") as node:
        with _login(node) as admin:
            admin.create_database("syncdb", _sync_db(1))
            thread, result = _write_in_background(node, "syncdb", {b"waits": b"forever"})
            time.sleep(0.5)
            admin.update_database("syncdb", {"replica": True, "sync_replication": False,
                                             "sync_acks": 0})
            thread.join(5)
            assert not thread.is_alive()
            assert getattr(result.get("error"), "code", None) == "not_primary", result


def _point_at(client, name: str, primary, database: str, **extra):
    client.update_database(name, {"primary_host": primary.host, "primary_port": primary.port,
                                  "primary_database": database, **extra})


@pytest.mark.parametrize("allow_discarding", [True, False])
def test_a_replica_ahead_of_its_new_primary_discards_only_unacknowledged_txs(
        tmp_path, allow_discarding):
    """Old primary P (sync, acks 1) with replica A; B, another replica of P, is promoted after
    tx 3 and writes its own tx 4. P goes on with txs 4 and 5 that no quorum acknowledges. A,
    re-pointed to B, holds 4 and 5 of P: with discarding it drops them (never 1..3, which P
    acknowledged) and follows B; without, it stops as diverged."""
    with running_node(tmp_path / "p", "--replication-sync-timeout=1") as p_node, \
            running_node(tmp_path / "r") as r_node:
        with _login(p_node) as p, _login(r_node) as r:
            p.create_database("main", _sync_db(1))
            r.create_database("a", _replica_settings(
                p_node, "main", allow_tx_discarding=allow_discarding))
            r.create_database("b", _replica_settings(p_node, "main"))
            p.use_database("main")
            for n in range(3):
                p.set({b"k%d" % n: b"acked"})
            with _login(r_node, "b") as b:
                _wait_for(lambda: b.current_state().tx_id == 3, "b at 3")
            r.update_database("b", {"replica": False})           # promote b
            with _login(r_node, "b") as b:
                b.set({b"k3": b"b's own"})
                b_state = b.current_state()
            p.update_database("main", {"sync_acks": 3})           # nobody can ack any more
            for n in (3, 4):
                with pytest.raises(RemoteError, match="replication_timeout|sync replicas"):
                    p.set({b"k%d" % n: b"never acked"})
            with _login(r_node, "a") as a:
                _wait_for(lambda: a.current_state().tx_id == 5, "a holds p's unacked txs")
                _point_at(r, "a", r_node, "b")
                if allow_discarding:
                    _wait_for(lambda: a.current_state().tx_hash == b_state.tx_hash,
                              "a follows b after discarding")
                    assert a.get(b"k3").value == b"b's own"
                    assert _status(r, "a")["state"] == "following"
                else:
                    status = _wait_for(lambda: (s := _status(r, "a"))["state"] == "diverged"
                                       and s, "divergence")
                    assert "diverged" in status["last_error"]
                    assert a.current_state().tx_id == 5      # nothing dropped, nothing merged


def test_replica_acks_are_checked_before_they_count(tmp_path):
    with running_node(tmp_path / "p", "--replication-sync-timeout=1") as node:
        with _login(node) as admin:
            admin.create_database("syncdb", _sync_db(1))
            admin.create_user("reader", "Reader1!pw", "read", "syncdb")
            admin.use_database("syncdb")
            with pytest.raises(RemoteError):
                admin.set({b"a": b"1"})          # no replica yet: times out, stays durable
            state = admin.current_state()
            with pytest.raises(IllegalArgumentsError, match="replica_id must have"):
                admin.replica_ack("x" * 257, state.tx_id, state.tx_hash)
            with pytest.raises(ReplicaDivergedError):
                admin.replica_ack("node/db", state.tx_id, b"\0" * 32)
            with pytest.raises(ReplicaDivergedError):
                admin.replica_ack("node/db", state.tx_id + 1, state.tx_hash)
            with Client(node.host, node.port) as reader:
                reader.login("reader", "Reader1!pw", "syncdb")
                with pytest.raises(RemoteError, match="permission denied"):
                    reader.replica_ack("node/db", state.tx_id, state.tx_hash)
            # none of those counted: the quorum is still empty, a write still times out
            with pytest.raises(RemoteError, match="only 0 of 1"):
                admin.set({b"b": b"2"})
            assert admin.replica_ack("node/db", 2, admin.current_state().tx_hash) == 2


def test_sync_writes_that_waited_across_a_change_of_their_user_answer_the_error(tmp_path):
    """SET, DELETE and VERIFIABLE_SET of a user deactivated while they wait for their sync
    replicas: once released (sync turned off), each answers that the session ended (its tx
    durable all the same), not its header or proof."""
    with running_node(tmp_path / "p", "--replication-sync-timeout=30") as node:
        with _login(node) as admin:
            admin.create_database("syncdb")
            admin.create_user("writer", "Writer1!pw", "readwrite", "syncdb")
            admin.use_database("syncdb")
            admin.set({b"gone": b"soon"})
            admin.update_database("syncdb", _sync_db(1))
            writes = {"set": lambda c: c.set({b"k": b"v"}),
                      "delete": lambda c: c.delete([b"gone"]),
                      "verifiable_set": lambda c: c.verifiable_set({b"p": b"v"},
                                                                   prove_since_tx=0)}
            results = {}

            def write(kind):
                try:
                    with Client(node.host, node.port) as client:
                        client.login("writer", "Writer1!pw", "syncdb")
                        results[kind] = writes[kind](client)
                except Exception as exc:  # noqa: BLE001 - asserted below
                    results[kind] = exc

            threads = [threading.Thread(target=write, args=(kind,)) for kind in writes]
            for thread in threads:
                thread.start()
            _wait_for(lambda: admin.current_state().tx_id == 4, "the three writes committed")
            time.sleep(0.3)
            assert all(t.is_alive() for t in threads), results       # waiting for acks
            admin.set_user_active("writer", False)
            admin.update_database("syncdb", {"sync_replication": False, "sync_acks": 0})
            for thread in threads:
                thread.join(10)
            for kind in writes:
                error = results.get(kind)
                assert getattr(error, "code", None) == "session_not_found", (kind, error)
                assert "durable" in str(error), (kind, error)


def test_a_sync_write_waiting_while_the_node_stops_gets_database_closed(tmp_path):
    """As documented: stopping the node fails a write waiting for its acks with
    ``database_closed``, not a connection closed under it."""
    with running_node(tmp_path / "p", *SYNC_FLAGS[:2], "--replication-sync-timeout=60") as node:
        thread, result = _write_in_background(node, "defaultdb", {b"never": b"acked"})
        time.sleep(0.5)
        assert thread.is_alive()
        assert node.stop() == 0
        thread.join(10)
        assert getattr(result.get("error"), "code", None) == "database_closed", result
