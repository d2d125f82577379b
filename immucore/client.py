"""Clients of an immucore node: ``AsyncClient`` (asyncio) and ``Client`` (blocking).

Both have the embedded ``Database`` API's method names and result types, plus ``login``,
``logout``, ``use_database``, database and user administration, and ``verified_*`` calls that
check every proof client-side against a locally kept trusted state (``StateStore``).

Requests are pipelined: any number of calls may be in flight on one connection (the node
answers each by request id), so ``asyncio.gather`` of many ``get``s costs one round trip.
"""
from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import os
import socket
import threading
import time
from typing import Any, AsyncIterator, Dict, List, Optional

from . import codec, verify
from .constants import (CLIENT_LONG_POLL_GRACE_SECONDS, CLIENT_STREAM_ITEMS_BUFFERED_MAX,
                        CLIENT_TIMEOUT_SECONDS_DEFAULT, EXPORT_WAIT_MS_MAX,
                        FRAME_BODY_BYTES_MAX)
from .durable_file import replace_durably
from .errors import IllegalArgumentsError, ImmucoreError, KeyNotFoundError, VerificationError
from .protocol.answers import decode_header_answer, encode_flat_set_request
from .protocol.frames import FLAG_END, FLAG_ERROR, FLAG_STREAM, FrameDecoder, encode_frame
from .protocol.messages import (Msg, entry_from_wire, from_wire, header_from_wire, pack,
                                raise_error, to_wire, unpack)
from .types import KVMetadata, State, TxHeader

_EMPTY_HASH = codec.sha256(b"")


@contextlib.contextmanager
def _proof_checks():
    """A proof the node shaped wrongly (a part missing, of the wrong type or out of range)
    fails verification like a wrong one: the caller gets VerificationError, never an
    AttributeError from deep inside the checks."""
    try:
        yield
    except (AttributeError, TypeError, ValueError, IndexError, KeyError,
            IllegalArgumentsError) as exc:      # the last: a wire value of an unknown type
        raise VerificationError(f"malformed proof: {type(exc).__name__}: {exc}") from exc


class ConnectionClosedError(ImmucoreError):
    """The connection to the node closed before the answer came."""


STATE_FILE_ENV = "IMMUCORE_STATE_FILE"
STATE_FILE_DEFAULT = os.path.join("~", ".immucore", "client_state.json")
STATE_FILE_LOCK_WAIT_SECONDS = 10.0      # another client holding the file's lock this long: error


def default_state_path() -> str:
    """Where clients keep their trusted states unless told otherwise: ``$IMMUCORE_STATE_FILE``,
    else ``~/.immucore/client_state.json``."""
    return os.path.expanduser(os.environ.get(STATE_FILE_ENV) or STATE_FILE_DEFAULT)


class StateStore:
    """Trusted states per (server, database), kept in a JSON file (like immudb's SDK state dir),
    replaced durably on every change (``durable_file``): after a crash it holds the last state
    saved, or the one before, never a torn file. ``path=None`` keeps them in memory only.

    Several clients may share one file, in one process or several: a change is made under an
    exclusive lock of ``<path>.lock``, to the file as it is then (an entry removed from it by
    hand stays removed), and a state only moves forward: a later tx replaces an earlier one,
    an earlier one is not written, and a different hash for the same tx is a VerificationError
    (the node showed two histories)."""

    def __init__(self, path: Optional[str] = None):
        self.path = path
        self._states: Dict[str, dict] = {}
        if path and os.path.exists(path):
            self._states = _load_states(path)
        self._lock = threading.Lock()

    @classmethod
    def default(cls) -> "StateStore":
        """The store of ``default_state_path()``, one per path in this process."""
        path = default_state_path()
        with _DEFAULT_STORES_LOCK:
            store = _DEFAULT_STORES.get(path)
            if store is None:
                store = _DEFAULT_STORES[path] = cls(path)
            return store

    def get(self, server: str, database: str) -> State:
        raw = self._states.get(f"{server}/{database}")
        if raw is None:
            return State(database, 0, _EMPTY_HASH)
        return State(database, raw["tx_id"], bytes.fromhex(raw["tx_hash"]))

    def databases(self, server: str) -> List[str]:
        """The databases of ``server`` with a trusted state, sorted."""
        head = server + "/"
        return sorted(key[len(head):] for key in self._states if key.startswith(head))

    def put(self, server: str, state: State):
        key = f"{server}/{state.db}"
        with self._lock:
            if not self.path:
                self._states[key] = _newer(self._states.get(key), state, key)
                return
            with _file_lock(self.path + ".lock"):
                states = _load_states(self.path) if os.path.exists(self.path) else {}
                states[key] = _newer(states.get(key), state, key)
                replace_durably(self.path, json.dumps(states).encode())
                self._states = states


