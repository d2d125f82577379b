"""EXPORT_TXS_STREAM, the server stream of a bulk export, against a real node: chunks in
order and whole, each with its last tx's Alh, a copy applied to a replica that ends equal,
permission checked (again after every wait, as for the EXPORT_TXS long poll), and a slow
reader's client holding only a few chunks."""
from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time

import pytest

from immucore.client import AsyncClient, Client
from immucore.constants import (CLIENT_STREAM_ITEMS_BUFFERED_MAX, EXPORT_STREAM_CHUNK_TXS,
                                FRAME_BODY_BYTES_MAX)
from immucore.database import open_database
from immucore.errors import IllegalArgumentsError
from immucore.protocol.frames import FLAG_ERROR, FLAG_STREAM, FrameDecoder, encode_frame
from immucore.protocol.messages import Msg, RemoteError, pack, unpack

from .nodes import running_node

TXS = 12 * EXPORT_STREAM_CHUNK_TXS + 321
_U64 = struct.Struct(">Q")


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with running_node(tmp_path_factory.mktemp("export-stream")) as running:
        async def fill():
            client = AsyncClient(running.host, running.port)
            await client.login("immudb", "immudb")
            for start in range(0, TXS, 500):
                await asyncio.gather(*(client.set({b"k%d" % n: b"v%d" % n})
                                       for n in range(start, min(start + 500, TXS))))
            await client.create_user("reader", "Reader1!pw", "read", "defaultdb")
            await client.close()
        asyncio.run(fill())
        yield running


def _stream(node, first, count, *, user=("immudb", "immudb"), pause=0.0, sizes=None):
    async def run():
        client = AsyncClient(node.host, node.port)
        await client.login(*user)
        chunks, queues = [], []
        try:
            async for chunk in client.export_stream(first, count):
                chunks.append(chunk)
                if sizes is not None:
                    # the stream's queue of chunks received and not yet taken (kept from the
                    # first chunk on: the client forgets it once the end frame arrived)
                    queues = queues or [q for q in client._pending.values()
                                        if type(q) is asyncio.Queue]
                    sizes.append(queues[0].qsize())
                await asyncio.sleep(pause)
            alhs = [(await client.tx_by_id(_tx_id(c["blobs"][-1]))).header.alh() for c in chunks]
            return chunks, alhs
        finally:
            await client.close()
    return asyncio.run(run())


def _tx_id(blob: bytes) -> int:
    return _U64.unpack_from(blob, 4)[0]


def test_the_whole_log_streams_in_order_in_chunks_with_their_last_alh(node, tmp_path):
    chunks, alhs = _stream(node, 1, 10**9)
    blobs = [blob for chunk in chunks for blob in chunk["blobs"]]
    assert [_tx_id(b) for b in blobs] == list(range(1, len(blobs) + 1))
    assert len(blobs) >= TXS
    assert all(len(c["blobs"]) <= EXPORT_STREAM_CHUNK_TXS for c in chunks) and len(chunks) >= 13
    assert [c["last_alh"] for c in chunks] == alhs
    replica = open_database(str(tmp_path / "replica"), replica=True)
    try:
        for chunk in chunks:
            replica.replicate_txs_async(chunk["blobs"], last_alh=chunk["last_alh"]).result()
        assert replica.current_state().tx_hash == alhs[-1]
        assert replica.audit() == len(blobs)
    finally:
        replica.close()


def test_a_range_streams_exactly_and_past_the_end_nothing(node):
    chunks, _ = _stream(node, 2001, 1500)
    assert [_tx_id(b) for c in chunks for b in c["blobs"]] == list(range(2001, 3501))
    assert _stream(node, 10**9, 5)[0] == []


def test_bad_ranges_and_a_reader_are_refused(node):
    with pytest.raises(IllegalArgumentsError):
        _stream(node, 1, 0)
    with pytest.raises(IllegalArgumentsError):
        _stream(node, 0, 10)
    with pytest.raises(RemoteError, match="permission denied"):
        _stream(node, 1, 10, user=("reader", "Reader1!pw"))


