"""Replication over immudb's gRPC API: ``exportTx`` (a server stream), ``replicateTx`` (a client
stream) and ``streamExportTx`` (both ways: what immudb's own replicas use), as a mixin of
ImmuService.

Each exported tx is immudb's export blob (the very bytes EXPORT_TXS sends), chunked as immudb
chunks (grpc/chunks.py), with the primary's state in the first chunk's metadata:
``committed-txid-bin`` (u64 BE) always, and for a request carrying a ``ReplicaState`` (a replica
that acknowledges) ``may-commit-up-to-txid-bin`` / ``may-commit-up-to-alh-bin``.

A ``ReplicaState`` is our REPLICA_ACK: its precommitted tx (what the replica durably holds) is
counted for sync replication under its ``UUID`` once it is checked to be this database's tx
with the same Alh; a committed or precommitted state this database does not have is
immudb's ``replica … state diverged from primary's``. "May commit up to" is what this primary
acknowledged to its clients (everything on an async primary, what the quorum holds on a sync
one), never above what the replica holds: the replica's discard floor.

The same permission as the native EXPORT_TXS / REPLICATE_TX / REPLICA_ACK: admin on the
database, checked again after every wait.
"""
from __future__ import annotations

import asyncio
import struct

from ..constants import GRPC_CHUNKED_MESSAGE_BYTES_MAX, GRPC_EXPORT_WAIT_MS, REPLICA_ID_CHARS_MAX
from ..errors import IllegalArgumentsError, ImmucoreError, ReplicaDivergedError
from . import convert, schema
from .chunks import chunked, read_message
from .streaming import served, served_stream

_U64 = struct.Struct(">Q")
NO_ALH = bytes(32)

COMMITTED_TXID = "committed-txid-bin"
MAY_COMMIT_TXID = "may-commit-up-to-txid-bin"
MAY_COMMIT_ALH = "may-commit-up-to-alh-bin"


class NoNewTransactionsError(ImmucoreError):
    """An export of a tx after the last committed one, without a ReplicaState to wait with:
    immudb's text, which its replicators match on (they poll again)."""

    def __init__(self):
        super().__init__("no new transactions")


class TxAlreadyCommittedError(ImmucoreError):
    """replicateTx of a tx the replica already holds (with the same Alh): immudb's text."""

    def __init__(self):
        super().__init__("tx already committed")


def _diverged(what: str) -> ReplicaDivergedError:
    # immudb's text (ErrReplicaDivergedFromPrimary wrapping the detail): replicators match on
    # "replica commit state diverged from primary" / "replica precommit state diverged ..."
    return ReplicaDivergedError(
        f"replica diverged from primary: replica {what} state diverged from primary's")


class ReplicationMethods:
    """exportTx, replicateTx and streamExportTx of ImmuService."""

    async def _export_one(self, db, permit, request, seen=None) -> tuple:
        """(the tx's export blob or b"" when there is none yet, the first chunk's metadata).
        ``seen``: a stream's memory of the ReplicaState it last checked (see _replica_state)."""
        if request.tx == 0:
            raise IllegalArgumentsError("tx must be at least 1")
        metadata = {}
        if request.HasField("replicaState"):
            metadata = await self._replica_state(db, permit, request.replicaState,
                                                 {} if seen is None else seen)
            await self.node.wait_for_commit(db.name, request.tx - 1, GRPC_EXPORT_WAIT_MS / 1000)
            permit.check()           # a user changed while it waited gets that error
        committed = db.current_state().tx_id
        metadata[COMMITTED_TXID] = _U64.pack(committed)
        if request.tx > committed:
            if request.HasField("replicaState"):
                return b"", metadata          # no tx yet: the primary's state only
            raise NoNewTransactionsError()
        blob = await self._read(db.export_tx, request.tx)
        permit.check()
        return blob, metadata

    async def _replica_state(self, db, permit, state, seen: dict) -> dict:
        """Check a ReplicaState against this database, count its ack, and say how far the
        replica may commit (immudb's rules, on immucore's acks). A replica pipelining its
        requests sends the same state many times: ``seen`` keeps, per stream, the state last
        found to be this database's, so it is checked once (a committed tx's Alh never
        changes while the stream lasts)."""
        if not 0 < len(state.UUID) <= REPLICA_ID_CHARS_MAX:
            raise IllegalArgumentsError(
                f"replicaState.UUID must have 1..{REPLICA_ID_CHARS_MAX} characters")
        key = state.SerializeToString(deterministic=True)
        if seen.get("state") != key:
            committed = db.current_state().tx_id
            for what, tx_id, alh in (("commit", state.committedTxID, state.committedAlh),
                                     ("precommit", state.precommittedTxID,
                                      state.precommittedAlh)):
                if tx_id and (tx_id > committed or await self._read(db.alh_of, tx_id) != alh):
                    raise _diverged(what)
            seen["state"] = key
        permit.check()                  # an ack counts only from a user still allowed
        acks = self.node.sync_acks.get(db.name)
        if acks is not None and state.precommittedTxID:
            acks.acknowledge(state.UUID, state.precommittedTxID)
        acked = self.node.acked_tx_id(db)
        if state.precommittedTxID < acked:
            may_tx, may_alh = state.precommittedTxID, bytes(state.precommittedAlh) or NO_ALH
        else:
            may_tx = acked
            may_alh = await self._read(db.alh_of, acked) if acked else NO_ALH
        return {MAY_COMMIT_TXID: _U64.pack(may_tx), MAY_COMMIT_ALH: may_alh}

    @staticmethod
    def _chunks(blob: bytes, metadata: dict):
        for content, md in chunked(blob, metadata):
            yield schema.Chunk(content=content, metadata=md)

    @served_stream
    async def exportTx(self, request, context):
        db, permit = self._db(context, "admin")
        blob, metadata = await self._export_one(db, permit, request)
        if request.HasField("replicaState"):
            # immudb sets them as trailers too on this (one-request) call
            context.set_trailing_metadata(tuple(metadata.items()))
        for chunk in self._chunks(blob, metadata):
            yield chunk

    @served_stream
    async def streamExportTx(self, request_iterator, context):
        """One export per request, in order, on one stream; an error ends the stream (immudb's
        replicator then reconnects)."""
        db, permit = self._db(context, "admin")
        seen: dict = {}
        async for request in request_iterator:
            self._session(self._call(context))      # a session closed meanwhile ends it
            blob, metadata = await self._export_one(db, permit, request, seen)
            for chunk in self._chunks(blob, metadata):
                yield chunk

    @served
    async def replicateTx(self, request_iterator, context):
        """One exported tx (chunked) applied to a replica fed from outside, verified as every
        replicated tx is; a replica that follows a primary itself takes none."""
        db, permit = self._db(context, "admin")
        self.node.check_takes_pushes(db.name)
        blob, _ = await read_message(request_iterator, GRPC_CHUNKED_MESSAGE_BYTES_MAX)
        held = db.current_state().tx_id
        # a tx this replica holds is still checked (another Alh: diverged), then refused with
        # immudb's text, which replicators match on to go on with the next tx
        headers = await asyncio.wrap_future(db.replicate_txs_async([blob]))
        permit.check()
        if headers[0][0] <= held:
            raise TxAlreadyCommittedError()
        return convert.header(headers[0])
