"""A fault-injecting TCP proxy for tests: put it between two nodes and break the network on cue.

    with FaultProxy(primary.host, primary.port, seed=7) as proxy:   # proxy.port to connect to
        proxy.set_latency(50, TO_CLIENT)          # conditions: latency, bandwidth, slicing
        proxy.blackhole()                         # partitions: blackhole, reset, drop, flap
        proxy.heal()
        proxy.add_frame_fault(FrameFault("flip_body", msg_type=Msg.EXPORT_TXS))
        assert proxy.stats()["frames_mutated"]["flip_body"] == 1

The proxy runs its own asyncio loop in a daemon thread, so synchronous tests drive it; every
method called from the test thread runs in that loop and returns once the change is in effect.
Everything it does is counted (``stats()``) so a test can assert that its fault really fired.
Random choices (flap durations, which bit to flip, where to cut) come from one ``random.Random``
seeded with ``seed`` (printed at start; ``IMMUCORE_FAULT_SEED`` sets it when ``seed`` is None).

Frames are cut by their header's ``body_len`` only (nothing else is checked, so garbage passes
through); if a boundary does not start with the magic, that direction of that connection falls
back to forwarding raw bytes. Frames are stored and forwarded whole, so a frame fault can act on
any of them.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import os
import random
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import xxhash

from immucore.constants import FRAME_BODY_BYTES_MAX, FRAME_HEADER_SIZE, FRAME_MAGIC

TO_SERVER = "to_server"      # client -> proxy -> server (for a replica: its requests)
TO_CLIENT = "to_client"      # server -> proxy -> client (for a replica: the primary's answers)
DIRECTIONS = (TO_SERVER, TO_CLIENT)

READ_BYTES_MAX = 64 << 10
QUEUE_CHUNKS_MAX = 4          # items waiting per direction: a slow side pushes back on the other
RECORDED_FRAMES_MAX = 512     # frames kept per direction for splicing
EARLIER_FRAMES_MAX = 64       # frames kept per connection and direction for replaying
CALL_SECONDS_MAX = 10.0       # a test-thread call into the loop
BANDWIDTH_SLICES_PER_SECOND = 20   # a capped direction writes at most rate/20 bytes at once
HELD_POLL_SECONDS = 0.02      # a connection accepted in a blackhole checks this often for heal

FRAME_FAULT_KINDS = ("flip_header", "flip_body", "forge_length", "truncate", "duplicate", "drop",
                     "reorder", "replay", "splice")

_BODY_LEN = struct.Struct(">I")          # at offset 16
_HASH = struct.Struct(">Q")              # body_hash at 24, header_hash at 32
_EOF, _CUT = object(), object()          # queue markers: half-close, cut the connection


@dataclass
class FrameFault:
    """One frame mutation: acts on matching frames (direction, ``msg_type``) after skipping
    ``nth`` of them, ``times`` times (counted over all connections of the proxy).

    kind: ``flip_header`` / ``flip_body`` (one ``bit``: a number, a function of the header or
    body giving one or None to skip that frame, or None for a seeded random one), ``forge_length``
    (header ``body_len`` := ``body_len``), ``truncate`` (send ``cut_at`` bytes of the frame, then
    close the connection), ``duplicate``, ``drop``, ``reorder`` (send it after the next frame;
    alone after ``hold_ms`` if none comes), ``replay`` (send it, then the previous frame of the same
    connection again), ``splice`` (replace it with ``frame``, or when None with a frame of the same
    request id and type recorded on another connection; with ``replace`` False the foreign
    frame goes in just before it instead; ``adopt_request_id`` gives it the request id of the
    frame it stands for, header checksum fixed, so the receiver takes it as that answer). ``rehash`` recomputes both checksums
    after the change, so it passes frame checks and reaches the layers above (a corruption made
    before framing, or by a hostile middlebox).
    """
    kind: str
    direction: str = TO_CLIENT
    msg_type: Optional[int] = None
    nth: int = 0
    times: int = 1
    bit: Union[int, Callable[[bytes], Optional[int]], None] = None
    body_len: int = 0
    cut_at: Optional[int] = None
    rehash: bool = False
    frame: Optional[bytes] = None
    replace: bool = True
    adopt_request_id: bool = False
    hold_ms: float = 1000.0

    def __post_init__(self):
        if self.kind not in FRAME_FAULT_KINDS:
            raise ValueError(f"unknown frame fault {self.kind!r}; one of {FRAME_FAULT_KINDS}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}")
        self.matched = 0          # matching frames seen so far (loop thread only)
        self.fired = 0


# --- frames -------------------------------------------------------------------------------------

def frame_fields(frame: bytes) -> Tuple[int, int, int, int]:
    """(msg_type, flags, request_id, body_len) of a frame's header, unchecked."""
    _, _, msg_type, flags, request_id, body_len, _ = struct.unpack_from(">4sBBHQII", frame)
    return msg_type, flags, request_id, body_len


