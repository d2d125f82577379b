"""A replica's primary over immudb's gRPC replication protocol (``--replication-primary-protocol
grpc``): the transport the replicator drives instead of the native client, so an immucore
replica can follow an immudb primary (or an immucore primary's gRPC face).

It offers the replicator the calls it makes of the native client (login, export_batch,
replica_ack, current_state, tx_by_id, close) and answers them in the same shapes, so the
replication machine and the verification (``Database.replicate_txs_async``) are the native
path's. What differs is the wire:

* logging in is immudb's ``OpenSession`` (the ``sessionid`` metadata on every call after it);
* txs come one per ``ExportTxRequest`` on a ``streamExportTx`` stream, as immudb's replicas
  fetch them; while catching up up to GRPC_REPLICATION_PIPELINE_TXS requests are in flight at
  once, so the round trip is paid once per batch, not once per tx;
* the acknowledgement is the ``ReplicaState`` each request carries (immudb's sync-replication
  ack): precommitted = what this replica durably holds, committed = its discard floor. A
  caught-up replica's request waits on the primary for the next commit; when an ack comes
  while it waits (a sync write on the primary waits for exactly that ack), the stream is
  cancelled and the request sent again with the new state;
* a primary that takes no ReplicaState (immudb without sync replication: "replica state was
  NOT expected") is asked without one, and answers "no new transactions" when we are caught
  up: then we ask again after GRPC_REPLICATION_POLL_SECONDS;
* the primary's committed tx comes in ``committed-txid-bin``; what it acknowledged to its
  clients (our floor) in ``may-commit-up-to-txid-bin``, or, from a primary that does not say,
  everything it sent (an async primary acknowledges every commit).
"""
from __future__ import annotations

import asyncio
import struct
from types import SimpleNamespace
from typing import Optional

import grpc

from ..constants import (GRPC_CHUNKED_MESSAGE_BYTES_MAX, GRPC_EXPORT_WAIT_MS,
                         GRPC_REPLICATION_PIPELINE_TXS, GRPC_REPLICATION_POLL_SECONDS,
                         GRPC_REQUEST_BYTES_MAX, GRPC_RESPONSE_BYTES_MAX)
from ..errors import ImmucoreError, ReplicaDivergedError
from ..grpc import schema
from ..grpc.chunks import ChunkedMessage
from ..types import TxHeader

_U64 = struct.Struct(">Q")
SERVICE_PATH = f"/{schema.SERVICE_NAME}/"
NO_NEW_TXS = "no new transactions"
STATE_NOT_EXPECTED = "replica state was NOT expected"
DIVERGED_TEXTS = ("replica commit state diverged from primary",
                  "replica precommit state diverged from primary")


class GrpcPrimaryError(ImmucoreError):
    """A gRPC call to the primary failed: its status and text, and the primary named."""

    def __init__(self, primary: str, method: str, code, details: str):
        super().__init__(f"{method} on {primary} (gRPC): {code.name if code else '?'}: {details}")
        self.code = "permission_denied" if "permission" in (details or "").lower() else None


class _Restart(Exception):
    """An ack arrived while a request waited on the primary: send it again with the ack."""


def _method(channel, name: str, request_class, response_class, kind: str):
    return getattr(channel, kind)(SERVICE_PATH + name,
                                  request_serializer=request_class.SerializeToString,
                                  response_deserializer=response_class.FromString)


