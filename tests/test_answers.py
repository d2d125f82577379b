"""The fixed-shape bodies read and written without msgpack's general machinery
(immucore/protocol/answers.py, ext/immucore/answers.pxi): a plain GET's key and answer, a SET's
answer (written by the node, read by the client) and a SET's request.

The pure functions are the reference: the pure encoders are literally ``encode_frame`` of
``pack`` of the map, and the pure readers must agree with ``unpack`` on what they accept. The
native twins must give the same bytes, keys and headers for every input, including msgpack's
size boundaries (fixint/uint8/16/32/64, bin8/16/32, fixarray/array16/32), where hand-written
code goes wrong first.
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from immucore.constants import FRAME_BODY_BYTES_MAX
from immucore.protocol.frames import FrameDecoder, pure_encode_frame
from immucore.protocol.messages import Msg, pack, to_wire, unpack
from immucore.protocol.answers import (pure_decode_header_answer, pure_encode_entry_answer,
                                       pure_encode_flat_set_request, pure_encode_header_answer,
                                       pure_plain_get_key)
from immucore.protocol.messages import header_to_wire
from immucore.types import Entry, TxHeader

try:
    from codec_vectors import require_native
except ImportError:  # tests/ imported as a package
    from tests.codec_vectors import require_native

GET = int(Msg.GET)
INT_BOUNDARIES = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1]
LENGTH_BOUNDARIES = [0, 1, 255, 256, 65535, 65536, 70000]


@pytest.fixture(scope="module")
def native():
    return require_native()


def answer_frame(request_id, tx, key, value, revision) -> bytes:
    """What the general path sends for the same entry."""
    body = pack({"entry": to_wire(Entry(tx, key, value, None, revision))})
    return pure_encode_frame(GET, 0, request_id, body)


# --- the answer -----------------------------------------------------------------------------

def test_the_pure_answer_is_the_general_paths_answer():
    for n in INT_BOUNDARIES:
        assert (pure_encode_entry_answer(GET, n, n, b"k", b"v", n)
                == answer_frame(n, n, b"k", b"v", n))


@pytest.mark.parametrize("number", INT_BOUNDARIES)
def test_native_answer_matches_at_every_integer_boundary(native, number):
    args = (GET, number, number, b"key", b"value", number)
    assert native.encode_entry_answer(*args) == pure_encode_entry_answer(*args)


@pytest.mark.parametrize("length", LENGTH_BOUNDARIES)
def test_native_answer_matches_at_every_length_boundary(native, length):
    key, value = bytes(range(256)) * (length // 256) + b"k" * (length % 256), b"v" * length
    for k, v in ((key, b"x"), (b"x", value)):
        assert (native.encode_entry_answer(GET, 9, 42, k, v, 3)
                == pure_encode_entry_answer(GET, 9, 42, k, v, 3))


@settings(max_examples=300, deadline=None)
@given(request_id=st.integers(0, 2**64 - 1), tx=st.integers(0, 2**64 - 1),
       revision=st.integers(0, 2**64 - 1), key=st.binary(max_size=600),
       value=st.binary(max_size=3000))
def test_native_answer_matches_the_pure_one(native, request_id, tx, revision, key, value):
    frame = native.encode_entry_answer(GET, request_id, tx, key, value, revision)
    assert frame == pure_encode_entry_answer(GET, request_id, tx, key, value, revision)
    [(msg, flags, rid, body)] = FrameDecoder(FRAME_BODY_BYTES_MAX).feed(frame)
    assert (msg, flags, rid) == (GET, 0, request_id)
    assert unpack(body)["entry"] == to_wire(Entry(tx, key, value, None, revision))


def test_native_answer_reads_buffers_in_place(native):
    """An LMDB memoryview or a bytearray works as the value, with the bytes' result."""
    for value in (memoryview(b"xvalue")[1:], bytearray(b"value")):
        assert (native.encode_entry_answer(GET, 1, 2, b"k", value, 3)
                == pure_encode_entry_answer(GET, 1, 2, b"k", b"value", 3))