_DEFAULT_STORES: Dict[str, StateStore] = {}
_DEFAULT_STORES_LOCK = threading.Lock()


def _newer(saved: Optional[dict], state: State, key: str) -> dict:
    """What to keep for ``key``: ``state`` unless ``saved`` is later; the same tx with another
    hash means two different histories."""
    entry = {"tx_id": state.tx_id, "tx_hash": state.tx_hash.hex()}
    if saved is None or saved["tx_id"] < state.tx_id:
        return entry
    if saved["tx_id"] == state.tx_id and saved["tx_hash"] != entry["tx_hash"]:
        raise VerificationError(
            f"{key}: tx {state.tx_id} was trusted with another hash; the node has shown two "
            "different histories")
    return saved


@contextlib.contextmanager
def _file_lock(path: str):
    """An exclusive lock of ``path`` (created 0600, never through a symbolic link), waited for
    at most STATE_FILE_LOCK_WAIT_SECONDS."""
    import fcntl                         # here: the rest of the client needs no POSIX module
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + STATE_FILE_LOCK_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ImmucoreError(
                        f"trusted state file {path} stayed locked for "
                        f"{STATE_FILE_LOCK_WAIT_SECONDS:g} s by another client") from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)                     # releases the lock


def _load_states(path: str) -> dict:
    """The saved states; an unreadable file is an error, never an empty store: starting afresh
    would trust whatever state the node shows next."""
    try:
        with open(path, "rb") as f:
            states = json.loads(f.read())
        if not isinstance(states, dict) or not all(
                isinstance(s, dict) and isinstance(s.get("tx_id"), int)
                and isinstance(s.get("tx_hash"), str) for s in states.values()):
            raise ValueError("not a map of {tx_id, tx_hash} states")
        for s in states.values():
            bytes.fromhex(s["tx_hash"])
    except (OSError, ValueError) as exc:
        raise ImmucoreError(
            f"trusted state file {path} is unreadable ({exc}); it is not reset silently, which "
            "would trust the next state a node shows: restore it, or remove it to trust anew"
        ) from None
    return states


class _NodeProtocol(asyncio.Protocol):
    """One connection to the node: frames go to the client as they arrive, with no reader task
    between the socket and the waiting calls (a stream reader's task cost a loop step and a
    wake-up per read: about a sixth of a single-entry SET's client time)."""

    def __init__(self, client: "AsyncClient"):
        self._client = client
        self._decoder = FrameDecoder(FRAME_BODY_BYTES_MAX)
        self.transport = None
        self.closed = asyncio.get_running_loop().create_future()   # set once it is over

    def connection_made(self, transport):
        # attached at once: the node may send its reason and close (too many connections,
        # protected mode) before create_connection has even returned
        self.transport = transport
        self._client._attach(self, transport)

    def data_received(self, data: bytes):
        if self._client._protocol is not self:
            return                        # a connection the client already gave up
        try:
            self._client._answered(self._decoder.feed(data))
        except ImmucoreError as exc:      # a bad frame or body: this connection is unusable
            self._client._ended(self, ConnectionClosedError(
                f"connection to the node failed: {exc}"))
            self.transport.abort()

    def connection_lost(self, exc):
        self._client._ended(self, ConnectionClosedError(f"connection to the node failed: {exc}")
                            if exc is not None else None)
        if not self.closed.done():
            self.closed.set_result(None)


