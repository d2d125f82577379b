"""The node's event-loop CPU per request, measured in process.

The end-to-end benchmarks (bench_node) move by 20 % or more with the machine's mood, which
hides a change of a few microseconds on the event loop. Here a real ``Node`` (durable, its
writer threads and LMDB files) serves single-entry SETs from 32 connections whose transports
are stubs: no sockets, so what is measured is the loop's own Python per request (frame decode,
session and permission checks, the handoff to the writer, the answer), counted with the loop
thread's CPU clock, which other threads and processes do not move.
"""
from __future__ import annotations

import asyncio
import tempfile
import time

from immucore.protocol.frames import encode_frame
from immucore.protocol.messages import Msg, pack
from immucore.server.connection import Connection
from immucore.server.handlers import Dispatcher
from immucore.server.node import Node, NodeOptions

try:
    import uvloop
except ImportError:        # uvloop is a dependency; keep the stdlib loop as a fallback
    uvloop = None


class _CountingTransport:
    """Counts the answer frames written to it and wakes the benchmark when all are in."""

    def __init__(self, answers: "_Answers"):
        self._answers = answers
        self.closed = False

    def get_extra_info(self, name):
        return ("127.0.0.1", 1) if name == "peername" else None

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def write(self, data):
        self._answers.add(1)

    def writelines(self, chunks):
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


async def _loop_cpu_per_set(connections: int, rounds: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="immucore-loop-bench-") as data_dir:
        node = Node(NodeOptions(dir=data_dir, port=0, metrics_server=False))
        try:
            dispatch = Dispatcher(node)
            answers = _Answers()
            conns = []
            for _ in range(connections):
                conn = Connection(node, dispatch)
                conn.connection_made(_CountingTransport(answers))
                session = node.sessions.open(node.users.get_user("immudb"), "defaultdb")
                conn.logged_in(session.id, False)
                conns.append(conn)
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
    per_set = sorted(per_set[len(per_set) // 10:])         # the first rounds warm up
    median = per_set[len(per_set) // 2]
    return {"connections": connections, "sets": connections * rounds, "durable": True,
            "loop_us_per_set_median": median * 1e6,
            "loop_us_per_set_p25": per_set[len(per_set) // 4] * 1e6,
            "loop_only_sets_per_s": 1 / median}


def loop_cpu_per_set(connections: int = 32, rounds: int = 400) -> dict:
    """Event-loop CPU per single-entry durable SET; ``loop_only_sets_per_s`` is the rate the
    loop alone could sustain (sockets, the writer threads and the client come on top)."""
    if uvloop is not None:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        return asyncio.run(_loop_cpu_per_set(connections, rounds))
    finally:
        asyncio.set_event_loop_policy(None)
