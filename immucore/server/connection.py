"""One client connection: frames in, pipelined requests dispatched, responses out by request id.

Bounds (immucore/constants.py): pre-login frames are tiny (PREAUTH_FRAME_BODY_BYTES_MAX) and only
HEALTH, SERVER_INFO and LOGIN are accepted; at most CONNECTION_INFLIGHT_REQUESTS_MAX requests are
served at once (reading pauses beyond that); when the peer does not read its responses and the
transport buffer passes CONNECTION_SEND_BUFFER_BYTES_MAX, reading pauses too, so a slow reader
cannot grow the node's memory. A bad frame gets an error frame and closes this connection only.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import logging
import socket
import sys
import time
import weakref

from ..constants import (CONNECTION_FLUSH_ANSWERS, CONNECTION_IDLE_SECONDS,
                         CONNECTION_INFLIGHT_REQUESTS_MAX,
                         CONNECTION_SEND_BUFFER_BYTES_MAX, CONNECTION_WRITE_STALL_SECONDS,
                         FRAME_BODY_BYTES_MAX,
                         PREAUTH_FRAME_BODY_BYTES_MAX, PREAUTH_IDLE_SECONDS)
from ..protocol.answers import encode_header_answer
from ..protocol.frames import (FLAG_END, FLAG_ERROR, FLAG_STREAM, FrameDecoder, ProtocolError,
                               encode_frame)
from ..protocol.messages import PREAUTH_MESSAGES, Msg, error_body, pack, unpack
from ..store.env import BurstWouldBlock, ReadBurst

log = logging.getLogger("immucore.server")
_MESSAGES = {int(msg): msg for msg in Msg}      # a dict lookup; Msg(n) costs a microsecond
_GET = int(Msg.GET)


def _request_body(raw: bytes) -> dict:
    try:
        body = unpack(raw) if raw else {}
    except Exception as exc:  # noqa: BLE001 - msgpack raises several types for bad input
        raise ProtocolError("bad_body", f"a request body must be a msgpack map ({exc})") from None
    if not isinstance(body, dict):
        raise ProtocolError("bad_body", "a request body must be a map")
    return body


def _no_delay(transport):
    """Answers are small and pipelined: Nagle's algorithm would hold them for the peer's
    delayed ACK (tens of milliseconds per round trip)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _ready(value):
    return value


class LaterAnswer:
    """What a handler returns when a callback gives its answer later (a SET, answered from its
    commit): no coroutine, task or future. The connection binds where the answer goes right
    after the handler returns, always before the loop can run the callback; an answer given
    before that anyway is kept until then. Only the first answer counts."""
    __slots__ = ("_to", "_given")

    def __init__(self):
        self._to = None
        self._given = None

    def bind(self, to) -> None:
        """``to(result, exception)`` receives the answer (in a later loop step, if it was given
        already: never inside the call that bound it)."""
        if self._given is not None:
            asyncio.get_running_loop().call_soon(to, *self._given)
        else:
            self._to = to

    def __await__(self):
        """The answer, awaited (a request served again in a task)."""
        waiter = asyncio.get_running_loop().create_future()
        self.bind(functools.partial(_settle_waiter, waiter))
        return (yield from waiter.__await__())

    def give(self, result) -> None:
        self._settle(result, None)

    def fail(self, exc: BaseException) -> None:
        self._settle(None, exc)

    def settle_from(self, source: asyncio.Future) -> None:
        """The outcome of a finished asyncio future (a task the answer had to wait for)."""
        if source.cancelled():
            self.fail(asyncio.CancelledError())
        elif source.exception() is not None:
            self.fail(source.exception())
        else:
            self.give(source.result())

    def _settle(self, result, exc) -> None:
        if self._given is not None:
            return                       # only the first answer counts
        self._given = (result, exc)
        to, self._to = self._to, None
        if to is not None:
            to(result, exc)


