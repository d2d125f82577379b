"""Replication over immudb's gRPC API between real nodes on loopback: an immucore replica that
follows its primary's gRPC face with ``primary_protocol: grpc`` (catch-up, resume, divergence,
sync acks), immudb's exportTx/replicateTx/streamExportTx as immudb-py drives them (an external
copier built on the SDK), a read user's refusals, and the error texts immudb's replicators
match on."""
from __future__ import annotations

import struct
import threading
import time

import grpc
import pytest

from immudb import ImmudbClient
from immudb.grpc import schema_pb2

from immucore.client import Client

from .nodes import HOST, free_port, port_accepts, running_node
from .test_replication import _fill, _immuadmin, _login, _status, _wait_for

READER_PASSWORD = "Reader1!pwd"
SYNC_FLAGS = ("--replication-sync-enabled=true", "--replication-sync-acks=1",
              "--replication-sync-timeout=1.5")
U64 = struct.Struct(">Q")


class _GrpcNode:
    """A node with gRPC on a port of its own, once that port listens."""

    def __init__(self, tmp_path, *args):
        self.grpc_port = free_port()
        self._cm = running_node(tmp_path, "--grpc-port", str(self.grpc_port), *args)

    def __enter__(self):
        self.node = self._cm.__enter__()
        self.node.grpc_port = self.grpc_port
        self.node.grpc_address = f"{HOST}:{self.grpc_port}"
        _wait_for(lambda: port_accepts(HOST, self.grpc_port), "the gRPC port", 30)
        return self.node

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def _grpc_replica_settings(primary, database="defaultdb", **extra):
    return {"replica": True, "primary_database": database, "primary_host": primary.host,
            "primary_port": primary.grpc_port, "primary_username": "immudb",
            "primary_password": "immudb", "primary_protocol": "grpc", **extra}


def _sdk(node, user="immudb", password="immudb", database=b"defaultdb"):
    client = ImmudbClient(node.grpc_address)
    client.login(user, password, database)
    return client


