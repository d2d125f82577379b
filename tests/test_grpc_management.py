"""Database and user management over immudb's gRPC API, driven by immudb's own Python SDK
(immudb-py, unmodified) against real immucore nodes: databases created, listed, updated,
loaded, unloaded and deleted; a replica created with createDatabaseV2's replication settings
following its primary (the replication guide, through the SDK); immudb's settings immucore does
not implement reported at immudb's defaults, taken at them and refused otherwise; users and
permissions; and the refusals, with immudb's texts."""
from __future__ import annotations

import time

import grpc
import pytest
from google.protobuf import empty_pb2

from immudb import constants, datatypesv2
from immudb.grpc import schema_pb2, schema_pb2_grpc

from immucore.grpc.nullable_settings import UNIMPLEMENTED_DEFAULTS

from .nodes import HOST
from .test_grpc_immudb_sdk import grpc_node, rpc_error, sdk

USER_PASSWORD = "Alice1!pwd"
WAIT_SECONDS = 30


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with grpc_node(tmp_path_factory.mktemp("grpc-manage")) as node:
        yield node


def _wait_for(predicate, what: str):
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _replication(primary, **extra):
    return datatypesv2.ReplicationSettings(
        replica=True, primaryDatabase="defaultdb", primaryHost=HOST, primaryPort=primary.port,
        primaryUsername="immudb", primaryPassword="immudb", **extra)


def _settings_message(client):
    return client._stub.GetDatabaseSettingsV2(schema_pb2.DatabaseSettingsRequest()).settings


def test_a_replica_created_with_createDatabaseV2_follows_its_primary(tmp_path):
    """The replication guide through immudb's SDK: a database created on another node with
    createDatabaseV2's replication settings follows its primary, proofs and all; and a replica
    made from a copy of the primary's whole settings (as immudb's tools make one) too."""
    with grpc_node(tmp_path / "p") as primary, grpc_node(tmp_path / "r") as replica:
        writer = sdk(primary)
        writer.set(b"before", b"1")
        admin = sdk(replica)
        created = admin.createDatabaseV2(
            "replicadb", datatypesv2.DatabaseSettingsV2(replicationSettings=_replication(primary)),
            False)
        assert created.name == "replicadb" and created.settings.replicationSettings.replica
        assert created.settings.replicationSettings.primaryPort == primary.port

        # immudb's tools: the primary's settings, all of them, with the replication part changed
        copied = schema_pb2.CreateDatabaseRequest(name="copydb")
        copied.settings.CopyFrom(_settings_message(writer))
        rep = copied.settings.replicationSettings
        rep.replica.value, rep.primaryDatabase.value = True, "defaultdb"
        rep.primaryHost.value, rep.primaryPort.value = HOST, primary.port
        rep.primaryUsername.value, rep.primaryPassword.value = "immudb", "immudb"
        assert copied.settings.HasField("fileSize") and copied.settings.HasField("indexSettings")
        admin._stub.CreateDatabaseV2(copied)

        writer.set(b"after", b"2")
        last = writer.currentState().txId
        for name in ("replicadb", "copydb"):
            reader = sdk(replica, database=name.encode())
            _wait_for(lambda: reader.currentState().txId >= last, f"{name} to catch up")
            assert reader.verifiedGet(b"before").value == b"1"      # the SDK checks the proof
            assert reader.get(b"after").value == b"2"
            error = rpc_error(reader.set, b"mine", b"x")
            assert "database is read-only because it's a replica" in error.details()
            assert reader.getDatabaseSettingsV2().settings.replicationSettings.replica


