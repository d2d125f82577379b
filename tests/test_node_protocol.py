"""The node's protocol edge against a real ``immucore`` process on a loopback port.

Raw-socket tests send what a confused or hostile peer sends (garbage, HTTP, TLS, forged lengths,
requests before login) and check the rule of docs/wire-protocol.md: one error frame when the
connection can still be written, then that connection closes — while a well-behaved client on
another connection keeps working and the node stays up. Permission and session tests go through
``Client``; the pipelining test through ``AsyncClient``.

Tests marked ``xfail(strict=True)`` state what the node should do and currently does not: each
names the bug (file:line) it demonstrates, and starts passing — so fails as XPASS — once fixed.
"""
from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time

import pytest
import xxhash

from immucore.client import AsyncClient, Client, ConnectionClosedError
from immucore.constants import (CONNECTION_IDLE_SECONDS, CONNECTION_INFLIGHT_REQUESTS_MAX,
                                CONNECTION_WRITE_STALL_SECONDS, FRAME_BODY_BYTES_MAX,
                                PREAUTH_FRAME_BODY_BYTES_MAX, PREAUTH_IDLE_SECONDS)
from immucore.errors import IllegalArgumentsError, InvalidRevisionError, KeyNotFoundError
from immucore.protocol.frames import FLAG_ERROR, FrameDecoder, encode_frame
from immucore.protocol.messages import Msg, RemoteError, pack, unpack

from .nodes import index_worker_pid, running_node

ADMIN = ("immudb", "immudb")
READER = ("reader", "Reader1!pw")
WRITER = ("writer", "Writer1!pw")
DBADMIN = ("dbadmin", "DbAdmin1!pw")
NODE_START_SECONDS_MAX = 20.0
NODE_STOP_SECONDS_MAX = 20.0


# --- a node process ------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NodeProcess:
    """``python -m immucore`` on a free loopback port, its output in ``node.log``.

    Ready means *this* process printed its banner for the port: a port that merely accepts
    connections may belong to another test's node that grabbed it first (then ours exits with
    "cannot listen" and we retry on another port)."""

    def __init__(self, folder, *extra_args: str):
        folder.mkdir(parents=True, exist_ok=True)
        self.log_path = folder / "node.log"
        for attempt in range(3):
            self.port = _free_port()
            self._log = open(self.log_path, "wb")
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "immucore", "--dir", str(folder / "data"),
                 "--address", "127.0.0.1", "--port", str(self.port), "--metrics-server=false",
                 *extra_args],
                stdout=self._log, stderr=subprocess.STDOUT)
            if self._wait_ready():
                return
            self._log.close()
        raise RuntimeError(f"node did not start:\n{self.log()}")

    def _wait_ready(self) -> bool:
        banner = f"listening on 127.0.0.1:{self.port},"
        deadline = time.monotonic() + NODE_START_SECONDS_MAX
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if "cannot listen" in self.log():
                    return False                          # port taken: try another
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log()}")
            if banner in self.log():
                return True
            time.sleep(0.05)
        self.proc.kill()
        self.proc.wait()
        raise RuntimeError(f"node did not start in time:\n{self.log()}")

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def client(self, login=ADMIN, **kwargs) -> Client:
        client = Client("127.0.0.1", self.port)
        if login:
            client.login(*login, **kwargs)
        return client

    def stop(self) -> int:
        """SIGTERM, then the exit code (a graceful stop is 0)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(NODE_STOP_SECONDS_MAX)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """The module's node. At the end: a graceful stop (exit code 0) and no traceback logged."""
    proc = NodeProcess(tmp_path_factory.mktemp("node"))
    # Opened now, checked by the last test: a peer that never sends a frame is closed.
    proc.idle_socket = socket.create_connection(("127.0.0.1", proc.port), timeout=5)
    proc.idle_since = time.monotonic()
    yield proc
    proc.idle_socket.close()
    code = proc.stop()
    log = proc.log()
    assert code == 0, f"node exited with {code}:\n{log}"
    assert "Traceback" not in log, log


@pytest.fixture
def scratch_node(tmp_path):
    """A node of its own, for tests that leave it in a state others must not see."""
    nodes = []

    def start(*extra_args):
        nodes.append(NodeProcess(tmp_path / f"n{len(nodes)}", *extra_args))
        return nodes[-1]

    yield start
    for proc in nodes:
        assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def good(node):
    """A well-behaved admin connection used throughout: it must keep working."""
    client = node.client()
    client.set({b"canary": b"alive"})
    yield client
    client.close()


@pytest.fixture(scope="module")
def users(node, good):
    good.create_user(*READER, "read", "defaultdb")
    good.create_user(*WRITER, "readwrite", "defaultdb")
    good.create_user(*DBADMIN, "admin", "defaultdb")
    good.set({b"shared": b"value"})
    return {"reader": READER, "writer": WRITER, "dbadmin": DBADMIN}


def assert_node_serves(node, good):
    assert node.proc.poll() is None, node.log()
    assert good.health()["status"] == "ok"
    assert good.get(b"canary").value == b"alive"


# --- raw sockets ---------------------------------------------------------------------------------

def raw_connection(node) -> socket.socket:
    return socket.create_connection(("127.0.0.1", node.port), timeout=5)


def send_quietly(sock, data: bytes):
    """The node may close while we still send (it refused the first bytes): that is fine."""
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


def read_until_close(sock, timeout: float = 5.0):
    """(frames as (msg_type, flags, request_id, body), closed_by_node) within ``timeout``."""
    decoder = FrameDecoder(FRAME_BODY_BYTES_MAX)
    frames = []
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            data = sock.recv(1 << 16)
            if not data:
                return frames, True
            frames += [(m, f, r, unpack(b) if b else {}) for m, f, r, b in decoder.feed(data)]
    except (socket.timeout, TimeoutError):
        return frames, False
    except ConnectionResetError:
        return frames, True
    return frames, False


def request(sock, msg: Msg, request_id: int, body: dict) -> tuple:
    """Send one request on a raw connection and read its one answer."""
    sock.sendall(encode_frame(int(msg), 0, request_id, pack(body)))
    decoder = FrameDecoder(FRAME_BODY_BYTES_MAX)
    while True:
        data = sock.recv(1 << 16)
        assert data, "node closed the connection"
        for m, f, r, b in decoder.feed(data):
            return m, f, r, unpack(b)


def forge_header(*, version=1, msg_type=1, request_id=0, body_len=0, body=b"") -> bytes:
    head = struct.pack(">4sBBHQIIQ", b"IMC1", version, msg_type, 0, request_id, body_len, 0,
                       xxhash.xxh64_intdigest(body))
    return head + struct.pack(">Q", xxhash.xxh64_intdigest(head))


def tls_client_hello() -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[0] == 0x16 and len(hello) > 40          # a TLS handshake record
    return hello


def postgres_startup() -> bytes:
    params = b"user\0postgres\0database\0postgres\0application_name\0psql\0\0"
    return struct.pack(">II", 8 + len(params), 196608) + params


def corrupted_frame() -> bytes:
    frame = bytearray(encode_frame(int(Msg.HEALTH), 0, 3, pack({})))
    frame[-1] ^= 0x01
    return bytes(frame)