def rehash(frame: bytes) -> bytes:
    """The frame with body_hash and header_hash recomputed over what it now holds."""
    head = bytearray(frame[:FRAME_HEADER_SIZE])
    body = frame[FRAME_HEADER_SIZE:]
    _HASH.pack_into(head, 24, xxhash.xxh64_intdigest(body))
    _HASH.pack_into(head, 32, xxhash.xxh64_intdigest(bytes(head[:32])))
    return bytes(head) + body


class FrameSplitter:
    """Cuts a byte stream at frame boundaries: ``feed`` returns ``(is_frame, bytes)`` items.

    Only the magic and ``body_len`` are read. A boundary without the magic, or a length no
    node would accept, loses the framing: from then on bytes pass through raw, at once.
    """

    def __init__(self):
        self._buffer = bytearray()
        self.framed = True

    def feed(self, data: bytes) -> List[Tuple[bool, bytes]]:
        if not self.framed:
            return [(False, data)]
        self._buffer += data
        items = []
        while self._buffer:
            # judged on the first bytes, as the node does: garbage is not held back
            if not FRAME_MAGIC.startswith(bytes(self._buffer[:len(FRAME_MAGIC)])):
                return self._lose_framing(items)
            if len(self._buffer) < FRAME_HEADER_SIZE:
                break
            body_len = _BODY_LEN.unpack_from(self._buffer, 16)[0]
            if body_len > FRAME_BODY_BYTES_MAX:
                return self._lose_framing(items)
            end = FRAME_HEADER_SIZE + body_len
            if len(self._buffer) < end:
                break
            items.append((True, bytes(self._buffer[:end])))
            del self._buffer[:end]
        return items

    def flush(self) -> List[Tuple[bool, bytes]]:
        """What is left at the end of the stream (a partial frame), as raw bytes."""
        rest, self._buffer = bytes(self._buffer), bytearray()
        return [(False, rest)] if rest else []

    def _lose_framing(self, items):
        self.framed = False
        return items + self.flush()


# --- the proxy ----------------------------------------------------------------------------------