def _rpc_error(call, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        result = call(*args)
        if hasattr(result, "__iter__") and not isinstance(result, (bytes, str)):
            list(result)
    return raised.value


def _messages(chunks) -> list:
    """Reassemble immudb's chunked messages: (payload, first chunk's metadata) each."""
    out, payload, length, metadata = [], b"", None, {}
    for chunk in chunks:
        content = chunk.content
        if length is None:
            length, metadata = U64.unpack(content[:8])[0], dict(chunk.metadata)
            content = content[8:]
        payload += content
        if len(payload) >= length:
            out.append((payload, metadata))
            payload, length = b"", None
    return out


def test_a_replica_follows_its_primary_over_grpc_and_resumes_after_restarts(tmp_path):
    import asyncio
    with _GrpcNode(tmp_path / "p") as primary, running_node(tmp_path / "r") as replica:
        # more txs than one pipelined batch, some of them large (many chunks each)
        asyncio.run(_fill(primary, 600))
        with _login(primary) as p:
            p.set({b"big": b"x" * (300 << 10)})
        with _login(replica) as r:
            r.create_database("replicadb", _grpc_replica_settings(primary))
            r.use_database("replicadb")
            with _login(primary) as p:
                last = p.current_state()
                _wait_for(lambda: r.current_state().tx_id == last.tx_id, "the catch-up")
                assert r.current_state().tx_hash == last.tx_hash
                assert r.get(b"big").value == b"x" * (300 << 10)
                status = _status(r, "replicadb")
                assert status["state"] == "following" and status["lag_txs"] == 0
                # caught up: the next commit arrives as it happens (the request waits for it)
                header = p.set({b"live": b"1"})
                started = time.monotonic()
                _wait_for(lambda: r.current_state().tx_id == header.id, "a live commit")
                assert time.monotonic() - started < 1.5
        replica.restart()                                   # settings persist in systemdb
        with _login(primary) as p:
            p.set({b"while-away": b"1"})
        with _login(replica, "replicadb") as r, _login(primary) as p:
            _wait_for(lambda: r.current_state().tx_id == p.current_state().tx_id,
                      "after the replica restarted")
        primary.restart()                                   # the replica reconnects
        _wait_for(lambda: port_accepts(HOST, primary.grpc_port), "the gRPC port again", 30)
        with _login(primary) as p, _login(replica, "replicadb") as r:
            header = p.set({b"after-primary-restart": b"1"})
            _wait_for(lambda: r.current_state().tx_id == header.id, "after the primary restarted")
            assert r.current_state().tx_hash == p.current_state().tx_hash


def test_divergence_over_grpc_is_detected_and_stops_replication(tmp_path):
    with _GrpcNode(tmp_path / "a") as first, _GrpcNode(tmp_path / "b") as second, \
            running_node(tmp_path / "r") as replica:
        with _login(first) as a, _login(second) as b, _login(replica) as r:
            a.set({b"history": b"A"})
            for n in range(3):
                b.set({f"other{n}".encode(): b"B"})
            r.create_database("replicadb", _grpc_replica_settings(first))
            r.use_database("replicadb")
            _wait_for(lambda: r.current_state().tx_id == 1, "the first primary")
            # re-pointed at a primary whose tx 1 is another tx: never merged, stopped
            r.update_database("replicadb", {"primary_host": second.host,
                                            "primary_port": second.grpc_port})
            status = _wait_for(lambda: (_status(r, "replicadb") or {}).get("state") == "diverged"
                               and _status(r, "replicadb"), "divergence")
            assert "diverged" in status["last_error"]
            time.sleep(0.5)
            assert r.current_state().tx_id == 1


def test_sync_writes_are_acknowledged_by_a_grpc_replica(tmp_path):
    """The primary waits for one ack (1.5 s at most); the replica's acks ride on its requests'
    ReplicaState, and a request already waiting on the primary when an ack is due is sent
    again with it: otherwise every write would wait out the request and fail."""
    with _GrpcNode(tmp_path / "p", *SYNC_FLAGS) as primary, \
            running_node(tmp_path / "r") as replica:
        with _login(primary) as p, _login(replica) as r:
            r.create_database("replicadb", _grpc_replica_settings(primary))
            r.use_database("replicadb")
            _wait_for(lambda: (_status(r, "replicadb") or {}).get("state") == "following",
                      "the replica following")
            for n in range(10):
                header = p.set({b"k%d" % n: b"v"})
                # acknowledged means the replica already holds it, durably
                assert r.current_state().tx_id >= header.id
            assert r.current_state().tx_hash == p.current_state().tx_hash


def test_an_external_copier_built_on_immudbs_sdk_copies_a_database(tmp_path):
    with _GrpcNode(tmp_path / "src") as source, _GrpcNode(tmp_path / "dst") as target:
        with _login(source) as s, _login(target) as t:
            for n in range(5):
                s.set({b"k%d" % n: b"v%d" % n})
            s.set({b"large": b"L" * (200 << 10)})           # an export of several chunks
            t.create_database("copydb", {"replica": True})  # fed from outside
        src, dst = _sdk(source), _sdk(target, database=b"copydb")
        last = src.currentState().txId
        # a tx altered on the way is verified as every replicated tx is: refused, not applied
        [chunk] = list(src.exportTx(1))
        assert chunk.content.count(b"v0") == 1                 # tx 1's value
        tampered = schema_pb2.Chunk(content=chunk.content.replace(b"v0", b"v9"),
                                    metadata=chunk.metadata)
        error = _rpc_error(dst.replicateTx, iter([tampered]))
        assert "corrupted" in error.details().lower() or "hash" in error.details().lower(), \
            error.details()
        assert dst.currentState().txId == 0
        for tx in range(1, last + 1):
            header = dst.replicateTx(src.exportTx(tx))      # the SDK's own calls, chained
            assert header.id == tx
        assert dst.currentState().txHash == src.currentState().txHash
        assert dst.get(b"large").value == b"L" * (200 << 10)
        # a tx already there gets immudb's text (its replicators go on with the next one)
        error = _rpc_error(dst.replicateTx, src.exportTx(2))
        assert error.code() == grpc.StatusCode.UNKNOWN
        assert error.details() == "tx already committed"
        # and the copy goes on where it stopped
        with _login(source) as s:
            s.set({b"later": b"1"})
        assert dst.replicateTx(src.exportTx(last + 1)).id == last + 1
        assert dst.currentState().txHash == src.currentState().txHash


def test_the_chunks_and_metadata_are_immudbs(tmp_path):
    with _GrpcNode(tmp_path / "p") as primary:
        with _login(primary) as p:
            p.set({b"a": b"1"})
            p.set({b"b": b"x" * (150 << 10)})
            state = p.current_state()
        client = _sdk(primary)
        chunks = list(client.exportTx(2))
        assert len(chunks) == 3 and all(len(c.content) == 64 << 10 for c in chunks[:-1])
        assert set(chunks[0].metadata) == {"committed-txid-bin"}
        assert not chunks[1].metadata and not chunks[2].metadata
        [(blob, metadata)] = _messages(chunks)
        assert metadata["committed-txid-bin"] == U64.pack(state.tx_id)
        with _login(primary) as p:
            assert blob == p.export_tx(2)
        # with a ReplicaState: may-commit-up-to as well, and as trailers on exportTx
        replica_state = schema_pb2.ReplicaState(UUID="r1", precommittedTxID=1,
                                                precommittedAlh=_alh(primary, 1))
        stream = client._stub.exportTx(schema_pb2.ExportTxRequest(tx=2,
                                                                  replicaState=replica_state))
        [(_, metadata)] = _messages(stream)
        assert metadata["may-commit-up-to-txid-bin"] == U64.pack(1)    # what the replica holds
        assert metadata["may-commit-up-to-alh-bin"] == _alh(primary, 1)
        trailers = dict(stream.trailing_metadata())
        assert trailers["may-commit-up-to-txid-bin"] == U64.pack(1)
        assert trailers["committed-txid-bin"] == U64.pack(state.tx_id)
        # streamExportTx: one answer per request on one stream; a caught-up request with a
        # ReplicaState waits for the next commit and is answered by it
        requests = [schema_pb2.ExportTxRequest(tx=1, replicaState=replica_state),
                    schema_pb2.ExportTxRequest(tx=2, replicaState=replica_state),
                    schema_pb2.ExportTxRequest(tx=3, replicaState=replica_state)]
        timer = threading.Timer(0.5, lambda: _login(primary).set({b"c": b"3"}))
        timer.start()
        started = time.monotonic()
        answers = _messages(client._stub.streamExportTx(iter(requests)))
        timer.join()
        assert [U64.unpack(blob[4:12])[0] for blob, _ in answers] == [1, 2, 3]
        assert 0.4 < time.monotonic() - started < 1.9


def _alh(node, tx_id: int) -> bytes:
    with _login(node) as c:
        return c.tx_by_id(tx_id).header.alh()


def test_immudbs_error_texts_verbatim(tmp_path):
    with _GrpcNode(tmp_path / "p") as primary:
        with _login(primary) as p:
            p.set({b"a": b"1"})
            p.set({b"b": b"2"})
        client = _sdk(primary)
        error = _rpc_error(client.exportTx, 3)
        assert error.code() == grpc.StatusCode.UNKNOWN and error.details() == "no new transactions"
        error = _rpc_error(client._stub.streamExportTx,
                           iter([schema_pb2.ExportTxRequest(tx=3)]))
        assert error.details() == "no new transactions"
        wrong = b"\x01" * 32
        for state, what in ((schema_pb2.ReplicaState(UUID="r", committedTxID=1, committedAlh=wrong),
                             "commit"),
                            (schema_pb2.ReplicaState(UUID="r", committedTxID=5), "commit"),
                            (schema_pb2.ReplicaState(UUID="r", precommittedTxID=2,
                                                     precommittedAlh=wrong), "precommit"),
                            (schema_pb2.ReplicaState(UUID="r", precommittedTxID=9), "precommit")):
            error = _rpc_error(client._stub.streamExportTx,
                               iter([schema_pb2.ExportTxRequest(tx=1, replicaState=state)]))
            assert error.details() == (f"replica diverged from primary: replica {what} state "
                                       "diverged from primary's")
        error = _rpc_error(client.exportTx, 0)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details().startswith("illegal arguments")
        # replicateTx into a primary, and a first chunk without its length
        error = _rpc_error(client.replicateTx, iter(list(client.exportTx(1))))
        assert error.details() == "database is NOT a replica"
        error = _rpc_error(client.replicateTx, iter([schema_pb2.Chunk(content=b"1234")]))
        assert error.details() == "minimum chunk size is 4096"
        # a length over one tx's export is refused before anything is allocated
        huge = schema_pb2.Chunk(content=U64.pack(1 << 40) + b"x")
        error = _rpc_error(client.replicateTx, iter([huge]))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "exceeds the limit" in error.details()


def test_a_read_user_may_not_replicate(tmp_path):
    with _GrpcNode(tmp_path / "p") as primary:
        with _login(primary) as p:
            p.set({b"a": b"1"})
            p.create_user("reader", READER_PASSWORD, "read", "defaultdb")
            p.create_database("copydb", {"replica": True})
            p.grant("reader", "read", "copydb")
        reader = _sdk(primary, "reader", READER_PASSWORD)
        admin = _sdk(primary)
        chunks = list(admin.exportTx(1))
        one_request = iter([schema_pb2.ExportTxRequest(tx=1)])
        for call, args in ((reader.exportTx, (1,)),
                           (reader._stub.streamExportTx, (one_request,))):
            error = _rpc_error(call, *args)
            assert error.code() == grpc.StatusCode.INTERNAL
            assert error.details() == "permission denied"
        reader.useDatabase(b"copydb")
        error = _rpc_error(reader.replicateTx, iter(chunks))
        assert error.details() == "permission denied"
        with Client(primary.host, primary.port) as c:
            c.login("immudb", "immudb", "copydb")
            assert c.current_state().tx_id == 0                # nothing was applied


def test_the_primary_protocol_setting_is_checked_and_kept(tmp_path):
    with running_node(tmp_path / "n") as node:
        _check_primary_protocol_setting(node)
        home = tmp_path / "home"
        assert _immuadmin(node, home, "login", "immudb", stdin="immudb\n").returncode == 0
        made = _immuadmin(node, home, "database", "create", "--replication-is-replica=true",
                          "--replication-primary-protocol", "grpc", "viaflag")
        assert made.returncode == 0, made.stderr
        with _login(node) as c:
            assert c.database_settings("viaflag")["settings"]["primary_protocol"] == "grpc"


def _check_primary_protocol_setting(node):
    from immucore.errors import IllegalArgumentsError
    with _login(node) as c:
        with pytest.raises(IllegalArgumentsError, match="PrimaryProtocol.*'http' is neither"):
            c.create_database("bad", {"replica": True, "primary_protocol": "http"})
        with pytest.raises(IllegalArgumentsError, match="PrimaryProtocol on primary database"):
            c.create_database("bad", {"primary_protocol": "grpc"})
        c.create_database("fed", {"replica": True, "primary_protocol": "grpc"})
    node.restart()                                          # kept in systemdb
    with _login(node) as c:
        assert c.database_settings("fed")["settings"]["primary_protocol"] == "grpc"


def test_a_server_level_replica_follows_systemdb_and_defaultdb_over_grpc(tmp_path):
    with _GrpcNode(tmp_path / "p") as primary:
        with _login(primary) as p:
            p.create_user("carol", READER_PASSWORD, "read", "defaultdb")
            p.set({b"server-level": b"1"})
        with running_node(tmp_path / "r", "--replication-enabled=true",
                          "--replication-primary-protocol", "grpc",
                          "--replication-master-address", primary.host,
                          "--replication-master-port", str(primary.grpc_port),
                          "--replication-follower-username", "immudb",
                          "--replication-follower-password", "immudb") as replica:
            def caught_up():
                try:           # users come from the primary's systemdb, once it arrived
                    with Client(replica.host, replica.port) as r:
                        r.login("carol", READER_PASSWORD)
                        return r.get(b"server-level").value == b"1"
                except Exception:  # noqa: BLE001 - not there yet
                    return False
            _wait_for(caught_up, "systemdb and defaultdb over gRPC")


def test_a_waiting_export_ends_with_the_error_when_its_user_loses_admin(tmp_path):
    """A caught-up replica's request waits on the primary; its user's admin permission is
    revoked meanwhile, then a commit comes: the stream answers the error, never the tx."""
    with _GrpcNode(tmp_path / "p") as primary:
        with _login(primary) as p:
            p.set({b"a": b"1"})
            p.create_user("follower", READER_PASSWORD, "admin", "defaultdb")
        follower = _sdk(primary, "follower", READER_PASSWORD)
        state = schema_pb2.ReplicaState(UUID="r1", precommittedTxID=1,
                                        precommittedAlh=_alh(primary, 1))
        outcome = {}

        def export():
            try:
                outcome["answers"] = _messages(follower._stub.streamExportTx(
                    iter([schema_pb2.ExportTxRequest(tx=2, replicaState=state)])))
            except grpc.RpcError as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=export)
        thread.start()
        time.sleep(0.5)                                   # the request now waits for tx 2
        with _login(primary) as p:
            p.revoke("follower", "admin", "defaultdb")
            p.set({b"b": b"2"})
        thread.join(10)
        assert "answers" not in outcome, outcome
        # the change of the user ended its token: immudb's text, on which its replicator stops
        assert outcome["error"].details() in ("permission denied", "no session found")


