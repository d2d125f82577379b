"""Issue 5's security list against a real node: names that could reach the file system are
refused before they do, and tokens do not survive a restart."""
from __future__ import annotations

import ipaddress
import os
import socket

import pytest

from immucore.client import Client, ConnectionClosedError
from immucore.errors import IllegalArgumentsError
from immucore.protocol.messages import RemoteError
from immucore.server.node import _is_loopback

from .nodes import running_node

BAD_NAMES = ["..", ".", "/x", "a/b", "a\\b", "a\x00b", "\x00", "", "x" * 129, "Upper", "DB",
             "a b", "a-b", "a.b", "~root", "é", "../systemdb", "defaultdb/../x"]


def _folders(data_dir) -> set:
    return set(os.listdir(data_dir))


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with running_node(tmp_path_factory.mktemp("security")) as node:
        yield node


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_a_bad_database_name_never_reaches_the_file_system(node, name):
    before = _folders(node.dir)
    with Client(node.host, node.port) as admin:
        admin.login("immudb", "immudb")
        for attempt in (lambda: admin.create_database(name),
                        lambda: admin.update_database(name, {"max_key_len": 10}),
                        lambda: admin.load_database(name),
                        lambda: admin.unload_database(name),
                        lambda: admin.delete_database(name),
                        lambda: admin.use_database(name)):
            with pytest.raises((IllegalArgumentsError, RemoteError)):
                attempt()
    assert _folders(node.dir) == before


def test_the_longest_good_name_works(node):
    with Client(node.host, node.port) as admin:
        admin.login("immudb", "immudb")
        admin.create_database("a" * 128)
        assert "a" * 128 in _folders(node.dir)


def test_tokens_do_not_survive_a_restart(tmp_path):
    with running_node(tmp_path) as node:
        with Client(node.host, node.port) as client:
            client.login("immudb", "immudb", detached=True)
            token = client.session_token
            client.set({b"a": b"1"})
        node.restart()
        with Client(node.host, node.port) as client:
            with pytest.raises(RemoteError) as refused:
                client.resume(token)
            assert refused.value.code == "session_not_found"


