"""immudb's stream methods (``streamGet``, ``streamSet``, ``streamScan``, ``streamHistory``,
``streamVerifiableGet``, ``streamVerifiableSet``) and ``GetAll``, as a mixin of ImmuService.

Each stream method is its unary twin with immudb's chunked framing (chunking.py) around it:
the same checks and the same answers, only cut into chunks. What immudb sends, in order:

- streamGet, streamScan, streamHistory: for each entry, its key message, then its value message.
- streamVerifiableGet: the entry without its value (an ``Entry`` with ``tx``, ``key`` and
  ``referencedBy``), the ``VerifiableTx`` (signed when the node signs) and the
  ``InclusionProof``, each a serialized message of its own, then the value message.
- streamSet: the client sends key and value messages, pair after pair; the answer is a TxHeader.
- streamVerifiableSet: first a message holding ``proveSinceTx`` as a u64 big-endian, then the
  pairs; the answer is a VerifiableTx.

A streamed set is gathered whole before it is written (as immudb does: one tx), bounded by
GRPC_STREAM_VALUES_BYTES_MAX, GRPC_STREAM_KEY_BYTES_MAX, GRPC_STREAM_ENTRIES_MAX and
GRPC_STREAM_CHUNKS_MAX, each checked before the bytes it covers are gathered. A stream that
ends inside a message, or after a key without its value, is refused, and nothing is written.
"""
from __future__ import annotations

import functools

import grpc

from ..constants import (GRPC_GET_ALL_KEYS_MAX, GRPC_RESPONSE_BYTES_MAX,
                         GRPC_STREAM_ENTRIES_MAX, GRPC_STREAM_KEY_BYTES_MAX,
                         GRPC_STREAM_VALUES_BYTES_MAX, GRPC_STREAMS_GATHERED_BYTES_MAX)
from ..errors import IllegalArgumentsError, KeyNotFoundError
from . import convert, schema
from .chunking import (MaxTxValuesLenExceededError, MessageReader, TruncatedStreamError,
                       message_chunks)
from .errors import StatusError
from .streaming import served, served_stream

PROVE_SINCE_TX_BYTES = 8


class StreamsBusyError(StatusError):
    """The streamed sets being gathered already declared GRPC_STREAMS_GATHERED_BYTES_MAX."""
    code = grpc.StatusCode.RESOURCE_EXHAUSTED



class _Gathering:
    """The bytes streamed sets declared, node-wide, while they are gathered (one per service:
    the node's event loop is the only one touching it)."""

    def __init__(self):
        self.declared = 0

    def reserve(self, call_declared: list, n: int):
        if self.declared + n > GRPC_STREAMS_GATHERED_BYTES_MAX:
            raise StreamsBusyError(
                f"streamed sets being gathered already declared {self.declared} bytes; "
                f"{n} more would pass GRPC_STREAMS_GATHERED_BYTES_MAX "
                f"({GRPC_STREAMS_GATHERED_BYTES_MAX}): try again")
        self.declared += n
        call_declared[0] += n

    def release(self, call_declared: list):
        self.declared -= call_declared[0]
        call_declared[0] = 0



def _chunks(*messages):
    for message in messages:
        for content in message_chunks(message):
            yield schema.Chunk(content=content)


def _entries_chunks(entries):
    for e in entries:
        yield from _chunks(e.key, e.value)