class HeaderAnswer:
    """A SET's answer as the writer's header tuple: ``_send`` writes its frame in C
    (``encode_header_answer``), the bytes of ``{"header": header_to_wire(header)}`` without
    building or packing that map."""
    __slots__ = ("header",)

    def __init__(self, header: tuple):
        self.header = header


def _settle_waiter(waiter: asyncio.Future, result, exc) -> None:
    if waiter.done():
        return
    if isinstance(exc, asyncio.CancelledError):
        waiter.cancel()
    elif exc is not None:
        waiter.set_exception(exc)
    else:
        waiter.set_result(result)


# From Python 3.12 a task can run its first step at once (eager_start): the handler then runs in
# a real task, which asyncio.timeout and current_task() need. Before, _Started emulates it.
_EAGER_TASKS = sys.version_info >= (3, 12)


def _first_step(handler):
    """Run a handler's coroutine up to its first wait: ``(True, result)`` when it finished (its
    exception, if it failed, is raised here), else ``(False, the rest to await)``."""
    if _EAGER_TASKS:
        task = asyncio.Task(handler, loop=asyncio.get_running_loop(), eager_start=True)
        return (True, task.result()) if task.done() else (False, task)
    try:
        waiting_on = handler.send(None)
    except StopIteration as done:
        return True, done.value
    return False, _Started(handler, waiting_on)


class _Started:
    """The rest of a coroutine whose first step has already run and yielded ``waiting_on``
    (Python 3.12's eager tasks, for 3.11): awaited in a task, it hands that future to the task
    and then drives the coroutine as a task would."""
    __slots__ = ("_coro", "_waiting_on")

    def __init__(self, coro, waiting_on):
        self._coro, self._waiting_on = coro, waiting_on

    def __await__(self):
        coro, waiting_on = self._coro, self._waiting_on
        self._waiting_on = None
        while True:
            try:
                yield waiting_on
            except BaseException as exc:     # cancellation, thrown into the task
                try:
                    waiting_on = coro.throw(exc)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    waiting_on = coro.send(None)
                except StopIteration as done:
                    return done.value


class _TurnWrites:
    """The connections with answers to write at the end of this turn of the loop, written by
    one loop callback: a commit answers a dozen of 32 connections at once, and a callback per
    connection cost more than its write. One per loop (it holds no reference to its loop, so
    a closed loop and its entry go away together)."""
    __slots__ = ("_waiting", "_scheduled", "__weakref__")

    def __init__(self):
        self._waiting: list = []
        self._scheduled = False

    def add(self, connection: "Connection") -> None:
        self._waiting.append(connection)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._write_all)

    def _write_all(self) -> None:
        self._scheduled = False
        waiting, self._waiting = self._waiting, []
        for connection in waiting:
            connection.write_answers()


_TURN_WRITES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # loop -> _TurnWrites


