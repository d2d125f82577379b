"""immudb's own Python SDK (immudb-py, unmodified) against real immucore nodes serving immudb's
gRPC API on --grpc-port: logins, keys, proofs checked by the SDK, signed states, databases,
sessions, permissions and immudb's error codes and texts."""
from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import threading
import time

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import empty_pb2

from immudb import ImmudbClient, datatypesv2
from immudb.exceptions import ErrCorruptedData
from immudb.grpc import schema_pb2

from immucore import Client
from immucore.constants import GRPC_REQUEST_BYTES_MAX, IMMUDB_COMPATIBLE_VERSION

from .nodes import HOST, free_port, index_worker_pid, port_accepts, running_node

READER_PASSWORD = "Reader1!pwd"


@contextlib.contextmanager
def grpc_node(tmp_path, *args):
    """A node with gRPC on a port of its own (``node.grpc_address``), once that port listens."""
    port = free_port()
    with running_node(tmp_path, "--grpc-port", str(port), *args) as node:
        deadline = time.monotonic() + 30
        while not port_accepts(HOST, port):
            assert time.monotonic() < deadline, f"gRPC port never listened:\n{node.log()}"
            time.sleep(0.05)
        node.grpc_address = f"{HOST}:{port}"
        yield node


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with grpc_node(tmp_path_factory.mktemp("grpc-node")) as node:
        with Client(node.host, node.port) as native:
            native.login("immudb", "immudb")
            native.create_user("reader", READER_PASSWORD, "read", "defaultdb")
        yield node


def sdk(node, user="immudb", password="immudb", database=b"defaultdb", **options):
    client = ImmudbClient(node.grpc_address, **options)
    client.login(user, password, database)
    return client


