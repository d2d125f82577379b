"""FrameDecoder / encode_frame (immucore/protocol/frames.py), named after the rule each test checks.

The decoder is the first code that touches bytes from the network: whatever it is fed, it either
returns whole, checksummed frames or raises ``ProtocolError`` — never another exception, never a
wrong frame, and never an allocation sized by a length it has not checked yet.

Every test body taking ``impl`` runs on both frame codecs: the pure reference
(``pure_encode_frame`` / ``PureFrameDecoder``) and the native one (``immucore._native``, skipped
when it is not built unless IMMUCORE_FORCE_NATIVE=1). The agreement tests feed both the same
random streams and require the same frames, or the same error, after every feed.
"""
from __future__ import annotations

import os
import random
import re
import struct
import tracemalloc
from types import SimpleNamespace

import pytest
import xxhash
from hypothesis import HealthCheck, event, given, settings, strategies as st

from immucore import codec, errors
from immucore.constants import (FRAME_BODY_BYTES_MAX, FRAME_HEADER_SIZE, FRAME_MAGIC,
                                PREAUTH_FRAME_BODY_BYTES_MAX, PROTOCOL_VERSION)
from immucore.protocol import frames as frames_module, messages
from immucore.protocol.frames import (FLAG_END, FLAG_ERROR, FLAG_STREAM, ProtocolError,
                                      PureFrameDecoder, pure_encode_frame)

try:
    from codec_vectors import require_native
except ImportError:  # tests/ imported as a package
    from tests.codec_vectors import require_native

PURE = SimpleNamespace(IMPLEMENTATION="pure", encode_frame=pure_encode_frame,
                       FrameDecoder=PureFrameDecoder)


@pytest.fixture(scope="module", params=["pure", "native"])
def impl(request):
    """A frame codec: ``.encode_frame`` and ``.FrameDecoder`` (module scope: hypothesis reruns
    a test body many times with one fixture value)."""
    return PURE if request.param == "pure" else require_native()


LIMIT = PREAUTH_FRAME_BODY_BYTES_MAX


def forge_header(*, magic=FRAME_MAGIC, version=PROTOCOL_VERSION, msg_type=1, flags=0,
                 request_id=0, body_len=0, reserved=0, body_hash=None, body=b"") -> bytes:
    """A 40-byte header with any field values and a *valid* header checksum, so the decoder
    gets past the checksum to the field it is meant to reject."""
    if body_hash is None:
        body_hash = xxhash.xxh64_intdigest(body)
    head = struct.pack(">4sBBHQIIQ", magic, version, msg_type, flags, request_id, body_len,
                       reserved, body_hash)
    return head + struct.pack(">Q", xxhash.xxh64_intdigest(head))


def sample_frames():
    return [
        (1, 0, 1, b""),
        (11, 0, 2, messages.pack({"key": b"k" * 100, "at_tx": 0})),
        (20, FLAG_STREAM, 2**64 - 1, os.urandom(300)),
        (3, FLAG_ERROR | FLAG_END, 7, messages.pack({"code": "x", "message": "y"})),
    ]


def encoded(impl, frames) -> bytes:
    return b"".join(impl.encode_frame(*f) for f in frames)


# --- encoding and round trips -------------------------------------------------------------------

def test_header_layout_is_as_documented(impl):
    body = b"hello"
    frame = impl.encode_frame(0x2A, FLAG_STREAM, 0x0102030405060708, body)
    assert len(frame) == FRAME_HEADER_SIZE + len(body)
    assert frame[0:4] == FRAME_MAGIC
    assert frame[4] == PROTOCOL_VERSION
    assert frame[5] == 0x2A
    assert frame[6:8] == struct.pack(">H", FLAG_STREAM)
    assert frame[8:16] == bytes.fromhex("0102030405060708")
    assert frame[16:20] == struct.pack(">I", len(body))
    assert frame[20:24] == b"\0\0\0\0"
    assert frame[24:32] == struct.pack(">Q", xxhash.xxh64_intdigest(body))
    assert frame[32:40] == struct.pack(">Q", xxhash.xxh64_intdigest(frame[:32]))
    assert frame[40:] == body
    assert frame[:40] == forge_header(msg_type=0x2A, flags=FLAG_STREAM,
                                      request_id=0x0102030405060708, body_len=5, body=body)