class Connection(asyncio.Protocol):
    def __init__(self, node, dispatch):
        self.node = node
        self._dispatch = dispatch
        # a run of GETs served at once, when the dispatcher can (tests may pass a plain function)
        self._plain_gets = getattr(dispatch, "plain_gets", None)
        self.session = None             # the session id, set by LOGIN
        self.detached = False           # a CLI token session (outlives the connection)
        self.peer = None
        self.transport = None
        self._decoder = FrameDecoder(PREAUTH_FRAME_BODY_BYTES_MAX)
        self._inflight = 0
        self._backlog = collections.deque()    # decoded frames waiting for an in-flight slot
        self._reading_paused = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._last_frame = time.monotonic()
        self._idle_handle = None
        self._write_stalled_since = None   # since when unread answers have not drained
        self._stalled_buffer_bytes = 0     # how much was unread when last looked at
        self._closed = False
        self._lost = False                 # connection_lost was called
        # Answers finished in one turn of the event loop leave in one write (one syscall for a
        # whole pipelined burst instead of one per answer).
        self._out: list = []
        self._flush_pending = False
        self._turn_writes = None        # the loop's _TurnWrites, found at the first answer

    @property
    def in_flight(self) -> int:
        """Requests being served (a stopping node lets them answer)."""
        return 0 if self._closed else self._inflight

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport
        self.peer = transport.get_extra_info("peername")
        _no_delay(transport)
        transport.set_write_buffer_limits(high=CONNECTION_SEND_BUFFER_BYTES_MAX)
        refusal = self.node.refuse_connection(self.peer)
        if refusal:
            self._fail(*refusal)
            return
        self.node.connections.add(self)
        self._schedule_idle_check()

    def connection_lost(self, exc):
        self._closed = self._lost = True
        self._backlog.clear()
        if self.session is not None:
            if not self.detached:
                self.node.close_session(self.session, detached=False)  # it dies with it
            if self in self.node.connections:
                self.node.logged_in_connections -= 1
            # gone with the connection: a request still running (a stream) that finds its
            # session ended must not log out, and count this connection out, a second time
            self.session, self.detached = None, False
        self.node.connections.discard(self)
        if self._idle_handle:
            self._idle_handle.cancel()
        self._writable.set()

    def pause_writing(self):
        self._write_stalled_since = time.monotonic()
        self._stalled_buffer_bytes = self.transport.get_write_buffer_size()
        self._writable.clear()
        self._pause_reading()

    def resume_writing(self):
        self._write_stalled_since = None
        self._writable.set()
        self._maybe_resume_reading()

    def data_received(self, data: bytes):
        try:
            frames = self._decoder.feed(data)
        except ProtocolError as exc:
            self._fail(exc.code, str(exc))
            return
        if frames:
            self._last_frame = time.monotonic()   # idleness counts whole frames, not bytes
            self._backlog.extend(frames)
            self._dispatch_backlog()

    def _dispatch_backlog(self):
        """Serve queued requests while fewer than CONNECTION_INFLIGHT_REQUESTS_MAX wait; reading
        stays paused while any are queued, so one read of many small frames cannot exceed the
        cap. A request whose answer is ready at once (a get the index already covers) is
        answered here, without a task: most of a pipelined burst never leaves this loop."""
        if len(self._backlog) > 1:
            with ReadBurst():         # the burst's gets share their read transactions
                still_open = self._serve_backlog()
        else:                         # a lone request has no reads to share a burst with
            still_open = self._serve_backlog()
        if not still_open:
            return
        if self._backlog or self._inflight >= CONNECTION_INFLIGHT_REQUESTS_MAX:
            self._pause_reading()

    def _serve_backlog(self) -> bool:
        """Serve queued requests up to the in-flight cap; False once the connection failed."""
        backlog = self._backlog
        while backlog and self._inflight < CONNECTION_INFLIGHT_REQUESTS_MAX:
            msg_type, flags, request_id, raw = backlog.popleft()
            msg = self._accept(msg_type, request_id)
            if msg is None:
                backlog.clear()
                return False
            if msg is Msg.GET and self._plain_gets is not None:
                self._serve_gets(request_id, raw)
            else:
                self._serve_now(msg, request_id, raw)
            if self._closed:
                return False
        return True

    def _serve_gets(self, request_id: int, raw: bytes):
        """This GET and the GETs right behind it in the backlog (up to CONNECTION_FLUSH_ANSWERS,
        so that answers still leave in chunks while the rest are served), as one run: one
        session check, one snapshot, answers encoded in C (``Dispatcher.plain_gets``). A GET
        the run cannot answer is served on its own, as every request was before."""
        run = [(request_id, raw)]
        backlog = self._backlog
        while backlog and backlog[0][0] == _GET and len(run) < CONNECTION_FLUSH_ANSWERS:
            _, _, request_id, raw = backlog.popleft()
            run.append((request_id, raw))
        try:
            answers = self._plain_gets(self, run)
        except Exception as exc:  # noqa: BLE001 - the session, the permission, the database
            # the first GET gets this error, as it would alone; the rest go back to the backlog,
            # each to be accepted again (the check may have logged the connection out)
            self._requeue(run[1:])
            self._answer_error(Msg.GET, run[0][0], exc)
            return
        deferred = []
        for (request_id, raw), answer in zip(run, answers):
            if answer is None:
                if self._inflight >= CONNECTION_INFLIGHT_REQUESTS_MAX:
                    deferred.append((request_id, raw))   # it may need a task: not past the cap
                    continue
                self._serve_now(Msg.GET, request_id, raw)
            elif type(answer) is bytes:
                self._queue_frame(answer)
            elif isinstance(answer, Exception):
                self._answer_error(Msg.GET, request_id, answer)
            else:
                try:
                    self._send(Msg.GET, 0, request_id, answer)
                except Exception as exc:  # noqa: BLE001 - an answer that does not encode
                    self._answer_error(Msg.GET, request_id, exc)
            if self._closed:
                return
        self._requeue(deferred)

    def _requeue(self, gets: list):
        """``(request_id, body)`` GETs back to the front of the backlog, in their order."""
        for request_id, raw in reversed(gets):
            self._backlog.appendleft((_GET, 0, request_id, raw))

    # --- serving --------------------------------------------------------------------------

    def _accept(self, msg_type: int, request_id: int):
        """The request's message, or None once the connection has been failed for it."""
        msg = _MESSAGES.get(msg_type)
        if msg is None:
            self._fail("unknown_message", f"unknown message type {msg_type}", request_id)
            return None
        if self.session is None and msg not in PREAUTH_MESSAGES:
            self._fail("not_logged_in", "not logged in", request_id, msg)
            return None
        return msg

    def _serve_now(self, msg, request_id: int, raw: bytes):
        """Run the request's handler up to its first wait, here and in request order; only a
        handler that has to wait (a write, an index wait, a stream) goes on in a task. Most of
        a pipelined burst of gets is answered in this loop, with no task at all."""
        try:
            handled = self._dispatch(self, msg, _request_body(raw))
            if type(handled) is dict:                # answered without a coroutine
                finished, result = True, handled
            elif type(handled) is LaterAnswer:          # answered by a callback (a SET)
                self._inflight += 1
                handled.bind(functools.partial(self._answered, msg, request_id))
                return
            else:
                finished, result = _first_step(handled)
        except BurstWouldBlock:
            # a read that would have to wait while this burst holds guards: served again in a
            # task, outside the burst (only reads raise it, before doing anything)
            finished, result = False, self._served_again(msg, raw)
        except Exception as exc:  # noqa: BLE001 - every error is answered, the node keeps going
            self._answer_error(msg, request_id, exc)
            return
        if finished and not hasattr(result, "__aiter__"):
            try:
                self._send(msg, 0, request_id, result)
            except Exception as exc:  # noqa: BLE001 - an answer that does not encode
                self._answer_error(msg, request_id, exc)
            return
        self._inflight += 1
        rest = _ready(result) if finished else result     # a finished one here is a stream
        asyncio.ensure_future(self._finish(msg, request_id, rest))

    async def _served_again(self, msg, raw: bytes):
        handled = self._dispatch(self, msg, _request_body(raw))
        return handled if type(handled) is dict else await handled

    async def _finish(self, msg, request_id: int, rest):
        try:
            result = await rest
            if hasattr(result, "__aiter__"):         # a server stream
                try:
                    items = result.__aiter__()
                    while True:
                        # the next item is asked for only once the socket takes more, and sent
                        # in the step that made it: it is never held while its reader is slow,
                        # and what its producer checked last (a permission) is still true
                        await self._writable.wait()
                        if self._closed:         # its reader is gone: read nothing more
                            return
                        try:
                            item = await items.__anext__()
                        except StopAsyncIteration:
                            break
                        self._send(msg, FLAG_STREAM, request_id, item)
                        if self._flush_pending:
                            # handed to the socket now, not at the end of the turn: a full
                            # send buffer then pauses the stream before its next item
                            self._flush()
                finally:
                    if hasattr(result, "aclose"):
                        await result.aclose()
                self._send(msg, FLAG_END, request_id, {})
            else:
                self._send(msg, 0, request_id, result)
        except Exception as exc:  # noqa: BLE001 - every error is answered, the node keeps going
            self._answer_error(msg, request_id, exc)
        finally:
            self._inflight -= 1
            if self._backlog:        # requests held back by the in-flight cap: serve them now
                self._dispatch_backlog()
            self._maybe_resume_reading()

    def _answered(self, msg, request_id: int, result, exc):
        """``_finish`` for a request answered through a LaterAnswer instead of a coroutine."""
        try:
            if exc is None:
                self._send(msg, 0, request_id, result)
            elif not isinstance(exc, asyncio.CancelledError):
                self._answer_error(msg, request_id, exc)
        except Exception as exc:  # noqa: BLE001 - an answer that does not encode
            self._answer_error(msg, request_id, exc)
        finally:
            self._inflight -= 1
            if self._backlog:        # requests held back by the in-flight cap: serve them now
                self._dispatch_backlog()
            self._maybe_resume_reading()

    def _answer_error(self, msg, request_id: int, exc: Exception):
        if isinstance(exc, ProtocolError):
            self._fail(exc.code, str(exc), request_id, msg)
            return
        body = error_body(exc)
        if body["code"] == "internal":
            log.error("%s from %s failed", msg.name, self.peer, exc_info=exc)
        self._send(msg, FLAG_ERROR, request_id, body)

    def logged_in(self, session_id: str, detached: bool):
        """LOGIN succeeded: authenticated frames may now be large. A session this connection
        held before is closed, so repeated logins cannot pile sessions up."""
        if self.session is not None and self.session != session_id and not self.detached:
            self.node.close_session(self.session, detached=False)
        if self._closed:
            # the peer left while its LOGIN was being checked: its session must not linger
            if not detached:
                self.node.close_session(session_id, detached=False)
            return
        if self.session is None:
            self.node.logged_in_connections += 1      # the pre-login cap counts the others
        self.session, self.detached = session_id, detached
        self._decoder.body_bytes_max = FRAME_BODY_BYTES_MAX

    def logged_out(self):
        if self.session is not None:
            self.node.logged_in_connections -= 1
        self.session, self.detached = None, False
        self._decoder.body_bytes_max = PREAUTH_FRAME_BODY_BYTES_MAX

    # --- output ---------------------------------------------------------------------------

    def _send(self, msg, flags: int, request_id: int, body):
        if self._closed or self.transport is None or self.transport.is_closing():
            return
        if type(body) is HeaderAnswer:
            self._queue_frame(encode_header_answer(int(msg), request_id, body.header))
            return
        raw = pack(body)
        if len(raw) > FRAME_BODY_BYTES_MAX:
            # no client would accept it: answer with an error and keep the connection
            raw = pack({"code": "response_too_large", "message":
                        f"response of {len(raw)} bytes exceeds the limit of "
                        f"{FRAME_BODY_BYTES_MAX} bytes; ask for fewer entries (limit)"})
            flags = FLAG_ERROR
        self._queue_frame(encode_frame(int(msg), flags, request_id, raw))

    def _queue_frame(self, frame: bytes):
        """An answer frame, written at the end of this loop turn (or now, with a full chunk)."""
        if self._closed or self.transport is None or self.transport.is_closing():
            return
        out = self._out
        out.append(frame)
        if len(out) >= CONNECTION_FLUSH_ANSWERS:
            # A long pipelined burst's first answers leave now, not at the end of the turn: the
            # client works on them while the rest are served (measured: the two then run side by
            # side on two cores instead of taking turns)
            self._out = []
            self.transport.writelines(out)
        elif not self._flush_pending:
            self._flush_pending = True
            (self._turn_writes or self._find_turn_writes()).add(self)

    def _find_turn_writes(self) -> "_TurnWrites":
        loop = asyncio.get_running_loop()
        turn_writes = _TURN_WRITES.get(loop)
        if turn_writes is None:
            turn_writes = _TURN_WRITES[loop] = _TurnWrites()
        self._turn_writes = turn_writes
        return turn_writes

    def _flush(self):
        self._flush_pending = False
        out, self._out = self._out, []
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)

    def write_answers(self):
        """The end of the loop turn: write what was answered in it (``_TurnWrites``). Answers
        that cannot be written close the connection, so that its client is not left waiting
        for them on an open one."""
        try:
            self._flush()
        except Exception:  # noqa: BLE001 - one connection's failure must not stop the others
            log.exception("writing answers to %s failed; closing its connection", self.peer)
            self._closed = True
            if self.transport is not None:
                self.transport.abort()

    def _fail(self, code: str, message: str, request_id: int = 0, msg=Msg.HEALTH):
        """Protocol violation: answer once with an error frame, then close this connection."""
        log.info("closing connection from %s: %s", self.peer, message)
        self._backlog.clear()            # nothing after the bad frame is served
        self._send(msg, FLAG_ERROR, request_id, {"code": code, "message": message})
        if self._flush_pending:
            self._flush()          # the turn's writer finds nothing left for this connection
        if self.transport is not None:
            self.transport.close()
            if self.transport.get_write_buffer_size():
                # close() waits for the peer to read what is buffered, which one that stopped
                # reading never does: abort it if it has not gone by then
                asyncio.get_running_loop().call_later(CONNECTION_WRITE_STALL_SECONDS,
                                                      self._abort_if_still_open)
        self._closed = True

    # --- flow control and idleness --------------------------------------------------------

    def _pause_reading(self):
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def _maybe_resume_reading(self):
        if (self._reading_paused and not self._closed and self._writable.is_set()
                and not self._backlog and self._inflight < CONNECTION_INFLIGHT_REQUESTS_MAX):
            self._reading_paused = False
            self.transport.resume_reading()

    def _schedule_idle_check(self):
        limit = CONNECTION_IDLE_SECONDS if self.session else PREAUTH_IDLE_SECONDS
        self._idle_handle = asyncio.get_running_loop().call_later(
            min(limit, CONNECTION_WRITE_STALL_SECONDS) / 2, self._check_idle)

    def _check_idle(self):
        """Close a connection idle for too long, and abort one whose peer stopped reading."""
        if self._closed:
            return
        now = time.monotonic()
        stalled = self._write_stalled_since
        if stalled is not None:
            unread = self.transport.get_write_buffer_size()
            if unread < self._stalled_buffer_bytes:
                # a slow reader, not a stopped one: it read some since the last look
                self._write_stalled_since = stalled = now
            self._stalled_buffer_bytes = unread
        if stalled is not None and now - stalled > CONNECTION_WRITE_STALL_SECONDS:
            log.info("closing connection from %s: it has not read its answers for %.0f s",
                     self.peer, now - stalled)
            self._abort()
            return
        limit = CONNECTION_IDLE_SECONDS if self.session else PREAUTH_IDLE_SECONDS
        if self._inflight == 0 and now - self._last_frame > limit:
            log.info("closing idle connection from %s", self.peer)
            if self.transport.get_write_buffer_size():
                self._abort()            # answers it never read: close() would wait for them
            else:
                self.transport.close()
            return
        self._schedule_idle_check()

    def _abort(self):
        self._closed = True
        self._backlog.clear()
        self.transport.abort()

    def _abort_if_still_open(self):
        if not self._lost:
            log.info("aborting connection from %s: it did not read its last answers",
                     self.peer)
            self.transport.abort()
