"""One handler per message: check the session, the database and the permission on every
request, then call the embedded API. Reads run on the node's read threads (an index wait must
never block the event loop); writes await the writer's future directly.
"""
from __future__ import annotations

import asyncio
import functools
import time

from .. import __version__
from ..constants import (EXPORT_STREAM_CHUNK_TXS, EXPORT_TXS_COUNT_MAX, EXPORT_WAIT_MS_MAX,
                         FRAME_BODY_BYTES_MAX,
                         KEY_SIZE_BYTES_MAX, REPLICA_ID_CHARS_MAX)
from ..errors import IllegalArgumentsError, ImmucoreError, ReplicaDivergedError
from ..protocol.answers import encode_entry_answer, plain_get_key
from ..protocol.frames import ProtocolError
from ..protocol.messages import Msg, from_wire, header_to_wire, to_wire
from ..store.env import BurstWouldBlock
from ..types import Entry, KVMetadata, State
from . import auth, settings as dbsettings
from .completions import Completions
from .connection import HeaderAnswer, LaterAnswer
from .node import DatabaseError, Node


PermissionDeniedError = auth.PermissionDeniedError
_GET = int(Msg.GET)
# A plain GET's answer is encoded in C up to this value size, whose answer always fits a frame
# (a key, the map's names and its integers take under 256 bytes more); a bigger value goes
# through ``Connection._send``, which answers response_too_large for one over the frame limit.
_INLINE_ANSWER_VALUE_BYTES_MAX = min(1 << 20, FRAME_BODY_BYTES_MAX - KEY_SIZE_BYTES_MAX - 256)


def _field(body: dict, name: str, kind, default=None):
    value = body.get(name, default)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise IllegalArgumentsError(f"field {name!r} must be {kind.__name__}")
    return value


def _metadata(body: dict):
    if "metadata" in body:
        md = from_wire(body["metadata"])
        if not isinstance(md, KVMetadata):
            raise IllegalArgumentsError("metadata must be a KVMetadata")
        return md
    if "metadata_by_key" in body:
        out = {}
        for key, md in _field(body, "metadata_by_key", list):
            md = from_wire(md)
            if not isinstance(key, bytes) or not isinstance(md, KVMetadata):
                raise IllegalArgumentsError("metadata_by_key must be [key, KVMetadata] pairs")
            out[key] = md
        return out
    return None


def _submit_set(db, body: dict, on_done):
    """A SET's tx handed to the writer without waiting (a full queue: writer_busy): its future,
    or None when ``on_done`` takes the outcome. Our clients' ``kvs_flat`` with at most one
    metadata goes to the codec as it came, not entry by entry."""
    flat = body.get("kvs_flat")
    if type(flat) is not list or len(flat) % 2:
        kvs = _kvs(body)      # refuses what is misshapen, before the metadata, as it always did
        return db.set_async(kvs, metadata=_metadata(body), block=False, on_done=on_done)
    metadata = _metadata(body)
    if isinstance(metadata, dict):       # metadata per key: entry by entry after all
        return db.set_async(_kvs(body), metadata=metadata, block=False, on_done=on_done)
    return db.set_flat_async(flat, metadata=metadata, block=False, on_done=on_done)


def _kvs(body: dict) -> list:
    """(key, value) pairs from ``kvs_flat: [k1, v1, k2, v2, ...]`` (what our clients send: one
    list instead of a list per entry, a third of the decoding of a 1000-entry set) or from
    ``kvs: [[k, v], ...]``. Types are checked by the codec with the rest of the tx."""
    if "kvs_flat" in body:
        flat = _field(body, "kvs_flat", list)
        if len(flat) % 2:
            raise IllegalArgumentsError("kvs_flat must alternate keys and values")
        pairs = iter(flat)
        return list(zip(pairs, pairs))
    pairs = _field(body, "kvs", list)
    if not all(isinstance(p, list) and len(p) == 2 for p in pairs):
        raise IllegalArgumentsError("kvs must be a list of [key, value] pairs")
    return [(k, v) for k, v in pairs]