def _non_loopback_address():
    """This machine's address on its default route, or None (a UDP connect sends nothing)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))          # TEST-NET-1, never reached
            address = probe.getsockname()[0]
    except OSError:
        return None
    return None if ipaddress.ip_address(address).is_loopback else address


def test_protected_mode_refuses_remote_peers_until_the_default_password_changes(tmp_path):
    """Redis's protected mode: listening on every address with the default sysadmin password,
    a peer from another address is refused with a message that says how to change it; once
    the password is changed (from loopback) the same peer logs in."""
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address")
    with running_node(tmp_path, "--address", "0.0.0.0") as node:
        with Client(address, node.port) as remote:
            with pytest.raises(ConnectionClosedError, match="protected mode") as refused:
                remote.login("immudb", "immudb")
        assert "immuadmin user changepassword immudb" in str(refused.value)
        with Client("127.0.0.1", node.port) as local:
            local.login("immudb", "immudb")
            local.change_password("immudb", "immudb", "Changed1!pw")
        with Client(address, node.port) as remote:
            remote.login("immudb", "Changed1!pw")
            assert remote.health()


@pytest.mark.parametrize("peer, loopback", [
    (("127.0.0.1", 1), True), (("127.8.9.10", 1), True), (("::1", 1, 0, 0), True),
    (("::ffff:127.0.0.1", 1, 0, 0), True),           # IPv4 on a dual-stack listener
    (("192.0.2.2", 1), False), (("::ffff:192.0.2.2", 1, 0, 0), False), (("fd00::2", 1, 0, 0), False),
    (("not an address", 1), False), ((), False), (None, False)])
def test_only_loopback_peers_pass_protected_mode(peer, loopback):
    assert _is_loopback(peer) is loopback


def test_protected_mode_covers_every_user_with_a_well_known_password(tmp_path):
    """immudb-tools' follower password is published like immudb's: while an active user holds
    it, remote peers are refused (naming that user); changing it, or deactivating the user,
    opens the node again."""
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address")
    with running_node(tmp_path, "--address", "0.0.0.0") as node:
        with Client("127.0.0.1", node.port) as local:
            local.login("immudb", "immudb")
            local.change_password("immudb", "immudb", "Changed1!pw")
        with Client("127.0.0.1", node.port) as local:
            local.login("immudb", "Changed1!pw")
            local.create_user("follower", "zyQQurat.0", "admin", "defaultdb")
        with Client(address, node.port) as remote:
            with pytest.raises(ConnectionClosedError, match="protected mode") as refused:
                remote.login("immudb", "Changed1!pw")
        assert "follower" in str(refused.value) and "zyQQurat.0" not in str(refused.value)
        with Client("127.0.0.1", node.port) as local:
            local.login("immudb", "Changed1!pw")
            local.set_user_active("follower", False)
        with Client(address, node.port) as remote:
            remote.login("immudb", "Changed1!pw")
        with Client("127.0.0.1", node.port) as local:
            local.login("immudb", "Changed1!pw")
            local.set_user_active("follower", True)
        with Client(address, node.port) as remote:
            with pytest.raises(ConnectionClosedError, match="protected mode"):
                remote.login("immudb", "Changed1!pw")
        node.restart()          # records written before: found again by hashing them
        with Client(address, node.port) as remote:
            with pytest.raises(ConnectionClosedError, match="follower"):
                remote.login("immudb", "Changed1!pw")
        with Client("127.0.0.1", node.port) as local:
            local.login("immudb", "Changed1!pw")
            local.change_password("follower", "", "Other1!pass")
        with Client(address, node.port) as remote:
            remote.login("immudb", "Changed1!pw")
            assert remote.health()


def test_a_management_call_that_waited_for_the_lock_across_a_revocation_changes_nothing(
        tmp_path):
    """A database admin's UNLOAD waits for the node's management lock while another unload
    holds it (its index worker is stopped with SIGSTOP, so closing it takes a while); the
    admin loses its right meanwhile. Once the lock is free the waiting call is checked again
    and refused: the database stays loaded."""
    import signal
    import threading
    import time

    from .nodes import index_worker_pid

    with running_node(tmp_path) as real, Client(real.host, real.port) as admin:
        admin.login("immudb", "immudb")
        admin.create_database("slow")
        admin.create_database("other")
        admin.create_user("dba", "Dba1!password", "admin", "other")
        worker = index_worker_pid(real, "slow")
        os.kill(worker, signal.SIGSTOP)
        outcome = {}

        def unload(name, user, password, database):
            try:
                with Client(real.host, real.port) as client:
                    client.login(user, password, database)
                    outcome[name] = client.unload_database(name)
            except Exception as exc:  # noqa: BLE001 - asserted below
                outcome[name] = exc

        holder = threading.Thread(target=unload, args=("slow", "immudb", "immudb", "defaultdb"))
        holder.start()
        time.sleep(1.0)                       # the holder has the lock, closing the worker
        waiter = threading.Thread(target=unload, args=("other", "dba", "Dba1!password", "other"))
        waiter.start()
        time.sleep(1.0)
        try:
            assert holder.is_alive() and waiter.is_alive(), outcome
            admin.revoke("dba", "admin", "other")
        finally:
            os.kill(worker, signal.SIGCONT)
        holder.join(60)
        waiter.join(60)
        assert outcome["slow"] == {"database": "slow"}
        assert isinstance(outcome["other"], RemoteError), outcome
        assert outcome["other"].code in ("session_not_found", "permission_denied")
        loaded = {d["name"]: d for d in admin.list_databases()}
        assert loaded["other"]["loaded"] is True, loaded["other"]