@pytest.mark.parametrize("args", [
    (GET, 1, -1, b"k", b"v", 1),            # negative: msgpack's int encodings
    (GET, 1, 2**64, b"k", b"v", 1),         # too big: msgpack's error
    (GET, 1, 1, "text", b"v", 1),           # a str key: msgpack's str type
    (GET, 1, True, b"k", b"v", 1),          # a bool is not an exact int
    (GET, 2**64, 1, b"k", b"v", 1),         # a request id out of range: the frame's error
])
def test_native_answer_hands_odd_arguments_to_the_pure_one(native, args):
    try:
        expected = pure_encode_entry_answer(*args)
    except Exception as exc:  # noqa: BLE001 - the same type and message are required
        with pytest.raises(type(exc)) as raised:
            native.encode_entry_answer(*args)
        assert str(raised.value) == str(exc)
    else:
        assert native.encode_entry_answer(*args) == expected


# --- the request ----------------------------------------------------------------------------

PLAIN_BODIES = [pack({"key": k}) for k in (b"", b"k", b"k" * 255, b"k" * 256, b"k" * 70000)]
# bin16/bin32 for a short key are valid msgpack too, just not what packers write
PLAIN_BODIES += [b"\x81\xa3key\xc5\x00\x02ab", b"\x81\xa3key\xc6\x00\x00\x00\x02ab"]
NOT_PLAIN = [
    b"", b"\x80", pack({}), pack({"key": "text"}), pack({"key": b"k", "at_tx": 1}),
    pack({"at_tx": 1, "key": b"k"}), pack({"kez": b"k"}), pack({"key": 1}),
    pack({"key": b"abc"})[:-1],             # short
    pack({"key": b"abc"}) + b"\x00",        # more after the key
    b"\x81\xa3key", b"\x81\xa3key\xc4", b"\x81\xa3key\xc5\x00", b"\x81\xa3key\xc6\x00\x00\x00",
    b"\xde\x00\x01\xa3key\xc4\x01k",        # map16 of one entry: valid, but not the plain form
]


@pytest.mark.parametrize("body", PLAIN_BODIES)
def test_plain_bodies_give_their_key(native, body):
    assert pure_plain_get_key(body) == native.plain_get_key(body) == unpack(body)["key"]


@pytest.mark.parametrize("body", NOT_PLAIN)
def test_anything_else_is_not_plain(native, body):
    assert pure_plain_get_key(body) is None and native.plain_get_key(body) is None


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=40),
                 st.binary(max_size=40).map(lambda b: b"\x81\xa3key" + b),
                 st.binary(max_size=300).map(lambda k: pack({"key": k}))))
def test_both_agree_on_any_body_and_a_key_is_what_unpack_reads(native, body):
    key = pure_plain_get_key(body)
    assert native.plain_get_key(body) == key
    if key is not None:
        assert unpack(body) == {"key": key}


# --- a SET's answer ---------------------------------------------------------------------------

HEADER = (12345, bytes(range(32)), 1_700_000_000, 1, b"", 3, bytes(32), 12344, b"\x07" * 32)


def test_the_pure_set_answer_is_the_general_paths_answer():
    body = pack({"header": to_wire(TxHeader(*HEADER))})
    assert pure_encode_header_answer(int(Msg.SET), 7, HEADER) == pure_encode_frame(
        int(Msg.SET), 0, 7, body)


@pytest.mark.parametrize("number", INT_BOUNDARIES)
def test_native_set_answer_matches_at_every_integer_boundary(native, number):
    header = (number, bytes(32), number, number, b"", number, bytes(32), number, bytes(32))
    assert (native.encode_header_answer(int(Msg.SET), number, header)
            == pure_encode_header_answer(int(Msg.SET), number, header))


@settings(max_examples=200, deadline=None)
@given(ints=st.lists(st.integers(0, 2**64 - 1), min_size=5, max_size=5),
       digests=st.lists(st.binary(max_size=300), min_size=4, max_size=4),
       request_id=st.integers(0, 2**64 - 1))
def test_native_set_answer_matches_the_pure_one(native, ints, digests, request_id):
    header = (ints[0], digests[0], ints[1], ints[2], digests[1], ints[3], digests[2], ints[4],
              digests[3])
    frame = native.encode_header_answer(int(Msg.SET), request_id, header)
    assert frame == pure_encode_header_answer(int(Msg.SET), request_id, header)
    [(_, flags, rid, body)] = FrameDecoder(FRAME_BODY_BYTES_MAX).feed(frame)
    assert (flags, rid) == (0, request_id)
    assert unpack(body) == {"header": header_to_wire(header)}