def test_round_trip_one_frame_at_a_time(impl):
    for frame in sample_frames():
        decoder = impl.FrameDecoder(FRAME_BODY_BYTES_MAX)
        assert decoder.feed(impl.encode_frame(*frame)) == [frame]
        assert decoder.buffered_bytes == 0


def test_many_frames_in_one_feed_come_out_in_order(impl):
    frames = [(11, 0, i, messages.pack({"key": str(i).encode()})) for i in range(1000)]
    decoder = impl.FrameDecoder(LIMIT)
    assert decoder.feed(encoded(impl, frames)) == frames
    assert decoder.buffered_bytes == 0


def test_frames_split_at_every_byte_offset(impl):
    frames = sample_frames()
    stream = encoded(impl, frames)
    for cut in range(len(stream) + 1):
        decoder = impl.FrameDecoder(FRAME_BODY_BYTES_MAX)
        out = decoder.feed(stream[:cut])
        out += decoder.feed(stream[cut:])
        assert out == frames, cut
        assert decoder.buffered_bytes == 0


def test_frames_fed_one_byte_at_a_time(impl):
    frames = sample_frames()
    decoder = impl.FrameDecoder(FRAME_BODY_BYTES_MAX)
    out = []
    for byte in encoded(impl, frames):
        out += decoder.feed(bytes([byte]))
    assert out == frames


def test_partial_frame_stays_buffered_and_yields_nothing(impl):
    frame = impl.encode_frame(1, 0, 1, b"x" * 10)
    decoder = impl.FrameDecoder(LIMIT)
    assert decoder.feed(frame[:-1]) == []
    assert decoder.buffered_bytes == len(frame) - 1
    assert decoder.feed(frame[-1:]) == [(1, 0, 1, b"x" * 10)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 255), st.integers(0, 0xFFFF), st.integers(0, 2**64 - 1),
                          st.binary(max_size=200)), max_size=8),
       st.lists(st.integers(1, 64), max_size=40))
def test_round_trip_any_frames_any_chunking(impl, frames, chunk_sizes):
    stream = encoded(impl, frames)
    decoder = impl.FrameDecoder(LIMIT)
    out, pos = [], 0
    for size in chunk_sizes:
        out += decoder.feed(stream[pos:pos + size])
        pos += size
    out += decoder.feed(stream[pos:])
    assert out == frames


# --- corruption -------------------------------------------------------------------------------