class _Permit:
    """What a request was allowed to do as it started — its session, the user's right on its
    database — checked again after each of its waits (a long poll, a sync write's wait for
    acks, an index wait, a stream's next chunk), right before what it answers. Any change of
    the user (password, permissions, deactivation) ends the user's sessions, so a request that
    waited across the change answers the error instead: a revoked permission never outlives
    the change. It checks the session the request started under, not the connection's current
    one (a LOGIN pipelined meanwhile binds another)."""
    __slots__ = ("_conn", "_session_id", "_manager", "_allowed", "_denied")

    def __init__(self, conn, session_id, manager, allowed, denied: str):
        self._conn, self._session_id, self._manager = conn, session_id, manager
        self._allowed, self._denied = allowed, denied

    def check(self) -> None:
        """On the event loop: a session that ended also logs its connection out, as any
        request that finds it ended does (unless the connection has another session now)."""
        try:
            self.check_anywhere()
        except auth.AuthError:
            if self._conn.session is not None and self._conn.session == self._session_id:
                self._conn.logged_out()
            raise

    def check_anywhere(self) -> None:
        """From any thread (under a lock a change waits for): raises, changes nothing."""
        _, user = self._manager.touch(self._session_id)
        if not self._allowed(user):
            raise PermissionDeniedError(self._denied)