@pytest.mark.parametrize("header", [
    HEADER[:8],                                          # too short: header_to_wire's zip
    HEADER + (1,),                                       # too long
    list(HEADER),                                        # not a tuple
    (-1,) + HEADER[1:],                                  # a negative id: msgpack's int
    HEADER[:1] + (bytearray(32),) + HEADER[2:],          # not exactly bytes
    HEADER[:4] + (None,) + HEADER[5:],                   # None metadata: nil
    HEADER[:2] + (2**64,) + HEADER[3:],                  # too big: msgpack's error
])
def test_native_set_answer_hands_odd_headers_to_the_pure_one(native, header):
    try:
        expected = pure_encode_header_answer(int(Msg.SET), 1, header)
    except Exception as exc:  # noqa: BLE001 - the same type and message are required
        with pytest.raises(type(exc)) as raised:
            native.encode_header_answer(int(Msg.SET), 1, header)
        assert str(raised.value) == str(exc)
    else:
        assert native.encode_header_answer(int(Msg.SET), 1, header) == expected


# --- a SET's answer, read by the client -------------------------------------------------------

def set_answer_body(header) -> bytes:
    return pack({"header": header_to_wire(header)})


@pytest.mark.parametrize("number", INT_BOUNDARIES)
def test_set_answers_read_back_at_every_boundary(native, number):
    for length in LENGTH_BOUNDARIES[:5]:
        header = (number, b"p" * length, number, number, b"", number, bytes(32), number,
                  b"r" * length)
        body = set_answer_body(header)
        assert native.decode_header_answer(body) == pure_decode_header_answer(body) == header


@settings(max_examples=200, deadline=None)
@given(ints=st.lists(st.integers(0, 2**64 - 1), min_size=5, max_size=5),
       digests=st.lists(st.binary(max_size=300), min_size=4, max_size=4))
def test_any_set_answer_reads_back_as_its_header(native, ints, digests):
    header = (ints[0], digests[0], ints[1], ints[2], digests[1], ints[3], digests[2], ints[4],
              digests[3])
    body = set_answer_body(header)
    assert native.decode_header_answer(body) == pure_decode_header_answer(body) == header
    assert native.decode_header_answer(memoryview(body)) == header


NOT_A_SET_ANSWER = [
    b"", pack({}), pack({"header": {}}), pack({"code": "x", "message": "y"}),
    set_answer_body(HEADER)[:-1],                     # short
    set_answer_body(HEADER) + b"\x00",                # more after the header
    pack({"header": {**header_to_wire(HEADER), "extra": 1}}),
    pack({"header": {**header_to_wire(HEADER), "id": -1}}),           # a negative int
    pack({"header": {**header_to_wire(HEADER), "id": "1"}}),          # a str
    pack({"header": {**header_to_wire(HEADER), "eh": 5}}),            # an int for bytes
    pack({"header": {**header_to_wire(HEADER), "ts": b"x"}}),         # bytes for an int
    pack({"header": {**header_to_wire(HEADER), "metadata": None}}),   # nil
    pack({"header": dict(reversed(list(header_to_wire(HEADER).items())))}),   # another order
]


@pytest.mark.parametrize("body", NOT_A_SET_ANSWER)
def test_anything_else_is_not_a_set_answer(native, body):
    assert pure_decode_header_answer(body) is None and native.decode_header_answer(body) is None


@settings(max_examples=500, deadline=None)
@given(cut=st.integers(0, 200), flip=st.integers(0, 200), bit=st.integers(0, 7))
def test_both_agree_on_damaged_set_answers(native, cut, flip, bit):
    body = bytearray(set_answer_body(HEADER))
    if flip < len(body):
        body[flip] ^= 1 << bit
    body = bytes(body[:len(body) - cut % len(body)] if cut else body)
    assert native.decode_header_answer(body) == pure_decode_header_answer(body)


# --- a SET request --------------------------------------------------------------------------