def test_settings_report_immudbs_defaults_for_what_immucore_does_not_implement(node):
    admin = sdk(node)
    reported = _settings_message(admin)
    assert reported.fileSize.value == 1 << 29 and reported.indexSettings.cacheSize.value == 1 << 27
    assert reported.ahtSettings.writeBufferSize.value == 1 << 24
    assert reported.truncationSettings.truncationFrequency.value == 24 * 3600 * 1000
    assert reported.syncFrequency.value == 20 and not reported.embeddedValues.value
    # the replication settings are always filled, a primary's as zero values
    rep = reported.replicationSettings
    assert rep.HasField("replica") and not rep.replica.value and rep.HasField("primaryPort")
    assert rep.HasField("syncAcks") and rep.HasField("waitForIndexing")
    listed = {d.name: d for d in admin._stub.DatabaseListV2(
        schema_pb2.DatabaseListRequestV2()).databases}
    assert listed["defaultdb"].settings == reported

    # at immudb's defaults they are taken (every one of them, at once)
    at_defaults = schema_pb2.CreateDatabaseRequest(name="defaultsdb")
    at_defaults.settings.CopyFrom(reported)
    admin._stub.CreateDatabaseV2(at_defaults)
    created = admin.createDatabaseV2(
        "mixeddb", datatypesv2.DatabaseSettingsV2(fileSize=1 << 29, maxConcurrency=30,
                                                  maxKeyLen=256), False)
    assert created.settings.maxKeyLen == 256 and created.settings.fileSize == 1 << 29

    # anything else is refused, naming the setting, and nothing is created
    error = rpc_error(admin.createDatabaseV2, "filesdb",
                      datatypesv2.DatabaseSettingsV2(fileSize=1 << 20), False)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "database setting fileSize is not supported by immucore" in error.details()
    assert str(1 << 29) in error.details()
    nested = schema_pb2.UpdateDatabaseRequest(database="mixeddb")
    nested.settings.indexSettings.cacheSize.value = 1000
    error = rpc_error(admin._stub.UpdateDatabaseV2, nested)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "indexSettings.cacheSize" in error.details()
    assert "filesdb" not in [d.name for d in admin.databaseListV2().databases]
    assert set(UNIMPLEMENTED_DEFAULTS) >= {"fileSize", "indexSettings.cacheSize"}


def test_update_load_unload_and_delete_a_database(node):
    admin = sdk(node)
    admin.createDatabaseV2("lifedb", datatypesv2.DatabaseSettingsV2(), False)
    updated = admin.updateDatabaseV2("lifedb", datatypesv2.DatabaseSettingsV2(autoload=False))
    assert updated.database == "lifedb" and updated.settings.autoload is False
    error = rpc_error(admin.updateDatabaseV2, "lifedb",
                      datatypesv2.DatabaseSettingsV2(maxKeyLen=17))
    assert "max_key_len can not be changed after database creation" in error.details()

    admin.useDatabase(b"lifedb")
    admin.set(b"k", b"v")
    settings = admin.getDatabaseSettingsV2()
    assert settings.database == "lifedb" and settings.settings.autoload is False

    error = rpc_error(admin.deleteDatabase, "lifedb")
    assert "must be unloaded before it is deleted" in error.details()
    assert admin.unloadDatabase("lifedb").database == "lifedb"
    listed = {d.name: d for d in admin.databaseListV2().databases}
    assert not listed["lifedb"].loaded
    assert "lifedb" in admin.databaseList()
    assert admin.loadDatabase("lifedb").database == "lifedb"
    assert sdk(node, database=b"lifedb").get(b"k").value == b"v"
    admin.unloadDatabase("lifedb")
    assert admin.deleteDatabase("lifedb").database == "lifedb"
    assert "lifedb" not in [d.name for d in admin.databaseListV2().databases]
    error = rpc_error(admin.loadDatabase, "lifedb")
    assert "database lifedb does not exist" in error.details()