def test_every_single_bit_flip_is_a_protocol_error(impl):
    body = messages.pack({"key": b"some key", "value": b"v" * 20})
    frame = impl.encode_frame(10, 0, 12345, body)
    for bit in range(len(frame) * 8):
        corrupted = bytearray(frame)
        corrupted[bit // 8] ^= 1 << (bit % 8)
        decoder = impl.FrameDecoder(LIMIT)
        with pytest.raises(ProtocolError) as info:
            # any other exception, or a frame coming back, fails the test
            decoder.feed(bytes(corrupted))
        where = bit // 8
        expected = ("bad_magic" if where < 4 else
                    "bad_checksum")           # header fields are covered by the header hash
        assert info.value.code == expected, (bit, info.value.code)


def test_bit_flip_in_the_second_frame_keeps_nothing_wrong(impl):
    first, second = impl.encode_frame(1, 0, 1, b"a"), impl.encode_frame(1, 0, 2, b"b" * 50)
    corrupted = bytearray(second)
    corrupted[-1] ^= 0x80
    decoder = impl.FrameDecoder(LIMIT)
    assert decoder.feed(first) == [(1, 0, 1, b"a")]
    with pytest.raises(ProtocolError, match="body checksum"):
        decoder.feed(bytes(corrupted))


@pytest.mark.parametrize("magic", [b"IMC0", b"imc1", b"\0\0\0\0", b"\x16\x03\x01\x02",
                                   b"GET ", b"PRI "])
def test_wrong_magic_is_refused_even_with_a_valid_checksum(impl, magic):
    with pytest.raises(ProtocolError) as info:
        impl.FrameDecoder(LIMIT).feed(forge_header(magic=magic))
    assert info.value.code == "bad_magic"


@pytest.mark.parametrize("greeting", [b"GET / HTTP/1.0\r\n\r\n",
                                      bytes.fromhex("0000000804d2162f")])
def test_wrong_magic_is_refused_before_a_whole_header_arrives(impl, greeting):
    assert len(greeting) < FRAME_HEADER_SIZE
    with pytest.raises(ProtocolError):
        impl.FrameDecoder(LIMIT).feed(greeting)


@pytest.mark.parametrize("version", [0, PROTOCOL_VERSION + 1, 255])
def test_wrong_version_is_refused(impl, version):
    with pytest.raises(ProtocolError) as info:
        impl.FrameDecoder(LIMIT).feed(forge_header(version=version))
    assert info.value.code == "bad_version"
    assert str(PROTOCOL_VERSION) in str(info.value)


@pytest.mark.parametrize("reserved", [1, 0x80000000, 0xFFFFFFFF])
def test_nonzero_reserved_bytes_are_refused(impl, reserved):
    with pytest.raises(ProtocolError) as info:
        impl.FrameDecoder(LIMIT).feed(forge_header(reserved=reserved))
    assert info.value.code == "bad_frame"


def test_body_checksum_is_checked_even_for_an_empty_body(impl):
    with pytest.raises(ProtocolError) as info:
        impl.FrameDecoder(LIMIT).feed(forge_header(body_len=0, body_hash=0))
    assert info.value.code == "bad_checksum"


# --- length prefixes --------------------------------------------------------------------------

def test_body_len_zero_is_a_frame(impl):
    assert impl.FrameDecoder(LIMIT).feed(forge_header(body_len=0)) == [(1, 0, 0, b"")]


def test_body_len_exactly_the_limit_is_accepted(impl):
    body = os.urandom(LIMIT)
    decoder = impl.FrameDecoder(LIMIT)
    assert decoder.feed(impl.encode_frame(3, 0, 9, body)) == [(3, 0, 9, body)]


@pytest.mark.parametrize("body_len", [LIMIT + 1, 2**31 - 1, 2**31, 2**32 - 1])
def test_body_len_over_the_limit_fails_on_the_header_alone(impl, body_len):
    decoder = impl.FrameDecoder(LIMIT)
    with pytest.raises(ProtocolError) as info:
        decoder.feed(forge_header(body_len=body_len))     # no body sent at all
    assert info.value.code == "frame_too_large"


def test_limit_can_be_raised_after_login(impl):
    decoder = impl.FrameDecoder(LIMIT)
    header = forge_header(body_len=LIMIT + 1)
    with pytest.raises(ProtocolError):
        decoder.feed(header)
    decoder = impl.FrameDecoder(LIMIT)
    decoder.body_bytes_max = FRAME_BODY_BYTES_MAX
    assert decoder.feed(header) == []                      # waiting for the body


def _peak_bytes_of(fn) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("body_len", [FRAME_BODY_BYTES_MAX + 1, 2**31, 2**32 - 1])
def test_forged_huge_body_len_allocates_nothing_big(impl, body_len):
    header = forge_header(body_len=body_len)

    def decode():
        decoder = impl.FrameDecoder(FRAME_BODY_BYTES_MAX)
        with pytest.raises(ProtocolError):
            decoder.feed(header)

    assert _peak_bytes_of(decode) < 64 << 10


def test_allowed_huge_body_len_allocates_nothing_until_the_body_arrives(impl):
    # body_len == the post-login limit (64 MiB): legal, so the decoder waits; it must not
    # preallocate 64 MiB for a peer that may never send it.
    header = forge_header(body_len=FRAME_BODY_BYTES_MAX)

    def decode():
        decoder = impl.FrameDecoder(FRAME_BODY_BYTES_MAX)
        assert decoder.feed(header) == []
        assert decoder.feed(b"x" * 1000) == []
        assert decoder.buffered_bytes == FRAME_HEADER_SIZE + 1000

    assert _peak_bytes_of(decode) < 64 << 10


# --- random input -----------------------------------------------------------------------------

def _feed_expecting_only_protocol_errors(impl, data: bytes, chunk: int):
    decoder = impl.FrameDecoder(LIMIT)
    try:
        for pos in range(0, len(data), chunk):
            for msg_type, flags, request_id, body in decoder.feed(data[pos:pos + chunk]):
                # a frame that came out must be a real one: its body hashes to what it claims
                assert isinstance(body, bytes) and len(body) <= LIMIT
    except ProtocolError as exc:
        assert exc.code in {"bad_magic", "bad_checksum", "bad_version", "bad_frame",
                            "frame_too_large"}


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096), st.integers(1, 512))
def test_random_bytes_raise_nothing_but_protocol_error(impl, data, chunk):
    _feed_expecting_only_protocol_errors(impl, data, chunk)