def test_a_grpc_replica_ahead_of_its_new_primary_discards_only_unacknowledged_txs(tmp_path):
    """test_sync_replication's failover over gRPC: old primary P (sync, acks 1) with replicas
    A and B following its gRPC face; B is promoted after tx 3 and writes its own tx 4; P goes on
    with txs 4 and 5 that no quorum acknowledges. A, re-pointed to B's gRPC face, drops 4 and 5
    (never 1..3, which P acknowledged: its floor came in may-commit-up-to) and follows B."""
    from immucore.protocol.messages import RemoteError
    with _GrpcNode(tmp_path / "p", "--replication-sync-timeout=1") as p_node, \
            _GrpcNode(tmp_path / "r") as r_node:
        with _login(p_node) as p, _login(r_node) as r:
            p.create_database("main", {"sync_replication": True, "sync_acks": 1})
            r.create_database("a", _grpc_replica_settings(p_node, "main",
                                                          allow_tx_discarding=True))
            r.create_database("b", _grpc_replica_settings(p_node, "main"))
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
                r.update_database("a", {"primary_host": r_node.host,
                                        "primary_port": r_node.grpc_port,
                                        "primary_database": "b"})
                _wait_for(lambda: a.current_state().tx_hash == b_state.tx_hash,
                          "a follows b after discarding")
                assert a.get(b"k3").value == b"b's own"
                assert _status(r, "a")["state"] == "following"


