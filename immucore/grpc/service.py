"""immudb's ImmuService on an immucore node: each method checks what the native protocol's
handler checks (the session, its database, the user's permission, through the very same
``Dispatcher`` helpers), then calls the embedded API and answers immudb's messages.

Authentication as immudb's: ``Login`` gives a token (sent back as ``authorization`` metadata,
with or without ``Bearer ``) that names no database until ``UseDatabase``; ``OpenSession``
gives a session id (``sessionid`` metadata) bound to a database and kept alive by
``KeepAlive``. Tokens are sessions of their own manager (a day of inactivity, as immudb's token
expiry); session ids are the node's sessions (``--max-sessions``, 3 minutes of inactivity).
"""
from __future__ import annotations

from ..constants import (GRPC_TOKENS_MAX, GRPC_TOKENS_PER_USER_MAX, IMMUDB_COMPATIBLE_VERSION,
                         TOKEN_SESSION_INACTIVITY_SECONDS)
from ..server import auth
from ..server.handlers import Dispatcher, _Permit
from ..server.node import (DatabaseError, _folder_size, _is_loopback,
                           protected_mode_message)
from ..server.shared_port import real_peer
from . import convert, schema
from .replication import ReplicationMethods
from .db_operations import DbOperations
from .management import ManagementMethods
from .errors import (DatabaseNotFoundError, NoDatabaseSelectedError, NotLoggedInError,
                     NotSupportedError, ProtectedModeError, SessionNotFoundError)
from .streams import StreamMethods
from .streaming import served

BEARER = "Bearer "


class GrpcCall:
    """One call's credentials, in the shape the Dispatcher's checks take a connection."""

    __slots__ = ("session", "detached", "manager", "by_session_id")

    def __init__(self, session: str, manager, by_session_id: bool):
        self.session, self.manager, self.by_session_id = session, manager, by_session_id
        self.detached = not by_session_id

    def logged_in(self, session_id: str, detached: bool):
        self.session = session_id

    def logged_out(self):
        self.session = None


class _Checks(Dispatcher):
    """The native handlers' checks, with a call's session in the manager it came from."""

    def _manager(self, conn):
        return conn.manager

    def _permit(self, conn, action: str, name: str, started=None) -> _Permit:
        return _Permit(conn, conn.session, conn.manager, lambda user: user.can(name, action),
                       "permission denied")

    def _authorize(self, conn, action: str, database: str = None):
        if database is None and self._manager(conn).touch(conn.session)[0] is None:
            raise NoDatabaseSelectedError()
        return super()._authorize(conn, action, database)



