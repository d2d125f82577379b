"""immudb's chunked value framing for its stream methods (immudb's pkg/stream).

A streamed key, value or proof is a *message*: a u64 big-endian length, then that many bytes.
A sender cuts each message into ``Chunk`` messages; every message starts a chunk of its own,
and its first chunk carries the length. A receiver reads the chunks' contents as one byte
stream: immudb's Go receiver does, and immudb-py's sender does not pack its chunks to one size
(its first value chunk is 8 bytes longer than the others).

Receiving is bounded before anything is allocated: a message's declared length is checked
against the caller's limit before its bytes are gathered, and the chunks of one stream are
counted (``GRPC_STREAM_CHUNKS_MAX``).
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

from google.protobuf.message import DecodeError

from ..constants import GRPC_STREAM_CHUNK_BYTES, GRPC_STREAM_CHUNKS_MAX
import grpc

from ..errors import IllegalArgumentsError
from .errors import StatusError

LENGTH_BYTES = 8      # the u64 length in front of each message


class MaxTxValuesLenExceededError(StatusError):
    """The values of one streamed set passed GRPC_STREAM_VALUES_BYTES_MAX: immudb's text (and
    its code, FAILED_PRECONDITION: immudb's CodDataException)."""
    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self):
        super().__init__("max transaction values length exceeded")


class TruncatedStreamError(IllegalArgumentsError):
    """The stream ended inside a message: its length promised more bytes than came."""


def message_chunks(message: bytes, chunk_bytes: int = GRPC_STREAM_CHUNK_BYTES) -> Iterator[bytes]:
    """The chunks' contents for one message, as immudb's sender cuts it: the first holds the
    length and the first ``chunk_bytes - 8`` bytes, each next one ``chunk_bytes`` (an empty
    message is one chunk of its length alone)."""
    view = memoryview(message)
    first = chunk_bytes - LENGTH_BYTES
    yield len(message).to_bytes(LENGTH_BYTES, "big") + bytes(view[:first])
    for at in range(first, len(message), chunk_bytes):
        yield bytes(view[at:at + chunk_bytes])


class MessageReader:
    """Messages out of a request's async iterator of Chunks, one ``next`` at a time."""

    def __init__(self, chunks, reserve: Optional[Callable[[int], None]] = None):
        """``reserve(n)`` is called with each message's declared length once it passed its
        limit, before its bytes are gathered (it may refuse by raising)."""
        self._chunks = chunks.__aiter__()
        self._reserve = reserve
        self._buffer = bytearray()
        self.chunks_read = 0

    async def _more(self) -> bool:
        """One more chunk's content into the buffer; False at the stream's end."""
        try:
            chunk = await self._chunks.__anext__()
        except StopAsyncIteration:
            return False
        except DecodeError:
            # grpc.aio decodes each streamed message as it is read; a unary request that is
            # not protobuf gets gRPC's own answer before any handler runs
            raise IllegalArgumentsError(
                f"chunk {self.chunks_read + 1} of the stream is not a valid Chunk message") from None
        self.chunks_read += 1
        if self.chunks_read > GRPC_STREAM_CHUNKS_MAX:
            raise IllegalArgumentsError(
                f"a stream of more than {GRPC_STREAM_CHUNKS_MAX} chunks (GRPC_STREAM_CHUNKS_MAX)")
        self._buffer += chunk.content
        return True

    async def _take(self, n: int, what: str) -> bytes:
        while len(self._buffer) < n:
            if not await self._more():
                raise TruncatedStreamError(
                    f"the stream ended inside {what}: {len(self._buffer)} of {n} bytes came")
        with memoryview(self._buffer) as view:    # one copy of a value of up to 32 MiB
            out = bytes(view[:n])
        del self._buffer[:n]
        return out

    async def next(self, what: str, length_max: int,
                   too_long: Optional[Callable[[int], Exception]] = None) -> Optional[bytes]:
        """The next message (``what`` names it in errors), or None if the stream ended cleanly
        before it. A declared length over ``length_max`` raises ``too_long(length)`` (by default
        an illegal-arguments error naming the limit) before any of its bytes are gathered."""
        while not self._buffer:                  # (skipping empty chunks before the length)
            if not await self._more():
                return None
        length = int.from_bytes(await self._take(LENGTH_BYTES, f"the length of {what}"), "big")
        if length > length_max:
            if too_long is not None:
                raise too_long(length)
            raise IllegalArgumentsError(f"{what} of {length} bytes, over {length_max}")
        if self._reserve is not None:
            self._reserve(length)
        return await self._take(length, what)
