"""One port, two protocols: a connection's first bytes say whether it speaks immucore's framed
protocol or immudb's gRPC (HTTP/2), docs/grpc.md "One port".

grpc.aio cannot take over a socket the node accepted, so the gRPC server listens on an internal
endpoint, a loopback port of its own (``start_grpc_server(..., internal=True)``), and a connection
that opens with HTTP/2's preface is spliced to it: a byte pipe on the event loop, the bytes
already read forwarded first, each side's reading paused while the other side's send buffer is
past SPLICE_BUFFER_BYTES_MAX. Any other first bytes go to a native ``Connection``, handed the
transport with ``set_protocol``: from then on its data arrives exactly as it does on a node
without gRPC, so the native per-request path costs nothing more.

The gRPC server sees the splice as its peer. The real peer is kept in ``Node.spliced_peers``,
under the splice's local port on the internal endpoint, and ``real_peer`` gives it back to the
gRPC handlers (protected mode checks the real peer, never the splice).
"""
from __future__ import annotations

import asyncio
import logging
import socket
from typing import Optional, Tuple

from ..constants import PREAUTH_IDLE_SECONDS, SPLICE_BUFFER_BYTES_MAX
from .connection import Connection

log = logging.getLogger("immucore.server")

# The first bytes every HTTP/2 client sends (RFC 9113 §3.4). No native frame starts with "P".
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
INTERNAL_HOST = "127.0.0.1"     # where the internal gRPC endpoint listens (grpc/server.py)
_SPLICE_PEER_PREFIX = f"ipv4:{INTERNAL_HOST}:"


def _no_delay(transport):
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def real_peer(node, grpc_peer: str) -> Optional[Tuple[str, int]]:
    """The real peer (asyncio's peername) of a gRPC call that came through a splice, from the
    call's ``context.peer()`` (``ipv4:127.0.0.1:PORT``, PORT being the splice's local port); None
    for a call that did not (a dedicated --grpc-port, or a local process on the internal
    endpoint itself, whose own loopback address is then its real peer)."""
    spliced = getattr(node, "spliced_peers", None)
    # a splice connects from 127.0.0.1; a local process binding another loopback address to a
    # splice's port is not that splice
    if not spliced or not grpc_peer.startswith(_SPLICE_PEER_PREFIX):
        return None
    try:
        port = int(grpc_peer.rpartition(":")[2])
    except ValueError:
        return None
    return spliced.get(port)


class FirstBytes(asyncio.Protocol):
    """A connection on the shared port until its first bytes decide what it speaks. Until then
    it counts as a connection waiting to log in (the node's caps), and it is closed if they do
    not come within PREAUTH_IDLE_SECONDS."""

    in_flight = 0                   # nothing is served before the first bytes (Node.close)

    def __init__(self, node, dispatch):
        self.node = node
        self._dispatch = dispatch
        self.transport = None
        self.peer = None
        self._head = b""
        self._timer = None

    def connection_made(self, transport):
        self.transport = transport
        self.peer = transport.get_extra_info("peername")
        refusal = self.node.refuse_connection(self.peer, protected_mode=False)
        if refusal:                 # past the caps: the native answer, as without gRPC
            self._native(b"")
            return
        self.node.connections.add(self)
        self._timer = asyncio.get_running_loop().call_later(PREAUTH_IDLE_SECONDS, self._too_slow)

    def _too_slow(self):
        log.info("closing connection from %s: no first bytes in %d s", self.peer,
                 PREAUTH_IDLE_SECONDS)
        self.transport.abort()

    def _decided(self):
        self.node.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()

    def data_received(self, data: bytes):
        head = self._head + data if self._head else data
        if head[:1] != b"P" or not HTTP2_PREFACE.startswith(head[:len(HTTP2_PREFACE)]):
            self._native(head)
        elif len(head) >= len(HTTP2_PREFACE):
            self._grpc(head)
        else:
            self._head = head         # a preface still arriving (bounded: shorter than it)

    def _native(self, head: bytes):
        """The framed protocol: a Connection takes the transport, and its checks (the caps,
        protected mode) run as on a node without gRPC."""
        self._decided()
        connection = Connection(self.node, self._dispatch)
        self.transport.set_protocol(connection)
        connection.connection_made(self.transport)
        if head and not self.transport.is_closing():
            connection.data_received(head)

    def _grpc(self, head: bytes):
        self._decided()
        splice = Splice(self.node, self.transport, self.peer, head)
        self.transport.set_protocol(splice)
        splice.start()

    def connection_lost(self, exc):
        self._decided()


class Splice(asyncio.Protocol):
    """The client's side of a spliced gRPC connection (this protocol owns the client's
    transport); ``_Inner`` is the side connected to the internal gRPC endpoint."""

    def __init__(self, node, transport, peer, head: bytes):
        self.node = node
        self.transport = transport
        self.peer = peer
        self._head = head
        self._inner = None
        self._inner_port = None
        self._connecting = None         # the task connecting to the internal endpoint
        self._closed = False

    def start(self):
        node = self.node
        node.spliced.add(self)          # counts against --max-connections
        _no_delay(self.transport)
        self.transport.set_write_buffer_limits(high=SPLICE_BUFFER_BYTES_MAX)
        self.transport.pause_reading()  # until the internal endpoint takes what was read
        host, port = node.grpc_internal_endpoint
        self._connecting = asyncio.ensure_future(self._connect(host, port))

    async def _connect(self, host, port):
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: _Inner(self), host, port)
        except OSError as exc:
            log.error("cannot reach the internal gRPC endpoint %s:%s for %s: %s", host, port,
                      self.peer, exc)
            self.transport.abort()

    def inner_made(self, inner):
        """The internal endpoint accepted: the real peer is recorded before any byte reaches
        the gRPC server, then the bytes already read go first."""
        if self._closed:
            inner.close()
            return
        self._inner = inner
        self._inner_port = inner.get_extra_info("sockname")[1]
        self.node.spliced_peers[self._inner_port] = self.peer
        inner.write(self._head)
        self._head = b""
        self.transport.resume_reading()

    def data_received(self, data: bytes):
        inner = self._inner
        if inner is None:       # a TLS transport may still hand over what it had decrypted
            self._head += data
        else:
            inner.write(data)

    def pause_writing(self):            # the client reads slower than gRPC answers
        if self._inner is not None:
            self._inner.pause_reading()

    def resume_writing(self):
        if self._inner is not None:
            self._inner.resume_reading()

    def inner_lost(self):
        if self._inner_port is not None:
            self.node.spliced_peers.pop(self._inner_port, None)
            self._inner_port = None
        self.transport.close()          # what gRPC answered last is still written

    def connection_lost(self, exc):
        self._closed = True
        self.node.spliced.discard(self)
        if self._inner is not None:
            self._inner.close()


class _Inner(asyncio.Protocol):
    def __init__(self, splice: Splice):
        self._splice = splice
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        _no_delay(transport)
        transport.set_write_buffer_limits(high=SPLICE_BUFFER_BYTES_MAX)
        self._splice.inner_made(transport)

    def data_received(self, data: bytes):
        self._splice.transport.write(data)

    def pause_writing(self):            # the gRPC server reads slower than the client sends
        self._splice.transport.pause_reading()

    def resume_writing(self):
        self._splice.transport.resume_reading()

    def connection_lost(self, exc):
        self._splice.inner_lost()