def rpc_error(call, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call(*args)
    return raised.value


def test_keys_and_proofs_through_immudbs_sdk(node):
    client = sdk(node)
    first = client.set(b"alice", b"10")
    assert client.get(b"alice").value == b"10"
    assert client.get(b"alice").tx == first.id

    verified = client.verifiedSet(b"bob", b"20")          # the SDK checks the proofs itself
    assert verified.verified and verified.id == first.id + 1
    assert client.verifiedGet(b"bob").value == b"20"
    got = client.verifiedGet(b"alice")                     # an older tx, proven to the newer state
    assert got.verified and got.value == b"10" and got.id == first.id

    many = client.setAll({b"carol": b"30", b"dave": b"40"})
    assert client.txById(many.id) == [b"carol", b"dave"]
    assert client._stub.TxById(schema_pb2.TxRequest(tx=many.id)).header.nentries == 2
    assert client.verifiedTxById(many.id) == [b"carol", b"dave"]

    client.set(b"alice", b"11")
    history = client.history(b"alice", 0, 10, False)
    assert [h.value for h in history] == [b"10", b"11"]
    assert client.get(b"alice", atRevision=1).value == b"10"
    assert client.scan(b"", b"", False, 10) == {b"alice": b"11", b"bob": b"20",
                                                b"carol": b"30", b"dave": b"40"}
    assert client.scan(b"", b"c", False, 10) == {b"carol": b"30"}

    deleted = client.delete(datatypesv2.DeleteKeysRequest(keys=[b"dave"]))
    assert deleted.id > many.id
    assert client.get(b"dave") is None                     # the SDK's reading of "key not found"
    state = client.currentState()
    assert state.db == "defaultdb" and state.txId == deleted.id


def test_scan_bounds_are_immudbs(node):
    """seekKey and endKey are exclusive unless asked, and offset skips entries first."""
    client = sdk(node)
    client.setAll({b"s1": b"1", b"s2": b"2", b"s3": b"3", b"s4": b"4"})
    scan = client._stub.Scan
    keys = lambda **kw: [e.key for e in scan(schema_pb2.ScanRequest(prefix=b"s", **kw)).entries]
    assert keys() == [b"s1", b"s2", b"s3", b"s4"]
    assert keys(seekKey=b"s1", endKey=b"s4") == [b"s2", b"s3"]
    assert keys(seekKey=b"s1", endKey=b"s4", inclusiveSeek=True, inclusiveEnd=True) == \
        [b"s1", b"s2", b"s3", b"s4"]
    assert keys(offset=1, limit=2) == [b"s2", b"s3"]
    assert keys(desc=True, limit=1) == [b"s4"]


def test_a_verified_read_fails_on_a_tampered_state(node):
    """The SDK's verification is live: a trusted state the node's history does not extend
    makes its verified get fail (nothing on the node's side passes it through unchecked)."""
    client = sdk(node)
    client.verifiedSet(b"tamper", b"x")
    trusted = client._rs.get()
    client._rs.set(type(trusted)(db=trusted.db, txId=trusted.txId, txHash=b"\x00" * 32,
                                 publicKey=b"", signature=b""))
    with pytest.raises(ErrCorruptedData):
        client.verifiedGet(b"tamper")


def test_expired_keys_read_as_missing(node):
    client = sdk(node)
    client.expireableSet(b"gone", b"v", dt.datetime.now() - dt.timedelta(seconds=5))
    client.expireableSet(b"kept", b"v", dt.datetime.now() + dt.timedelta(days=1))
    assert client.get(b"gone") is None
    assert client.get(b"kept").value == b"v"


def test_server_info_and_health(node):
    client = ImmudbClient(node.grpc_address)
    assert client.health().version == IMMUDB_COMPATIBLE_VERSION
    info = sdk(node).serverInfo()
    assert info.version == IMMUDB_COMPATIBLE_VERSION and info.numDatabases >= 1


def test_errors_are_immudbs(node):
    client = sdk(node)
    error = rpc_error(client._stub.Get, schema_pb2.KeyRequest(key=b"no such key"))
    assert (error.code(), error.details()) == (grpc.StatusCode.UNKNOWN, "key not found")
    error = rpc_error(client._stub.TxById, schema_pb2.TxRequest(tx=1 << 40))
    assert (error.code(), error.details()) == (grpc.StatusCode.UNKNOWN, "tx not found")

    anonymous = ImmudbClient(node.grpc_address)._stub
    error = rpc_error(anonymous.CurrentState, empty_pb2.Empty())
    assert error.details() == "not logged in"
    error = rpc_error(anonymous.Login, schema_pb2.LoginRequest(user=b"immudb", password=b"no"))
    assert error.details() == "invalid user name or password"

    # a token straight from Login names no database yet (immudb's multi-database mode)
    token = anonymous.Login(schema_pb2.LoginRequest(user=b"immudb", password=b"immudb")).token
    error = rpc_error(anonymous.CurrentState, empty_pb2.Empty(),)
    assert error.details() == "not logged in"
    with_token = lambda call, request, value: call(request, metadata=[("authorization", value)])
    error = rpc_error(with_token, anonymous.CurrentState, empty_pb2.Empty(), token)
    assert error.details() == "please select a database first"
    error = rpc_error(with_token, anonymous.UseDatabase,
                      schema_pb2.Database(databaseName="nosuchdb"), token)
    assert (error.code(), error.details()) == (grpc.StatusCode.NOT_FOUND, "'nosuchdb' does not exist")
    # with or without "Bearer "
    with_token(anonymous.UseDatabase, schema_pb2.Database(databaseName="defaultdb"), token)
    assert with_token(anonymous.CurrentState, empty_pb2.Empty(), token).db == "defaultdb"
    assert with_token(anonymous.CurrentState, empty_pb2.Empty(), "Bearer " + token).db == \
        "defaultdb"

    error = rpc_error(client._stub.Set, schema_pb2.SetRequest(
        KVs=[schema_pb2.KeyValue(key=b"k", value=b"v")],
        preconditions=[schema_pb2.Precondition(
            keyMustExist=schema_pb2.Precondition.KeyMustExistPrecondition(key=b"k"))]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "preconditions" in error.details()


def test_logout_ends_the_token(node):
    client = sdk(node)
    stub = client._stub
    client.set(b"before-logout", b"v")
    stub.Logout(empty_pb2.Empty())
    error = rpc_error(stub.Get, schema_pb2.KeyRequest(key=b"before-logout"))
    assert error.details() == "not logged in"


def test_sessions_by_session_id(node):
    client = ImmudbClient(node.grpc_address)
    client.openSession("immudb", "immudb", b"defaultdb")
    client.set(b"in-session", b"v")
    assert client.get(b"in-session").value == b"v"
    client.keepAlive()
    stub = client._stub
    client.closeSession()
    error = rpc_error(stub.Get, schema_pb2.KeyRequest(key=b"in-session"))
    assert error.details() == "session not found"


def test_a_read_user_is_refused_what_the_native_protocol_refuses(node):
    sdk(node).set(b"public", b"v")
    reader = sdk(node, "reader", READER_PASSWORD)
    assert reader.get(b"public").value == b"v"
    assert reader.verifiedGet(b"public").verified
    for call, args in ((reader.set, (b"k", b"v")), (reader.verifiedSet, (b"k", b"v")),
                       (reader.setAll, ({b"k": b"v"},)),
                       (reader.delete, (datatypesv2.DeleteKeysRequest(keys=[b"public"]),)),
                       (reader.createDatabaseV2, ("readersdb", datatypesv2.DatabaseSettingsV2(),
                                                 False))):
        error = rpc_error(call, *args)
        assert "permission denied" in error.details() or "permission" in error.details(), \
            (call.__name__, error.details())
    # a database the reader has no permission on: immudb's status and text
    sdk(node).createDatabaseV2("secretdb", datatypesv2.DatabaseSettingsV2(), True)
    error = rpc_error(reader.useDatabase, b"secretdb")
    assert (error.code(), error.details()) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "Logged in user does not have permission on this database")
    assert [d.name for d in reader.databaseListV2().databases] == ["defaultdb"]


def test_reads_that_waited_across_a_change_of_their_user_answer_the_error(tmp_path):
    """A reader's Get, History, Scan and VerifiableGet over gRPC wait for the key index (its
    worker stopped with SIGSTOP); the reader is deactivated meanwhile. Each then fails: the
    permission is checked again after the wait, as on the native port, never the data."""
    with grpc_node(tmp_path) as real, Client(real.host, real.port) as admin:
        admin.login("immudb", "immudb")
        admin.create_user("waiter", READER_PASSWORD, "read", "defaultdb")
        admin.set({b"k": b"before"})
        worker = index_worker_pid(real, "defaultdb")
        os.kill(worker, signal.SIGSTOP)
        results = {}
        try:
            admin.set({b"k": b"after the change"})            # not indexed while stopped
            reads = {"get": lambda c: c.get(b"k"),
                     "history": lambda c: c.history(b"k", 0, 10, False),
                     "scan": lambda c: c.scan(b"", b"k", False, 10),
                     "verifiedGet": lambda c: c.verifiedGet(b"k")}

            def read(kind):
                try:
                    results[kind] = reads[kind](sdk(real, "waiter", READER_PASSWORD))
                except Exception as exc:  # noqa: BLE001 - asserted below
                    results[kind] = exc

            threads = [threading.Thread(target=read, args=(kind,)) for kind in reads]
            for thread in threads:
                thread.start()
            time.sleep(1.5)
            assert all(t.is_alive() for t in threads), results       # waiting for the index
            admin.set_user_active("waiter", False)
        finally:
            os.kill(worker, signal.SIGCONT)
        for thread in threads:
            thread.join(20)
        for kind in reads:
            assert isinstance(results.get(kind), grpc.RpcError), (kind, results.get(kind))


def test_create_and_list_databases_v2(node):
    admin = sdk(node)
    created = admin.createDatabaseV2("salesdb", datatypesv2.DatabaseSettingsV2(maxKeyLen=512),
                                     False)
    assert created.name == "salesdb" and not created.alreadyExisted
    assert created.settings.maxKeyLen == 512
    again = admin.createDatabaseV2("salesdb", datatypesv2.DatabaseSettingsV2(), True)
    assert again.alreadyExisted
    listed = {d.name: d for d in admin.databaseListV2().databases}
    assert listed["salesdb"].loaded and listed["salesdb"].settings.maxKeyLen.value == 512
    assert "defaultdb" in listed

    admin.useDatabase(b"salesdb")
    admin.set(b"order", b"1")
    assert admin.currentState().db == "salesdb"
    assert admin.verifiedGet(b"order").value == b"1"
    other = sdk(node)                                      # defaultdb does not see it
    assert other.get(b"order") is None

    error = rpc_error(admin.createDatabaseV2, "filesdb",
                      datatypesv2.DatabaseSettingsV2(fileSize=1 << 20), False)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "fileSize" in error.details()


def test_an_oversized_request_is_refused_and_the_node_goes_on(node):
    client = sdk(node)
    error = rpc_error(client.set, b"big", b"x" * (GRPC_REQUEST_BYTES_MAX + 1))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    client = sdk(node)
    assert client.set(b"after-big", b"v").id > 0


def test_states_are_signed_with_the_signing_key(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    private_pem, public_pem = tmp_path / "signing.pem", tmp_path / "public.pem"
    private_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    public_pem.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with grpc_node(tmp_path / "node", "--signingKey", str(private_pem)) as node:
        client = sdk(node, publicKeyFile=str(public_pem))
        assert client.verifiedSet(b"signed", b"v").verified      # the SDK checks the signature
        assert client.verifiedGet(b"signed").verified
        state = client.currentState()
        state.Verify(client._vk)                                   # raises if it does not verify
        assert state.signature

        other = ec.generate_private_key(ec.SECP256R1()).public_key()
        (tmp_path / "other.pem").write_bytes(other.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        stranger = sdk(node, publicKeyFile=str(tmp_path / "other.pem"))
        with pytest.raises(Exception, match="") as raised:
            stranger.verifiedGet(b"signed")
        assert "BadSignature" in type(raised.value).__name__ or "signature" in str(raised.value)


def test_a_request_that_is_no_protobuf_is_refused_and_the_node_goes_on(node):
    channel = grpc.insecure_channel(node.grpc_address)
    raw_login = channel.unary_unary("/immudb.schema.ImmuService/Login",
                                    request_serializer=None, response_deserializer=None)
    error = rpc_error(raw_login, b"\xff\xff\xff\xff garbage")
    # grpc.aio's own answer to a request it cannot decode: UNKNOWN, naming the message
    assert "Error parsing message with type 'immudb.schema.LoginRequest'" in error.details()
    channel.close()
    assert sdk(node).set(b"after-garbage", b"v").id > 0


def test_grpc_uses_the_nodes_tls_certificate(tmp_path):
    from immudb.grpc import schema_pb2_grpc
    from .test_tls import _self_signed
    cert, key = _self_signed(tmp_path)
    with grpc_node(tmp_path / "n", "--certificate", cert, "--pkey", key) as node:
        with open(cert, "rb") as f:
            credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        with grpc.secure_channel(node.grpc_address, credentials) as channel:
            stub = schema_pb2_grpc.ImmuServiceStub(channel)
            token = stub.Login(schema_pb2.LoginRequest(user=b"immudb", password=b"immudb")).token
            assert token
        plain = ImmudbClient(node.grpc_address, timeout=3)     # no TLS: no answer
        with pytest.raises(grpc.RpcError):
            plain.login("immudb", "immudb")


def test_the_grpc_port_is_a_node_flag_and_an_environment_variable():
    from immucore.cli import node as node_cli
    parser = node_cli.build_parser()
    assert node_cli.resolve(parser.parse_args(["--grpc-port", "3323"]), environ={})["grpc_port"] \
        == 3323
    assert node_cli.resolve(parser.parse_args([]),
                            environ={"IMMUCORE_GRPC_PORT": "3324"})["grpc_port"] == 3324
    assert node_cli.resolve(parser.parse_args([]), environ={})["grpc_port"] == 0   # on --port