@settings(max_examples=500, deadline=None)
@given(magic=st.sampled_from([FRAME_MAGIC, b"IMC2", b"\0\0\0\0"]),
       version=st.sampled_from([PROTOCOL_VERSION, 0, 2, 255]),
       msg_type=st.integers(0, 255), flags=st.integers(0, 0xFFFF),
       request_id=st.integers(0, 2**64 - 1),
       body_len=st.one_of(st.integers(0, 64), st.sampled_from(
           [LIMIT - 1, LIMIT, LIMIT + 1, 2**31 - 1, 2**31, 2**32 - 1])),
       reserved=st.sampled_from([0, 0, 0, 1, 2**32 - 1]),
       tail=st.binary(max_size=200), chunk=st.integers(1, 64))
def test_forged_headers_with_valid_checksums_raise_nothing_but_protocol_error(
        impl, magic, version, msg_type, flags, request_id, body_len, reserved, tail, chunk):
    """Random bytes almost never pass the header checksum; these do, so every later check
    (version, reserved, length, body hash) sees arbitrary values."""
    header = forge_header(magic=magic, version=version, msg_type=msg_type, flags=flags,
                          request_id=request_id, body_len=body_len, reserved=reserved,
                          body=tail[:body_len])
    _feed_expecting_only_protocol_errors(impl, header + tail, chunk)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_valid_streams_never_yield_a_wrong_frame(impl, data):
    frames = sample_frames()
    stream = bytearray(encoded(impl, frames))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(stream) - 1))
        stream[pos] = data.draw(st.integers(0, 255))
    decoder = impl.FrameDecoder(LIMIT)
    try:
        out = decoder.feed(bytes(stream))
    except ProtocolError:
        return
    # no error: every frame that came out must be one that was sent (the mutation was a no-op
    # or hit only frames still incomplete)
    assert out == frames[:len(out)]


# --- large frames ---------------------------------------------------------------------------

def test_large_frame_in_pieces_round_trips_and_its_memory_is_given_back(impl):
    # 3 MiB: past the size from which the native codec hashes without the GIL
    body = random.Random(3).randbytes(3 << 20)
    stream = impl.encode_frame(22, 0, 5, body) + impl.encode_frame(1, 0, 6, b"next")
    decoder = impl.FrameDecoder(FRAME_BODY_BYTES_MAX)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        out = []
        for pos in range(0, len(stream), 64 << 10):
            out += decoder.feed(stream[pos:pos + (64 << 10)])
        assert out == [(22, 0, 5, body), (1, 0, 6, b"next")]
        del out
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert decoder.buffered_bytes == 0
    assert held < 256 << 10         # the decoder kept no frame-sized buffer


# --- the two implementations agree ------------------------------------------------------------

FRAME_FIELDS = st.tuples(st.integers(0, 255), st.integers(0, 0xFFFF), st.integers(0, 2**64 - 1),
                         st.binary(max_size=120))