# name -> (bytes sent, error code, expected (msg_type, request_id) of the error frame)
BAD_INPUTS = {
    "garbage": (b"\x00" + random.Random(7).randbytes(255), "bad_magic", (1, 0)),
    "http_request": (b"GET / HTTP/1.1\r\nHost: localhost:3322\r\nUser-Agent: curl/8.5.0\r\n"
                     b"Accept: */*\r\n\r\n", "bad_magic", (1, 0)),
    "tls_client_hello": (None, "bad_magic", (1, 0)),                 # built at run time
    "postgres_startup": (postgres_startup(), "bad_magic", (1, 0)),
    "wrong_version": (forge_header(version=2), "bad_version", (1, 0)),
    "body_checksum": (corrupted_frame(), "bad_checksum", (1, 0)),
    "huge_body_len_before_login": (forge_header(body_len=2**32 - 1), "frame_too_large", (1, 0)),
    "body_len_limit_plus_one_before_login": (
        forge_header(body_len=PREAUTH_FRAME_BODY_BYTES_MAX + 1), "frame_too_large", (1, 0)),
    "20KiB_body_before_login": (
        encode_frame(int(Msg.HEALTH), 0, 5, b"\x00" * (20 << 10)), "frame_too_large", (1, 0)),
    "unknown_message_type": (encode_frame(99, 0, 6, pack({})), "unknown_message", (1, 6)),
    "data_request_before_login": (encode_frame(int(Msg.GET), 0, 7, pack({"key": b"canary"})),
                                  "not_logged_in", (int(Msg.GET), 7)),
    "export_before_login": (encode_frame(int(Msg.EXPORT_TX), 0, 8, pack({"tx_id": 1})),
                            "not_logged_in", (int(Msg.EXPORT_TX), 8)),
    "replicate_before_login": (encode_frame(int(Msg.REPLICATE_TX), 0, 9, pack({"blobs": []})),
                               "not_logged_in", (int(Msg.REPLICATE_TX), 9)),
    "body_is_a_list": (encode_frame(int(Msg.HEALTH), 0, 10, pack([1, 2, 3])), "bad_body",
                       (int(Msg.HEALTH), 10)),
    "body_is_an_int": (encode_frame(int(Msg.LOGIN), 0, 11, pack(5)), "bad_body",
                       (int(Msg.LOGIN), 11)),
    "body_is_a_string": (encode_frame(int(Msg.SERVER_INFO), 0, 12, pack("x")), "bad_body",
                         (int(Msg.SERVER_INFO), 12)),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_gets_one_error_frame_then_the_connection_closes(node, good, name):
    data, code, (msg_type, request_id) = BAD_INPUTS[name]
    if data is None:
        data = tls_client_hello()
    with raw_connection(node) as sock:
        send_quietly(sock, data)
        frames, closed = read_until_close(sock)
    assert closed, f"{name}: connection still open after {frames}"
    assert len(frames) == 1, frames
    got_type, flags, got_id, body = frames[0]
    assert flags & FLAG_ERROR
    assert body["code"] == code, body
    assert isinstance(body["message"], str) and body["message"]
    assert (got_type, got_id) == (msg_type, request_id)
    assert_node_serves(node, good)


def test_requests_before_the_bad_frame_on_other_connections_are_unaffected(node, good):
    """A client mid-pipeline on its own connection does not notice another one failing."""
    with raw_connection(node) as bad, raw_connection(node) as fine:
        assert request(fine, Msg.HEALTH, 1, {})[3]["status"] == "ok"
        send_quietly(bad, b"\xff" * 64)
        assert read_until_close(bad)[1]
        assert request(fine, Msg.SERVER_INFO, 2, {})[3]["protocol"] == 1
    assert_node_serves(node, good)


@pytest.mark.parametrize("cut", [1, 4, 20, 39, 40, 41, 60])
def test_truncated_frame_then_close_leaves_the_node_serving(node, good, cut):
    frame = encode_frame(int(Msg.LOGIN), 0, 1, pack({"user": "immudb", "password": "x" * 40}))
    assert cut < len(frame)
    with raw_connection(node) as sock:
        sock.sendall(frame[:cut])
    assert_node_serves(node, good)


def test_truncated_frame_then_half_close_is_closed_by_the_node(node, good):
    with raw_connection(node) as sock:
        sock.sendall(encode_frame(int(Msg.HEALTH), 0, 1, pack({}))[:30])
        sock.shutdown(socket.SHUT_WR)
        frames, closed = read_until_close(sock)
    assert closed and frames == []
    assert_node_serves(node, good)


def test_preauth_messages_are_served_before_login(node):
    with raw_connection(node) as sock:
        assert request(sock, Msg.HEALTH, 1, {})[3]["status"] == "ok"
        m, flags, r, body = request(sock, Msg.SERVER_INFO, 2, {})
        assert (m, flags, r, body["protocol"]) == (int(Msg.SERVER_INFO), 0, 2, 1)
        # an empty body is an empty map
        sock.sendall(encode_frame(int(Msg.HEALTH), 0, 3, b""))
        assert read_until_close(sock, 0.5)[0][0][3]["status"] == "ok"


def test_bad_login_is_an_error_frame_and_the_connection_stays_open(node, good):
    with raw_connection(node) as sock:
        m, flags, r, body = request(sock, Msg.LOGIN, 1, {"user": "immudb", "password": "wrong"})
        assert flags & FLAG_ERROR and body["code"] == "invalid_credentials"
        m, flags, r, body = request(sock, Msg.LOGIN, 2, {"user": 5, "password": "x"})
        assert flags & FLAG_ERROR and body["code"] == "illegal_arguments"
        assert request(sock, Msg.HEALTH, 3, {})[3]["status"] == "ok"


def test_login_must_be_answered_before_other_requests_are_sent(node, good):
    """LOGIN takes effect when it is served, not when it is read: a GET pipelined behind it
    in the same write is refused as not logged in (docs/wire-protocol.md, Sessions)."""
    with raw_connection(node) as sock:
        sock.sendall(encode_frame(int(Msg.LOGIN), 0, 1, pack({"user": "immudb",
                                                              "password": "immudb"}))
                     + encode_frame(int(Msg.GET), 0, 2, pack({"key": b"canary"})))
        frames, closed = read_until_close(sock)
    assert closed
    assert [(f[2], f[3].get("code")) for f in frames if f[1] & FLAG_ERROR] == [
        (2, "not_logged_in")]
    assert_node_serves(node, good)


def test_frames_after_login_may_exceed_the_preauth_limit(node, good):
    value = os.urandom(PREAUTH_FRAME_BODY_BYTES_MAX * 2)
    with raw_connection(node) as sock:
        assert not request(sock, Msg.LOGIN, 1, {"user": "immudb", "password": "immudb"})[1]
        m, flags, r, body = request(sock, Msg.SET, 2, {"kvs": [[b"big-after-login", value]]})
        assert not flags & FLAG_ERROR, body
        # after LOGOUT the pre-auth limit applies again
        assert not request(sock, Msg.LOGOUT, 3, {})[1]
        send_quietly(sock, encode_frame(int(Msg.HEALTH), 0, 4, value))
        frames, closed = read_until_close(sock)
    assert closed and frames[0][3]["code"] == "frame_too_large"
    assert good.get(b"big-after-login").value == value


def test_after_logout_data_requests_are_refused(node, good):
    with raw_connection(node) as sock:
        request(sock, Msg.LOGIN, 1, {"user": "immudb", "password": "immudb"})
        request(sock, Msg.LOGOUT, 2, {})
        sock.sendall(encode_frame(int(Msg.GET), 0, 3, pack({"key": b"canary"})))
        frames, closed = read_until_close(sock)
    assert closed and frames[0][2:] == (3, {"code": "not_logged_in",
                                            "message": "not logged in"})


def test_short_foreign_greeting_is_refused_promptly(node, good):
    with raw_connection(node) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")             # 18 bytes
        frames, closed = read_until_close(sock, timeout=1.5)
    assert closed and frames and frames[0][3]["code"] == "bad_magic"


# --- permissions and sessions, through the Client ---------------------------------------------

def test_read_user_can_get_but_not_set_nor_export(node, users):
    with node.client(users["reader"]) as reader:
        assert reader.get(b"shared").value == b"value"
        assert reader.scan(prefix=b"shar")[0].key == b"shared"
        assert reader.current_state().tx_id >= 1
        with pytest.raises(RemoteError) as info:
            reader.set({b"k": b"v"})
        assert info.value.code == "permission_denied"
        with pytest.raises(RemoteError) as info:
            reader.delete([b"shared"])
        assert info.value.code == "permission_denied"
        with pytest.raises(RemoteError) as info:
            reader.export_tx(1)
        assert info.value.code == "permission_denied"
        with pytest.raises(RemoteError) as info:
            reader.export_txs(1, 1)
        assert info.value.code == "permission_denied"
        with pytest.raises(RemoteError) as info:
            reader.create_user("someone", "Someone1!pw", "read", "defaultdb")
        assert info.value.code == "permission_denied"
        with pytest.raises(RemoteError) as info:
            reader.create_database("readers_db")
        assert info.value.code == "permission_denied"
        assert reader.get(b"shared").value == b"value"       # refusals keep the session


def test_readwrite_user_can_set_but_not_export(node, users):
    with node.client(users["writer"]) as writer:
        header = writer.set({b"written-by-writer": b"w"})
        assert writer.get(b"written-by-writer").tx == header.id
        with pytest.raises(RemoteError) as info:
            writer.export_tx(header.id)
        assert info.value.code == "permission_denied"
        with pytest.raises(RemoteError) as info:
            writer.replicate_txs([])
        assert info.value.code == "permission_denied"
        with pytest.raises(RemoteError) as info:
            writer.database_settings("defaultdb")
        assert info.value.code == "permission_denied"


def test_admin_of_a_database_can_export_it_but_not_create_databases(node, users):
    with node.client(users["dbadmin"]) as dbadmin:
        header = dbadmin.set({b"by-dbadmin": b"a"})
        assert len(dbadmin.export_tx(header.id)) > 0
        assert dbadmin.database_settings("defaultdb")["database"] == "defaultdb"
        with pytest.raises(RemoteError) as info:
            dbadmin.create_database("dbadmin_db")
        assert info.value.code == "permission_denied"


def test_a_long_poll_longer_than_the_clients_timeout_is_answered_not_timed_out(node):
    """EXPORT_TXS with wait_ms is answered up to wait_ms later by design: the client must not
    give it up after its own timeout (a 30 s client on a 30 s poll always timed out)."""
    with node.client() as admin:
        admin.create_database("pollingdb")
    with Client("127.0.0.1", node.port, timeout=1.0) as client:
        client.login(*ADMIN, database="pollingdb")
        started = time.monotonic()
        assert client.export_txs(1, 10, wait_ms=2500, with_state=True) == ([], 0)
        assert time.monotonic() - started >= 2.0            # the node did hold it


def test_connection_session_id_is_not_a_bearer_token(node, users):
    with node.client(users["reader"]) as reader:
        token = reader.session_token
        assert reader.get(b"shared").value == b"value"
        # a connection-bound session's id is not accepted as a token on another connection
        with node.client(login=None) as other:
            with pytest.raises(RemoteError) as info:
                other.resume(token)
            assert info.value.code == "session_not_found"


def test_reads_at_a_revision_the_key_lacks_are_invalid_revision(node, good):
    """immudb's revision errors over the wire, as their own code and class, for GET and
    VERIFIABLE_GET; a key with no version at all stays key_not_found."""
    good.set({b"revs": b"1"})
    good.set({b"revs": b"2"})
    assert good.get(b"revs", at_revision=-1).value == b"1"
    for revision in (3, -2):
        with pytest.raises(InvalidRevisionError, match="^invalid key revision number$") as info:
            good.get(b"revs", at_revision=revision)
        assert info.value.code == "invalid_revision"
        with pytest.raises(InvalidRevisionError):
            good.verified_get(b"revs", at_revision=revision)
    with pytest.raises(KeyNotFoundError):
        good.get(b"no-such-key", at_revision=1)


def test_token_refused_after_logout(node, users):
    with node.client(users["reader"], detached=True) as first:
        token = first.session_token
        with node.client(login=None) as second:
            assert second.resume(token)["user"] == "reader"
            assert second.get(b"shared").value == b"value"
        first.logout()
        with pytest.raises(RemoteError) as info:
            first.get(b"shared")
        assert info.value.code == "not_logged_in"
    with node.client(login=None) as third:
        with pytest.raises(RemoteError) as info:
            third.resume(token)
        assert info.value.code == "session_not_found"


def test_detached_token_outlives_its_connection(node, users):
    with node.client(users["reader"], detached=True) as first:
        token = first.session_token
    with node.client(login=None) as later:
        assert later.resume(token)["database"] == "defaultdb"
        assert later.get(b"shared").value == b"value"
        later.logout()


def test_tokens_refused_after_password_change(node, good):
    good.create_user("changer", "Changer1!pw", "read", "defaultdb")
    detached = node.client(("changer", "Changer1!pw"), detached=True)
    bound = node.client(("changer", "Changer1!pw"))
    token = detached.session_token
    try:
        good.change_password("changer", "", "Changer2!pw")
        with pytest.raises(RemoteError) as info:
            bound.get(b"shared")
        assert info.value.code == "session_not_found"
        with pytest.raises(RemoteError) as info:
            detached.get(b"shared")
        assert info.value.code == "session_not_found"
    finally:
        detached.close()
        bound.close()
    with node.client(login=None) as other:
        with pytest.raises(RemoteError) as info:
            other.resume(token)
        assert info.value.code == "session_not_found"
        with pytest.raises(RemoteError) as info:
            other.login("changer", "Changer1!pw")
        assert info.value.code == "invalid_credentials"
        other.login("changer", "Changer2!pw")
        assert other.get(b"shared").value == b"value"


def test_own_password_change_ends_the_session(node, good):
    good.create_user("selfchanger", "Selfch1!pw", "read", "defaultdb")
    with node.client(("selfchanger", "Selfch1!pw")) as user:
        user.change_password("selfchanger", "Selfch1!pw", "Selfch2!pw")
        with pytest.raises(RemoteError) as info:
            user.get(b"shared")
        assert info.value.code == "not_logged_in"


def test_deactivated_user_sessions_end(node, good):
    good.create_user("leaver", "Leaver1!pw", "read", "defaultdb")
    with node.client(("leaver", "Leaver1!pw")) as leaver:
        good.set_user_active("leaver", False)
        with pytest.raises(RemoteError) as info:
            leaver.get(b"shared")
        assert info.value.code == "session_not_found"
    with node.client(login=None) as again:
        with pytest.raises(RemoteError) as info:
            again.login("leaver", "Leaver1!pw")
        assert info.value.code == "user_not_active"


def test_revoked_permission_takes_effect_at_once(node, good):
    good.create_user("revokee", "Revokee1!pw", "readwrite", "defaultdb")
    with node.client(("revokee", "Revokee1!pw")) as revokee:
        revokee.set({b"by-revokee": b"1"})
        good.revoke("revokee", "readwrite", "defaultdb")
        with pytest.raises(RemoteError) as info:
            revokee.set({b"by-revokee": b"2"})
        assert info.value.code in ("session_not_found", "permission_denied")
        with pytest.raises(RemoteError) as info:
            revokee.get(b"by-revokee")
        assert info.value.code in ("not_logged_in", "session_not_found", "permission_denied")
    with node.client(login=None) as again:
        with pytest.raises(RemoteError) as info:
            again.login("revokee", "Revokee1!pw")
        assert info.value.code == "no_database_permission"
    assert good.get(b"by-revokee").value == b"1"


def test_reads_that_waited_for_the_index_across_a_change_of_their_user_answer_the_error(
        tmp_path):
    """GET, HISTORY, SCAN and VERIFIABLE_GET of a reader wait for the key index (its worker
    is stopped with SIGSTOP); the reader is deactivated meanwhile. Once the index catches up,
    each answers that the session ended, never the data."""
    with running_node(tmp_path) as real, Client(real.host, real.port) as admin:
        admin.login(*ADMIN)
        admin.create_database("orders")
        admin.create_user(*READER, "read", "orders")
        admin.use_database("orders")
        admin.set({b"k": b"before"})
        worker = index_worker_pid(real, "orders")
        os.kill(worker, signal.SIGSTOP)
        try:
            admin.set({b"k": b"after the change"})            # not indexed while stopped
            reads = {"get": lambda c: c.get(b"k"), "history": lambda c: c.history(b"k"),
                     "scan": lambda c: c.scan(prefix=b"k"),
                     "verifiable_get": lambda c: c.verified_get(b"k")}
            results = {}

            def read(kind):
                try:
                    with Client(real.host, real.port) as client:
                        client.login(*READER, "orders")
                        results[kind] = reads[kind](client)
                except Exception as exc:  # noqa: BLE001 - asserted below
                    results[kind] = exc

            threads = [threading.Thread(target=read, args=(kind,)) for kind in reads]
            for thread in threads:
                thread.start()
            time.sleep(1.0)
            assert all(t.is_alive() for t in threads), results       # waiting for the index
            admin.set_user_active(READER[0], False)
        finally:
            os.kill(worker, signal.SIGCONT)
        for thread in threads:
            thread.join(20)
        for kind in reads:
            assert getattr(results.get(kind), "code", None) == "session_not_found", \
                (kind, results.get(kind))


def test_sessions_are_scoped_to_their_database(node, good, users):
    good.create_database("scoped", if_not_exists=True)
    good.create_user("scoper", "Scoper1!pw", "readwrite", "scoped")
    with node.client(login=None) as scoper:
        with pytest.raises(RemoteError) as info:
            scoper.login("scoper", "Scoper1!pw")                       # defaultdb
        assert info.value.code == "no_database_permission"
        assert scoper.login("scoper", "Scoper1!pw", "scoped")["database"] == "scoped"
        scoper.set({b"only-in-scoped": b"s"})
        assert scoper.get(b"only-in-scoped").value == b"s"
        with pytest.raises(KeyNotFoundError):
            scoper.get(b"canary")                                       # defaultdb's key
        with pytest.raises(RemoteError) as info:
            scoper.use_database("defaultdb")
        assert info.value.code == "no_database_permission"
        with pytest.raises(RemoteError) as info:
            scoper.use_database("systemdb")
        assert info.value.code == "no_database_permission"
        assert scoper.get(b"only-in-scoped").value == b"s"             # still on scoped
    with pytest.raises(KeyNotFoundError):
        good.get(b"only-in-scoped")                                     # admin on defaultdb
    with node.client(users["reader"]) as reader:
        with pytest.raises(RemoteError) as info:
            reader.use_database("scoped")
        assert info.value.code == "no_database_permission"
        with pytest.raises(RemoteError) as info:
            reader.login("reader", READER[1], "scoped")
        assert info.value.code == "no_database_permission"
    with node.client() as admin:
        admin.use_database("scoped")
        assert admin.get(b"only-in-scoped").value == b"s"
        admin.use_database("systemdb")
        with pytest.raises(RemoteError) as info:
            admin.set({b"x": b"y"})                     # nobody writes systemdb directly
        assert info.value.code == "permission_denied"


# --- pipelining ---------------------------------------------------------------------------------

def test_1000_concurrent_gets_on_one_connection(node, good):
    kvs = {f"pipe-{i:04d}".encode(): f"value-{i}".encode() * (1 + i % 7) for i in range(1000)}
    good.set(kvs)

    async def run():
        async with AsyncClient("127.0.0.1", node.port) as client:
            await client.login(*ADMIN)
            keys = list(kvs)
            random.Random(3).shuffle(keys)
            entries = await asyncio.gather(*(client.get(k) for k in keys))
            return keys, entries

    keys, entries = asyncio.run(run())
    assert len(entries) == 1000 > CONNECTION_INFLIGHT_REQUESTS_MAX
    for key, entry in zip(keys, entries):
        assert (entry.key, entry.value) == (key, kvs[key])


def test_get_many_answers_each_key_in_order_like_the_embedded_api(node, good):
    good.set({b"many-a": b"1", b"many-b": b"2"})
    good.delete([b"many-b"])
    keys = [b"many-a", b"many-missing", b"many-b"] + [b"many-a"] * 100
    results = good.get_many(keys)
    assert len(results) == len(keys)
    assert results[0].value == b"1" and all(r.value == b"1" for r in results[3:])
    assert isinstance(results[1], KeyNotFoundError) and isinstance(results[2], KeyNotFoundError)
    with node.client(login=None) as anonymous:
        with pytest.raises(RemoteError, match="not logged in"):
            anonymous.get_many([b"many-a"])


def test_pipelined_raw_requests_are_answered_by_request_id(node):
    with raw_connection(node) as sock:
        request(sock, Msg.LOGIN, 1, {"user": "immudb", "password": "immudb"})
        ids = list(range(1000, 1300))
        sock.sendall(b"".join(encode_frame(int(Msg.GET), 0, i, pack({"key": b"canary"}))
                              for i in ids))
        decoder, answers = FrameDecoder(FRAME_BODY_BYTES_MAX), {}
        while len(answers) < len(ids):
            data = sock.recv(1 << 16)
            assert data
            for m, flags, r, body in decoder.feed(data):
                assert m == int(Msg.GET) and not flags & FLAG_ERROR, unpack(body)
                answers[r] = unpack(body)["entry"]["value"]
    assert sorted(answers) == ids and set(answers.values()) == {b"alive"}


# --- known bugs (each xfail names it) -----------------------------------------------------------

def test_undecodable_body_is_bad_body_and_closes(scratch_node):
    node = scratch_node()
    with raw_connection(node) as sock:
        sock.sendall(encode_frame(int(Msg.HEALTH), 0, 1, b"\xc1"))
        frames, closed = read_until_close(sock, timeout=1.5)
    assert frames and frames[0][3]["code"] == "bad_body"
    assert closed
    assert "Traceback" not in node.log()


def test_login_twice_on_one_connection_does_not_leak_a_session(scratch_node):
    node = scratch_node("--max-sessions", "2")
    with raw_connection(node) as sock:
        for request_id in (1, 2):
            m, flags, r, body = request(sock, Msg.LOGIN, request_id,
                                        {"user": "immudb", "password": "immudb"})
            assert not flags & FLAG_ERROR, body
        with node.client() as other:        # the second session: max-sessions is 2
            assert other.session_token


def test_closing_a_connection_whose_session_ended_elsewhere_is_clean(scratch_node):
    node = scratch_node()
    with node.client() as admin:
        admin.create_user("victim", "Victim1!pw", "read", "defaultdb")
        victim = node.client(("victim", "Victim1!pw"))
        admin.change_password("victim", "", "Victim2!pw")
        victim.close()                      # no request in between
        time.sleep(0.5)
        assert admin.health()["status"] == "ok"
    assert "Traceback" not in node.log(), node.log()


def test_response_over_the_frame_limit_is_refused_cleanly(node, good):
    value_size = 22 << 20                     # 3 versions: 66 MiB > FRAME_BODY_BYTES_MAX
    for i in range(3):
        good.set({b"big-history": bytes([i]) * value_size})
    try:
        with pytest.raises(Exception) as info:
            good.history(b"big-history")
        assert not isinstance(info.value, ConnectionClosedError), info.value
    finally:
        good.login(*ADMIN)                     # the fixture's client must stay usable
        good.delete([b"big-history"])
    assert good.get(b"canary").value == b"alive"


# --- connection bounds, on the Connection class itself -----------------------------------------

class _StubNode:
    def __init__(self):
        self.connections = set()
        self.logged_in_connections = 0

    def refuse_connection(self, peer):
        return None


class _StubTransport:
    def __init__(self):
        self.paused = self.closed = self.aborted = False
        self.written = []
        self.buffered = 0           # what get_write_buffer_size() says is still unsent

    def get_extra_info(self, name):
        return ("127.0.0.1", 1) if name == "peername" else None

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def pause_reading(self):
        self.paused = True

    def resume_reading(self):
        self.paused = False

    def write(self, data):
        self.written.append(data)

    def writelines(self, chunks):
        self.written.extend(chunks)

    def is_closing(self):
        return self.closed

    def get_write_buffer_size(self):
        return self.buffered

    def close(self):
        self.closed = True

    def abort(self):
        self.closed = self.aborted = True


def _logged_in_connection(dispatch):
    """A Connection serving ``dispatch`` on a stub transport, past login."""
    from immucore.server.connection import Connection
    transport = _StubTransport()
    conn = Connection(_StubNode(), dispatch)
    conn.connection_made(transport)
    conn.logged_in("session", False)
    return conn, transport


def _numbered_requests(msg, numbers) -> bytes:
    """One frame per number n, request id n and body ``{"n": n}``, as one read."""
    return b"".join(encode_frame(int(msg), 0, n, pack({"n": n})) for n in numbers)


def _answers_sent(transport) -> list:
    """``(request_id, flags, body)`` of every frame written to ``transport``, in order."""
    decoder = FrameDecoder(FRAME_BODY_BYTES_MAX)
    return [(r, f, unpack(b)) for w in transport.written for _, f, r, b in decoder.feed(w)]


class _GeneralPathOnly:
    """The Dispatcher without ``plain_gets``: every GET served on its own, as before runs."""

    def __init__(self, dispatcher):
        self._dispatcher = dispatcher

    def __call__(self, conn, msg, body):
        return self._dispatcher(conn, msg, body)


def _serve_gets_in_process(path, setup, bodies, before_burst=None, *, runs=True,
                           in_flight_already=0):
    """A real in-process Node and Dispatcher behind a stub transport: ``setup(db)`` writes, then
    one read carrying a GET per body (request ids 1..n) arrives. ``runs=False`` serves it with
    the general path only (the reference). Returns the answers by request id as ``(flags,
    body)``, the database's read-request count, whether the connection was closed (before the
    node's shutdown closes it anyway), how many runs ``plain_gets`` served, and the most
    requests in flight at once."""
    from immucore.server.connection import Connection
    from immucore.server.handlers import Dispatcher
    from immucore.server.node import Node, NodeOptions

    async def run():
        node = Node(NodeOptions(dir=str(path), port=0, metrics_server=False))
        try:
            db = node.database("defaultdb")
            setup(db)
            for _ in range(500):
                if db.index_covers(0):
                    break
                await asyncio.sleep(0.01)
            dispatcher, seen = Dispatcher(node), {"runs": 0, "in_flight": 0}
            plain_gets = dispatcher.plain_gets

            def counting_plain_gets(conn, run):
                seen["runs"] += 1
                return plain_gets(conn, run)

            dispatcher.plain_gets = counting_plain_gets
            conn = Connection(node, dispatcher if runs else _GeneralPathOnly(dispatcher))
            transport = _StubTransport()
            conn.connection_made(transport)
            session = node.sessions.open(node.users.get_user("immudb"), "defaultdb")
            conn.logged_in(session.id, False)
            conn._inflight += in_flight_already     # requests of an earlier read still served
            serve_now = conn._serve_now

            def watched_serve_now(*args):
                serve_now(*args)
                seen["in_flight"] = max(seen["in_flight"], conn._inflight)

            conn._serve_now = watched_serve_now
            if before_burst is not None:
                before_burst(node, db, session)
            counted = node.request_counts.get(("defaultdb", "read"), 0)
            conn.data_received(b"".join(encode_frame(int(Msg.GET), 0, n, pack(body))
                                        for n, body in enumerate(bodies, 1)))
            for _ in range(50):
                await asyncio.sleep(0)
            conn._inflight -= in_flight_already     # they finish: the rest is served
            if conn._backlog:
                conn._dispatch_backlog()
            for _ in range(500):          # the general path may go through a task or a thread
                if transport.closed or len(_answers_sent(transport)) >= len(bodies):
                    break
                await asyncio.sleep(0.01)
            if conn._idle_handle:
                conn._idle_handle.cancel()
            answers = {r: (f, body) for r, f, body in _answers_sent(transport)}
            return (answers, node.request_counts.get(("defaultdb", "read"), 0) - counted,
                    transport.closed, seen["runs"], seen["in_flight"])
        finally:
            await node.close()

    return asyncio.run(run())


def _both_paths(tmp_path, setup, bodies, before_burst=None, **options):
    """The same burst served with runs and with the general path only, on two equal nodes."""
    with_runs = _serve_gets_in_process(tmp_path / "runs", setup, bodies, before_burst, **options)
    alone = _serve_gets_in_process(tmp_path / "alone", setup, bodies, before_burst,
                                   runs=False, **options)
    return with_runs, alone


def test_a_burst_of_gets_is_answered_each_as_its_own_get(tmp_path):
    """Plain GETs of one read are served as runs (one session check, one snapshot, answers
    encoded in C); a missing, deleted or expired key, an entry with metadata, a big value, a
    GET with more than a key and one whose key is not bytes are each answered exactly as the
    general path answers them alone, across more than one run, and counted once each."""
    from immucore.types import KVMetadata
    future, past = int(time.time()) + 3600, int(time.time()) - 5
    big = b"B" * (1536 << 10)       # over the inline answer limit: the general encoder

    def setup(db):
        db.set({b"a": b"1", b"b": b"2"})
        db.set({b"a": b"3", b"big": big})
        db.set({b"gone": b"x"})
        db.delete([b"gone"])
        db.set({b"old": b"y"}, metadata=KVMetadata(expires_at=past))
        db.set({b"fresh": b"z"}, metadata=KVMetadata(expires_at=future))

    shapes = [{"key": b"a"}, {"key": b"missing"}, {"key": b"b"}, {"key": b"gone"},
              {"key": b"old"}, {"key": b"fresh"}, {"key": b"big"}, {"key": b"a", "at_tx": 1},
              {"key": "text"}, {"key": b"a", "at_revision": 1}]
    bodies = [shapes[n % len(shapes)] for n in range(75)]
    (answers, counted, closed, runs, _), (alone, alone_counted, _, _, _) = _both_paths(
        tmp_path, setup, bodies)
    assert runs == 3                               # 75 GETs: runs of 32, 32 and 11
    assert sorted(answers) == list(range(1, 76)) and not closed
    assert answers == alone
    assert counted == alone_counted == 75
    assert answers[1][1]["entry"]["value"] == b"3" and answers[7][1]["entry"]["value"] == big
    assert answers[6][1]["entry"]["metadata"]["expires_at"] == future
    assert answers[2][1]["code"] == "key_not_found" and answers[4][1]["code"] == "key_not_found"
    assert answers[9][1]["code"] == "illegal_arguments"


def test_a_burst_of_gets_after_its_session_ended_is_answered_as_before(tmp_path):
    """The session ended elsewhere before the burst: its first GET gets the session's error,
    the next one finds the connection logged out (not_logged_in), and the connection closes
    — frame for frame as when every GET was served alone."""
    def end_session(node, db, session):
        node.close_session(session.id, detached=False)

    (answers, _, closed, _, _), (alone, _, alone_closed, _, _) = _both_paths(
        tmp_path, lambda db: db.set({b"a": b"1"}), [{"key": b"a"}] * 5, end_session)
    assert answers == alone and closed and alone_closed
    assert answers[1][1]["code"] == "session_not_found"
    assert answers[2][1]["code"] == "not_logged_in" and set(answers) == {1, 2}


def test_a_burst_of_gets_while_the_index_is_behind_is_served_the_general_way(tmp_path):
    """When the index does not cover the last commit, no GET is answered from the run: each
    goes the general way, which waits for the index on a read thread; counted once each."""
    def index_behind(node, db, session):
        db.index_covers = lambda since_tx=0: False

    answers, counted, _, runs, _ = _serve_gets_in_process(
        tmp_path, lambda db: db.set({b"k%d" % n: b"v%d" % n for n in range(40)}),
        [{"key": b"k%d" % n} for n in range(40)], index_behind)
    assert runs == 2 and counted == 40
    assert [answers[n + 1][1]["entry"]["value"] for n in range(40)] == [
        b"v%d" % n for n in range(40)]


def test_gets_a_run_passes_on_never_exceed_the_in_flight_limit(tmp_path):
    """GETs a run cannot answer may each need a task: with the connection near its in-flight
    limit, the run serves only up to the limit and leaves the rest in the backlog, served once
    earlier requests finish."""
    def index_behind(node, db, session):
        db.index_covers = lambda since_tx=0: False

    already = CONNECTION_INFLIGHT_REQUESTS_MAX - 4
    answers, counted, _, _, most = _serve_gets_in_process(
        tmp_path, lambda db: db.set({b"k%d" % n: b"v%d" % n for n in range(40)}),
        [{"key": b"k%d" % n} for n in range(40)], index_behind, in_flight_already=already)
    assert most == CONNECTION_INFLIGHT_REQUESTS_MAX
    assert sorted(answers) == list(range(1, 41)) and counted == 40


def test_a_run_whose_read_would_block_is_served_the_general_way(tmp_path):
    """A run's snapshot read that would block (a resized map, an index that fell behind
    meanwhile) passes the whole run to the general path: every GET answered, counted once."""
    from immucore.store.env import BurstWouldBlock

    def blocked_once(node, db, session):
        latest_rows = db.latest_rows

        def refusing(keys):
            db.latest_rows = latest_rows
            raise BurstWouldBlock()

        db.latest_rows = refusing

    (answers, counted, _, _, _), (alone, alone_counted, _, _, _) = _both_paths(
        tmp_path, lambda db: db.set({b"k%d" % n: b"v%d" % n for n in range(10)}),
        [{"key": b"k%d" % n} for n in range(10)], blocked_once)
    assert answers == alone and sorted(answers) == list(range(1, 11))
    # (alone, the GET served again outside its burst is counted twice: its handler runs twice)
    assert counted == 10 <= alone_counted


def test_a_key_whose_read_fails_unexpectedly_fails_alone(tmp_path, monkeypatch):
    """A read error that is not one of ours (here struct.error from reading one key's record)
    is that GET's answer (internal, logged), not its neighbours', exactly as alone."""
    import struct
    from immucore import codec
    real = codec.record_entry_at

    def failing_for_badkey(record, index, offset):
        found = real(record, index, offset)
        if found[0] == b"\x00badkey":
            raise struct.error("cut record")
        return found

    monkeypatch.setattr(codec, "record_entry_at", failing_for_badkey)
    bodies = [{"key": b"a"}, {"key": b"badkey"}, {"key": b"c"}]
    (answers, _, closed, runs, _), (alone, _, _, _, _) = _both_paths(
        tmp_path, lambda db: db.set({b"a": b"1", b"badkey": b"2", b"c": b"3"}), bodies)
    assert runs == 1 and answers == alone and not closed
    assert answers[1][1]["entry"]["value"] == b"1" and answers[3][1]["entry"]["value"] == b"3"
    assert answers[2][0] & FLAG_ERROR and answers[2][1]["code"] == "internal"


def test_a_run_for_a_closing_connection_writes_nothing(tmp_path):
    """Answers encoded in C are dropped, like any other, once the transport is closing."""
    def closing(node, db, session):
        for conn in node.connections:
            conn.transport.closed = True

    answers, _, _, runs, _ = _serve_gets_in_process(
        tmp_path, lambda db: db.set({b"a": b"1"}), [{"key": b"a"}] * 40, closing)
    assert runs == 2 and answers == {}


def test_a_read_that_would_block_in_a_burst_is_served_again_outside_it():
    """A handler whose read would have to wait while the burst holds guards raises
    BurstWouldBlock; the connection serves that request again in a task, outside the burst, and
    the other requests of the burst are answered as usual."""
    from immucore.store import env as env_module

    async def run():
        calls = []

        async def dispatch(conn, msg, body):
            in_burst = getattr(env_module._burst, "txns", None) is not None
            calls.append((body["n"], in_burst))
            if body["n"] == 2 and in_burst:
                raise env_module.BurstWouldBlock()
            return {"n": body["n"]}

        conn, transport = _logged_in_connection(dispatch)
        conn.data_received(_numbered_requests(Msg.GET, (1, 2, 3)))
        for _ in range(5):
            await asyncio.sleep(0)
        conn._idle_handle.cancel()
        answers = {r: (f, body) for r, f, body in _answers_sent(transport)}
        return calls, answers, conn._inflight

    calls, answers, inflight = asyncio.run(run())
    assert calls == [(1, True), (2, True), (3, True), (2, False)]
    assert answers == {1: (0, {"n": 1}), 2: (0, {"n": 2}), 3: (0, {"n": 3})}
    assert inflight == 0


def test_a_long_burst_sends_its_first_answers_before_its_turn_ends():
    """A long pipelined burst's answers leave every CONNECTION_FLUSH_ANSWERS, in request order,
    not all at the end of the loop turn: the client works on the first ones meanwhile."""
    from immucore.constants import CONNECTION_FLUSH_ANSWERS
    count = 2 * CONNECTION_FLUSH_ANSWERS + 5

    async def run():
        async def dispatch(conn, msg, body):
            return {"n": body["n"]}

        conn, transport = _logged_in_connection(dispatch)
        conn.data_received(_numbered_requests(Msg.GET, range(1, count + 1)))
        sent_within_the_turn = len(transport.written)
        await asyncio.sleep(0)
        conn._idle_handle.cancel()
        order = [r for r, _, _ in _answers_sent(transport)]
        return sent_within_the_turn, order

    sent_within_the_turn, order = asyncio.run(run())
    assert sent_within_the_turn == 2 * CONNECTION_FLUSH_ANSWERS
    assert order == list(range(1, count + 1))


def test_answers_of_one_turn_leave_in_one_write_per_connection():
    """Answers given in one loop turn to several connections are written at its end by one
    loop callback, one write per connection carrying all of its answers; a connection whose
    transport fails to write is closed and does not keep the others' answers back."""
    from immucore.server.connection import Connection, LaterAnswer

    class _CountingTransport(_StubTransport):
        def __init__(self, broken=False):
            super().__init__()
            self.broken, self.writes = broken, 0

        def writelines(self, chunks):
            if self.broken:
                raise OSError("broken transport")
            self.writes += 1
            super().writelines(chunks)

    async def run():
        answers = {}

        def dispatch(conn, msg, body):
            answers[body["n"]] = LaterAnswer()
            return answers[body["n"]]

        transports = [_CountingTransport(broken=(index == 1)) for index in range(4)]
        conns = []
        for index, transport in enumerate(transports):
            conn = Connection(_StubNode(), dispatch)
            conn.connection_made(transport)
            conn.logged_in("session", False)
            conn.data_received(_numbered_requests(Msg.SET, (10 * index + 1, 10 * index + 2)))
            conns.append(conn)
        await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        scheduled, call_soon = [], loop.call_soon
        loop.call_soon = lambda callback, *args, **kwargs: (
            scheduled.append(callback), call_soon(callback, *args, **kwargs))[1]
        for n in sorted(answers):
            answers[n].give({"n": n})
        loop.call_soon = call_soon
        written_at_once = sum(t.writes for t in transports)
        for _ in range(2):
            await asyncio.sleep(0)
        for conn in conns:
            conn._idle_handle.cancel()
        return len(scheduled), written_at_once, transports[1].closed, [
            (t.writes, [r for r, _, _ in _answers_sent(t)]) for t in transports if not t.broken]

    callbacks, written_at_once, broken_closed, writes = asyncio.run(run())
    assert callbacks == 1                         # one for the four connections
    assert written_at_once == 0                   # at the end of the turn, not per answer
    assert writes == [(1, [1, 2]), (1, [21, 22]), (1, [31, 32])]
    assert broken_closed


def test_a_lone_request_is_served_without_a_read_burst(monkeypatch):
    """A read burst (shared read transactions) is opened only when more than one request
    waits: a single request has nothing to share it with."""
    from immucore.server import connection as connection_module
    bursts = []

    class _CountingBurst:
        def __enter__(self):
            bursts.append(1)

        def __exit__(self, *exc_info):
            return False

    monkeypatch.setattr(connection_module, "ReadBurst", _CountingBurst)

    async def run():
        async def dispatch(conn, msg, body):
            return {"n": body["n"]}

        conn, transport = _logged_in_connection(dispatch)
        conn.data_received(_numbered_requests(Msg.GET, (1,)))
        lone = len(bursts)
        conn.data_received(_numbered_requests(Msg.GET, (2, 3)))
        await asyncio.sleep(0)
        conn._idle_handle.cancel()
        return lone, len(bursts), [r for r, _, _ in _answers_sent(transport)]

    lone, total, answered = asyncio.run(run())
    assert (lone, total, answered) == (0, 1, [1, 2, 3])


def test_requests_answered_later_are_answered_in_any_order_and_counted():
    """A handler may return a LaterAnswer (a SET, given its answer by its commit): its result,
    or its error, is answered when given, only the first one counts, and the request counts as
    in flight until then."""
    from immucore.errors import ReadOnlyReplicaError
    from immucore.server.connection import LaterAnswer

    async def run():
        loop = asyncio.get_running_loop()
        answers = {n: LaterAnswer() for n in (1, 2, 3, 4)}
        answers[4].give({"n": 4})           # given before the connection bound it: kept

        def dispatch(conn, msg, body):
            return answers[body["n"]]

        conn, transport = _logged_in_connection(dispatch)
        conn.data_received(_numbered_requests(Msg.SET, (1, 2, 3, 4)))
        inflight_before = conn._inflight
        answers[3].give({"n": 3})
        answers[3].give({"n": "again"})     # not a second answer
        answers[1].fail(ReadOnlyReplicaError())
        cancelled = loop.create_future()
        cancelled.cancel()
        answers[2].settle_from(cancelled)   # never answered, but no longer in flight
        for _ in range(3):
            await asyncio.sleep(0)
        conn._idle_handle.cancel()
        sent = _answers_sent(transport)
        return inflight_before, sent, conn._inflight

    inflight_before, sent, inflight_after = asyncio.run(run())
    assert inflight_before == 4 and inflight_after == 0
    by_id = {request_id: (flags, body) for request_id, flags, body in sent}
    assert len(sent) == 3 and set(by_id) == {1, 3, 4}
    assert by_id[4] == (0, {"n": 4}) and by_id[3] == (0, {"n": 3})
    assert by_id[1][0] & FLAG_ERROR
    assert by_id[1][1]["message"] == "database is read-only because it's a replica"


def test_a_later_answer_can_be_awaited():
    """A request served again in a task awaits its handler's result, a LaterAnswer too."""
    from immucore.server.connection import LaterAnswer

    async def run():
        given, failed, early = LaterAnswer(), LaterAnswer(), LaterAnswer()
        early.give("early")
        loop = asyncio.get_running_loop()
        loop.call_soon(given.give, "late")
        loop.call_soon(failed.fail, ValueError("bad"))
        results = await asyncio.gather(given, failed, early, return_exceptions=True)
        return results

    late, bad, early = asyncio.run(run())
    assert (late, early) == ("late", "early") and isinstance(bad, ValueError)


def test_inflight_requests_never_exceed_the_limit():

    async def run():
        running = peak = 0
        release = asyncio.Event()

        async def dispatch(conn, msg, body):
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await release.wait()
            running -= 1
            return {}

        conn, transport = _logged_in_connection(dispatch)
        conn.data_received(b"".join(encode_frame(int(Msg.GET), 0, i, pack({}))
                                    for i in range(1, 3 * CONNECTION_INFLIGHT_REQUESTS_MAX)))
        for _ in range(5):
            await asyncio.sleep(0)
        release.set()
        for _ in range(5):
            await asyncio.sleep(0)
        conn._idle_handle.cancel()
        return peak, transport.paused

    peak, paused = asyncio.run(run())
    assert paused is False
    assert peak <= CONNECTION_INFLIGHT_REQUESTS_MAX, peak


def test_preauth_slowloris_is_closed_after_the_idle_limit(monkeypatch):
    from immucore.server import connection as connection_module

    clock = [1000.0]
    monkeypatch.setattr(connection_module.time, "monotonic", lambda: clock[0])

    async def run():
        transport = _StubTransport()
        conn = connection_module.Connection(_StubNode(), None)
        conn.connection_made(transport)
        conn._idle_handle.cancel()
        for step in range(4):                       # one byte every 0.6 x the limit
            clock[0] += PREAUTH_IDLE_SECONDS * 0.6
            conn.data_received(b"IMC1"[step:step + 1])
            conn._check_idle()
            conn._idle_handle.cancel()
        return transport.closed, clock[0] - 1000.0

    closed, elapsed = asyncio.run(run())
    assert elapsed > PREAUTH_IDLE_SECONDS
    assert closed, f"no frame in {elapsed:.0f} s and still open"


def _stub_clock(monkeypatch):
    from immucore.server import connection as connection_module
    clock = [1000.0]
    monkeypatch.setattr(connection_module.time, "monotonic", lambda: clock[0])
    return clock


def _check_idle_after(conn, clock, seconds):
    clock[0] += seconds
    conn._check_idle()
    if conn._idle_handle:
        conn._idle_handle.cancel()


def test_a_peer_that_stops_reading_its_answers_is_aborted(monkeypatch):
    """Its answers passed the send buffer's mark (reading stopped) and never drained: after
    CONNECTION_WRITE_STALL_SECONDS it is aborted, not closed (close would wait for the peer
    to read them). One that drains in time stays."""
    clock = _stub_clock(monkeypatch)

    async def run():
        conn, transport = _logged_in_connection(None)
        conn._idle_handle.cancel()
        conn.pause_writing()
        _check_idle_after(conn, clock, CONNECTION_WRITE_STALL_SECONDS * 0.6)
        drained_in_time = not transport.closed
        conn.resume_writing()                     # it read: the stall starts again from here
        _check_idle_after(conn, clock, CONNECTION_WRITE_STALL_SECONDS * 0.6)
        conn.pause_writing()
        _check_idle_after(conn, clock, CONNECTION_WRITE_STALL_SECONDS * 0.6)
        still_open = not transport.closed
        _check_idle_after(conn, clock, CONNECTION_WRITE_STALL_SECONDS * 0.6)
        return drained_in_time, still_open, transport.aborted

    drained_in_time, still_open, aborted = asyncio.run(run())
    assert drained_in_time and still_open
    assert aborted


def test_a_slow_reader_is_not_aborted_while_its_answers_drain(monkeypatch):
    """Reading its answers slowly (the buffer shrinks between checks, though writing stays
    paused) is not stopping: the stall counts from the last progress."""
    clock = _stub_clock(monkeypatch)

    async def run():
        conn, transport = _logged_in_connection(None)
        conn._idle_handle.cancel()
        transport.buffered = 80 << 20
        conn.pause_writing()
        for _ in range(5):                      # 5 x 0.6 of the limit, reading all along
            transport.buffered -= 10 << 20
            _check_idle_after(conn, clock, CONNECTION_WRITE_STALL_SECONDS * 0.6)
        still_open = not transport.closed
        for _ in range(2):                      # then it stops reading
            _check_idle_after(conn, clock, CONNECTION_WRITE_STALL_SECONDS * 0.6)
        return still_open, transport.aborted

    assert asyncio.run(run()) == (True, True)


def test_an_idle_connection_with_unread_answers_is_aborted_and_one_without_closed(monkeypatch):
    clock = _stub_clock(monkeypatch)

    async def run(buffered):
        conn, transport = _logged_in_connection(None)
        conn._idle_handle.cancel()
        transport.buffered = buffered
        _check_idle_after(conn, clock, CONNECTION_IDLE_SECONDS + 1)
        return transport.closed, transport.aborted

    assert asyncio.run(run(buffered=1000)) == (True, True)
    assert asyncio.run(run(buffered=0)) == (True, False)


# --- last: the idle connection opened when the module's node started ---------------------------

def test_idle_preauth_connection_is_closed(node, good):
    """PREAUTH_IDLE_SECONDS without a frame before login: closed (checked every half limit)."""
    remaining = node.idle_since + PREAUTH_IDLE_SECONDS * 1.5 + 2 - time.monotonic()
    frames, closed = read_until_close(node.idle_socket, timeout=max(remaining, 0.1))
    assert closed and frames == []
    assert_node_serves(node, good)


def test_client_requests_time_out_each_at_its_own_deadline():
    """A node that accepts and never answers: every pipelined request fails with TimeoutError
    after the client's timeout (one deadline queue serves them all), and an answer that came in
    time is not failed later."""
    async def main():
        answered = asyncio.Event()

        async def silent(reader, writer):
            decoder = FrameDecoder(FRAME_BODY_BYTES_MAX)
            while data := await reader.read(1 << 16):
                for msg_type, _, request_id, _ in decoder.feed(data):
                    if not answered.is_set():       # only the very first request is answered
                        answered.set()
                        writer.write(encode_frame(msg_type, 0, request_id, pack({"ok": 1})))
            writer.close()        # Python 3.12's wait_closed waits for its connections

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = AsyncClient("127.0.0.1", port, timeout=0.5)
        try:
            assert await client.call(Msg.HEALTH) == {"ok": 1}
            start = time.monotonic()
            results = await asyncio.gather(*(client.call(Msg.HEALTH) for _ in range(20)),
                                           return_exceptions=True)
            waited = time.monotonic() - start
            assert all(isinstance(r, TimeoutError) for r in results), results
            assert 0.45 <= waited < 3.0
            assert "HEALTH got no answer within 0.5s" in str(results[0])
            assert not client._deadlines           # answered and expired entries are gone
        finally:
            await client.close()
            server.close()
            await server.wait_closed()

    asyncio.run(main())


def test_set_takes_flat_and_paired_kvs_and_refuses_misshapen_ones(node, good):
    """The clients send ``kvs_flat``; ``kvs`` pairs still work; an odd flat list, or a pair
    that is not a pair, is refused before anything is written (a 3-tuple must never shift the
    pairs after it)."""
    client = node.client()
    try:
        client.set([(b"f1", b"1"), (b"f2", b"2")])
        assert client.get(b"f2").value == b"2"
        before = client.current_state().tx_id
        with pytest.raises(IllegalArgumentsError, match="key, value"):
            client.set([(b"a", b"1", b"extra"), (b"b", b"2")])
        assert client.current_state().tx_id == before
    finally:
        client.close()
    with raw_connection(node) as sock:
        _, flags, _, answer = request(sock, Msg.LOGIN, 1, {"user": "immudb", "password": "immudb"})
        assert not flags & FLAG_ERROR, answer
        for n, body in enumerate(({"kvs_flat": [b"a", b"1", b"b"]}, {"kvs": [[b"a", b"1", b"x"]]})):
            _, flags, _, answer = request(sock, Msg.SET, 5 + n, body)
            assert flags & FLAG_ERROR and answer["code"] == "illegal_arguments", answer
        _, flags, _, answer = request(sock, Msg.SET, 9, {"kvs": [[b"p1", b"x"]]})
        assert not flags & FLAG_ERROR, answer
    assert good.get(b"p1").value == b"x"


def test_one_metadata_reaches_every_entry_of_a_flat_set(node, good):
    """A SET with kvs_flat and one metadata (sealed from the wire's list as it came) gives every
    entry that metadata; metadata per key still goes entry by entry."""
    from immucore.types import KVMetadata
    hidden = KVMetadata(non_indexable=True)
    header = good.set({b"md1": b"1", b"md2": b"2", b"md3": b"3"}, metadata=hidden)
    assert [e.metadata for e in good.tx_by_id(header.id).entries] == [hidden] * 3
    expiring = KVMetadata(expires_at=4_000_000_000)
    header = good.set({b"md4": b"4", b"md5": b"5"}, metadata={b"md5": expiring})
    assert [e.metadata for e in good.tx_by_id(header.id).entries] == [None, expiring]


def test_a_client_reports_why_a_node_refused_it_on_connect():
    """A node may answer a new connection with one error frame and close it before the client
    has even finished connecting (too_many_connections, protected mode): the client's first call
    fails with the node's words, not with a bare 'connection closed'."""
    async def run():
        async def refuse(reader, writer):
            writer.write(encode_frame(int(Msg.HEALTH), FLAG_ERROR, 0, pack(
                {"code": "too_many_connections", "message": "too many connections (8)"})))
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(refuse, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        outcomes = []
        for _ in range(5):
            client = AsyncClient("127.0.0.1", port)
            try:
                await client.login("immudb", "immudb")
                outcomes.append("logged in")
            except ConnectionClosedError as exc:
                outcomes.append(str(exc))
            await client.close()
        server.close()
        await server.wait_closed()
        return outcomes

    outcomes = asyncio.run(run())
    assert outcomes == ["node closed the connection: too many connections (8)"] * 5


def test_connections_past_the_caps_are_refused_and_the_node_serves_on(tmp_path):
    """--max-connections 8: a quarter (2) may wait to log in; one more idle connection, or a
    ninth connection, gets one `too_many_connections` error frame and is closed, while the
    logged-in clients keep working."""
    from tests.nodes import running_node

    def refused(n) -> str:
        with socket.create_connection(("127.0.0.1", n.port), timeout=5) as sock:
            frames, closed = read_until_close(sock)
        assert frames and closed, "refused without an error frame, or left open"
        body = frames[0][3]
        assert body["code"] == "too_many_connections", body
        return body["message"]

    with running_node(tmp_path, "--max-connections", "8") as n:
        clients = [Client(n.host, n.port)]
        clients[0].login("immudb", "immudb")
        idle = [socket.create_connection(("127.0.0.1", n.port), timeout=5) for _ in range(2)]
        time.sleep(0.3)
        assert "waiting to log in (2)" in refused(n)
        refused_client = Client(n.host, n.port)     # the clients say why, too
        with pytest.raises(ConnectionClosedError, match="waiting to log in"):
            refused_client.login("immudb", "immudb")
        refused_client.close()
        assert clients[0].set({b"k": b"v"}).id >= 1
        for sock in idle:
            sock.close()
        time.sleep(0.3)
        for _ in range(7):
            client = Client(n.host, n.port)
            client.login("immudb", "immudb")
            clients.append(client)
        assert "at most 8 (--max-connections)" in refused(n)
        assert all(c.get(b"k").value == b"v" for c in clients)
        clients.pop().close()
        time.sleep(0.3)
        with Client(n.host, n.port) as late:
            assert late.health()["status"] == "ok"
        for client in clients:
            client.close()


def test_client_deadlines_do_not_pile_up_behind_one_slow_request():
    """One request that never gets an answer must not keep the deadlines of the thousands
    answered after it: the heap is compacted, and the slow one still times out."""
    async def main():
        async def all_but_the_first(reader, writer):
            decoder = FrameDecoder(FRAME_BODY_BYTES_MAX)
            while data := await reader.read(1 << 16):
                for msg_type, _, request_id, _ in decoder.feed(data):
                    if request_id != 1:
                        writer.write(encode_frame(msg_type, 0, request_id, pack({})))
            writer.close()

        server = await asyncio.start_server(all_but_the_first, "127.0.0.1", 0)
        client = AsyncClient("127.0.0.1", server.sockets[0].getsockname()[1], timeout=2.0)
        try:
            await client.connect()
            slow = asyncio.ensure_future(client.call(Msg.HEALTH))
            for _ in range(30):
                await asyncio.gather(*(client.call(Msg.HEALTH) for _ in range(200)))
            assert len(client._deadlines) <= 2 * len(client._pending) + 1024 + 200
            with pytest.raises(TimeoutError):
                await slow
        finally:
            await client.close()
            server.close()
            await server.wait_closed()

    asyncio.run(main())