class AsyncClient:
    def __init__(self, host: str = "127.0.0.1", port: int = 3322, *,
                 timeout: float = CLIENT_TIMEOUT_SECONDS_DEFAULT, ssl=None,
                 state_store: Optional[StateStore] = None, server_public_key=None):
        """``server_public_key`` (a PEM file path or the raw point): every state the node returns
        must then carry its valid signature (``--signingKey`` on the node)."""
        self.host, self.port, self.timeout, self._ssl = host, port, timeout, ssl
        self.server_public_key = None
        if server_public_key is not None:
            from .signing import load_public_key
            self.server_public_key = load_public_key(server_public_key)
        self._state_store = state_store
        self.database: Optional[str] = None
        self.session_token: Optional[str] = None
        self._transport = self._protocol = None
        self._pending: Dict[int, Any] = {}
        self._reading_paused = False      # by _maybe_pause_reading: stream callers behind
        self._ids = itertools.count(1)
        self._closed_error: Optional[BaseException] = None
        self._close_reason: Optional[str] = None    # what the node said when it closed
        self._out: list = []              # request frames waiting for the flush below
        self._flush_scheduled = False
        self._deadlines: list = []        # heap of (when, request id, msg, timeout)
        self._expiry_timer = None

    # --- connection -------------------------------------------------------------------

    async def connect(self):
        if self._transport is not None:
            return
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await asyncio.wait_for(loop.create_connection(
                lambda: _NodeProtocol(self), self.host, self.port, ssl=self._ssl), self.timeout)
        except asyncio.TimeoutError:
            # the builtin one, which callers catch (before Python 3.11 asyncio's is another class)
            raise TimeoutError(f"connecting to {self.host}:{self.port} timed out after "
                               f"{self.timeout:g}s") from None
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # small pipelined requests must not wait for Nagle's algorithm
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _attach(self, protocol: _NodeProtocol, transport):
        """A new connection (from its protocol's connection_made): the client's from now on."""
        self._closed_error = self._close_reason = None
        self._transport, self._protocol = transport, protocol

    def _check_open(self):
        """After connecting: a node that refused the connection at once has already said why."""
        if self._transport is None:
            raise self._closed_error or ConnectionClosedError("connection closed by the node")

    async def close(self):
        protocol = self._protocol
        if self._transport is not None:
            self._transport.close()
        if protocol is not None:
            await protocol.closed         # connection_lost failed every waiting call
        self._transport = self._protocol = None
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        self._deadlines.clear()       # their waiters were failed when the connection ended

    async def __aenter__(self):
        await self.connect()
        return self

    async def __aexit__(self, *exc):
        await self.close()

    def _answered(self, frames: list):
        """Frames from the node (on the loop, as they arrive): each answer to its waiting call,
        or to its stream's queue."""
        pending = self._pending
        for msg_type, flags, request_id, raw in frames:
            header = (decode_header_answer(raw) if msg_type in _HEADER_ANSWERS and not flags
                      else None)
            if header is not None:          # a SET's answer, read in C: no map, no from_wire
                body = {"header": TxHeader(*header)}
            else:
                try:
                    body = unpack(raw) if raw else {}
                except Exception as exc:  # noqa: BLE001 - msgpack raises several types
                    raise ImmucoreError(f"undecodable answer from the node: {exc}") from None
            waiter = pending.get(request_id)
            if waiter is None:
                if flags & FLAG_ERROR and isinstance(body, dict):
                    self._close_reason = str(body.get("message"))   # the node closes next
                continue
            if type(waiter) is asyncio.Queue:      # a stream
                waiter.put_nowait((flags, body))
                if flags & (FLAG_END | FLAG_ERROR):
                    pending.pop(request_id, None)
                    self._read_again()
                elif waiter.qsize() >= CLIENT_STREAM_ITEMS_BUFFERED_MAX:
                    self._maybe_pause_reading()
            else:
                del pending[request_id]
                if not waiter.done():
                    waiter.set_result((flags, body))

    def _ended(self, protocol: _NodeProtocol, error: Optional[BaseException]):
        """``protocol``'s connection is over: every waiting call fails with why (once)."""
        if protocol is not self._protocol or self._transport is None:
            return                        # an earlier connection, or already ended
        if error is None or self._close_reason is not None:    # the node's own words first
            error = ConnectionClosedError(
                f"node closed the connection: {self._close_reason}"
                if self._close_reason is not None else "connection closed by the node")
        self._closed_error = error
        for waiter in self._pending.values():
            if type(waiter) is asyncio.Queue:
                waiter.put_nowait((FLAG_ERROR, {"code": "connection_closed",
                                                "message": str(error)}))
            elif not waiter.done():
                waiter.set_exception(error)
        self._pending.clear()
        self._reading_paused = False
        self._transport = None

    async def _ensure_connected(self):
        """Connect on first use; after the node closed a logged-in connection, say why instead
        of silently reconnecting without the session."""
        if self._transport is None:
            if self._closed_error is not None and self.session_token is not None:
                raise self._closed_error
            await self.connect()

    async def call(self, msg: Msg, body: Optional[dict] = None) -> Any:
        """Send one request and wait for its answer body (raising the node's error, if any).
        A SET's or DELETE's ``header`` comes already read, as a TxHeader (``_answered``)."""
        if self._transport is None:
            await self._ensure_connected()
            self._check_open()
        request_id = next(self._ids)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._pending[request_id] = waiter
        if self._reading_paused:        # its answer may sit behind a paused stream's items
            self._read_again()
        self._write(_request_frame(msg, request_id, body))
        timeout = self.timeout
        if msg == Msg.EXPORT_TXS and body and body.get("wait_ms"):
            timeout = _long_poll_timeout(timeout, body["wait_ms"])
        self._expire_at(loop, request_id, msg, timeout)
        try:
            flags, answer = await waiter
        finally:
            self._pending.pop(request_id, None)
        if flags & FLAG_ERROR:
            raise_error(answer)
        return answer

    def _expire_at(self, loop, request_id: int, msg: Msg, timeout: float):
        """Fail request ``request_id`` if it has no answer within ``timeout``: one heap of
        deadlines and one timer per client (a timer per request cost more than the rest of a
        pipelined get). Entries hold ids, not futures, so an answered request keeps nothing
        alive; the heap is compacted when answered entries outnumber the waiting ones."""
        deadlines = self._deadlines
        pending = self._pending
        while deadlines and deadlines[0][1] not in pending:      # answered: forget them
            heapq.heappop(deadlines)
        if len(deadlines) > 2 * len(pending) + 1024:
            deadlines[:] = [d for d in deadlines if d[1] in pending]
            heapq.heapify(deadlines)
        when = loop.time() + timeout
        heapq.heappush(deadlines, (when, request_id, msg, timeout))
        if self._expiry_timer is None or when < self._expiry_timer.when():
            if self._expiry_timer is not None:
                self._expiry_timer.cancel()
            self._expiry_timer = loop.call_at(deadlines[0][0], self._expire_due)

    def _expire_due(self):
        self._expiry_timer = None
        loop = asyncio.get_running_loop()
        now, deadlines, pending = loop.time(), self._deadlines, self._pending
        while deadlines and (deadlines[0][0] <= now or deadlines[0][1] not in pending):
            _, request_id, msg, timeout = heapq.heappop(deadlines)
            waiter = pending.get(request_id)
            if waiter is not None and not isinstance(waiter, asyncio.Queue) \
                    and not waiter.done():
                waiter.set_exception(TimeoutError(f"{msg.name} got no answer within {timeout:g}s"))
        if deadlines:
            self._expiry_timer = loop.call_at(deadlines[0][0], self._expire_due)

    def _write(self, frame: bytes):
        """Requests made in one turn of the event loop (a pipelined burst) leave in one write."""
        self._out.append(frame)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self):
        self._flush_scheduled = False
        out, self._out = self._out, []
        if out and self._transport is not None:
            self._transport.writelines(out)

    async def stream(self, msg: Msg, body: dict) -> AsyncIterator[Any]:
        """Send one request answered by a server stream; yields each item's body."""
        await self._ensure_connected()
        self._check_open()
        request_id = next(self._ids)
        queue: asyncio.Queue = asyncio.Queue()
        self._pending[request_id] = queue
        self._read_again()
        self._write(encode_frame(int(msg), 0, request_id, pack(body)))
        try:
            while True:
                try:
                    flags, item = await asyncio.wait_for(queue.get(), self.timeout)
                except asyncio.TimeoutError:
                    raise TimeoutError(f"{msg.name} stream got nothing within "
                                       f"{self.timeout:g}s") from None
                if queue.qsize() < CLIENT_STREAM_ITEMS_BUFFERED_MAX:
                    self._read_again()
                if flags & FLAG_ERROR:
                    raise_error(item)
                if flags & FLAG_END:
                    return
                if flags & FLAG_STREAM:
                    yield item
        finally:
            self._pending.pop(request_id, None)     # a stream given up: its queue goes too
            self._read_again()

    def _maybe_pause_reading(self):
        """Stop reading the connection when everything waiting on it is a stream whose caller
        is CLIENT_STREAM_ITEMS_BUFFERED_MAX items behind: the node then waits, instead of
        this client holding a whole export. Never while a call or another stream waits for
        an answer, which would then never come."""
        if self._reading_paused or self._transport is None:
            return
        if all(type(w) is asyncio.Queue and w.qsize() >= CLIENT_STREAM_ITEMS_BUFFERED_MAX
               for w in self._pending.values()):
            self._reading_paused = True
            self._transport.pause_reading()

    def _read_again(self):
        if self._reading_paused:
            self._reading_paused = False
            if self._transport is not None:
                self._transport.resume_reading()

    # --- session ----------------------------------------------------------------------

    async def health(self) -> dict:
        return await self.call(Msg.HEALTH)

    async def server_info(self) -> dict:
        return await self.call(Msg.SERVER_INFO)

    async def login(self, user: str, password: str, database: str = "defaultdb", *,
                    detached: bool = False) -> dict:
        """Log in; ``detached`` sessions outlive the connection (CLIs keep their token)."""
        if self._transport is None:
            self._closed_error = None      # an explicit login starts afresh
            await self.connect()
            self._check_open()
        answer = await self.call(Msg.LOGIN, {"user": user, "password": password,
                                             "database": database, "detached": detached})
        self.database, self.session_token = answer["database"], answer["token"]
        return answer

    async def resume(self, token: str) -> dict:
        """Bind this connection to an existing session (a CLI's saved token)."""
        answer = await self.call(Msg.LOGIN, {"token": token})
        self.database, self.session_token = answer["database"], token
        return answer

    async def logout(self):
        await self.call(Msg.LOGOUT)
        self.session_token = None

    async def keepalive(self):
        await self.call(Msg.KEEPALIVE)

    async def use_database(self, name: str):
        answer = await self.call(Msg.USE_DATABASE, {"database": name})
        self.database = answer["database"]
        return answer

    # --- data -------------------------------------------------------------------------

    async def set(self, kvs, *, metadata=None):
        return _header((await self.call(Msg.SET, _set_body(kvs, metadata)))["header"])

    async def delete(self, keys: List[bytes]):
        return _header((await self.call(Msg.DELETE, {"keys": list(keys)}))["header"])

    async def get(self, key: bytes, *, at_tx: int = 0, since_tx: int = 0, at_revision: int = 0):
        body = {"key": key}
        if at_tx or since_tx or at_revision:       # the node defaults each to 0
            body.update(at_tx=at_tx, since_tx=since_tx, at_revision=at_revision)
        return entry_from_wire((await self.call(Msg.GET, body))["entry"])

    async def get_many(self, keys) -> list:
        """``Database.get_many`` over the wire: each key's latest Entry, or the
        KeyNotFoundError its ``get`` raised, in order. The GETs are pipelined (one write, one
        round trip). Unlike the embedded call they are not all read from one snapshot: the
        node serves up to 32 that arrive together from one, so a commit made meanwhile may be
        seen by some keys and not by others. Any other error (the connection, the session) is
        raised."""
        results = await asyncio.gather(*(self.get(key) for key in keys), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, KeyNotFoundError):
                raise result
        return results

    async def history(self, key: bytes, *, offset: int = 0, limit: int = 0, desc: bool = False):
        return from_wire((await self.call(Msg.HISTORY, {
            "key": key, "offset": offset, "limit": limit, "desc": desc}))["entries"])

    async def scan(self, *, prefix: bytes = b"", seek_key: bytes = b"", end_key: bytes = b"",
                   desc: bool = False, limit: int = 0, since_tx: int = 0):
        return from_wire((await self.call(Msg.SCAN, {
            "prefix": prefix, "seek_key": seek_key, "end_key": end_key, "desc": desc,
            "limit": limit, "since_tx": since_tx}))["entries"])

    async def tx_by_id(self, tx_id: int):
        return from_wire((await self.call(Msg.TX_BY_ID, {"tx_id": tx_id}))["tx"])

    async def current_state(self) -> State:
        answer = await self.call(Msg.CURRENT_STATE)
        state = from_wire(answer["state"])
        self._check_signed(answer, state.db, state.tx_id, state.tx_hash)
        return state

    def _check_signed(self, answer: dict, db: str, tx_id: int, tx_hash: bytes):
        """With a server key configured, the answer's signed state must be this state."""
        if self.server_public_key is None:
            return
        from .signing import verify_state_signature
        signed = answer.get("signed") or {}
        if "signature" not in signed:
            raise VerificationError("the node did not sign its state (is --signingKey set?)")
        if (signed.get("db"), signed.get("tx_id"), signed.get("tx_hash")) != (db, tx_id, tx_hash):
            raise VerificationError("the signed state is not the state returned")
        verify_state_signature(self.server_public_key, db, tx_id, tx_hash, signed["signature"])

    def _check_signed_target(self, answer: dict, vtx):
        target = vtx.dual_proof.target_tx_header
        self._check_signed(answer, self.database, target.id, target.alh())

    async def verifiable_set(self, kvs, *, prove_since_tx: int, metadata=None):
        body = _set_body(kvs, metadata)
        body["prove_since_tx"] = prove_since_tx
        answer = await self.call(Msg.VERIFIABLE_SET, body)
        with _proof_checks():
            vtx = from_wire(answer["verifiable_tx"])
            self._check_signed_target(answer, vtx)
        return vtx

    async def verifiable_get(self, key: bytes, *, prove_since_tx: int, at_tx: int = 0,
                             since_tx: int = 0, at_revision: int = 0):
        answer = await self.call(Msg.VERIFIABLE_GET, {
            "key": key, "prove_since_tx": prove_since_tx, "at_tx": at_tx, "since_tx": since_tx,
            "at_revision": at_revision})
        with _proof_checks():
            ventry = from_wire(answer["verifiable_entry"])
            self._check_signed_target(answer, ventry.verifiable_tx)
        return ventry

    async def verifiable_tx_by_id(self, tx_id: int, *, prove_since_tx: int):
        answer = await self.call(Msg.VERIFIABLE_TX_BY_ID, {"tx_id": tx_id,
                                                           "prove_since_tx": prove_since_tx})
        with _proof_checks():
            vtx = from_wire(answer["verifiable_tx"])
            self._check_signed_target(answer, vtx)
        return vtx

    async def export_tx(self, tx_id: int) -> bytes:
        return (await self.call(Msg.EXPORT_TX, {"tx_id": tx_id}))["blob"]

    async def export_txs(self, first_tx_id: int, count: int, *, wait_ms: int = 0,
                         with_state: bool = False):
        """Committed export blobs from ``first_tx_id``; ``wait_ms`` > 0 waits (long poll) for
        the next commit when there is none yet. ``with_state`` also returns the primary's
        committed tx id: ``(blobs, committed_tx_id)``."""
        answer = await self.call(Msg.EXPORT_TXS, {"first_tx_id": first_tx_id, "count": count,
                                                  "wait_ms": wait_ms})
        return (answer["blobs"], answer["committed_tx_id"]) if with_state else answer["blobs"]

    async def export_stream(self, first_tx_id: int, count: int) -> AsyncIterator[dict]:
        """Committed txs from ``first_tx_id`` (``count`` of them, or up to the node's last
        committed when it starts) as a server stream: yields ``{"blobs", "last_alh"}`` chunks
        (the Alh of each chunk's last tx, for ``replicate_txs(..., last_alh=)``). While the
        caller is a few chunks behind the client stops reading, unless other calls wait on
        this connection: give a bulk stream a client of its own."""
        async for chunk in self.stream(Msg.EXPORT_TXS_STREAM, {"first_tx_id": first_tx_id,
                                                               "count": count}):
            yield chunk

    async def export_batch(self, first_tx_id: int, count: int, *, wait_ms: int = 0) -> dict:
        """EXPORT_TXS's whole answer: ``blobs``, ``committed_tx_id`` (the primary's last tx),
        ``acked_tx_id`` (its last tx acknowledged to clients: never discarded by a replica) and
        the database's ``role``, ``primary`` and ``chain`` (docs/wire-protocol.md)."""
        return await self.call(Msg.EXPORT_TXS, {"first_tx_id": first_tx_id, "count": count,
                                                "wait_ms": wait_ms})

    async def replica_ack(self, replica_id: str, tx_id: int, alh: bytes) -> int:
        """Tell the primary this replica durably holds every tx up to ``tx_id`` (with ``alh``);
        returns the highest tx the sync quorum now holds."""
        answer = await self.call(Msg.REPLICA_ACK, {"replica_id": replica_id, "tx_id": tx_id,
                                                   "alh": alh})
        return answer["acked_tx_id"]

    async def replicate_tx(self, blob: bytes):
        return (await self.replicate_txs([blob]))[0]

    async def replicate_txs(self, blobs: List[bytes], *, last_alh: Optional[bytes] = None):
        """Apply exported txs on a replica; ``last_alh`` (from ``export_batch``) makes the node
        refuse the batch if its last tx does not hash to what the primary announced."""
        body = {"blobs": list(blobs)}
        if last_alh is not None:
            body["last_alh"] = last_alh
        return from_wire((await self.call(Msg.REPLICATE_TX, body))["headers"])

    # --- verified calls ---------------------------------------------------------------

    @property
    def state_store(self) -> StateStore:
        """The trusted states: by default in a file (``default_state_path()``), as immudb's
        SDKs keep theirs, so a new client, or this program started again, keeps trusting what
        was proven before. Opened at the first verified call: a client that never verifies
        never reads it."""
        if self._state_store is None:
            self._state_store = StateStore.default()
        return self._state_store

    @state_store.setter
    def state_store(self, store: StateStore):
        self._state_store = store

    def _server_id(self) -> str:
        return f"{self.host}:{self.port}"

    async def verified_set(self, kvs, *, metadata=None):
        trusted = self.state_store.get(self._server_id(), self.database)
        vtx = await self.verifiable_set(kvs, prove_since_tx=trusted.tx_id, metadata=metadata)
        with _proof_checks():
            self._check_and_advance(trusted, vtx)
            return vtx.tx.header

    async def verified_tx_by_id(self, tx_id: int):
        trusted = self.state_store.get(self._server_id(), self.database)
        vtx = await self.verifiable_tx_by_id(tx_id, prove_since_tx=trusted.tx_id)
        with _proof_checks():
            self._check_and_advance(trusted, vtx)
            return vtx.tx

    async def verified_get(self, key: bytes, *, at_tx: int = 0, since_tx: int = 0,
                           at_revision: int = 0):
        trusted = self.state_store.get(self._server_id(), self.database)
        ventry = await self.verifiable_get(key, prove_since_tx=trusted.tx_id, at_tx=at_tx,
                                           since_tx=since_tx, at_revision=at_revision)
        with _proof_checks():
            return self._check_entry(trusted, ventry)

    def _check_entry(self, trusted: State, ventry):
        entry, vtx = ventry.entry, ventry.verifiable_tx
        header = vtx.tx.header
        if entry.tx != header.id:
            raise VerificationError("entry's tx differs from the proven tx")
        index = ventry.inclusion_proof.leaf
        if not 0 <= index < len(vtx.tx.entries) or ventry.inclusion_proof.width != header.nentries:
            raise VerificationError("entry inclusion proof does not fit its tx")
        tx_entry = vtx.tx.entries[index]
        md = entry.metadata.to_bytes() if entry.metadata else b""
        if tx_entry.key != b"\x00" + entry.key or \
                tx_entry.hvalue != codec.sha256(b"\x00" + entry.value):
            raise VerificationError("entry differs from the tx entry it claims to be")
        digest = codec.entry_digest(header.version, tx_entry.key, md, tx_entry.hvalue)
        if not verify.verify_inclusion(ventry.inclusion_proof, digest, header.eh):
            raise VerificationError("entry inclusion proof does not verify")
        self._check_and_advance(trusted, vtx)
        return entry

    def _check_and_advance(self, trusted: State, vtx):
        """Check the tx against its own header, the dual proof between it and the trusted state,
        then trust the newer end. With no trusted state yet (tx id 0), the first proven tx is
        trusted as it is (trust on first use, as immudb's SDKs do)."""
        tx, proof = vtx.tx, vtx.dual_proof
        header = tx.header
        digests = [codec.entry_digest(header.version, e.key,
                                      e.metadata.to_bytes() if e.metadata else b"", e.hvalue)
                   for e in tx.entries]
        if len(digests) != header.nentries or codec.entries_hash(digests) != header.eh:
            raise VerificationError("tx entries do not hash to the header's Eh")
        source, target = proof.source_tx_header, proof.target_tx_header
        if header not in (source, target):
            raise VerificationError("the proof is not about the returned tx")
        if trusted.tx_id:
            ends = {source.id, target.id}
            trusted_end = source if source.id == trusted.tx_id else target
            if ends != {trusted.tx_id, header.id} or trusted_end.alh() != trusted.tx_hash:
                raise VerificationError("the proof does not start from the trusted state")
        elif source != target:
            raise VerificationError("a first proof must be about the returned tx alone")
        if not verify.verify_dual_proof(proof, source.id, target.id, source.alh(), target.alh()):
            raise VerificationError("dual proof does not verify")
        if target.id > trusted.tx_id:
            self.state_store.put(self._server_id(), State(self.database, target.id, target.alh()))

    # --- administration ---------------------------------------------------------------

    async def create_database(self, name: str, settings: Optional[dict] = None,
                              if_not_exists: bool = False) -> dict:
        return await self.call(Msg.DATABASE_CREATE, {"database": name, "settings": settings or {},
                                                     "if_not_exists": if_not_exists})

    async def update_database(self, name: str, settings: dict) -> dict:
        return await self.call(Msg.DATABASE_UPDATE, {"database": name, "settings": settings})

    async def list_databases(self) -> List[dict]:
        return (await self.call(Msg.DATABASE_LIST))["databases"]

    async def database_settings(self, name: str) -> dict:
        return await self.call(Msg.DATABASE_SETTINGS, {"database": name})

    async def load_database(self, name: str) -> dict:
        return await self.call(Msg.DATABASE_LOAD, {"database": name})

    async def unload_database(self, name: str) -> dict:
        return await self.call(Msg.DATABASE_UNLOAD, {"database": name})

    async def delete_database(self, name: str) -> dict:
        return await self.call(Msg.DATABASE_DELETE, {"database": name})

    async def create_user(self, user: str, password: str, permission: str,
                          database: str = "") -> dict:
        return await self.call(Msg.USER_CREATE, {"user": user, "password": password,
                                                 "permission": permission, "database": database})

    async def list_users(self) -> List[dict]:
        return (await self.call(Msg.USER_LIST))["users"]

    async def change_password(self, user: str, old_password: str, new_password: str) -> dict:
        return await self.call(Msg.USER_CHANGE_PASSWORD, {
            "user": user, "old_password": old_password, "new_password": new_password})

    async def grant(self, user: str, permission: str, database: str) -> dict:
        return await self.call(Msg.USER_PERMISSION, {"user": user, "action": "grant",
                                                     "permission": permission,
                                                     "database": database})

    async def revoke(self, user: str, permission: str, database: str) -> dict:
        return await self.call(Msg.USER_PERMISSION, {"user": user, "action": "revoke",
                                                     "permission": permission,
                                                     "database": database})

    async def set_user_active(self, user: str, active: bool) -> dict:
        return await self.call(Msg.USER_SET_ACTIVE, {"user": user, "active": active})