class GrpcPrimary:
    """One connection (a channel and a session) to a primary database over gRPC."""

    def __init__(self, database, host: str, port: int, *, credentials=None,
                 timeout_seconds: float = 15.0, primary: str = "", replica_id: str):
        self.database = database          # this replica: what its ReplicaState says
        self._replica_id = replica_id     # its UUID: the primary counts each replica once
        self.primary = primary or f"{host}:{port}"
        self._timeout = timeout_seconds
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        options = [("grpc.max_receive_message_length", GRPC_RESPONSE_BYTES_MAX),
                   ("grpc.max_send_message_length", GRPC_REQUEST_BYTES_MAX)]
        self._channel = (grpc.aio.secure_channel(target, credentials, options=options)
                         if credentials is not None else
                         grpc.aio.insecure_channel(target, options=options))
        c = self._channel
        self._open_session = _method(c, "OpenSession", schema.OpenSessionRequest,
                                     schema.OpenSessionResponse, "unary_unary")
        self._close_session = _method(c, "CloseSession", schema.Empty, schema.Empty,
                                      "unary_unary")
        self._current_state = _method(c, "CurrentState", schema.Empty, schema.ImmutableState,
                                      "unary_unary")
        self._tx_by_id = _method(c, "TxById", schema.TxRequest, schema.Tx, "unary_unary")
        self._stream_export = _method(c, "streamExportTx", schema.ExportTxRequest, schema.Chunk,
                                      "stream_stream")
        self._metadata: tuple = ()
        self._stream = None
        self._with_state = True           # until the primary says it takes no ReplicaState
        self._acked: Optional[tuple] = None      # (tx_id, alh) durably held, as last acked
        self._acked_changed = asyncio.Event()
        self.primary_committed_tx_id = 0

    # --- the calls the replicator makes -----------------------------------------------------

    async def login(self, username: str, password: str, database: str):
        answer = await self._unary("OpenSession", self._open_session, schema.OpenSessionRequest(
            username=username.encode(), password=password.encode(), databaseName=database),
            with_session=False)
        self._metadata = (("sessionid", answer.sessionID),)

    async def close(self):
        self._cancel_stream()
        if self._metadata:
            try:
                await self._close_session(schema.Empty(), metadata=self._metadata, timeout=2.0)
            except (grpc.RpcError, asyncio.TimeoutError):
                pass                       # the session ends on its own on the primary
        await self._channel.close()

    async def current_state(self):
        state = await self._unary("CurrentState", self._current_state, schema.Empty())
        self.primary_committed_tx_id = max(self.primary_committed_tx_id, state.txId)
        return SimpleNamespace(tx_id=state.txId, tx_hash=state.txHash)

    async def tx_by_id(self, tx_id: int):
        """The primary's header of ``tx_id`` (its Alh computed here, as a verifier would)."""
        tx = await self._unary("TxById", self._tx_by_id, schema.TxRequest(tx=tx_id))
        h = tx.header
        metadata = b""
        if h.HasField("metadata") and h.metadata.ByteSize():     # an empty one is none
            raise ImmucoreError(f"tx {tx_id} on {self.primary} has tx metadata, which immucore "
                                "does not write or check")
        return SimpleNamespace(header=TxHeader(h.id, h.prevAlh, h.ts, h.version, metadata,
                                               h.nentries, h.eH, h.blTxId, h.blRoot))

    async def replica_ack(self, replica_id: str, tx_id: int, alh: bytes):
        """Held for the next request's ReplicaState; a request waiting on the primary is sent
        again with it (the primary counts acks only as requests bring them)."""
        # the machine's acks only rise, except after a discard: then the lower one is the truth
        if self._acked != (tx_id, alh):
            self._acked = (tx_id, alh)
            self._acked_changed.set()

    async def export_batch(self, first_tx_id: int, count: int, wait_ms: int = 0) -> dict:
        """Txs from ``first_tx_id`` (up to ``count``), in the native answer's shape."""
        known = self.primary_committed_tx_id
        n = max(0, min(count, GRPC_REPLICATION_PIPELINE_TXS, known - first_tx_id + 1))
        if n == 0 and not wait_ms:
            # the first fetch of a connection must not wait: nothing known to be there yet
            return self._answer([], known, None)
        while True:
            try:
                return await self._export(first_tx_id, max(n, 1), waiting=n == 0)
            except _Restart:
                self._cancel_stream()
            except grpc.RpcError as exc:
                self._cancel_stream()
                details = exc.details() or ""
                if STATE_NOT_EXPECTED in details and self._with_state:
                    self._with_state = False      # an async immudb primary: poll without one
                    continue
                if NO_NEW_TXS in details:
                    if n:                          # the primary is behind what it told us
                        raise self._error("streamExportTx", exc) from None
                    await asyncio.sleep(GRPC_REPLICATION_POLL_SECONDS)
                    return self._answer([], self.primary_committed_tx_id, None)
                if any(text in details for text in DIVERGED_TEXTS):
                    raise ReplicaDivergedError(f"{self.primary} (gRPC): {details}") from None
                raise self._error("streamExportTx", exc) from None

    # --- the stream ----------------------------------------------------------------------------

    def _replica_state(self):
        if not self._with_state:
            return None
        if self._acked is None:
            state = self.database.current_state()
            self._acked = (state.tx_id, state.tx_hash)
        tx_id, alh = self._acked
        floor = min(self.database.discard_floor, tx_id)
        return schema.ReplicaState(
            UUID=self._replica_id,
            committedTxID=floor, committedAlh=self.database.alh_of(floor) if floor else b"",
            precommittedTxID=tx_id, precommittedAlh=alh if tx_id else b"")

    def _cancel_stream(self):
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.cancel()

    async def _export(self, first_tx_id: int, n: int, waiting: bool) -> dict:
        if self._stream is None:
            self._stream = self._stream_export(metadata=self._metadata)
        stream = self._stream
        self._acked_changed.clear()
        state = self._replica_state()
        for tx_id in range(first_tx_id, first_tx_id + n):
            await stream.write(schema.ExportTxRequest(tx=tx_id, replicaState=state,
                                                      allowPreCommitted=False))
        blobs, metadata = [], {}
        for _ in range(n):
            if waiting and self._with_state:
                blob, metadata = await self._read_or_restart(stream)
            else:
                blob, metadata = await asyncio.wait_for(
                    self._read_message(stream), self._timeout + GRPC_EXPORT_WAIT_MS / 1000)
            if not blob:
                break                              # no tx yet: the primary's state only
            blobs.append(blob)
        committed = _u64(metadata.get("committed-txid-bin"), self.primary_committed_tx_id)
        self.primary_committed_tx_id = max(self.primary_committed_tx_id, committed)
        may = metadata.get("may-commit-up-to-txid-bin")
        return self._answer(blobs, committed, _u64(may, None) if may is not None else None,
                            first_tx_id)

    async def _read_or_restart(self, stream):
        """A waiting request's answer, unless an ack comes first (then _Restart)."""
        read = asyncio.ensure_future(self._read_message(stream))
        acked = asyncio.ensure_future(self._acked_changed.wait())
        try:
            done, _ = await asyncio.wait(
                {read, acked}, timeout=self._timeout + GRPC_EXPORT_WAIT_MS / 1000,
                return_when=asyncio.FIRST_COMPLETED)
        finally:
            acked.cancel()
        if read in done:
            return read.result()
        read.cancel()
        await asyncio.gather(read, return_exceptions=True)
        if acked in done:
            raise _Restart()
        raise asyncio.TimeoutError(f"{self.primary} (gRPC) did not answer streamExportTx")

    async def _read_message(self, stream) -> tuple:
        message = ChunkedMessage(GRPC_CHUNKED_MESSAGE_BYTES_MAX)
        while True:
            chunk = await stream.read()
            if chunk is grpc.aio.EOF:
                raise GrpcPrimaryError(self.primary, "streamExportTx", None,
                                       "the primary ended the stream")
            if message.add(chunk.content, chunk.metadata):
                return message.payload(), message.metadata

    def _answer(self, blobs: list, committed: int, may_commit: Optional[int],
                first_tx_id: int = 0) -> dict:
        last = first_tx_id + len(blobs) - 1 if blobs else 0
        # an async primary acknowledged every commit it sent: the floor may rise to the last
        acked = may_commit if may_commit is not None else last
        return {"blobs": blobs, "committed_tx_id": committed, "acked_tx_id": acked}

    async def _unary(self, name: str, call, request, with_session: bool = True):
        try:
            return await call(request, metadata=self._metadata if with_session else None,
                              timeout=self._timeout)
        except grpc.RpcError as exc:
            raise self._error(name, exc) from None

    def _error(self, name: str, exc) -> GrpcPrimaryError:
        return GrpcPrimaryError(self.primary, name, exc.code(), exc.details())


def _u64(raw, default):
    return _U64.unpack(raw)[0] if isinstance(raw, bytes) and len(raw) == 8 else default