def _peer_address(peer: str):
    """``ipv4:127.0.0.1:5000`` / ``ipv6:[::1]:5000`` as (host, port); anything else (a Unix
    socket) as None."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return (rest.rpartition(":")[0], 0)
    if kind == "ipv6":
        return (rest.rpartition(":")[0].strip("[]"), 0)
    return None


class ImmuService(StreamMethods, ManagementMethods, DbOperations, ReplicationMethods):
    def __init__(self, node):
        self.node = node
        self.checks = _Checks(node)
        self.tokens = auth.SessionManager(
            GRPC_TOKENS_MAX, inactivity_timeout_seconds=TOKEN_SESSION_INACTIVITY_SECONDS,
            per_user_max=GRPC_TOKENS_PER_USER_MAX)
        # any change of a user (password, permissions, deactivation) ends its tokens too
        node.users.add_listener(self.tokens.user_changed)

    # --- helpers ------------------------------------------------------------------------------

    def _check_peer(self, context):
        """Protected mode, as for native connections: while any active user holds a well-known
        password, only loopback peers are served."""
        # through the shared port the gRPC server's peer is the node's splice: the real one
        peer = real_peer(self.node, context.peer() or "") or _peer_address(context.peer() or "")
        if peer is not None and _is_loopback(peer):
            return
        exposed, judged = self.node.exposed_users()
        if exposed:
            raise ProtectedModeError(protected_mode_message(exposed, judged))

    def _call(self, context) -> GrpcCall:
        """The call's credentials: a session id (``sessionid``) or a token (``authorization``)."""
        metadata = dict(context.invocation_metadata() or ())
        session_id = metadata.get("sessionid")
        if session_id:
            return GrpcCall(session_id, self.node.sessions, by_session_id=True)
        token = metadata.get("authorization", "")
        token = token[len(BEARER):] if token.startswith(BEARER) else token
        if not token:
            raise NotLoggedInError()
        return GrpcCall(token, self.tokens, by_session_id=False)

    def _session(self, call: GrpcCall):
        try:
            return self.checks._session(call)
        except auth.SessionNotFoundError:
            raise (SessionNotFoundError() if call.by_session_id else NotLoggedInError()) from None

    def _db(self, context, action: str):
        """The call's database, and its permit: what the call may do, checked again after each
        of its waits (a revoked permission never outlives the change, as on the native port)."""
        call = self._call(context)
        self._session(call)            # an unknown token or session id: immudb's text for it
        return self.checks._db_permit(call, action)

    async def _read(self, fn, *args, **kwargs):
        return await self.checks._read(fn, *args, **kwargs)

    async def _set(self, db, permit, request) -> tuple:
        """A SetRequest's tx, durable (and on a sync primary replicated) when it returns."""
        if len(request.preconditions):
            raise NotSupportedError("preconditions are not supported by immucore (docs/grpc.md)")
        kvs, metadata = [], {}
        for kv in request.KVs:
            kvs.append((kv.key, kv.value))
            if kv.HasField("metadata"):
                md = convert.kv_metadata_from(kv.metadata)
                if md is not None:
                    metadata[kv.key] = md
        headers = await self.checks._committed(
            db.set_async(kvs, metadata=metadata or None, block=False))
        await self._replicated(db, permit, headers[0][0])
        return headers[0]

    async def _replicated(self, db, permit, tx_id: int):
        """A write answered once replicated: a sync write waits for acks, and is answered
        only if the caller may still write after that wait."""
        if not self.node.replicated_at_once(db.name, tx_id):
            await self.node.replicated(db.name, tx_id)
            permit.check()

    async def _proof(self, permit, fn, *args, **kwargs):
        """A proof built on a read thread, answered only if the permit still holds."""
        result = await self._read(fn, *args, **kwargs)
        permit.check()
        return result

    def _signed_target(self, db, vtx) -> dict:
        return self.checks._signed_target(db, vtx)

    # --- logging in, sessions -------------------------------------------------------------------

    @served
    async def Login(self, request, context):
        user = await self._read(self.node.users.authenticate, request.user, request.password)
        session = self.tokens.open(user, None)     # no database until UseDatabase, as immudb
        warning = b""
        if user.username == auth.SYSADMIN_USERNAME and await self._read(
                auth.using_default_password, self.node.users):
            warning = auth.DEFAULT_PASSWORD_WARNING.encode()
        return schema.LoginResponse(token=session.id, warning=warning)

    @served
    async def Logout(self, request, context):
        call = self._call(context)
        self._session(call)
        call.manager.close(call.session)
        return schema.Empty()

    @served
    async def OpenSession(self, request, context):
        user = await self._read(self.node.users.authenticate, request.username, request.password)
        name = request.databaseName or "defaultdb"
        self._database_exists(name)
        if not user.can(name, "read"):
            raise auth.NoDatabasePermissionError()
        session = self.node.sessions.open(user, name)
        return schema.OpenSessionResponse(sessionID=session.id, serverUUID=self.node.node_id)

    @served
    async def CloseSession(self, request, context):
        call = self._call(context)
        if not call.by_session_id:
            raise NotLoggedInError("no sessionID provided")     # immudb's text
        self._session(call)
        call.manager.close(call.session)
        return schema.Empty()

    @served
    async def KeepAlive(self, request, context):
        self._session(self._call(context))
        return schema.Empty()

    def _database_exists(self, name: str):
        if name == "systemdb":
            return
        try:
            self.node.database(name)
        except DatabaseError:
            if name in self.node.settings:
                raise                                     # exists, not loaded: its own text
            raise DatabaseNotFoundError(name) from None

    @served
    async def UseDatabase(self, request, context):
        """The call's token (or session) now works on that database, and is the token given
        back: immudb mints a new token and leaves the old one on its database (docs/grpc.md)."""
        call = self._call(context)
        _, user = self._session(call)
        name = request.databaseName
        self._database_exists(name)
        if not user.can(name, "read"):
            raise auth.NoDatabasePermissionError()
        call.manager.use_database(call.session, name)
        return schema.UseDatabaseReply(token=call.session)

    @served
    async def Health(self, request, context):
        return schema.HealthResponse(status=True, version=IMMUDB_COMPATIBLE_VERSION)

    @served
    async def ServerInfo(self, request, context):
        node = self.node
        databases = list(node.databases.values())
        size = await self._read(lambda: sum(_folder_size(f"{node.options.dir}/{d.name}")
                                            for d in databases))
        return schema.ServerInfoResponse(
            version=IMMUDB_COMPATIBLE_VERSION, startedAt=int(node.started_at),
            numTransactions=sum(d.current_state().tx_id for d in databases),
            numDatabases=len(node.settings), databasesDiskSize=size)

    @served
    async def CurrentState(self, request, context):
        db, _ = self._db(context, "read")
        state = db.current_state()
        return convert.state(self.node.signed_state(state))

    # --- keys -----------------------------------------------------------------------------------

    @served
    async def Set(self, request, context):
        db, permit = self._db(context, "write")
        return convert.header(await self._set(db, permit, request))

    @served
    async def Get(self, request, context):
        db, permit = self._db(context, "read")
        entry = await self.checks._index_read(
            db, permit, max(request.atTx, request.sinceTx), db.get, request.key, at_tx=request.atTx,
            since_tx=request.sinceTx, at_revision=request.atRevision)
        return convert.entry(entry)

    @served
    async def Delete(self, request, context):
        db, permit = self._db(context, "write")
        headers = await self.checks._committed(db.delete_async(list(request.keys), block=False))
        await self._replicated(db, permit, headers[0][0])
        return convert.header(headers[0])

    @served
    async def History(self, request, context):
        db, permit = self._db(context, "read")
        found = await self.checks._index_read(db, permit, request.sinceTx, db.history, request.key,
                                              offset=request.offset, limit=request.limit,
                                              desc=request.desc)
        return convert.entries(found)

    @served
    async def Scan(self, request, context):
        """immudb's bounds: seekKey and endKey are left out unless inclusiveSeek/inclusiveEnd
        (the embedded scan includes both), and ``offset`` entries are skipped first."""
        db, permit = self._db(context, "read")
        wanted = request.limit
        # the entries dropped for an exclusive bound or the offset are read too
        extra = request.offset + (1 if request.seekKey else 0) + (1 if request.endKey else 0)
        found = await self.checks._index_read(
            db, permit, request.sinceTx, db.scan, prefix=request.prefix, seek_key=request.seekKey,
            end_key=request.endKey, desc=request.desc,
            limit=wanted + extra if wanted else 0, since_tx=request.sinceTx)
        if request.seekKey and not request.inclusiveSeek:
            found = [e for e in found if e.key != request.seekKey]
        if request.endKey and not request.inclusiveEnd:
            found = [e for e in found if e.key != request.endKey]
        found = found[request.offset:]
        return convert.entries(found[:wanted] if wanted else found)

    # --- transactions and proofs ------------------------------------------------------------------

    @served
    async def TxById(self, request, context):
        db, permit = self._db(context, "read")
        return convert.tx(await self._proof(permit, db.tx_by_id, request.tx))

    @served
    async def VerifiableSet(self, request, context):
        db, permit = self._db(context, "write")
        header = await self._set(db, permit, request.setRequest)
        vtx = await self._proof(permit, db.verifiable_tx_by_id, header[0],
                               prove_since_tx=request.proveSinceTx)
        return convert.verifiable_tx(vtx, self._signed_target(db, vtx))

    @served
    async def VerifiableGet(self, request, context):
        db, permit = self._db(context, "read")
        key_request = request.keyRequest
        ventry = await self._proof(permit, db.verifiable_get, key_request.key,
                                  prove_since_tx=request.proveSinceTx, at_tx=key_request.atTx,
                                  since_tx=key_request.sinceTx,
                                  at_revision=key_request.atRevision)
        return convert.verifiable_entry(ventry, self._signed_target(db, ventry.verifiable_tx))

    @served
    async def VerifiableTxById(self, request, context):
        db, permit = self._db(context, "read")
        vtx = await self._proof(permit, db.verifiable_tx_by_id, request.tx,
                               prove_since_tx=request.proveSinceTx)
        return convert.verifiable_tx(vtx, self._signed_target(db, vtx))