def test_a_slow_reader_holds_only_a_few_chunks(node):
    sizes = []
    chunks, _ = _stream(node, 1, 10**9, pause=0.05, sizes=sizes)
    assert len(chunks) >= 13
    assert max(sizes) <= CLIENT_STREAM_ITEMS_BUFFERED_MAX + 2, sizes


def test_streams_abandoned_midway_end_and_leave_the_node_serving(tmp_path):
    """A client that drops its connection in the middle of a stream: the stream ends (it
    reads nothing more for nobody) and the node's count of logged-in connections stays
    right, so with --max-connections 8 (2 may wait to log in) new clients still get in."""
    with running_node(tmp_path, "--max-connections=8") as node:
        async def fill_then_abandon():
            client = AsyncClient(node.host, node.port)
            await client.login("immudb", "immudb")
            for start in range(0, 6000, 500):
                await asyncio.gather(*(client.set({b"a%d" % n: b"v"})
                                       for n in range(start, start + 500)))
            await client.close()
            for _ in range(4):
                reader = AsyncClient(node.host, node.port)
                await reader.login("immudb", "immudb")
                async for _chunk in reader.export_stream(1, 10**9):
                    break                          # one chunk, then the connection goes
                await reader.close()
        asyncio.run(fill_then_abandon())
        time.sleep(0.5)
        for _ in range(3):
            with Client(node.host, node.port) as client:
                client.login("immudb", "immudb")
                assert client.get(b"a1").value == b"v"
        assert "Traceback" not in node.log()


def test_other_calls_on_the_streams_connection_are_answered_while_its_caller_is_behind(node):
    """The client pauses reading for a caller behind on a stream only when nothing else
    waits on the connection: a get made meanwhile is answered, not left behind the pause."""
    async def run():
        client = AsyncClient(node.host, node.port, timeout=5)
        await client.login("immudb", "immudb")
        values = []
        try:
            async for _chunk in client.export_stream(1, 10**9):
                await asyncio.sleep(0.05)          # behind: the chunks pile up
                values.append((await client.get(b"k7")).value)
        finally:
            await client.close()
        return values

    values = asyncio.run(run())
    assert len(values) >= 13 and set(values) == {b"v7"}


# --- a change of the user while an export waits ------------------------------------------------

FOLLOWER = ("follower", "Follower1!pw")


def _change_user(admin, change: str):
    """Deactivate ``follower``, take its admin away, or give it a new password."""
    if change == "deactivate":
        admin.set_user_active(FOLLOWER[0], False)
    elif change == "revoke":
        admin.revoke(FOLLOWER[0], "admin", "orders")
    else:
        admin.change_password(FOLLOWER[0], "", "Follower2!pw")


def _orders_node_admin(node):
    admin = Client(node.host, node.port)
    admin.login("immudb", "immudb")
    admin.create_database("orders")
    admin.create_user(*FOLLOWER, "admin", "orders")
    admin.use_database("orders")
    return admin


@pytest.mark.parametrize("change", ["deactivate", "revoke", "password"])
def test_a_long_poll_that_waited_across_a_change_of_its_user_answers_the_error(tmp_path, change):
    """An EXPORT_TXS long poll of an admin of ``orders``, standing when the user is changed:
    the next commit must not reach it (the node checks again after the wait)."""
    with running_node(tmp_path) as node, _orders_node_admin(node) as admin:
        admin.set({b"before": b"1"})
        outcome = {}

        def poll():
            async def run():
                client = AsyncClient(node.host, node.port, timeout=30)
                await client.login(*FOLLOWER, "orders")
                try:
                    outcome["answer"] = await client.export_batch(2, 1000, wait_ms=20_000)
                except Exception as exc:  # noqa: BLE001 - asserted below
                    outcome["error"] = exc
                finally:
                    await client.close()
            asyncio.run(run())

        thread = threading.Thread(target=poll)
        thread.start()
        time.sleep(1.0)
        assert thread.is_alive() and not outcome, outcome        # it stands on the node
        _change_user(admin, change)
        admin.set({b"after": b"not for the follower"})
        thread.join(15)
        assert not thread.is_alive()
        assert "answer" not in outcome, f"the commit reached a changed user: {outcome}"
        assert getattr(outcome["error"], "code", None) in ("session_not_found",
                                                           "permission_denied"), outcome