def test_a_grpc_replica_follows_a_tls_primary_and_verifies_it(tmp_path):
    """--replication-tls-ca covers a primary followed over gRPC (TLS, its certificate checked
    against that CA); a replica without it speaks plain gRPC, which a TLS primary never
    answers: it retries, saying which call failed."""
    import ssl
    from .test_tls import _self_signed
    cert, key = _self_signed(tmp_path)
    with _GrpcNode(tmp_path / "p", "--certificate", cert, "--pkey", key) as primary, \
            running_node(tmp_path / "r", "--replication-tls-ca", cert) as replica, \
            running_node(tmp_path / "u") as untrusting:
        with Client(primary.host, primary.port,
                    ssl=ssl.create_default_context(cafile=cert)) as p:
            p.login("immudb", "immudb")
            p.set({b"over": b"tls"})
        with _login(replica) as r:
            r.create_database("replicadb", _grpc_replica_settings(primary))
            r.use_database("replicadb")
            _wait_for(lambda: r.current_state().tx_id == 1, "the tx over TLS")
            assert r.get(b"over").value == b"tls"
        with _login(untrusting) as u:
            u.create_database("replicadb", _grpc_replica_settings(primary))
            status = _wait_for(lambda: (s := _status(u, "replicadb") or {}).get("retries")
                               and s, "a refused certificate")
            assert status["state"] == "retrying" and "OpenSession" in status["last_error"]
            u.use_database("replicadb")
            assert u.current_state().tx_id == 0