SET = int(Msg.SET)


@pytest.mark.parametrize("count", [0, 1, 2, 15, 16, 65535, 65536])
def test_native_set_request_matches_at_every_array_boundary(native, count):
    kvs_flat = [b"%d" % n for n in range(count)]
    assert (native.encode_flat_set_request(SET, 3, kvs_flat)
            == pure_encode_flat_set_request(SET, 3, kvs_flat))


@settings(max_examples=200, deadline=None)
@given(kvs_flat=st.lists(st.binary(max_size=70000), max_size=40),
       request_id=st.integers(0, 2**64 - 1))
def test_native_set_request_matches_the_pure_one(native, kvs_flat, request_id):
    frame = native.encode_flat_set_request(SET, request_id, kvs_flat)
    assert frame == pure_encode_flat_set_request(SET, request_id, kvs_flat)
    [(_, _, rid, body)] = FrameDecoder(FRAME_BODY_BYTES_MAX).feed(frame)
    assert rid == request_id and unpack(body) == {"kvs_flat": kvs_flat}


@pytest.mark.parametrize("kvs_flat", [
    [b"k", "text"],                   # a str: msgpack's str type (the node refuses it)
    [b"k", bytearray(b"v")],          # not exactly bytes
    [b"k", 1],                        # an int
    (b"k", b"v"),                     # a tuple, not a list
    [b"k", object()],                 # msgpack's error
])
def test_native_set_request_hands_odd_lists_to_the_pure_one(native, kvs_flat):
    try:
        expected = pure_encode_flat_set_request(SET, 1, kvs_flat)
    except Exception as exc:  # noqa: BLE001 - the same type and message are required
        with pytest.raises(type(exc)) as raised:
            native.encode_flat_set_request(SET, 1, kvs_flat)
        assert str(raised.value) == str(exc)
    else:
        assert native.encode_flat_set_request(SET, 1, kvs_flat) == expected


def _wide_set_answer(header, int_tag: int, bin_tag: int) -> bytes:
    """A SET's answer with every int written as ``int_tag`` (uint8..64) and every byte string
    as ``bin_tag`` (bin8..32), wider than a packer writes them: valid msgpack all the same."""
    import struct
    ints = {0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q"}
    bins = {0xC4: ">B", 0xC5: ">H", 0xC6: ">I"}
    out = bytearray(b"\x81\xa6header\x8a\xa2_t\xa8TxHeader")
    for name, value in header_to_wire(header).items():
        if name == "_t":
            continue
        out += bytes([0xA0 | len(name)]) + name.encode()
        if isinstance(value, int):
            out += bytes([int_tag]) + struct.pack(ints[int_tag], value)
        else:
            out += bytes([bin_tag]) + struct.pack(bins[bin_tag], len(value)) + value
    return bytes(out)


@pytest.mark.parametrize("int_tag", [0xCC, 0xCD, 0xCE, 0xCF])
@pytest.mark.parametrize("bin_tag", [0xC4, 0xC5, 0xC6])
def test_set_answers_with_wider_encodings_read_back(native, int_tag, bin_tag):
    header = (200, bytes(32), 100, 1, b"", 3, bytes(range(32)), 199, b"\x07" * 32)
    body = _wide_set_answer(header, int_tag, bin_tag)
    assert unpack(body) == {"header": header_to_wire(header)}
    assert native.decode_header_answer(body) == pure_decode_header_answer(body) == header


def test_native_set_request_sizes_and_fills_from_one_snapshot(native):
    """A request id whose ``__index__`` changes the list between sizing and filling (no caller
    of ours does; it crashed the first native encoder) goes to the pure encoder, which packs
    the list before it reads the id."""
    kvs_flat = [b"k", b"v"]

    class Sneaky:
        def __index__(self):
            kvs_flat[1] = b"X" * 100_000
            return 7

    frame = native.encode_flat_set_request(SET, Sneaky(), kvs_flat)
    [(_, _, rid, body)] = FrameDecoder(FRAME_BODY_BYTES_MAX).feed(frame)
    assert rid == 7 and unpack(body) == {"kvs_flat": [b"k", b"v"]}
    assert kvs_flat[1] == b"X" * 100_000          # __index__ did run
