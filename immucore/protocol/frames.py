"""Frames: a fixed 40-byte header with its own checksum, and a checksummed body.

    off size field
    0   4    magic        b"IMC1"
    4   1    version      PROTOCOL_VERSION
    5   1    msg_type     see immucore/protocol/messages.py
    6   2    flags        FLAG_* below
    8   8    request_id   chosen by the client; a response carries its request's id
    16  4    body_len     checked against the connection's limit before anything is allocated
    20  4    reserved     zero
    24  8    body_hash    xxh64 of the body
    32  8    header_hash  xxh64 of bytes 0..31

All integers big-endian. The decoder (``FrameDecoder``) reassembles frames from a byte stream
and raises ``ProtocolError`` at the first bad byte; the connection is then closed.

Two implementations, one behaviour: ``encode_frame`` and ``FrameDecoder`` are the native ones
(ext/immucore/frames.pxi, in ``immucore._native``) whenever the native codec is the active one
(``immucore.codec.IMPLEMENTATION``, chosen by IMMUCORE_FORCE_NATIVE / IMMUCORE_FORCE_PURE), and
the pure-Python ones below otherwise. Every request and answer goes through them on the event
loop's thread, where per-frame Python work (struct, slicing, xxhash calls) costs throughput; the
pure ones stay as the readable reference the native ones are tested against (tests/test_frames.py:
same bytes, same frames, same ``ProtocolError`` code and message) and as the fallback where the
extension is not built.
"""
from __future__ import annotations

import struct

import xxhash

from ..codec import IMPLEMENTATION
from ..constants import FRAME_HEADER_SIZE, FRAME_MAGIC, PROTOCOL_VERSION
from ..errors import ProtocolError  # defined there, so both frame codecs raise the one class

FLAG_ERROR = 0x1        # body is {"code", "message"}
FLAG_STREAM = 0x2       # one item of a server stream; more follow
FLAG_END = 0x4          # the last frame of a server stream

_HEADER = struct.Struct(">4sBBHQII")       # the first 24 bytes
_HASHES = struct.Struct(">QQ")


def pure_encode_frame(msg_type: int, flags: int, request_id: int, body: bytes) -> bytes:
    head = _HEADER.pack(FRAME_MAGIC, PROTOCOL_VERSION, msg_type, flags, request_id, len(body), 0)
    body_hash = xxhash.xxh64_intdigest(body)
    head += struct.pack(">Q", body_hash)
    return head + struct.pack(">Q", xxhash.xxh64_intdigest(head)) + body


class PureFrameDecoder:
    """Feed bytes in, get whole frames out: ``(msg_type, flags, request_id, body)`` tuples."""

    def __init__(self, body_bytes_max: int):
        self.body_bytes_max = body_bytes_max
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list:
        self._buffer += data
        frames = []
        buf = self._buffer
        pos = 0
        # A foreign protocol (HTTP, TLS, PostgreSQL) is refused at its first bytes, not after
        # a whole header's worth has arrived.
        if buf and not FRAME_MAGIC.startswith(bytes(buf[:len(FRAME_MAGIC)])):
            raise ProtocolError("bad_magic", "not an immucore frame (bad magic)")
        while len(buf) - pos >= FRAME_HEADER_SIZE:
            magic, version, msg_type, flags, request_id, body_len, reserved = \
                _HEADER.unpack_from(buf, pos)
            body_hash, header_hash = _HASHES.unpack_from(buf, pos + 24)
            if magic != FRAME_MAGIC:
                raise ProtocolError("bad_magic", "not an immucore frame (bad magic)")
            if xxhash.xxh64_intdigest(bytes(buf[pos:pos + 32])) != header_hash:
                raise ProtocolError("bad_checksum", "frame header checksum mismatch")
            if version != PROTOCOL_VERSION:
                raise ProtocolError("bad_version",
                                    f"unsupported protocol version {version} "
                                    f"(this node speaks {PROTOCOL_VERSION})")
            if reserved:
                raise ProtocolError("bad_frame", "reserved header bytes must be zero")
            if body_len > self.body_bytes_max:
                raise ProtocolError("frame_too_large",
                                    f"frame body of {body_len} bytes exceeds the limit of "
                                    f"{self.body_bytes_max} bytes")
            end = pos + FRAME_HEADER_SIZE + body_len
            if len(buf) < end:
                break
            body = bytes(buf[pos + FRAME_HEADER_SIZE:end])
            if xxhash.xxh64_intdigest(body) != body_hash:
                raise ProtocolError("bad_checksum", "frame body checksum mismatch")
            frames.append((msg_type, flags, request_id, body))
            pos = end
            tail = bytes(buf[pos:pos + len(FRAME_MAGIC)])
            if tail and not FRAME_MAGIC.startswith(tail):
                raise ProtocolError("bad_magic", "not an immucore frame (bad magic)")
        if pos:
            del buf[:pos]
        return frames

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer)


if IMPLEMENTATION == "native":
    from .._native import FrameDecoder, encode_frame
else:
    FrameDecoder = PureFrameDecoder
    encode_frame = pure_encode_frame
