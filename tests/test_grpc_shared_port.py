"""immudb's gRPC API on the node's own port (the default): immudb's SDK connects to the native
port with no flag, beside native clients; first bytes that are not HTTP/2's preface still get the
native protocol's answers; a preface sent in pieces; TLS; the real peer behind the splice
(protected mode); spliced connections counted against --max-connections; --grpc-port -1 and a
dedicated --grpc-port."""
from __future__ import annotations

import socket
import ssl
import time

import grpc
import pytest
from immudb import ImmudbClient
from immudb.grpc import schema_pb2, schema_pb2_grpc

from immucore import Client
from immucore.client import ConnectionClosedError
from immucore.constants import FRAME_BODY_BYTES_MAX, PREAUTH_IDLE_SECONDS
from immucore.protocol.frames import FLAG_ERROR, FrameDecoder
from immucore.protocol.messages import unpack
from immucore.server.shared_port import HTTP2_PREFACE, real_peer

from .nodes import HOST, free_port, port_accepts, running_node
from .test_security import _non_loopback_address
from .test_tls import _self_signed

# An empty HTTP/2 SETTINGS frame: length 0, type 4, no flags, stream 0
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with running_node(tmp_path_factory.mktemp("shared-port")) as node:   # no gRPC flag at all
        yield node


def native_answer(sock, timeout: float = 5.0):
    """The native frames the node sends before it closes the connection, and whether it did."""
    decoder, frames = FrameDecoder(FRAME_BODY_BYTES_MAX), []
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(1 << 16)
            if not data:
                return frames, True
            frames += [(m, f, r, unpack(b) if b else {}) for m, f, r, b in decoder.feed(data)]
    except (socket.timeout, TimeoutError):
        return frames, False
    except ConnectionResetError:
        return frames, True


def test_immudb_sdk_and_native_client_share_the_port_with_no_grpc_flag(node):
    sdk = ImmudbClient(node.address)         # the native port, as immudb's 3322
    sdk.login("immudb", "immudb")
    with Client(node.host, node.port) as native:
        native.login("immudb", "immudb")
        for i in range(20):                  # interleaved, both connections open all along
            sdk.set(f"sdk-{i}".encode(), b"from grpc")
            native.set({f"native-{i}".encode(): b"from native"})
        assert native.get(b"sdk-19").value == b"from grpc"
        assert sdk.get(b"native-19").value == b"from native"
        assert sdk.verifiedGet(b"sdk-3").verified
    sdk.logout()


