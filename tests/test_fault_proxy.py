"""The fault-injecting proxy itself (tests/faults/proxy.py), against a tiny echo server: each
fault does what it says, and its counters show it fired."""
import contextlib
import os
import socket
import socketserver
import threading
import time

import pytest

from immucore.constants import FRAME_HEADER_SIZE
from immucore.protocol.frames import FrameDecoder, ProtocolError, encode_frame

from .faults.proxy import TO_CLIENT, TO_SERVER, FaultProxy, FrameFault, frame_fields

pytestmark = pytest.mark.timeout(60)

SEED = int(os.environ.get("IMMUCORE_FAULT_SEED", "1234"))
RECV_SECONDS = 3.0
BODY_BYTES_MAX = 1 << 20


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self):
        server = self.server
        with server.lock:
            server.connections += 1
        while True:
            try:
                data = self.request.recv(65536)
            except OSError:
                return
            if not data:
                return
            with server.lock:
                server.received += data
            if not server.mute:
                self.request.sendall(data)


@contextlib.contextmanager
def echo_server(mute: bool = False):
    """Echoes every byte back (or only records them when ``mute``)."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _EchoHandler)
    server.daemon_threads = True
    server.lock, server.connections, server.received, server.mute = threading.Lock(), 0, b"", mute
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def proxied_echo(**options):
    with echo_server(**options) as server, \
            FaultProxy(*server.server_address, seed=SEED) as proxy:
        yield server, proxy


def _connect(proxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=RECV_SECONDS)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_exactly(sock, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _frame(request_id: int, body: bytes = b"body") -> bytes:
    return encode_frame(22, 0, request_id, body)


def _echo_frames(proxy, frames, expect: int, *, sock=None):
    """Send ``frames`` through the proxy and decode what comes back: (frames, error or None)."""
    sock = sock or _connect(proxy)
    decoder, received, error = FrameDecoder(BODY_BYTES_MAX), [], None
    with sock:
        sock.sendall(b"".join(frames))
        deadline = time.monotonic() + RECV_SECONDS
        while len(received) < expect and time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except socket.timeout:
                break
            if not data:
                break
            try:
                received += decoder.feed(data)
            except ProtocolError as exc:
                error = exc
                break
    return received, error


def _ids(frames):
    return [request_id for _, _, request_id, _ in frames]


def _wait_for(predicate, what: str, seconds: float = RECV_SECONDS):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


# --- plain forwarding and conditions ------------------------------------------------------------

def test_bytes_pass_unchanged_both_ways_and_are_counted():
    payload = os.urandom(300_000)
    with proxied_echo() as (server, proxy), _connect(proxy) as sock:
        sock.sendall(payload)
        assert _recv_exactly(sock, len(payload)) == payload
        stats = proxy.stats()
        assert stats["connections_accepted"] == 1 and stats["connections_open"] == 1
        assert stats["bytes_forwarded"] == {TO_SERVER: len(payload), TO_CLIENT: len(payload)}


def test_latency_delays_only_its_direction():
    with proxied_echo() as (_, proxy), _connect(proxy) as sock:
        proxy.set_latency(300, TO_CLIENT)
        start = time.monotonic()
        sock.sendall(b"x")
        assert _recv_exactly(sock, 1) == b"x"
        assert 0.3 <= time.monotonic() - start < 1.5
        proxy.set_latency(0, TO_CLIENT)
        start = time.monotonic()
        sock.sendall(b"y")
        assert _recv_exactly(sock, 1) == b"y"
        assert time.monotonic() - start < 0.2


def test_latency_does_not_cap_throughput():
    """Every chunk is delayed by the latency, not each after the previous one."""
    with proxied_echo() as (_, proxy), _connect(proxy) as sock:
        proxy.set_latency(200, TO_SERVER)
        start = time.monotonic()
        for _ in range(10):
            sock.sendall(b"z" * 100)
            time.sleep(0.01)
        assert _recv_exactly(sock, 1000) == b"z" * 1000
        assert time.monotonic() - start < 1.0


def test_bandwidth_cap_slows_a_transfer_to_its_rate():
    payload = os.urandom(60_000)
    with proxied_echo() as (_, proxy), _connect(proxy) as sock:
        proxy.set_bandwidth(100_000, TO_CLIENT)
        start = time.monotonic()
        sock.sendall(payload)
        assert _recv_exactly(sock, len(payload)) == payload
        assert 0.5 <= time.monotonic() - start < 2.0          # 0.6 s at 100 kB/s
        assert proxy.stats()["writes"][TO_CLIENT] >= 10       # in slices of rate/20


def test_slicing_writes_one_byte_at_a_time_and_frames_still_decode():
    frames = [_frame(n, os.urandom(50)) for n in range(1, 4)]
    with proxied_echo() as (_, proxy):
        proxy.set_slicing(1, TO_CLIENT)
        received, error = _echo_frames(proxy, frames, expect=3)
        assert error is None and _ids(received) == [1, 2, 3]
        assert proxy.stats()["writes"][TO_CLIENT] == sum(map(len, frames))


# --- partitions ---------------------------------------------------------------------------------

def test_blackhole_reads_everything_and_forwards_nothing():
    with proxied_echo() as (server, proxy), _connect(proxy) as sock:
        sock.sendall(b"before")
        assert _recv_exactly(sock, 6) == b"before"
        proxy.blackhole()
        sock.sendall(b"lost")
        sock.settimeout(0.5)
        with pytest.raises(socket.timeout):
            sock.recv(10)
        with _connect(proxy) as during:                 # accepted, held until the heal
            during.sendall(b"held")
            _wait_for(lambda: proxy.stats()["bytes_dropped"][TO_SERVER] >= 4, "the drop")
            time.sleep(0.2)
            assert server.connections == 1 and server.received == b"before"
            proxy.heal()
            assert _recv_exactly(during, 4) == b"held"
        sock.settimeout(RECV_SECONDS)
        sock.sendall(b"after")                          # the old connection resumes, with a hole
        assert _recv_exactly(sock, 5) == b"after"


def test_reset_sends_rst_to_open_connections_and_new_ones_until_healed():
    with proxied_echo() as (_, proxy), _connect(proxy) as sock:
        sock.sendall(b"a")
        assert _recv_exactly(sock, 1) == b"a"
        proxy.reset()
        with pytest.raises(ConnectionResetError):
            sock.sendall(b"b")
            sock.recv(1)
        # the RST may beat connect() itself back, or come with the first send or read
        with pytest.raises(ConnectionResetError), _connect(proxy) as refused:
            refused.sendall(b"c")
            refused.recv(1)
        stats = proxy.stats()
        assert stats["connections_reset"] == 1 and stats["connections_refused"] == 1
        proxy.heal()
        with _connect(proxy) as again:
            again.sendall(b"d")
            assert _recv_exactly(again, 1) == b"d"


@pytest.mark.parametrize("direction", [TO_CLIENT, TO_SERVER])
def test_one_way_drop_loses_only_its_direction(direction):
    with proxied_echo() as (server, proxy), _connect(proxy) as sock:
        proxy.drop(direction)
        sock.sendall(b"ping")
        sock.settimeout(0.5)
        with pytest.raises(socket.timeout):
            sock.recv(10)
        # dropped on the way back: the server got it; dropped on the way in: it never did
        assert server.received == (b"ping" if direction == TO_CLIENT else b"")
        assert proxy.stats()["bytes_dropped"][direction] == 4


def test_flapping_alternates_up_and_down_on_a_seeded_schedule():
    outcomes = set()
    with proxied_echo() as (_, proxy):
        proxy.flap(up_seconds=(0.1, 0.2), down_seconds=(0.1, 0.2))
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                with _connect(proxy) as sock:
                    sock.settimeout(0.3)
                    sock.sendall(b"p")
                    outcomes.add(_recv_exactly(sock, 1) == b"p")
            except OSError:
                outcomes.add(False)
            time.sleep(0.02)
        stats = proxy.stats()
        proxy.heal()
        with _connect(proxy) as sock:
            sock.sendall(b"q")
            assert _recv_exactly(sock, 1) == b"q"
    assert outcomes == {True, False} and stats["flaps"] >= 3, (outcomes, stats)


def test_the_same_seed_gives_the_same_random_choices():
    def flipped_bits(seed):
        with echo_server() as server, FaultProxy(*server.server_address, seed=seed) as proxy:
            proxy.add_frame_fault(FrameFault("flip_body", times=5, rehash=True))
            received, _ = _echo_frames(proxy, [_frame(n, bytes(64)) for n in range(5)], expect=5)
            return [body for _, _, _, body in received]
    assert flipped_bits(SEED) == flipped_bits(SEED) != flipped_bits(SEED + 1)


# --- frame faults -------------------------------------------------------------------------------

def test_flip_in_the_header_is_caught_by_the_decoder():
    with proxied_echo() as (_, proxy):
        proxy.add_frame_fault(FrameFault("flip_header", nth=1))
        received, error = _echo_frames(proxy, [_frame(n) for n in (1, 2, 3)], expect=3)
        # frame 1 is lost with the error when all three arrive in one read
        assert _ids(received) in ([], [1]) and error.code in ("bad_magic", "bad_checksum")
        assert proxy.stats()["frames_mutated"] == {"flip_header": 1}


def test_flip_in_the_header_with_rehash_passes_the_checksums():
    with proxied_echo() as (_, proxy):
        proxy.add_frame_fault(FrameFault("flip_header", bit=8 * 15, rehash=True))  # request_id
        received, error = _echo_frames(proxy, [_frame(2)], expect=1)
        assert error is None and _ids(received) == [2 ^ 0x80]


@pytest.mark.parametrize("rehash", [False, True])
def test_flip_in_the_body(rehash):
    body = bytes(100)
    with proxied_echo() as (_, proxy):
        proxy.add_frame_fault(FrameFault("flip_body", bit=8 * 10 + 7, rehash=rehash))
        received, error = _echo_frames(proxy, [_frame(1, body)], expect=1)
        if rehash:
            assert error is None and received[0][3] == bytes(10) + b"\x01" + bytes(89)
        else:
            assert received == [] and error.code == "bad_checksum"
        assert proxy.stats()["frames_mutated"] == {"flip_body": 1}


@pytest.mark.parametrize("body_len, code", [(0, "bad_checksum"), (0xFFFFFFFF, "frame_too_large")])
def test_forged_body_length_is_refused_before_any_body_is_read(body_len, code):
    with proxied_echo() as (_, proxy):
        proxy.add_frame_fault(FrameFault("forge_length", body_len=body_len, rehash=True))
        received, error = _echo_frames(proxy, [_frame(1, b"x" * 64)], expect=1)
        assert received == [] and error.code == code
        assert proxy.stats()["frames_mutated"] == {"forge_length": 1}


def test_truncate_sends_part_of_a_frame_then_ends_the_connection():
    frame = _frame(1, b"x" * 64)
    with proxied_echo() as (_, proxy), _connect(proxy) as sock:
        proxy.add_frame_fault(FrameFault("truncate", cut_at=17))
        sock.sendall(frame)
        assert _recv_exactly(sock, len(frame)) == frame[:17]         # then EOF
        assert proxy.stats()["frames_mutated"] == {"truncate": 1}


@pytest.mark.parametrize("kind, expected_ids", [
    ("duplicate", [1, 2, 2, 3]),
    ("drop", [1, 3]),
    ("reorder", [1, 3, 2]),
    ("replay", [1, 2, 1, 3]),
])
def test_whole_frame_faults(kind, expected_ids):
    with proxied_echo() as (_, proxy), _connect(proxy) as sock:
        proxy.add_frame_fault(FrameFault(kind, nth=1))
        # one frame at a time, so the echo cannot coalesce them and each reaches the proxy alone
        for request_id in (1, 2, 3):
            sock.sendall(_frame(request_id))
            time.sleep(0.05)
        received, error = _echo_frames(proxy, [], expect=len(expected_ids), sock=sock)
        assert error is None and _ids(received) == expected_ids
        assert proxy.stats()["frames_mutated"] == {kind: 1}


def test_reorder_without_a_partner_sends_the_frame_alone_after_the_hold():
    with proxied_echo() as (_, proxy):
        proxy.add_frame_fault(FrameFault("reorder", hold_ms=200))
        start = time.monotonic()
        received, error = _echo_frames(proxy, [_frame(1)], expect=1)
        assert _ids(received) == [1] and time.monotonic() - start >= 0.2
        stats = proxy.stats()
        assert stats["reorders_unpaired"] == 1 and stats["frames_mutated"] == {}


def test_splice_replaces_a_frame_with_one_recorded_on_another_connection():
    with proxied_echo() as (_, proxy):
        first, _ = _echo_frames(proxy, [_frame(n, b"first") for n in (1, 2)], expect=2)
        assert len(first) == 2
        proxy.add_frame_fault(FrameFault("splice", nth=1))
        received, error = _echo_frames(proxy, [_frame(n, b"second") for n in (1, 2, 3)],
                                       expect=3)
        assert error is None
        assert [(rid, body) for _, _, rid, body in received] == [
            (1, b"second"), (2, b"first"), (3, b"second")]
        assert proxy.stats()["frames_mutated"] == {"splice": 1}


def test_splice_of_a_given_frame_and_recorded_frames_for_other_proxies():
    with proxied_echo() as (_, other):
        _echo_frames(other, [_frame(7, b"elsewhere")], expect=1)
        foreign = other.recorded_frames(TO_CLIENT)[-1]
    assert frame_fields(foreign)[2] == 7 and foreign[FRAME_HEADER_SIZE:] == b"elsewhere"
    with proxied_echo() as (_, proxy):
        proxy.add_frame_fault(FrameFault("splice", frame=foreign))
        received, _ = _echo_frames(proxy, [_frame(1)], expect=1)
        assert _ids(received) == [7]


def test_a_frame_fault_only_matches_its_direction_and_message_type():
    with proxied_echo() as (_, proxy):
        proxy.add_frame_fault(FrameFault("drop", direction=TO_SERVER, msg_type=5))
        received, _ = _echo_frames(proxy, [_frame(1)], expect=1)
        assert _ids(received) == [1]
        stats = proxy.stats()
        assert stats["frames_mutated"] == {} and stats["frames_seen"] == {TO_SERVER: 1,
                                                                          TO_CLIENT: 1}


def test_garbage_passes_through_raw():
    with proxied_echo() as (_, proxy), _connect(proxy) as sock:
        proxy.add_frame_fault(FrameFault("drop"))
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert _recv_exactly(sock, 18) == b"GET / HTTP/1.0\r\n\r\n"
        assert proxy.stats()["frames_seen"] == {TO_SERVER: 0, TO_CLIENT: 0}
