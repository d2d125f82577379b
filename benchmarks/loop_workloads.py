"""The node's event-loop CPU per request, measured in process.

The end-to-end benchmarks (bench_node) move by 20 % or more with the machine's mood, which
hides a change of a few microseconds on the event loop. Here a real ``Node`` (durable, its
writer threads and LMDB files) serves requests from connections whose transports are stubs: no
sockets, so what is measured is the loop's own Python per request (frame decode, session and
permission checks, the handoff to the writer or the read, the answer), counted with the loop
thread's CPU clock, which other threads and processes do not move. Two shapes: single-entry
SETs from 32 connections, and pipelined GETs arriving 256 to a read on one connection.
"""
from __future__ import annotations

import asyncio
import tempfile
import time

from immucore.protocol.frames import FLAG_ERROR, encode_frame
from immucore.protocol.messages import Msg, pack
from immucore.server.connection import Connection
from immucore.server.handlers import Dispatcher
from immucore.server.node import Node, NodeOptions

from .node_workloads import run_on_uvloop


class _CountingTransport:
    """Counts the answer frames written to it (and the error frames among them) and wakes the
    benchmark when all are in."""

    def __init__(self, answers: "_Answers"):
        self._answers = answers
        self.closed = False
        self.errors = 0

    def get_extra_info(self, name):
        return ("127.0.0.1", 1) if name == "peername" else None

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def write(self, data):
        self.writelines((data,))

    def writelines(self, chunks):
        # every chunk is one frame; its flags are big-endian at bytes 6..7
        self.errors += sum(1 for frame in chunks if frame[7] & FLAG_ERROR)
        self._answers.add(len(chunks))

    def is_closing(self):
        return self.closed

    def close(self):
        self.closed = True


class _Answers:
    def __init__(self):
        self.count = 0
        self.expected = 0
        self.all_in = asyncio.Event()

    def expect(self, more: int):
        self.expected += more
        self.all_in.clear()

    def add(self, frames: int):
        self.count += frames
        if self.count >= self.expected:
            self.all_in.set()


def _logged_in(node, dispatch, answers: "_Answers") -> Connection:
    """A connection past login, on a transport that counts its answers into ``answers``."""
    conn = Connection(node, dispatch)
    conn.connection_made(_CountingTransport(answers))
    session = node.sessions.open(node.users.get_user("immudb"), "defaultdb")
    conn.logged_in(session.id, False)
    return conn


async def _loop_cpu_per_set(connections: int, rounds: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="immucore-loop-bench-") as data_dir:
        node = Node(NodeOptions(dir=data_dir, port=0, metrics_server=False))
        try:
            dispatch, answers = Dispatcher(node), _Answers()
            conns = [_logged_in(node, dispatch, answers) for _ in range(connections)]
            per_set = []
            request_id = 0
            for n in range(rounds):
                frames = []
                for index in range(connections):
                    request_id += 1
                    body = pack({"kvs_flat": [b"c%d-%d" % (index, n), b"x" * 100]})
                    frames.append(encode_frame(int(Msg.SET), 0, request_id, body))
                answers.expect(connections)
                started = time.thread_time()
                for conn, frame in zip(conns, frames):    # one read per connection, as 32
                    conn.data_received(frame)              # clients with one set in flight
                await answers.all_in.wait()                # idle waiting costs no loop CPU
                per_set.append((time.thread_time() - started) / connections)
            committed = node.database("defaultdb").current_state().tx_id
            if committed < connections * rounds:      # error answers count as answers too
                raise RuntimeError(f"only {committed} of {connections * rounds} sets committed")
            for conn in conns:
                conn.connection_lost(None)
        finally:
            await node.close()
    return _summary(per_set, {"connections": connections, "sets": connections * rounds,
                              "durable": True}, "set")


async def _loop_cpu_per_get(burst: int, rounds: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="immucore-loop-bench-") as data_dir:
        node = Node(NodeOptions(dir=data_dir, port=0, metrics_server=False))
        try:
            db = node.database("defaultdb")
            db.set({b"key%d" % n: b"v" * 100 for n in range(1000)})
            while not db.index_covers(0):          # timed from when the index has caught up
                await asyncio.sleep(0.01)
            answers = _Answers()
            conn = _logged_in(node, Dispatcher(node), answers)
            per_get = []
            request_id = 0
            for _ in range(rounds):
                frames = []
                for _ in range(burst):
                    request_id += 1
                    body = pack({"key": b"key%d" % (request_id % 1000)})
                    frames.append(encode_frame(int(Msg.GET), 0, request_id, body))
                data = b"".join(frames)
                answers.expect(burst)
                started = time.thread_time()
                conn.data_received(data)                # one read of a pipelining client
                await answers.all_in.wait()
                per_get.append((time.thread_time() - started) / burst)
            if conn.transport.errors:
                raise RuntimeError(f"{conn.transport.errors} gets were answered with an error")
            conn.connection_lost(None)
        finally:
            await node.close()
    return _summary(per_get, {"connections": 1, "gets": burst * rounds, "per_read": burst},
                    "get")


def _summary(per_request: list, settings: dict, name: str) -> dict:
    per_request = sorted(per_request[len(per_request) // 10:])   # the first rounds warm up
    median = per_request[len(per_request) // 2]
    return {**settings, f"loop_us_per_{name}_median": median * 1e6,
            f"loop_us_per_{name}_p25": per_request[len(per_request) // 4] * 1e6,
            f"loop_only_{name}s_per_s": 1 / median}


def loop_cpu_per_get(burst: int = 256, rounds: int = 200) -> dict:
    """Event-loop CPU per pipelined GET of an existing key, ``burst`` GETs to a read (what a
    client with that many in flight sends); every answer must be an entry."""
    return run_on_uvloop(_loop_cpu_per_get(burst, rounds))


def loop_cpu_per_set(connections: int = 32, rounds: int = 400) -> dict:
    """Event-loop CPU per single-entry durable SET; ``loop_only_sets_per_s`` is the rate the
    loop alone could sustain (sockets, the writer threads and the client come on top)."""
    return run_on_uvloop(_loop_cpu_per_set(connections, rounds))