def test_first_bytes_that_are_not_the_preface_get_the_native_error_frame(node):
    for first in (b"\x00garbage" * 8, b"PRX * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"PRI * HTTP/1.1\r\n\r\n"):
        with socket.create_connection((HOST, node.port), timeout=5) as sock:
            sock.sendall(first)
            frames, closed = native_answer(sock)
        assert closed and len(frames) == 1, (first, frames)
        assert frames[0][1] & FLAG_ERROR and frames[0][3]["code"] == "bad_magic", frames
    with Client(node.host, node.port) as native:
        assert native.health()["status"] == "ok"


def test_a_preface_sent_in_pieces_reaches_grpc(node):
    """The first bytes may arrive a few at a time: the node waits for the whole preface, then
    gRPC answers (its own SETTINGS frame first)."""
    with socket.create_connection((HOST, node.port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for piece in (HTTP2_PREFACE[:1], HTTP2_PREFACE[1:9], HTTP2_PREFACE[9:23]):
            sock.sendall(piece)
            time.sleep(0.2)
        sock.sendall(HTTP2_PREFACE[23:] + EMPTY_SETTINGS)
        answer = b""
        while len(answer) < 9:
            data = sock.recv(1 << 16)
            assert data, f"closed after {answer!r}"
            answer += data
    assert answer[3] == 0x04 and answer[5:9] == b"\x00\x00\x00\x00", answer  # SETTINGS, stream 0


def test_a_preface_never_finished_is_closed_and_others_are_served(node):
    with socket.create_connection((HOST, node.port), timeout=5) as stuck:
        stuck.sendall(HTTP2_PREFACE[:10])
        started = time.monotonic()
        sdk = ImmudbClient(node.address)
        sdk.login("immudb", "immudb")              # meanwhile the node serves gRPC ...
        with Client(node.host, node.port) as native:   # ... and native clients
            assert native.health()["status"] == "ok"
        stuck.settimeout(PREAUTH_IDLE_SECONDS + 10)
        try:
            assert stuck.recv(1024) == b""
        except ConnectionResetError:
            pass
        waited = time.monotonic() - started
    assert PREAUTH_IDLE_SECONDS - 1 < waited < PREAUTH_IDLE_SECONDS + 5, waited


def test_tls_covers_both_protocols_on_the_shared_port(tmp_path):
    cert, key = _self_signed(tmp_path)
    with running_node(tmp_path / "n", "--certificate", cert, "--pkey", key) as node:
        with open(cert, "rb") as f:
            credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        with grpc.secure_channel(node.address, credentials) as channel:
            stub = schema_pb2_grpc.ImmuServiceStub(channel)
            token = stub.Login(schema_pb2.LoginRequest(user=b"immudb", password=b"immudb")).token
            assert token
            with Client(node.host, node.port,
                        ssl=ssl.create_default_context(cafile=cert)) as native:
                native.login("immudb", "immudb")
                assert native.health()["status"] == "ok"
        plain = ImmudbClient(node.address, timeout=3)      # gRPC without TLS: no answer
        with pytest.raises(grpc.RpcError):
            plain.login("immudb", "immudb")


def test_real_peer_maps_a_splice_port_to_its_client():
    class FakeNode:
        spliced_peers = {40001: ("192.0.2.7", 5555)}
    assert real_peer(FakeNode, "ipv4:127.0.0.1:40001") == ("192.0.2.7", 5555)
    assert real_peer(FakeNode, "ipv4:127.0.0.1:40002") is None    # not a splice
    assert real_peer(FakeNode, "ipv4:127.0.0.2:40001") is None    # splices come from 127.0.0.1
    assert real_peer(FakeNode, "ipv6:[::1]:40001") is None        # the endpoint is IPv4
    assert real_peer(FakeNode, "unix:/tmp/x") is None
    assert real_peer(FakeNode, "") is None


def test_protected_mode_judges_the_real_peer_behind_the_splice(tmp_path):
    """With the default sysadmin password, a gRPC call through the shared port from another
    address is refused, though the gRPC server itself only ever sees the loopback splice."""
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address")
    with running_node(tmp_path, "--address", "0.0.0.0") as node:
        remote = ImmudbClient(f"{address}:{node.port}", timeout=10)
        with pytest.raises(grpc.RpcError) as refused:
            remote.login("immudb", "immudb")
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "protected mode" in refused.value.details()
        ImmudbClient(f"127.0.0.1:{node.port}").login("immudb", "immudb")   # loopback: served
        with Client("127.0.0.1", node.port) as local:
            local.login("immudb", "immudb")
            local.change_password("immudb", "immudb", "Changed1!pw")
        remote = ImmudbClient(f"{address}:{node.port}", timeout=10)
        remote.login("immudb", "Changed1!pw")           # no well-known password: served
        assert remote.set(b"k", b"v").id > 0


def test_spliced_connections_count_against_max_connections(tmp_path):
    with running_node(tmp_path, "--max-connections", "2") as node:
        sdk = ImmudbClient(node.address)
        sdk.login("immudb", "immudb")             # one connection, spliced to gRPC
        with Client(node.host, node.port) as first:
            first.login("immudb", "immudb")       # two
            with pytest.raises(ConnectionClosedError, match="too many connections"):
                with Client(node.host, node.port) as third:
                    third.login("immudb", "immudb")
        assert sdk.set(b"still", b"served").id > 0       # the splice still serves


def test_grpc_port_minus_one_turns_grpc_off(tmp_path):
    with running_node(tmp_path, "--grpc-port", "-1") as node:
        with socket.create_connection((HOST, node.port), timeout=5) as sock:
            sock.sendall(HTTP2_PREFACE + EMPTY_SETTINGS)
            frames, closed = native_answer(sock)
        assert closed and frames[0][3]["code"] == "bad_magic", frames
        assert "gRPC API off" in node.log()


def test_a_grpc_port_of_its_own_leaves_the_native_port_native(tmp_path):
    grpc_port = free_port()
    with running_node(tmp_path, "--grpc-port", str(grpc_port)) as node:
        deadline = time.monotonic() + 30
        while not port_accepts(HOST, grpc_port):
            assert time.monotonic() < deadline, node.log()
            time.sleep(0.05)
        with socket.create_connection((HOST, node.port), timeout=5) as sock:
            sock.sendall(HTTP2_PREFACE + EMPTY_SETTINGS)
            frames, closed = native_answer(sock)
        assert closed and frames[0][3]["code"] == "bad_magic", frames
        sdk = ImmudbClient(f"{HOST}:{grpc_port}")
        sdk.login("immudb", "immudb")


def test_grpc_placement_of_the_grpc_port_flag():
    from immucore.cli import node as node_cli
    from immucore.errors import ImmucoreError
    from immucore.server.app import GRPC_OFF, GRPC_OWN_PORT, GRPC_SHARED, grpc_placement
    parser = node_cli.build_parser()
    assert node_cli.resolve(parser.parse_args(["--grpc-port", "-1"]), environ={})["grpc_port"] == -1
    assert node_cli.resolve(parser.parse_args([]),
                            environ={"IMMUDB_GRPC_PORT": "-1"})["grpc_port"] == -1
    assert grpc_placement(0, 3322) == GRPC_SHARED
    assert grpc_placement(3322, 3322) == GRPC_SHARED
    assert grpc_placement(3323, 3322) == GRPC_OWN_PORT
    assert grpc_placement(-1, 3322) == GRPC_OFF
    with pytest.raises(ImmucoreError, match="--grpc-port"):
        grpc_placement(70000, 3322)


def test_large_values_cross_the_splice_both_ways(node):
    """Bigger than SPLICE_BUFFER_BYTES_MAX three times over (and under the 4 MiB gRPC clients
    accept by default): each side's reading pauses and resumes while the other side drains, and
    every byte arrives."""
    from immucore.constants import SPLICE_BUFFER_BYTES_MAX
    value = bytes(range(256)) * (3 * SPLICE_BUFFER_BYTES_MAX // 256) + b"end"
    sdk = ImmudbClient(node.address)
    sdk.login("immudb", "immudb")
    sdk.set(b"big-through-splice", value)
    assert sdk.get(b"big-through-splice").value == value


def test_a_node_with_open_grpc_connections_stops_cleanly(tmp_path):
    with running_node(tmp_path) as node:
        sdk = ImmudbClient(node.address)
        sdk.login("immudb", "immudb")
        sdk.set(b"k", b"v")
        started = time.monotonic()
        assert node.stop() == 0, node.log()
        assert time.monotonic() - started < 10


class _SpliceNode:
    """What FirstBytes and Splice use of a Node, for the splice alone (the internal endpoint here
    is a plain TCP server of the test's own, standing in for gRPC)."""

    def __init__(self, endpoint):
        self.connections, self.spliced, self.spliced_peers = set(), set(), {}
        self.grpc_internal_endpoint = endpoint

    def refuse_connection(self, peer, protected_mode=True):
        return None


def test_the_splice_stops_reading_a_side_whose_other_side_does_not_drain():
    """Real sockets on loopback. Toward a client that does not read, the internal endpoint's
    64 MiB pile up in the endpoint's own send buffer, not in the splice's (it stops reading the
    endpoint past SPLICE_BUFFER_BYTES_MAX); toward an endpoint that does not read, the same for
    the client's. Once each reader reads, every byte arrives in order."""
    import asyncio
    import hashlib

    from immucore.constants import SPLICE_BUFFER_BYTES_MAX
    from immucore.server.shared_port import FirstBytes

    total = 64 << 20
    payload = hashlib.sha256(b"seed").digest() * (total // 32)
    bound = 2 * SPLICE_BUFFER_BYTES_MAX      # the cap plus what one read may bring

    class Endpoint(asyncio.Protocol):
        transports, received = [], bytearray()

        def connection_made(self, transport):
            Endpoint.transports.append(transport)

        def data_received(self, data):
            Endpoint.received += data

    async def main():
        loop = asyncio.get_running_loop()
        endpoint = await loop.create_server(Endpoint, HOST, 0)
        node = _SpliceNode((HOST, endpoint.sockets[0].getsockname()[1]))
        shared = await loop.create_server(lambda: FirstBytes(node, None), HOST, 0)
        reader, writer = await asyncio.open_connection(HOST, shared.sockets[0].getsockname()[1])
        writer.write(HTTP2_PREFACE)
        while not Endpoint.transports or len(Endpoint.received) < len(HTTP2_PREFACE):
            await asyncio.sleep(0.01)
        assert bytes(Endpoint.received) == HTTP2_PREFACE       # the bytes read first, forwarded
        (splice,) = node.spliced
        inner = Endpoint.transports[0]

        # the client does not read: the endpoint's writes back up in the endpoint
        inner.write(payload)
        await asyncio.sleep(1.0)
        assert splice.transport.get_write_buffer_size() <= bound
        assert inner.get_write_buffer_size() > total // 2
        got = await reader.readexactly(total)
        assert got == payload

        # the endpoint does not read: the client's writes back up in the client
        inner.pause_reading()
        Endpoint.received.clear()
        writer.write(payload)
        await asyncio.sleep(1.0)
        assert splice._inner.get_write_buffer_size() <= bound
        assert writer.transport.get_write_buffer_size() > total // 2
        inner.resume_reading()
        while len(Endpoint.received) < total:
            await asyncio.sleep(0.01)
        assert bytes(Endpoint.received) == payload
        writer.close()
        shared.close()
        endpoint.close()

    asyncio.run(main())