def test_users_and_permissions(node):
    admin = sdk(node)
    admin.createDatabaseV2("teamdb", datatypesv2.DatabaseSettingsV2(), True)
    admin.createUser("alice", USER_PASSWORD, constants.PERMISSION_RW, "defaultdb")
    users = {u.user: u for u in admin.listUsers().userlist.users}
    assert users[b"alice"].active and users[b"alice"].createdby == "immudb"
    assert [(p.database, p.permission) for p in users[b"alice"].permissions] == \
        [("defaultdb", constants.PERMISSION_RW)]
    assert users[b"immudb"].permissions[0].permission == constants.PERMISSION_SYS_ADMIN

    alice = sdk(node, "alice", USER_PASSWORD)
    alice.set(b"by-alice", b"1")
    assert rpc_error(alice.useDatabase, b"teamdb").code() == grpc.StatusCode.PERMISSION_DENIED
    admin.changePermission(constants.PERMISSION_GRANT, "alice", "teamdb", constants.PERMISSION_R)
    alice = sdk(node, "alice", USER_PASSWORD, database=b"teamdb")   # the change ended her token
    assert alice.currentState().db == "teamdb"
    assert "permission denied" in rpc_error(alice.set, b"x", b"y").details()
    admin.changePermission(constants.PERMISSION_REVOKE, "alice", "teamdb", constants.PERMISSION_R)
    assert rpc_error(alice.currentState).code() == grpc.StatusCode.UNKNOWN   # token ended

    # ChangePermission's refusals carry immudb's own status codes
    grant = constants.PERMISSION_GRANT
    for args, code, text in (
            (("immudb", "teamdb"), grpc.StatusCode.INVALID_ARGUMENT,
             "changing your own permissions is not allowed"),
            (("alice", "nosuchdb"), grpc.StatusCode.INVALID_ARGUMENT, "database does not exist"),
            (("nobody", "teamdb"), grpc.StatusCode.NOT_FOUND, "user nobody not found")):
        error = rpc_error(admin.changePermission, grant, args[0], args[1], constants.PERMISSION_R)
        assert (error.code(), error.details()) == (code, text), args
    error = rpc_error(admin.changePermission, grant, "alice", "teamdb", 3)
    assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT,
                                               "unrecognized permission")

    new_password = "Alice2!pwd"
    alice = sdk(node, "alice", USER_PASSWORD)
    alice.changePassword("alice", new_password, USER_PASSWORD)
    assert rpc_error(sdk, node, "alice", USER_PASSWORD).details() == \
        "invalid user name or password"
    alice = sdk(node, "alice", new_password)

    assert admin.setActiveUser(False, "alice")
    assert not {u.user: u for u in admin.listUsers().userlist.users}[b"alice"].active
    assert "user is not active" in rpc_error(sdk, node, "alice", new_password).details()
    assert admin.setActiveUser(True, "alice")
    sdk(node, "alice", new_password)


def test_what_a_non_admin_is_refused_with_immudbs_texts(node):
    admin = sdk(node)
    admin.createUser("bob", USER_PASSWORD, constants.PERMISSION_R, "defaultdb")
    bob = sdk(node, "bob", USER_PASSWORD)

    admin.createUser("dave", USER_PASSWORD, constants.PERMISSION_R, "defaultdb")
    error = rpc_error(bob.createDatabaseV2, "bobdb", datatypesv2.DatabaseSettingsV2(), False)
    assert error.code() == grpc.StatusCode.UNKNOWN
    assert error.details() == "loggedin user does not have permissions for this operation"
    for call, args in ((bob.updateDatabaseV2, ("defaultdb", datatypesv2.DatabaseSettingsV2(
                            autoload=True))),
                       (bob.unloadDatabase, ("defaultdb",)), (bob.deleteDatabase, ("defaultdb",)),
                       (bob.loadDatabase, ("defaultdb",))):
        error = rpc_error(call, *args)
        assert error.details() == ("the database 'defaultdb' does not exist or you do not have "
                                   "admin permission on this database"), call
    error = rpc_error(bob.createUser, "carol", USER_PASSWORD, constants.PERMISSION_R, "defaultdb")
    assert "admin permission" in error.details()
    error = rpc_error(bob.changePermission, constants.PERMISSION_GRANT, "dave", "defaultdb",
                      constants.PERMISSION_ADMIN)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == "you do not have permission on this database"
    assert rpc_error(bob.setActiveUser, False, "dave").code() == grpc.StatusCode.INTERNAL
    assert {u.user: u for u in admin.listUsers().userlist.users}[b"dave"].active
    # what bob may do: read his database's settings, list what he can read, and himself
    assert bob.getDatabaseSettingsV2().database == "defaultdb"
    assert [d.name for d in bob.databaseListV2().databases] == ["defaultdb"]
    assert [u.user for u in bob.listUsers().userlist.users] == [b"bob"]
    # and nobody without a token
    with grpc.insecure_channel(node.grpc_address) as channel:
        stub = schema_pb2_grpc.ImmuServiceStub(channel)
        anonymous = rpc_error(stub.DatabaseListV2, schema_pb2.DatabaseListRequestV2())
    assert anonymous.details() == "not logged in"