# answers that are one TxHeader ({"header": ...}): read by decode_header_answer when laid out as
# the node writes them
_HEADER_ANSWERS = frozenset({int(Msg.SET), int(Msg.DELETE)})
_SET = int(Msg.SET)


def _long_poll_timeout(timeout: float, wait_ms) -> float:
    """A long poll's deadline: the node holds it up to ``wait_ms`` (at most EXPORT_WAIT_MS_MAX)
    before answering, so the client's timeout alone would cut polls as long as itself."""
    try:
        wait_seconds = min(max(int(wait_ms), 0), EXPORT_WAIT_MS_MAX) / 1000
    except (TypeError, ValueError):
        return timeout                  # the node refuses such a body at once
    return max(timeout, wait_seconds + CLIENT_LONG_POLL_GRACE_SECONDS)


def _request_frame(msg: Msg, request_id: int, body: Optional[dict]) -> bytes:
    """A request's frame; a SET of only ``kvs_flat`` (every set without metadata) is written in
    C, without building and packing its map."""
    if msg is Msg.SET and body is not None and len(body) == 1 and "kvs_flat" in body:
        return encode_flat_set_request(_SET, request_id, body["kvs_flat"])
    return encode_frame(int(msg), 0, request_id, pack(body or {}))


def _header(value):
    """The TxHeader of a SET's or DELETE's answer (already one when read in C)."""
    return value if type(value) is TxHeader else header_from_wire(value)