def _raw_frames(sock, decoder):
    while True:
        data = sock.recv(1 << 20)
        if not data:
            return
        for frame in decoder.feed(data):
            yield frame


def test_a_stream_stops_at_a_revoked_permission_before_its_next_chunk_leaves(tmp_path):
    """A stream whose reader stopped reading: the node's send buffer (64 MiB) is full, so it
    waits before the next chunk. The follower's admin is revoked meanwhile: once the reader
    reads again, what was handed to the socket before arrives, then the error — never a chunk
    made after the change (or read before it and sent after)."""
    value = bytes(20 << 20)                   # one tx per chunk (a chunk stops at half a frame)
    with running_node(tmp_path) as node, _orders_node_admin(node) as admin:
        for n in range(5):
            admin.set({b"big%d" % n: value})
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)   # the node buffers it
        sock.connect((node.host, node.port))
        decoder = FrameDecoder(FRAME_BODY_BYTES_MAX)
        frames = _raw_frames(sock, decoder)
        try:
            sock.sendall(encode_frame(int(Msg.LOGIN), 0, 1, pack(
                {"user": FOLLOWER[0], "password": FOLLOWER[1], "database": "orders"})))
            _, flags, _, body = next(frames)
            assert not flags & FLAG_ERROR, unpack(body)
            sock.sendall(encode_frame(int(Msg.EXPORT_TXS_STREAM), 0, 2,
                                      pack({"first_tx_id": 1, "count": 5})))
            time.sleep(3.0)                   # the node fills its send buffer and waits
            _change_user(admin, "revoke")
            chunks, last = 0, None
            for _, flags, request_id, body in frames:
                assert request_id == 2
                if flags & FLAG_STREAM:
                    chunks += 1
                    continue
                last = (flags, unpack(body))
                break
        finally:
            sock.close()
        assert last is not None and last[0] & FLAG_ERROR, \
            f"the stream ended normally after the revocation ({chunks} chunks)"
        assert last[1]["code"] in ("session_not_found", "permission_denied"), last
        assert chunks < 5


def test_an_export_answer_is_one_snapshot_while_the_primary_commits(tmp_path):
    """EXPORT_TXS's blobs, last_alh and committed_tx_id come from one snapshot of the log: on
    a real node taking writes from 8 connections, every answer's blobs reach exactly the
    committed id it reports, and its last_alh is that tx's."""
    with running_node(tmp_path) as node:
        async def run():
            writers = [AsyncClient(node.host, node.port) for _ in range(8)]
            reader = AsyncClient(node.host, node.port)
            for client in writers + [reader]:
                await client.login("immudb", "immudb")
            stop = asyncio.Event()

            async def write(client, n):
                while not stop.is_set():
                    await client.set({b"w%d-%d" % (n, time.monotonic_ns()): b"v"})

            tasks = [asyncio.ensure_future(write(c, n)) for n, c in enumerate(writers)]
            answers = []
            try:
                while len(answers) < 150:
                    answers.append(await reader.call(Msg.EXPORT_TXS,
                                                     {"first_tx_id": 1, "count": 5000}))
            finally:
                stop.set()
                await asyncio.gather(*tasks)
            alhs = {}
            for answer in answers:
                last = answer["committed_tx_id"]
                if last and last not in alhs:
                    alhs[last] = (await reader.tx_by_id(last)).header.alh()
            for client in writers + [reader]:
                await client.close()
            return answers, alhs

        answers, alhs = asyncio.run(run())
    assert answers[-1]["committed_tx_id"] > answers[0]["committed_tx_id"] + 50   # it committed
    for answer in answers:
        assert len(answer["blobs"]) == answer["committed_tx_id"]
        if answer["blobs"]:
            assert _tx_id(answer["blobs"][-1]) == answer["committed_tx_id"]
            assert answer["last_alh"] == alhs[answer["committed_tx_id"]]