def test_tx_scan_counts_and_the_index_calls(node):
    admin = sdk(node)
    admin.createDatabaseV2("scandb", datatypesv2.DatabaseSettingsV2(), True)
    admin.useDatabase(b"scandb")
    first = admin.set(b"c1", b"1").id
    admin.setAll({b"c2": b"2", b"other": b"3"})
    admin.delete(datatypesv2.DeleteKeysRequest(keys=[b"c1"]))
    last = admin.currentState().txId

    ascending = admin.txScan(first, limit=10)
    assert [t.header.id for t in ascending.txs] == list(range(first, last + 1))
    assert ascending.txs[1].header.nentries == 2
    descending = admin.txScan(last, limit=2, desc=True)
    assert [t.header.id for t in descending.txs] == [last, last - 1]
    error = rpc_error(admin.txScan, first, 1001)
    assert error.details() == ("result size limit exceeded: the specified limit (1001) is "
                               "larger than the maximum allowed one (1000)")

    count = admin._stub.Count(schema_pb2.KeyPrefix(prefix=b"c")).count
    assert count == 1                                 # c1 was deleted: live keys are counted
    assert admin._stub.CountAll(empty_pb2.Empty()).count == 2
    # more keys than one scan page: counted page by page
    for chunk in range(3):
        admin.setAll({f"many{chunk}-{i:04}".encode(): b"v" for i in range(400)})
    assert admin._stub.Count(schema_pb2.KeyPrefix(prefix=b"many")).count == 1200

    assert admin.flushIndex(10.0, True).database == "scandb"
    assert admin.compactIndex()
    admin.createUser("reader", USER_PASSWORD, constants.PERMISSION_R, "scandb")
    reader = sdk(node, "reader", USER_PASSWORD, database=b"scandb")
    assert len(reader.txScan(first, limit=3).txs) == 3      # a reader may scan and count
    assert rpc_error(reader.flushIndex, 0.0, False).details() == "permission denied"
    assert rpc_error(reader.compactIndex).details() == "permission denied"


def test_immudbs_older_database_calls(node):
    """CreateDatabase, CreateDatabaseWith, DatabaseList, UpdateDatabase and GetDatabaseSettings:
    immudb's first API, which its older tools still call."""
    admin = sdk(node)
    admin.createDatabase(b"olddb")
    assert "olddb" in admin.databaseList()
    stub = admin._stub
    stub.CreateDatabaseWith(schema_pb2.DatabaseSettings(databaseName="withdb", maxKeyLen=300))
    stub.UpdateDatabase(schema_pb2.DatabaseSettings(databaseName="withdb", maxKeyLen=300))
    error = rpc_error(stub.UpdateDatabase,
                      schema_pb2.DatabaseSettings(databaseName="withdb", fileSize=1 << 20))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "fileSize" in error.details()
    admin.useDatabase(b"withdb")
    old = stub.GetDatabaseSettings(empty_pb2.Empty())
    assert (old.databaseName, old.maxKeyLen, old.fileSize, old.replica) == \
        ("withdb", 300, 1 << 29, False)


def test_an_unload_that_waited_for_the_lock_across_a_revocation_changes_nothing(tmp_path):
    """As on the native port: a database admin's UnloadDatabase waits for the management lock
    (held by another unload whose index worker is stopped with SIGSTOP); its admin right is
    revoked meanwhile; once it holds the lock it is checked again and unloads nothing."""
    import os
    import signal
    import threading

    from immucore import Client

    from .nodes import index_worker_pid

    with grpc_node(tmp_path) as real, Client(real.host, real.port) as admin:
        admin.login("immudb", "immudb")
        admin.create_database("slow")
        admin.create_database("other")
        admin.create_user("dba", "Dba1!password", "admin", "other")
        worker = index_worker_pid(real, "slow")
        os.kill(worker, signal.SIGSTOP)
        outcome = {}

        def unload(name, user, password):
            try:
                outcome[name] = sdk(real, user, password, name.encode()).unloadDatabase(name)
            except Exception as exc:  # noqa: BLE001 - asserted below
                outcome[name] = exc

        holder = threading.Thread(target=unload, args=("slow", "immudb", "immudb"))
        holder.start()
        time.sleep(1.0)                       # the holder has the lock, closing the worker
        waiter = threading.Thread(target=unload, args=("other", "dba", "Dba1!password"))
        waiter.start()
        time.sleep(1.0)
        try:
            assert holder.is_alive() and waiter.is_alive(), outcome
            admin.revoke("dba", "admin", "other")
        finally:
            os.kill(worker, signal.SIGCONT)
        holder.join(60)
        waiter.join(60)
        assert not isinstance(outcome["slow"], Exception), outcome
        assert isinstance(outcome["other"], grpc.RpcError), outcome
        loaded = {d["name"]: d for d in admin.list_databases()}
        assert loaded["other"]["loaded"] is True