# Limits either decoder may be given mid-stream, including ones only Python compares exactly.
LIMITS = st.sampled_from([LIMIT, LIMIT, 0, 40, 100, FRAME_BODY_BYTES_MAX, 2**70, -1, 60.5])


@st.composite
def frame_bytes(draw):
    """Mostly a well-formed frame; otherwise a header with any version, reserved value, body
    length or body hash but a valid header checksum, so the checks after it are reached."""
    msg_type, flags, request_id, body = draw(FRAME_FIELDS)
    if draw(st.integers(0, 3)):
        return pure_encode_frame(msg_type, flags, request_id, body)
    header = forge_header(
        version=draw(st.sampled_from([PROTOCOL_VERSION, PROTOCOL_VERSION, 0, 2, 255])),
        msg_type=msg_type, flags=flags, request_id=request_id,
        body_len=draw(st.one_of(st.just(len(body)), st.integers(0, 200),
                                st.sampled_from([LIMIT, LIMIT + 1, 2**32 - 1]))),
        reserved=draw(st.sampled_from([0, 0, 0, 1, 2**32 - 1])),
        body_hash=draw(st.one_of(st.none(), st.integers(0, 2**64 - 1))), body=body)
    return header + body


def damage(data, stream: bytes) -> bytes:
    """``stream`` with a few bits flipped, bytes overwritten or inserted, or its end cut off."""
    out = bytearray(stream)
    for _ in range(data.draw(st.integers(0, 3))):
        if not out:
            break
        pos = data.draw(st.integers(0, len(out) - 1))
        kind = data.draw(st.sampled_from(["flip", "overwrite", "insert", "truncate"]))
        if kind == "flip":
            out[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "overwrite":
            out[pos] = data.draw(st.integers(0, 255))
        elif kind == "insert":
            out[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del out[pos:]
    return bytes(out)


def outcomes(decoder_class, feeds) -> list:
    """What a decoder answers to each ``(limit, chunk)`` in turn: its frames or its error, and
    what it holds after. It is fed on after an error, to compare the state the error left."""
    decoder = decoder_class(feeds[0][0] if feeds else LIMIT)
    answers = []
    for limit, chunk in feeds:
        decoder.body_bytes_max = limit
        try:
            answer = ("frames", decoder.feed(chunk))
        except ProtocolError as exc:
            answer = ("error", type(exc), exc.code, str(exc))
        answers.append((answer, decoder.buffered_bytes))
    return answers


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_both_decoders_answer_every_stream_alike(data):
    native = require_native()
    stream = b"".join(data.draw(st.lists(frame_bytes(), max_size=6)))
    stream = damage(data, stream)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    pieces = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
    # the native decoder parses bytes in place and copies other buffers first: both paths
    wrappers = st.sampled_from([bytes, bytes, bytearray, memoryview])
    feeds = [(data.draw(LIMITS), data.draw(wrappers)(piece)) for piece in pieces]
    answers = outcomes(PureFrameDecoder, feeds)
    assert outcomes(native.FrameDecoder, feeds) == answers
    event(next((f"error {a[2]}" for a, _ in answers if a[0] == "error"), "no error"))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([b"", FRAME_MAGIC]), st.binary(max_size=600),
       st.lists(st.integers(1, 100), max_size=10), LIMITS)
def test_both_decoders_answer_random_bytes_alike(prefix, raw, chunk_sizes, limit):
    native = require_native()
    stream = prefix + raw
    feeds, pos = [], 0
    for size in chunk_sizes + [len(stream)]:
        feeds.append((limit, stream[pos:pos + size]))
        pos += size
    assert outcomes(native.FrameDecoder, feeds) == outcomes(PureFrameDecoder, feeds)


@settings(max_examples=300, deadline=None)
@given(FRAME_FIELDS, st.sampled_from([bytes, bytearray, memoryview]))
def test_both_encoders_build_the_same_frame(fields, wrap):
    native = require_native()
    msg_type, flags, request_id, body = fields
    assert native.encode_frame(msg_type, flags, request_id, wrap(body)) == \
        pure_encode_frame(msg_type, flags, request_id, body)


@pytest.mark.parametrize("args", [(256, 0, 0), (-1, 0, 0), (0, 0x10000, 0), (0, -1, 0),
                                  (0, 0, 2**64), (0, 0, -1), (1.0, 0, 0), ("1", 0, 0),
                                  (None, 0, 0), (True, 2, 3)])
def test_both_encoders_refuse_and_accept_the_same_integers(args):
    native = require_native()

    def result(encode):
        try:
            return encode(*args, b"body")
        except Exception as exc:  # noqa: BLE001 - the exception itself is what is compared
            return type(exc), str(exc)

    assert result(native.encode_frame) == result(pure_encode_frame)


def test_both_implementations_raise_the_one_protocol_error_class(impl):
    with pytest.raises(errors.ProtocolError) as info:
        impl.FrameDecoder(LIMIT).feed(b"GET ")
    assert type(info.value) is errors.ProtocolError is ProtocolError


def test_the_active_codec_provides_the_frame_codec():
    active = require_native() if codec.IMPLEMENTATION == "native" else PURE
    assert frames_module.FrameDecoder is active.FrameDecoder
    assert frames_module.encode_frame is active.encode_frame


def test_native_decoder_refuses_a_feed_while_it_feeds():
    # A limit compared in Python can run code; a feed from there must not move the buffer
    # the running feed is parsing.
    native = require_native()

    class ReentrantLimit:
        def __lt__(self, body_len):
            decoder.feed(b"")
            return False

    decoder = native.FrameDecoder(ReentrantLimit())
    with pytest.raises(RuntimeError, match="already running"):
        decoder.feed(forge_header())
    decoder.body_bytes_max = LIMIT
    assert decoder.feed(b"") == [(1, 0, 0, b"")]        # the buffered header, now decoded


# --- XXH64, against the xxhash package ---------------------------------------------------------

def test_native_xxh64_matches_xxhash_at_every_length_and_alignment():
    native = require_native()
    rnd = random.Random(64)
    for fill in (rnd.randbytes(300 + 8), b"\xff" * (300 + 8), bytes(300 + 8)):
        for length in range(301):
            for offset in (0, 1, 3, 7):         # unaligned starts: loads assume no alignment
                piece = memoryview(fill)[offset:offset + length]
                assert native.xxh64_intdigest(piece) == xxhash.xxh64_intdigest(piece), \
                    (length, offset)


@pytest.mark.parametrize("length", [(1 << 20) - 1, 1 << 20, (1 << 20) + 33, 5 << 20])
def test_native_xxh64_matches_xxhash_on_large_inputs(length):
    native = require_native()
    data = random.Random(length).randbytes(length)
    assert native.xxh64_intdigest(data) == xxhash.xxh64_intdigest(data)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=2000),
                 st.builds(lambda n, seed: random.Random(seed).randbytes(n),
                           st.integers(0, 3 << 20), st.integers(0, 2**32))),
       st.one_of(st.just(0), st.integers(0, 2**64 - 1)))
def test_native_xxh64_matches_xxhash_on_random_input(data, seed):
    native = require_native()
    assert native.xxh64_intdigest(data, seed) == xxhash.xxh64_intdigest(data, seed=seed)


# --- the documentation stays complete ---------------------------------------------------------

def test_wire_protocol_doc_lists_every_message_and_error_code():
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "wire-protocol.md")
    with open(path) as f:
        doc = f.read()
    for msg in messages.Msg:
        assert re.search(rf"\b{msg.name}\b", doc), f"{msg.name} missing from wire-protocol.md"
        assert re.search(rf"\|\s*{int(msg)}\s*\|", doc), f"id {int(msg)} of {msg.name} missing"
    for code in messages.ERROR_CODES.values():
        assert f"`{code}`" in doc, code
    for code in ("bad_magic", "bad_checksum", "bad_version", "bad_frame", "frame_too_large",
                 "unknown_message", "not_logged_in", "bad_body", "protected_mode",
                 "too_many_connections", "internal"):
        assert f"`{code}`" in doc, code
