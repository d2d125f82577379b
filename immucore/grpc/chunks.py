"""immudb's chunked messages on gRPC streams (its pkg/stream sender and receiver).

A message too big for one gRPC message travels as ``Chunk``s: the first chunk's content begins
with the whole message's length (u64, big-endian) and only the first chunk carries metadata;
every chunk but the last is full. exportTx, replicateTx and streamExportTx send an exported tx
this way, and the stream variants of Get/Set their values.
"""
from __future__ import annotations

import struct
from typing import AsyncIterator, Iterator, Optional, Tuple

from ..constants import GRPC_STREAM_CHUNK_BYTES
from ..errors import IllegalArgumentsError, ImmucoreError

_U64 = struct.Struct(">Q")
LENGTH_BYTES = _U64.size


class ChunkTooSmallError(ImmucoreError):
    """A first chunk without its 8-byte length: immudb's receiver's text."""

    def __init__(self):
        super().__init__("minimum chunk size is 4096")


def chunked(payload: bytes, metadata: Optional[dict] = None,
            chunk_bytes: int = GRPC_STREAM_CHUNK_BYTES) -> Iterator[Tuple[bytes, dict]]:
    """``(content, metadata)`` of each chunk of ``payload``; an empty payload is one chunk
    holding just its length (immudb answers a request with no tx that way, metadata only)."""
    data = memoryview(_U64.pack(len(payload)) + payload)
    first = True
    for at in range(0, len(data), chunk_bytes):
        yield bytes(data[at:at + chunk_bytes]), (metadata or {}) if first else {}
        first = False


class ChunkedMessage:
    """One message being reassembled from its chunks, its length checked against
    ``bytes_max`` before anything is allocated."""

    def __init__(self, bytes_max: int):
        self.bytes_max = bytes_max
        self.metadata: dict = {}
        self._length: Optional[int] = None
        self._parts: list = []
        self._received = 0

    @property
    def complete(self) -> bool:
        return self._length is not None and self._received >= self._length

    def add(self, content: bytes, metadata=None) -> bool:
        """Take one chunk; True once the message is complete."""
        if self._length is None:
            if len(content) < LENGTH_BYTES:
                raise ChunkTooSmallError()
            self._length = _U64.unpack_from(content)[0]
            if self._length > self.bytes_max:
                raise IllegalArgumentsError(
                    f"a chunked message of {self._length} bytes exceeds the limit of "
                    f"{self.bytes_max} bytes (GRPC_CHUNKED_MESSAGE_BYTES_MAX)")
            self.metadata = dict(metadata or {})
            content = content[LENGTH_BYTES:]
        if self._received + len(content) > self._length:
            raise IllegalArgumentsError(
                f"chunks carry more than the {self._length} bytes their message announced")
        self._parts.append(bytes(content))
        self._received += len(content)
        return self.complete

    def payload(self) -> bytes:
        return b"".join(self._parts)


async def read_message(chunks: AsyncIterator, bytes_max: int) -> Tuple[bytes, dict]:
    """The next whole message (payload, first chunk's metadata) from an async iterator of
    Chunk messages; a stream that ends first raises IllegalArgumentsError."""
    message = ChunkedMessage(bytes_max)
    async for chunk in chunks:
        if message.add(chunk.content, chunk.metadata):
            return message.payload(), message.metadata
    if message._length is None:
        raise IllegalArgumentsError("the stream ended before any chunk")
    raise IllegalArgumentsError(
        f"the stream ended after {message._received} of the {message._length} bytes announced")