class StreamMethods:
    """GetAll and immudb's stream methods; ImmuService provides ``_db``, ``_proof``, the
    unary methods these wrap, and ``_check_peer``."""

    def _unary(self, name: str):
        """The unary method ``name`` without its error wrapper, to run inside a stream's."""
        return functools.partial(getattr(type(self), name).__wrapped__, self)

    @served
    async def GetAll(self, request, context):
        """Each key's latest entry, from one snapshot; keys not found (missing, deleted,
        expired) are left out, as immudb does."""
        db, permit = self._db(context, "read")
        if len(request.keys) > GRPC_GET_ALL_KEYS_MAX:
            raise IllegalArgumentsError(
                f"GetAll of {len(request.keys)} keys, over {GRPC_GET_ALL_KEYS_MAX} "
                "(GRPC_GET_ALL_KEYS_MAX)")
        found = await self._proof(permit, db.get_many, list(request.keys))
        out, size = schema.Entries(), 0
        for e in found:
            if isinstance(e, KeyNotFoundError):
                continue
            if isinstance(e, Exception):
                raise e
            size += len(e.key) + len(e.value)
            if size > GRPC_RESPONSE_BYTES_MAX:
                raise IllegalArgumentsError(
                    f"GetAll's values pass {GRPC_RESPONSE_BYTES_MAX} bytes "
                    "(GRPC_RESPONSE_BYTES_MAX): ask for fewer keys")
            out.entries.append(convert.entry(e))
        return out

    # --- streamed answers -----------------------------------------------------------------

    @served_stream
    async def streamGet(self, request, context):
        entry = await self._unary("Get")(request, context)
        for chunk in _chunks(entry.key, entry.value):
            yield chunk

    @served_stream
    async def streamScan(self, request, context):
        entries = await self._unary("Scan")(request, context)
        for chunk in _entries_chunks(entries.entries):
            yield chunk

    @served_stream
    async def streamHistory(self, request, context):
        entries = await self._unary("History")(request, context)
        for chunk in _entries_chunks(entries.entries):
            yield chunk

    @served_stream
    async def streamVerifiableGet(self, request, context):
        ventry = await self._unary("VerifiableGet")(request, context)
        without_value = schema.Entry(tx=ventry.entry.tx, key=ventry.entry.key)
        if ventry.entry.HasField("referencedBy"):
            without_value.referencedBy.CopyFrom(ventry.entry.referencedBy)
        for chunk in _chunks(without_value.SerializeToString(),
                             ventry.verifiableTx.SerializeToString(),
                             ventry.inclusionProof.SerializeToString(), ventry.entry.value):
            yield chunk

    # --- streamed requests ----------------------------------------------------------------

    def _gathering(self) -> _Gathering:
        # made on first use: the mixin leaves ImmuService's __init__ alone
        gathering = self.__dict__.get("_streams_gathering")
        if gathering is None:
            gathering = self.__dict__["_streams_gathering"] = _Gathering()
        return gathering

    async def _gathered_kvs(self, reader: MessageReader) -> list:
        """The key/value pairs of a streamed set, until the stream ends."""
        kvs, values_bytes = [], 0

        def too_long(length):
            return MaxTxValuesLenExceededError()

        while True:
            key = await reader.next("a key", GRPC_STREAM_KEY_BYTES_MAX)
            if key is None:
                return kvs
            if len(kvs) == GRPC_STREAM_ENTRIES_MAX:
                raise IllegalArgumentsError(
                    f"a streamed set of more than {GRPC_STREAM_ENTRIES_MAX} entries "
                    "(GRPC_STREAM_ENTRIES_MAX)")
            value = await reader.next("a value", GRPC_STREAM_VALUES_BYTES_MAX - values_bytes,
                                      too_long)
            if value is None:
                raise TruncatedStreamError("the stream ended after a key, before its value")
            values_bytes += len(value)
            kvs.append(schema.KeyValue(key=key, value=value))

    @served
    async def streamSet(self, request_chunks, context):
        self._db(context, "write")          # refused before a byte of the stream is gathered
        reader, declared = self._reader(request_chunks)
        try:
            kvs = await self._gathered_kvs(reader)
            return await self._unary("Set")(schema.SetRequest(KVs=kvs), context)
        finally:
            self._gathering().release(declared)

    @served
    async def streamVerifiableSet(self, request_chunks, context):
        self._db(context, "write")
        reader, declared = self._reader(request_chunks)
        try:
            since = await reader.next("proveSinceTx", PROVE_SINCE_TX_BYTES)
            if since is None or len(since) != PROVE_SINCE_TX_BYTES:
                raise IllegalArgumentsError(
                    "a streamed verifiable set starts with proveSinceTx, a u64 big-endian")
            kvs = await self._gathered_kvs(reader)
            request = schema.VerifiableSetRequest(setRequest=schema.SetRequest(KVs=kvs),
                                                  proveSinceTx=int.from_bytes(since, "big"))
            return await self._unary("VerifiableSet")(request, context)
        finally:
            self._gathering().release(declared)

    def _reader(self, request_chunks) -> tuple:
        """A reader whose every message's declared length is reserved node-wide first, and
        the call's reservation (a one-item list) to release when the call ends."""
        declared = [0]
        gathering = self._gathering()
        return MessageReader(request_chunks,
                             reserve=lambda n: gathering.reserve(declared, n)), declared