class Dispatcher:
    def __init__(self, node: Node):
        self.node = node
        self._completions = None     # made on the running loop, at the first write
        self._handlers = {
            Msg.HEALTH: self.health, Msg.SERVER_INFO: self.server_info, Msg.LOGIN: self.login,
            Msg.LOGOUT: self.logout, Msg.KEEPALIVE: self.keepalive,
            Msg.USE_DATABASE: self.use_database,
            Msg.SET: self.set, Msg.GET: self.get, Msg.DELETE: self.delete,
            Msg.HISTORY: self.history, Msg.SCAN: self.scan, Msg.TX_BY_ID: self.tx_by_id,
            Msg.CURRENT_STATE: self.current_state, Msg.VERIFIABLE_SET: self.verifiable_set,
            Msg.VERIFIABLE_GET: self.verifiable_get,
            Msg.VERIFIABLE_TX_BY_ID: self.verifiable_tx_by_id, Msg.EXPORT_TX: self.export_tx,
            Msg.EXPORT_TXS: self.export_txs, Msg.REPLICATE_TX: self.replicate_tx,
            Msg.REPLICA_ACK: self.replica_ack, Msg.EXPORT_TXS_STREAM: self.export_txs_stream,
            Msg.DATABASE_CREATE: self.database_create, Msg.DATABASE_LIST: self.database_list,
            Msg.DATABASE_LOAD: self.database_load, Msg.DATABASE_UNLOAD: self.database_unload,
            Msg.DATABASE_DELETE: self.database_delete, Msg.DATABASE_UPDATE: self.database_update,
            Msg.DATABASE_SETTINGS: self.database_settings,
            Msg.USER_CREATE: self.user_create, Msg.USER_LIST: self.user_list,
            Msg.USER_CHANGE_PASSWORD: self.user_change_password,
            Msg.USER_PERMISSION: self.user_permission, Msg.USER_SET_ACTIVE: self.user_set_active,
        }

    def __call__(self, conn, msg: Msg, body: dict):
        """The handler's coroutine, not yet started (the connection runs its first step); or,
        from a handler that answered at once without one (a plain GET), its answer, a dict."""
        handler = self._handlers.get(msg)
        if handler is None:
            raise ProtocolError("unknown_message", f"message {msg.name} is not served")
        return handler(conn, body)

    # --- helpers --------------------------------------------------------------------------

    async def _write(self, db, permit, body: dict) -> tuple:
        """One SET's tx, awaited without blocking the loop (a full write queue: writer_busy),
        and on a sync primary answered once enough replicas hold it (and its permit holds)."""
        headers = await self._committed(_submit_set(db, body, None))
        if not self.node.replicated_at_once(db.name, headers[0][0]):
            await self._replicated(permit, db.name, headers[0][0])
        return headers[0]

    def _committed(self, writer_future) -> asyncio.Future:
        """The writer's future on the loop, through the node's one-wake-per-commit bridge."""
        return self._bridge().wrap(writer_future)

    def _bridge(self) -> Completions:
        if self._completions is None:
            self._completions = Completions(asyncio.get_running_loop())
        return self._completions

    def _set_answered(self, conn, session_id, detached, name: str, answer: LaterAnswer,
                      headers, exc):
        """A SET's commit, on the loop: its answer, or on a sync primary the wait for the
        replicas' acks first (in a task, as ``_write`` does). The commit itself is answered
        without a second check: the writer took the tx while the write was allowed."""
        if exc is not None:
            answer.fail(exc)                       # its failure is the answer
            return
        header = headers[0]
        if not self.node.replicated_at_once(name, header[0]):
            permit = self._permit(conn, "write", name, (session_id, detached))
            waiting = asyncio.ensure_future(self._set_replicated(permit, name, header))
            waiting.add_done_callback(answer.settle_from)
            return
        answer.give(HeaderAnswer(header))

    async def _set_replicated(self, permit, name: str, header: tuple) -> "HeaderAnswer":
        await self._replicated(permit, name, header[0])
        return HeaderAnswer(header)

    async def _replicated(self, permit, name: str, tx_id: int):
        """A sync write's wait for its replicas, then the check of its permit: a writer whose
        session ended meanwhile gets that error, which says the tx is durable all the same."""
        await self.node.replicated(name, tx_id)
        try:
            permit.check()
        except auth.AuthError as exc:
            raise type(exc)(f"{exc}: the session ended while tx {tx_id} waited for its sync "
                            "replicas (the tx is durable on the primary)") from None

    def _manager(self, conn):
        return self.node.token_sessions if conn.detached else self.node.sessions

    def _session(self, conn):
        """The connection's session database and user, re-checked on every request. The session
        carries its user as of login; any change of that user (password, permissions,
        deactivation) ends the session (``UserStore`` listeners), so a live session's user is
        current."""
        try:
            database, user = self._manager(conn).touch(conn.session)
        except auth.AuthError:
            conn.logged_out()
            raise
        if not user.active:
            self._manager(conn).close(conn.session)
            conn.logged_out()
            raise auth.UserNotActiveError()
        return database, user

    def _authorize(self, conn, action: str, database: str = None):
        session_database, user = self._session(conn)
        name = database or session_database
        if not user.can(name, action):
            raise PermissionDeniedError("permission denied")
        return user, name

    def _db(self, conn, action: str, kind: str = None):
        """The session's database, once ``action`` is allowed on it; the request is counted
        under ``kind`` (default: the action) in the immucore_requests metric."""
        _, name = self._authorize(conn, action)
        database = self.node.database(name)
        self.node.count_request(name, kind or action)
        return database

    def _db_permit(self, conn, action: str, kind: str = None):
        """``_db``, and the permit to check again after the request's waits."""
        database = self._db(conn, action, kind)
        return database, self._permit(conn, action, database.name)

    def _permit(self, conn, action: str, name: str, started=None) -> _Permit:
        """``started``: the connection's ``(session, detached)`` when the request came, if it
        may have changed since (default: as they are now)."""
        session_id, detached = started or (conn.session, conn.detached)
        manager = self.node.token_sessions if detached else self.node.sessions
        return _Permit(conn, session_id, manager, lambda user: user.can(name, action),
                       "permission denied")

    async def _read(self, fn, *args, **kwargs):
        """Run a blocking call on the node's read threads (index waits, hashing, fsyncs)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.node.read_pool,
                                          functools.partial(fn, *args, **kwargs))

    async def _index_read(self, db, permit, needed_tx: int, fn, *args, **kwargs):
        """A key-index read: inline when the index already covers what it needs (a few LMDB
        lookups, cheaper than two thread hops), on a read thread when it must wait — and then
        answered only if ``permit`` still holds after the wait."""
        if db.index_covers(needed_tx):
            return fn(*args, **kwargs)
        result = await self._read(fn, *args, **kwargs)
        permit.check()
        return result

    # --- session --------------------------------------------------------------------------

    async def health(self, conn, body):
        return {"status": "ok", "version": __version__}

    async def server_info(self, conn, body):
        return {"version": __version__, "protocol": 1, "started_at": self.node.started_at,
                "uptime_seconds": time.monotonic() - self.node.started_monotonic}

    async def login(self, conn, body):
        """Log in with user and password, or bind this connection to a detached session (a
        CLI's saved token). Detached sessions outlive their connection (24 h of inactivity)."""
        if "token" in body:
            detached = True
            session = self.node.token_sessions.get(_field(body, "token", str))
        else:
            user_name = _field(body, "user", str)
            password = _field(body, "password", str)
            database = _field(body, "database", str, "defaultdb")
            detached = bool(body.get("detached", False))
            user = await self._read(self.node.users.authenticate, user_name, password)
            if database != "systemdb":
                self.node.database(database)          # must exist and be loaded
            if not user.can(database, "read"):
                raise auth.NoDatabasePermissionError()
            session = (self.node.token_sessions if detached else self.node.sessions).open(
                user, database)
        conn.logged_in(session.id, detached)
        warning = ""
        if session.username == auth.SYSADMIN_USERNAME and await self._read(
                auth.using_default_password, self.node.users):
            warning = auth.DEFAULT_PASSWORD_WARNING
        return {"token": session.id, "database": session.database, "user": session.username,
                "warning": warning}

    async def logout(self, conn, body):
        self.node.close_session(conn.session, detached=conn.detached)
        conn.logged_out()
        return {}

    async def keepalive(self, conn, body):
        self._session(conn)
        return {}

    async def use_database(self, conn, body):
        name = _field(body, "database", str)
        _, user = self._session(conn)
        if name != "systemdb":
            self.node.database(name)
        if not user.can(name, "read"):
            raise auth.NoDatabasePermissionError()
        self._manager(conn).use_database(conn.session, name)
        return {"database": name}

    # --- data -----------------------------------------------------------------------------

    def set(self, conn, body):
        """Answered by a callback when its commit is durable: no task, coroutine or future (the
        writer calls back through the bridge, and the connection sends what it is given)."""
        db = self._db(conn, "write")
        answer = LaterAnswer()
        _submit_set(db, body, self._bridge().on_loop(
            functools.partial(self._set_answered, conn, conn.session, conn.detached, db.name,
                              answer)))
        return answer

    async def delete(self, conn, body):
        db, permit = self._db_permit(conn, "write")
        keys = _field(body, "keys", list)
        headers = await self._committed(db.delete_async(keys, block=False))
        if not self.node.replicated_at_once(db.name, headers[0][0]):
            await self._replicated(permit, db.name, headers[0][0])
        return {"header": header_to_wire(headers[0])}

    def get(self, conn, body):
        """A plain get (only a key) that the index already covers is answered here, with no
        coroutine: most of a pipelined burst. Any other goes on in ``_get``."""
        db = self._db(conn, "read")
        if len(body) == 1 and db.index_covers(0):
            return {"entry": to_wire(db.get(_field(body, "key", bytes)))}
        return self._get(db, self._permit(conn, "read", db.name), body)

    def plain_gets(self, conn, run: list) -> list:
        """A run of GETs that arrived together on ``conn`` (``(request_id, body)`` pairs),
        served at once: for each, its answer frame (bytes), an answer body to send, the error
        to answer, or None for one to serve the general way (``get``): a body with more than
        a key, or every one of them while the index is behind.

        The session and permission are checked once for the run, as the run is served: its
        GETs arrived together and are all answered in this one step of the event loop. A
        change of the user made meanwhile (on a read thread) is answered to its own client
        only after this step, so it is ordered after these GETs either way, as it would be
        had each been checked alone. The plain ones are read from one snapshot
        (``latest_rows``) and an answer without metadata is encoded in C, with no Entry or map
        built for it. An error of the session or the database is raised (the connection
        answers the first GET with it)."""
        _, name = self._authorize(conn, "read")
        db = self.node.database(name)
        if not db.index_covers(0):
            return [None] * len(run)
        keys = [plain_get_key(body) for _, body in run]
        plain = [key for key in keys if key is not None]
        try:
            rows = iter(db.latest_rows(plain))
        except (BurstWouldBlock, ImmucoreError):
            # a resized map or an index that fell behind meanwhile (BurstWouldBlock), a
            # database closing: each GET the general way, which waits or answers the error
            return [None] * len(run)
        self.node.count_request(name, "read", len(plain))   # the general path counts the rest
        answers = []
        for (request_id, _), key in zip(run, keys):
            if key is None:
                answers.append(None)
                continue
            row = next(rows)
            if isinstance(row, Exception):
                answers.append(row)
            elif row[3] is None and len(row[2]) <= _INLINE_ANSWER_VALUE_BYTES_MAX:
                answers.append(encode_entry_answer(_GET, request_id, row[0], row[1], row[2],
                                                   row[4]))
            else:       # metadata, or a value big enough to need the frame size check
                answers.append({"entry": to_wire(Entry(*row))})
        return answers

    async def _get(self, db, permit, body):
        at_tx, since_tx = _field(body, "at_tx", int, 0), _field(body, "since_tx", int, 0)
        entry = await self._index_read(db, permit, max(at_tx, since_tx), db.get,
                                       _field(body, "key", bytes),
                                       at_tx=at_tx, since_tx=since_tx,
                                       at_revision=_field(body, "at_revision", int, 0))
        return {"entry": to_wire(entry)}

    async def history(self, conn, body):
        db, permit = self._db_permit(conn, "read")
        entries = await self._index_read(db, permit, 0, db.history, _field(body, "key", bytes),
                                   offset=_field(body, "offset", int, 0),
                                   limit=_field(body, "limit", int, 0),
                                   desc=bool(body.get("desc", False)))
        return {"entries": to_wire(entries)}

    async def scan(self, conn, body):
        db, permit = self._db_permit(conn, "read")
        since_tx = _field(body, "since_tx", int, 0)
        entries = await self._index_read(db, permit, since_tx, db.scan,
                                         prefix=_field(body, "prefix", bytes, b""),
                                         seek_key=_field(body, "seek_key", bytes, b""),
                                         end_key=_field(body, "end_key", bytes, b""),
                                         desc=bool(body.get("desc", False)),
                                         limit=_field(body, "limit", int, 0),
                                         since_tx=since_tx)
        return {"entries": to_wire(entries)}

    async def tx_by_id(self, conn, body):
        db = self._db(conn, "read")
        return {"tx": to_wire(db.tx_by_id(_field(body, "tx_id", int)))}

    async def current_state(self, conn, body):
        state = self._db(conn, "read").current_state()
        return {"state": to_wire(state), "signed": self.node.signed_state(state)}

    def _signed_target(self, db, vtx) -> dict:
        """immudb signs the state of the dual proof's target."""
        target = vtx.dual_proof.target_tx_header
        return self.node.signed_state(State(db.name, target.id, target.alh()))

    async def verifiable_set(self, conn, body):
        db, permit = self._db_permit(conn, "write")
        prove_since = _field(body, "prove_since_tx", int)
        header = await self._write(db, permit, body)
        vtx = await self._read(db.verifiable_tx_by_id, header[0], prove_since_tx=prove_since)
        permit.check()                         # the proof is of the database's state now
        return {"verifiable_tx": to_wire(vtx), "signed": self._signed_target(db, vtx)}

    async def verifiable_get(self, conn, body):
        db, permit = self._db_permit(conn, "read")
        ventry = await self._read(db.verifiable_get, _field(body, "key", bytes),
                                  prove_since_tx=_field(body, "prove_since_tx", int),
                                  at_tx=_field(body, "at_tx", int, 0),
                                  since_tx=_field(body, "since_tx", int, 0),
                                  at_revision=_field(body, "at_revision", int, 0))
        permit.check()                         # after the read's index wait
        return {"verifiable_entry": to_wire(ventry),
                "signed": self._signed_target(db, ventry.verifiable_tx)}

    async def verifiable_tx_by_id(self, conn, body):
        db, permit = self._db_permit(conn, "read")
        vtx = await self._read(db.verifiable_tx_by_id, _field(body, "tx_id", int),
                               prove_since_tx=_field(body, "prove_since_tx", int))
        permit.check()
        return {"verifiable_tx": to_wire(vtx), "signed": self._signed_target(db, vtx)}

    async def export_tx(self, conn, body):
        db, permit = self._db_permit(conn, "admin")
        blob = await self._read(db.export_tx, _field(body, "tx_id", int))
        permit.check()
        return {"blob": blob}

    async def export_txs(self, conn, body):
        """Committed txs from ``first_tx_id``; with ``wait_ms``, a caught-up caller (a replica)
        is answered as soon as the next commit happens (long poll), not after a polling delay."""
        db, permit = self._db_permit(conn, "admin")
        first = _field(body, "first_tx_id", int)
        count = min(_field(body, "count", int), EXPORT_TXS_COUNT_MAX)
        wait_ms = min(max(_field(body, "wait_ms", int, 0), 0), EXPORT_WAIT_MS_MAX)
        await self.node.wait_for_commit(db.name, first - 1, wait_ms / 1000)
        # the answer must fit one frame: stop well before FRAME_BODY_BYTES_MAX. Blobs, the
        # last one's Alh and the committed id come from one snapshot, in one read-pool trip.
        export = await self._read(db.export_range, first, count, FRAME_BODY_BYTES_MAX // 2)
        answer = {"blobs": export.blobs, "committed_tx_id": export.committed_tx_id,
                  "acked_tx_id": self.node.acked_tx_id(db), **self.node.replication_role(db)}
        if export.blobs:   # the replica checks the last tx against it (no later prevAlh does)
            answer["last_alh"] = export.last_alh
        # checked again after the long poll and the reads: a user changed while it waited
        # (deactivated, no longer admin, a new password) gets that error, not the commit
        permit.check()
        return answer

    async def export_txs_stream(self, conn, body):
        """Committed txs ``first_tx_id`` .. ``first_tx_id + count - 1`` (or up to the last
        committed when the stream starts) as a server stream: one frame per chunk of up to
        EXPORT_STREAM_CHUNK_TXS blobs, then the end frame. A bulk copy of a log: no chunk size
        to choose, no request per chunk; each chunk waits for the one before to be sent."""
        db, permit = self._db_permit(conn, "admin")
        first, count = _field(body, "first_tx_id", int), _field(body, "count", int)
        if first < 1 or count < 1:
            raise IllegalArgumentsError("first_tx_id and count must be at least 1")
        last = min(first + count - 1, db.current_state().tx_id)
        return self._export_chunks(permit, db, first, last)

    async def _export_chunks(self, permit, db, first: int, last: int):
        """The connection asks for each chunk only once the one before is handed to the socket
        (``Connection._finish``), and the chunk is checked after it was read: a user whose
        permission went meanwhile (or a session that ended) stops the stream with that error
        before anything more leaves."""
        while first <= last:
            permit.check()
            export = await self._read(db.export_range, first,
                                      min(EXPORT_STREAM_CHUNK_TXS, last - first + 1),
                                      FRAME_BODY_BYTES_MAX // 2)
            if not export.blobs:
                return
            permit.check()
            yield {"blobs": export.blobs, "last_alh": export.last_alh}
            first += len(export.blobs)

    async def replica_ack(self, conn, body):
        """A replica durably holds every tx up to ``tx_id``; counted for sync replication only
        if ``alh`` is this database's Alh at that tx (a diverged replica never counts). Counted
        apart from the exports (kind replica_ack): one comes after every applied batch."""
        db, permit = self._db_permit(conn, "admin", "replica_ack")
        replica_id = _field(body, "replica_id", str)
        tx_id, alh = _field(body, "tx_id", int), _field(body, "alh", bytes)
        if not 0 < len(replica_id) <= REPLICA_ID_CHARS_MAX:
            raise IllegalArgumentsError(f"replica_id must have 1..{REPLICA_ID_CHARS_MAX} chars")
        if tx_id > db.current_state().tx_id or await self._read(db.alh_of, tx_id) != alh:
            raise ReplicaDivergedError(
                f"replica diverged from primary: its tx {tx_id} is not {db.name}'s tx {tx_id}")
        permit.check()                         # an ack counts only from a user still allowed
        acks = self.node.sync_acks.get(db.name)
        quorum = acks.acknowledge(replica_id, tx_id) if acks is not None else 0
        return {"acked_tx_id": quorum}

    async def replicate_tx(self, conn, body):
        """A push into a replica fed from outside. A replica that follows a primary with its
        own replicator takes none: foreign txs would pass for its primary's (served as
        ``following`` with no lag) until the primary's next commit showed the divergence."""
        db, permit = self._db_permit(conn, "admin")
        blobs = _field(body, "blobs", list)
        last_alh = body.get("last_alh")
        if last_alh is not None and not (isinstance(last_alh, bytes) and len(last_alh) == 32):
            raise IllegalArgumentsError("field 'last_alh' must be 32 bytes")
        self.node.check_takes_pushes(db.name)
        headers = await asyncio.wrap_future(db.replicate_txs_async(blobs, last_alh=last_alh))
        permit.check()
        return {"headers": [header_to_wire(h) for h in headers]}

    # --- databases ------------------------------------------------------------------------

    _NOT_SYSADMIN = "loggedin user does not have permissions for this operation"

    def _sysadmin(self, conn):
        _, user = self._session(conn)
        if not user.sysadmin:
            raise PermissionDeniedError(self._NOT_SYSADMIN)
        return user

    @staticmethod
    def _not_db_admin(name: str) -> str:
        return (f"the database '{name}' does not exist or you do not have admin permission on "
                "this database")

    def _db_admin(self, conn, name: str):
        _, user = self._session(conn)
        if not user.can(name, "admin"):
            raise PermissionDeniedError(self._not_db_admin(name))
        return user

    def _sysadmin_permit(self, conn) -> _Permit:
        """What a sysadmin-only management call re-checks once it holds the management lock."""
        return _Permit(conn, conn.session, self._manager(conn), lambda user: user.sysadmin,
                       self._NOT_SYSADMIN)

    def _db_admin_permit(self, conn, name: str) -> _Permit:
        return _Permit(conn, conn.session, self._manager(conn),
                       lambda user: user.can(name, "admin"), self._not_db_admin(name))

    async def database_create(self, conn, body):
        user = self._sysadmin(conn)
        name = _field(body, "database", str)
        requested = _field(body, "settings", dict, {})
        s = await self._read(self.node.manage, self.node.create_database, name, requested,
                             user.username, bool(body.get("if_not_exists", False)),
                             permit=self._sysadmin_permit(conn))
        return {"database": name, "settings": dbsettings.public(s),
                "summary": dbsettings.summary(s, requested)}

    async def database_update(self, conn, body):
        name = _field(body, "database", str)
        user = self._db_admin(conn, name)
        requested = _field(body, "settings", dict, {})
        s = await self._read(self.node.manage, self.node.update_database, name, requested,
                             user.username, permit=self._db_admin_permit(conn, name))
        return {"database": name, "settings": dbsettings.public(s),
                "summary": dbsettings.summary(s, requested)}

    async def database_list(self, conn, body):
        _, user = self._session(conn)
        permit = _Permit(conn, conn.session, self._manager(conn), lambda _: True, "")
        listed = await self._read(self.node.list_databases)
        permit.check()
        return {"databases": [d for d in listed if user.sysadmin or user.can(d["name"], "read")]}

    async def database_settings(self, conn, body):
        name = _field(body, "database", str)
        self._db_admin(conn, name)
        s = self.node.settings.get(name)
        if s is None:
            raise DatabaseError(f"database {name} does not exist")
        return {"database": name, "settings": dbsettings.public(s)}

    async def database_load(self, conn, body):
        name = _field(body, "database", str)
        self._db_admin(conn, name)
        await self._read(self.node.manage, self.node.load_database, name,
                         permit=self._db_admin_permit(conn, name))
        return {"database": name}

    async def database_unload(self, conn, body):
        name = _field(body, "database", str)
        self._db_admin(conn, name)
        await self._read(self.node.manage, self.node.unload_database, name,
                         permit=self._db_admin_permit(conn, name))
        return {"database": name}

    async def database_delete(self, conn, body):
        name = _field(body, "database", str)
        user = self._db_admin(conn, name)
        await self._read(self.node.manage, self.node.delete_database, name, user.username,
                         permit=self._db_admin_permit(conn, name))
        return {"database": name}

    # --- users ----------------------------------------------------------------------------

    async def user_create(self, conn, body):
        name = _field(body, "user", str)
        permission = auth.parse_permission(_field(body, "permission", str))
        database = _field(body, "database", str, "")
        if permission == auth.PERMISSION_SYSADMIN:
            creator = self._sysadmin(conn)
        else:
            creator = self._db_admin(conn, database)
            self.node.database(database)
        await self._read(self.node.users.create_user, name, _field(body, "password", str),
                         permission, database, creator)
        return {"user": name}

    async def user_list(self, conn, body):
        _, user = self._session(conn)
        permit = _Permit(conn, conn.session, self._manager(conn), lambda _: True, "")
        users = await self._read(self.node.users.list_users)
        permit.check()
        if not user.sysadmin:
            users = [u for u in users if u.username == user.username or any(
                user.can(db, "admin") for db in u.permissions)]
        return {"users": [_user_public(u) for u in users]}

    async def user_change_password(self, conn, body):
        _, user = self._session(conn)
        name = _field(body, "user", str)
        await self._read(self.node.users.change_password, name,
                         _field(body, "old_password", str, "") or None,
                         _field(body, "new_password", str), user)
        if name == user.username:          # the change ended every session of the user
            conn.logged_out()
        return {"user": name}

    async def user_permission(self, conn, body):
        name = _field(body, "user", str)
        database = _field(body, "database", str)
        user = self._db_admin(conn, database)
        permission = auth.parse_permission(_field(body, "permission", str))
        action = _field(body, "action", str)
        if action not in ("grant", "revoke"):
            raise IllegalArgumentsError("action must be grant or revoke")
        fn = self.node.users.grant if action == "grant" else self.node.users.revoke
        await self._read(fn, name, permission, database, by_user=user)
        return {"user": name}

    async def user_set_active(self, conn, body):
        _, user = self._session(conn)
        name = _field(body, "user", str)
        active = bool(body.get("active"))
        await self._read(self.node.users.set_active, name, active, by_user=user)
        return {"user": name, "active": active}


def _user_public(user) -> dict:
    """What user listings show: never a password hash."""
    return {"user": user.username, "active": user.active, "sysadmin": user.sysadmin,
            "permissions": {db: auth.permission_name(p) for db, p in user.permissions.items()},
            "created_by": user.created_by, "created_at": user.created_at}