class FaultProxy:
    def __init__(self, target_host: str, target_port: int, *, seed: Optional[int] = None,
                 listen_host: str = "127.0.0.1", name: str = "proxy"):
        if seed is None:
            seed = int(os.environ.get("IMMUCORE_FAULT_SEED") or random.randrange(1 << 32))
        self.seed = seed
        self.name = name
        self.target = (target_host, target_port)
        self.listen_host = listen_host
        self.port: Optional[int] = None
        self._rng = random.Random(seed)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._server = None
        self._links: Dict[int, "_Link"] = {}
        self._link_count = 0
        # conditions, per direction
        self._latency_s = dict.fromkeys(DIRECTIONS, 0.0)
        self._bandwidth_bps: Dict[str, Optional[int]] = dict.fromkeys(DIRECTIONS, None)
        self._slice_bytes: Dict[str, Optional[int]] = dict.fromkeys(DIRECTIONS, None)
        self._slice_pause_s = 0.0
        # partitions
        self._blackholed = False
        self._refusing = False                    # new connections get an RST
        self._dropping = dict.fromkeys(DIRECTIONS, False)
        self._flap_task: Optional[asyncio.Task] = None
        self._frame_faults: List[FrameFault] = []
        self._recorded = {d: collections.deque(maxlen=RECORDED_FRAMES_MAX) for d in DIRECTIONS}
        self._stats = _new_stats()

    # --- lifecycle (test thread) ----------------------------------------------------------

    def __enter__(self) -> "FaultProxy":
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self):
        started = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._serve, args=(started,),
                                        name=f"faultproxy-{self.name}", daemon=True)
        self._thread.start()
        self.port = started.result(CALL_SECONDS_MAX)
        print(f"FaultProxy {self.name}: 127.0.0.1:{self.port} -> "
              f"{self.target[0]}:{self.target[1]} seed={self.seed}")

    def stop(self):
        if self._loop is None:
            return
        with contextlib.suppress(RuntimeError, concurrent.futures.TimeoutError):
            self._call(self._shutdown)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CALL_SECONDS_MAX)
        self._loop = None

    def _serve(self, started: concurrent.futures.Future):
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._accept, self.listen_host, 0))
            started.set_result(self._server.sockets[0].getsockname()[1])
            loop.run_forever()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            if not started.done():
                started.set_exception(exc)
        finally:
            loop.close()

    async def _shutdown(self):
        self._server.close()
        self._stop_flapping()
        for link in list(self._links.values()):
            link.abort(rst=False)
        await asyncio.gather(*(link.done for link in list(self._links.values())),
                             return_exceptions=True)

    def _call(self, function, *args):
        """Run ``function(*args)`` (a coroutine function or a plain one) in the proxy's loop and
        return its result: the change is in effect when this returns."""
        async def run():
            result = function(*args)
            return await result if asyncio.iscoroutine(result) else result
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(CALL_SECONDS_MAX)

    # --- conditions -----------------------------------------------------------------------

    def set_latency(self, ms: float, direction: Optional[str] = None):
        """Each byte is delivered ``ms`` after it was read (throughput is not capped by it)."""
        self._call(self._set_each, self._latency_s, direction, ms / 1000.0)

    def set_bandwidth(self, bytes_per_second: Optional[int], direction: Optional[str] = None):
        """At most this many bytes per second (None: no cap)."""
        self._call(self._set_each, self._bandwidth_bps, direction, bytes_per_second)

    def set_slicing(self, chunk_bytes: Optional[int], direction: Optional[str] = None,
                    pause_ms: float = 0.0):
        """Forward in writes of ``chunk_bytes`` (1: byte by byte), ``pause_ms`` apart."""
        self._call(setattr, self, "_slice_pause_s", pause_ms / 1000.0)
        self._call(self._set_each, self._slice_bytes, direction, chunk_bytes)

    @staticmethod
    def _set_each(table: dict, direction: Optional[str], value):
        for d in ([direction] if direction else DIRECTIONS):
            table[d] = value

    # --- partitions -----------------------------------------------------------------------

    def blackhole(self, on: bool = True):
        """Open connections: read everything, forward nothing (both directions); after ``heal``
        they resume with a hole in their streams. New connections are accepted but left unread
        and reach the server only after ``heal``, intact (as a connect whose SYNs are retried)."""
        self._call(setattr, self, "_blackholed", on)

    def reset(self, refuse_new: bool = True):
        """RST every open connection (SO_LINGER 0) and, until ``heal``, every new one."""
        self._call(self._reset_all, refuse_new)

    def drop(self, direction: str, on: bool = True):
        """One-way loss: bytes read in ``direction`` are thrown away."""
        self._call(self._dropping.__setitem__, direction, on)

    def flap(self, up_seconds=(0.5, 5.0), down_seconds=(0.5, 5.0), mode: str = "reset"):
        """Alternate up and down (``mode`` reset or blackhole), each phase lasting a seeded
        uniform time within its range, until ``heal``. Starts with an up phase."""
        if mode not in ("reset", "blackhole"):
            raise ValueError("mode must be 'reset' or 'blackhole'")
        self._call(self._start_flapping, up_seconds, down_seconds, mode)

    def heal(self):
        """End every partition (blackhole, reset, drop, flapping); conditions stay."""
        self._call(self._heal)

    def clear(self):
        """Heal and remove every condition and frame fault."""
        self._call(self._clear)

    def _heal(self):
        self._stop_flapping()
        self._blackholed = self._refusing = False
        self._dropping = dict.fromkeys(DIRECTIONS, False)

    def _clear(self):
        self._heal()
        self._latency_s = dict.fromkeys(DIRECTIONS, 0.0)
        self._bandwidth_bps = dict.fromkeys(DIRECTIONS, None)
        self._slice_bytes = dict.fromkeys(DIRECTIONS, None)
        self._frame_faults = []

    def _reset_all(self, refuse_new: bool):
        self._refusing = refuse_new
        for link in list(self._links.values()):
            link.abort(rst=True)
            self._stats["connections_reset"] += 1

    def _start_flapping(self, up_seconds, down_seconds, mode):
        self._stop_flapping()
        self._flap_task = asyncio.ensure_future(self._flapping(up_seconds, down_seconds, mode))

    def _stop_flapping(self):
        if self._flap_task is not None:
            self._flap_task.cancel()
            self._flap_task = None
            self._blackholed = self._refusing = False

    async def _flapping(self, up_seconds, down_seconds, mode):
        while True:
            await asyncio.sleep(self._rng.uniform(*up_seconds))
            self._stats["flaps"] += 1
            if mode == "reset":
                self._reset_all(refuse_new=True)
            else:
                self._blackholed = True
            await asyncio.sleep(self._rng.uniform(*down_seconds))
            self._blackholed = self._refusing = False

    # --- frame faults ---------------------------------------------------------------------

    def add_frame_fault(self, fault: FrameFault) -> FrameFault:
        self._call(self._frame_faults.append, fault)
        return fault

    def recorded_frames(self, direction: str = TO_CLIENT) -> List[bytes]:
        """Frames seen in ``direction`` (the last RECORDED_FRAMES_MAX), to splice elsewhere."""
        return self._call(lambda: [frame for _, frame in self._recorded[direction]])

    def stats(self) -> dict:
        """A snapshot of the counters (see ``_new_stats``)."""
        def snapshot():
            copy = {k: (dict(v) if isinstance(v, dict) else v) for k, v in self._stats.items()}
            copy["connections_open"] = len(self._links)
            return copy
        return self._call(snapshot)

    # --- connections (loop thread) --------------------------------------------------------

    async def _accept(self, reader, writer):
        index, self._link_count = self._link_count, self._link_count + 1
        self._stats["connections_accepted"] += 1
        if self._refusing:
            self._stats["connections_refused"] += 1
            _abort_with_rst(writer)
            return
        link = _Link(self, index, reader, writer)
        self._links[index] = link
        try:
            await link.run()
        finally:
            self._links.pop(index, None)

    def _discards(self, link: "_Link", direction: str) -> bool:
        return self._blackholed or self._dropping[direction]

    def _frame_items(self, pipe: "_Pipe", frame: bytes) -> list:
        """What to send for one whole frame: frames, raw bytes, or the _CUT marker."""
        direction = pipe.direction
        self._stats["frames_seen"][direction] += 1
        msg_type, _, request_id, _ = frame_fields(frame)
        fault = self._matching_fault(direction, msg_type)
        out = [frame] if fault is None else self._apply(fault, pipe, frame, request_id, msg_type)
        self._recorded[direction].append((pipe.link.index, frame))
        pipe.earlier.append(frame)
        return out

    def _matching_fault(self, direction: str, msg_type: int) -> Optional[FrameFault]:
        for fault in self._frame_faults:
            if fault.direction != direction or fault.fired >= fault.times:
                continue
            if fault.msg_type is not None and fault.msg_type != msg_type:
                continue
            fault.matched += 1
            if fault.matched > fault.nth:
                return fault
        return None

    def _apply(self, fault: FrameFault, pipe: "_Pipe", frame: bytes, request_id: int,
               msg_type: int) -> list:
        body_len = len(frame) - FRAME_HEADER_SIZE
        kind = fault.kind
        if kind == "flip_header":
            # with rehash, flip a checked field (0..31), not the hashes the rehash rewrites
            bit = self._choose_bit(fault, frame[:FRAME_HEADER_SIZE],
                                   32 if fault.rehash else FRAME_HEADER_SIZE)
            if bit is None:
                return [frame]
            out = [_flip(frame, bit, fault.rehash)]
        elif kind == "flip_body":
            bit = self._choose_bit(fault, frame[FRAME_HEADER_SIZE:], body_len)
            if bit is None:
                return [frame]                    # nothing to flip here: wait for another frame
            out = [_flip(frame, FRAME_HEADER_SIZE * 8 + bit, fault.rehash)]
        elif kind == "forge_length":
            forged = bytearray(frame)
            _BODY_LEN.pack_into(forged, 16, fault.body_len & 0xFFFFFFFF)
            out = [rehash(bytes(forged)) if fault.rehash else bytes(forged)]
        elif kind == "truncate":
            cut = fault.cut_at if fault.cut_at is not None else self._rng.randrange(len(frame))
            out = [frame[:cut], _CUT]
        elif kind == "duplicate":
            out = [frame, frame]
        elif kind == "drop":
            out = []
        elif kind == "reorder":
            if pipe.holding:
                return [frame]                    # one held frame at a time
            pipe.hold(frame, fault.hold_ms / 1000.0)
            out = []
        elif kind == "replay":
            if not pipe.earlier:
                return [frame]                    # nothing earlier on this connection yet
            out = [frame, pipe.earlier[-1]]
        else:                                     # splice
            foreign = fault.frame or self._foreign_frame(pipe, request_id, msg_type)
            if foreign is None:
                return [frame]                    # nothing recorded elsewhere yet
            if fault.adopt_request_id:
                foreign = _with_request_id(foreign, request_id)
            out = [foreign] if fault.replace else [foreign, frame]
        fault.fired += 1
        if kind != "reorder":                     # a reorder counts once it has a partner
            self._stats["frames_mutated"][kind] += 1
        return out

    def _choose_bit(self, fault: FrameFault, part: bytes, size_bytes: int) -> Optional[int]:
        """The bit to flip within ``part`` (header or body): the fault's, the one its locator
        picks from ``part`` (None: not this frame), or a seeded random one."""
        if callable(fault.bit):
            return fault.bit(part)
        if fault.bit is not None:
            return fault.bit
        return self._rng.randrange(size_bytes * 8) if size_bytes else None

    def _foreign_frame(self, pipe: "_Pipe", request_id: int, msg_type: int) -> Optional[bytes]:
        for link_index, frame in reversed(self._recorded[pipe.direction]):
            other_type, _, other_request_id, _ = frame_fields(frame)
            if link_index != pipe.link.index and (other_type, other_request_id) == (msg_type,
                                                                                   request_id):
                return frame
        return None