def _set_body(kvs, metadata) -> dict:
    items = kvs.items() if isinstance(kvs, dict) else kvs
    try:
        # unpacking each pair checks its shape: a 3-tuple must not shift every later pair
        body = {"kvs_flat": [x for key, value in items for x in (key, value)]}
    except (TypeError, ValueError) as exc:
        raise IllegalArgumentsError(
            f"kvs must be a dict or a list of (key, value) pairs ({exc})") from None
    if isinstance(metadata, KVMetadata):
        body["metadata"] = to_wire(metadata)
    elif isinstance(metadata, dict):
        body["metadata_by_key"] = [[k, to_wire(m)] for k, m in metadata.items()]
    return body


_BLOCKING_METHODS = (
    "health", "server_info", "login", "resume", "logout", "keepalive", "use_database", "set",
    "delete", "get", "get_many", "history", "scan", "tx_by_id", "current_state", "verifiable_set",
    "verifiable_get", "verifiable_tx_by_id", "export_tx", "export_txs", "export_batch",
    "replica_ack", "replicate_tx",
    "replicate_txs", "verified_set", "verified_get", "verified_tx_by_id", "create_database",
    "update_database", "list_databases", "database_settings", "load_database",
    "unload_database", "delete_database", "create_user", "list_users", "change_password",
    "grant", "revoke", "set_user_active", "call")


class Client:
    """A blocking client: the same methods as ``AsyncClient``, run on a private event loop."""

    def __init__(self, host: str = "127.0.0.1", port: int = 3322, **options):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="immucore-client",
                                        daemon=True)
        self._thread.start()
        self._async = AsyncClient(host, port, **options)
        try:
            self._run(self._async.connect())
        except BaseException:
            self.close()
            raise

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __getattr__(self, name):
        if name in _BLOCKING_METHODS:
            method = getattr(self._async, name)
            return lambda *args, **kwargs: self._run(method(*args, **kwargs))
        if name in ("database", "session_token", "state_store", "host", "port"):
            return getattr(self._async, name)
        raise AttributeError(name)

    def close(self):
        if self._loop.is_running():
            try:
                self._run(self._async.close())
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join()
        self._loop.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