def _new_stats() -> dict:
    per_direction = lambda: dict.fromkeys(DIRECTIONS, 0)  # noqa: E731
    return {"connections_accepted": 0, "connections_refused": 0, "connections_reset": 0,
            "flaps": 0, "bytes_read": per_direction(), "bytes_forwarded": per_direction(),
            "bytes_dropped": per_direction(), "writes": per_direction(),
            "frames_seen": per_direction(), "frames_mutated": collections.Counter(),
            "reorders_unpaired": 0}


def _flip(frame: bytes, bit: int, with_rehash: bool) -> bytes:
    flipped = bytearray(frame)
    flipped[bit // 8] ^= 0x80 >> (bit % 8)
    return rehash(bytes(flipped)) if with_rehash else bytes(flipped)


def _with_request_id(frame: bytes, request_id: int) -> bytes:
    changed = bytearray(frame)
    struct.pack_into(">Q", changed, 8, request_id)
    _HASH.pack_into(changed, 32, xxhash.xxh64_intdigest(bytes(changed[:32])))
    return bytes(changed)


def _abort_with_rst(writer):
    """Close with an RST instead of a FIN: SO_LINGER on, timeout 0."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One client connection and its connection to the server: two pipes."""

    def __init__(self, proxy: FaultProxy, index: int, reader, writer):
        self.proxy, self.index = proxy, index
        self.client = (reader, writer)
        self.server = None
        self.aborted = False
        self.done = asyncio.get_running_loop().create_future()
        self._tasks: List[asyncio.Task] = []

    async def run(self):
        try:
            while self.proxy._blackholed and not self.aborted:
                await asyncio.sleep(HELD_POLL_SECONDS)
            if self.aborted:
                return
            try:
                self.server = await asyncio.open_connection(*self.proxy.target)
            except OSError:
                _abort_with_rst(self.client[1])   # as a refused connection would look
                return
            for _, writer in (self.client, self.server):
                _no_delay(writer)
            pipes = [_Pipe(self, TO_SERVER, self.client[0], self.server[1]),
                     _Pipe(self, TO_CLIENT, self.server[0], self.client[1])]
            self._tasks = [asyncio.ensure_future(p.run()) for p in pipes]
            await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            self.abort(rst=False)
            if not self.done.done():
                self.done.set_result(None)

    def abort(self, rst: bool):
        self.aborted = True
        for task in self._tasks:
            task.cancel()
        for end in (self.client, self.server):
            if end is None or end[1].transport.is_closing():
                continue
            if rst:
                _abort_with_rst(end[1])
            else:
                end[1].close()


class _Pipe:
    """One direction of a link: read, apply faults, queue with a delivery time, write."""

    def __init__(self, link: _Link, direction: str, reader, writer):
        self.link, self.direction = link, direction
        self.proxy = link.proxy
        self.reader, self.writer = reader, writer
        self.splitter = FrameSplitter()
        self.earlier = collections.deque(maxlen=EARLIER_FRAMES_MAX)
        self.queue: asyncio.Queue = asyncio.Queue(QUEUE_CHUNKS_MAX)
        self._held: Optional[bytes] = None
        self._held_until = 0.0
        self._next_send_at = 0.0

    async def run(self):
        sender = asyncio.ensure_future(self._send_loop())
        try:
            await self._read_loop()
            await sender
        except (OSError, asyncio.IncompleteReadError):
            self.link.abort(rst=True)             # one side failed: the other sees it too
        finally:
            sender.cancel()

    @property
    def holding(self) -> bool:
        return self._held is not None

    def hold(self, frame: bytes, seconds: float):
        self._held = frame
        self._held_until = asyncio.get_running_loop().time() + seconds

    async def _read_loop(self):
        stats = self.proxy._stats
        loop = asyncio.get_running_loop()
        while True:
            data = await self._read_or_release_held(loop)
            if data is None:
                continue
            if not data:
                for _, chunk in self.splitter.flush():
                    await self._queue(chunk)
                await self._release_held()
                await self.queue.put((0.0, _EOF))
                return
            stats["bytes_read"][self.direction] += len(data)
            if self.proxy._discards(self.link, self.direction):
                stats["bytes_dropped"][self.direction] += len(data)
                continue
            for is_frame, chunk in self.splitter.feed(data):
                items = self.proxy._frame_items(self, chunk) if is_frame else [chunk]
                if is_frame and self._held is not None and items:
                    items = items + [self._held]  # the held frame goes after its partner
                    self._held = None
                    stats["frames_mutated"]["reorder"] += 1
                for item in items:
                    await self._queue(item)

    async def _read_or_release_held(self, loop) -> Optional[bytes]:
        """The next read; while a frame is held for a reorder, give up waiting for its partner
        at its deadline (then it goes alone and None is returned)."""
        if self._held is None:
            return await self.reader.read(READ_BYTES_MAX)
        try:
            return await asyncio.wait_for(self.reader.read(READ_BYTES_MAX),
                                          max(self._held_until - loop.time(), 0.0))
        except asyncio.TimeoutError:
            self.proxy._stats["reorders_unpaired"] += 1
            await self._release_held()
            return None

    async def _release_held(self):
        if self._held is not None:
            held, self._held = self._held, None
            await self._queue(held)

    async def _queue(self, item):
        if item is _CUT or item:
            deliver_at = asyncio.get_running_loop().time() + self.proxy._latency_s[self.direction]
            await self.queue.put((deliver_at, item))

    async def _send_loop(self):
        loop = asyncio.get_running_loop()
        while True:
            deliver_at, item = await self.queue.get()
            if item is _EOF:
                with contextlib.suppress(OSError):
                    if self.writer.can_write_eof():
                        self.writer.write_eof()
                return
            if item is _CUT:
                await self.writer.drain()
                self.link.abort(rst=False)        # the peer sees the stream end mid-frame
                return
            delay = deliver_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await self._write(item, loop)

    async def _write(self, data: bytes, loop):
        stats = self.proxy._stats
        for piece in self._pieces(data):
            rate = self.proxy._bandwidth_bps[self.direction]
            if rate:
                wait = self._next_send_at - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                self._next_send_at = max(loop.time(), self._next_send_at) + len(piece) / rate
            self.writer.write(piece)
            await self.writer.drain()
            stats["writes"][self.direction] += 1
            stats["bytes_forwarded"][self.direction] += len(piece)
            if self.proxy._slice_bytes[self.direction] and self.proxy._slice_pause_s:
                await asyncio.sleep(self.proxy._slice_pause_s)

    def _pieces(self, data: bytes):
        size = len(data)
        slice_bytes = self.proxy._slice_bytes[self.direction]
        rate = self.proxy._bandwidth_bps[self.direction]
        if rate:
            step = max(rate // BANDWIDTH_SLICES_PER_SECOND, 1)
            slice_bytes = min(slice_bytes or step, step)
        if not slice_bytes or slice_bytes >= size:
            return [data]
        view = memoryview(data)
        return [bytes(view[i:i + slice_bytes]) for i in range(0, size, slice_bytes)]


def _no_delay(writer):
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
