"""The commonest requests' fixed-shape bodies, read and written without msgpack's general
machinery.

A pipelined burst of reads is made of plain GETs: a body that is exactly ``{"key": <bin>}`` (no
``at_tx``, ``since_tx`` or ``at_revision``), answered with the key's latest entry. The node serves
a run of them together (``Dispatcher.plain_gets``), and the first two functions are most of what
is left per request there. The other three are a SET's answer, written by the node and read by
the client, and the client's SET request.

* ``plain_get_key(body)``: the key of a plain GET's body, or None for any other body (which then
  goes the general way: ``unpack`` and the handler, with its checks and error messages).
* ``encode_entry_answer(msg_type, request_id, tx, key, value, revision)``: the whole answer frame
  of an entry without metadata, the same bytes as ``encode_frame`` of
  ``pack({"entry": to_wire(Entry(tx, key, value, None, revision))})``.
* ``encode_header_answer(msg_type, request_id, header)``: a SET's answer frame from the writer's
  header tuple, the same bytes as ``encode_frame`` of ``pack({"header": header_to_wire(header)})``.
* ``decode_header_answer(body)``: the client's side of it, the header tuple back from such a body
  (exactly that layout, any of msgpack's unsigned int and bin widths), or None for any other body
  (which the client then reads with ``unpack``). Unpacking the map and ``header_from_wire`` cost a
  quarter of a single-entry SET's client time.
* ``encode_flat_set_request(msg_type, request_id, kvs_flat)``: the client's SET request frame,
  the same bytes as ``encode_frame`` of ``pack({"kvs_flat": kvs_flat})``.

Two implementations, one behaviour, chosen as ``protocol.frames`` chooses: the native ones
(ext/immucore/answers.pxi) and the pure ones below, the reference they are tested against
(tests/test_answers.py: same keys, same bytes).
"""
from __future__ import annotations

import struct
from typing import Optional

from ..codec import IMPLEMENTATION
from .frames import pure_encode_frame
from .messages import header_to_wire, pack

_KEY_MAP_HEAD = b"\x81\xa3key"     # fixmap of one entry, fixstr "key"
_BIN_LENGTHS = {0xC4: struct.Struct(">B"), 0xC5: struct.Struct(">H"), 0xC6: struct.Struct(">I")}
_UINT_LENGTHS = {0xCC: struct.Struct(">B"), 0xCD: struct.Struct(">H"), 0xCE: struct.Struct(">I"),
                 0xCF: struct.Struct(">Q")}
# {"header": {"_t": "TxHeader", ...}}: fixmap(1), fixstr "header", fixmap(10), "_t", "TxHeader"
_HEADER_ANSWER_HEAD = b"\x81\xa6header\x8a\xa2_t\xa8TxHeader"
# each field's name as a fixstr, and whether it holds an unsigned int (else bytes)
_HEADER_FIELDS = ((b"\xa2id", True), (b"\xa8prev_alh", False), (b"\xa2ts", True),
                  (b"\xa7version", True), (b"\xa8metadata", False), (b"\xa8nentries", True),
                  (b"\xa2eh", False), (b"\xa8bl_tx_id", True), (b"\xa7bl_root", False))


def pure_plain_get_key(body: bytes) -> Optional[bytes]:
    body = memoryview(body)        # TypeError for anything not bytes-like, as the native one
    if body[:5] != _KEY_MAP_HEAD or len(body) < 6:
        return None
    length = _BIN_LENGTHS.get(body[5])
    if length is None or len(body) < 6 + length.size:
        return None
    start = 6 + length.size
    if length.unpack_from(body, 6)[0] != len(body) - start:
        return None                      # short, or more follows the key: not a plain GET
    return bytes(body[start:])


def pure_encode_entry_answer(msg_type: int, request_id: int, tx: int, key: bytes, value: bytes,
                             revision: int) -> bytes:
    body = pack({"entry": {"_t": "Entry", "tx": tx, "key": key, "value": value,
                           "metadata": None, "revision": revision}})
    return pure_encode_frame(msg_type, 0, request_id, body)


def pure_encode_header_answer(msg_type: int, request_id: int, header: tuple) -> bytes:
    return pure_encode_frame(msg_type, 0, request_id, pack({"header": header_to_wire(header)}))


def pure_decode_header_answer(body: bytes) -> Optional[tuple]:
    body = bytes(memoryview(body))      # TypeError for anything not bytes-like, as the native
    if not body.startswith(_HEADER_ANSWER_HEAD):
        return None
    at, fields = len(_HEADER_ANSWER_HEAD), []
    for name, is_int in _HEADER_FIELDS:
        if body[at:at + len(name)] != name or at + len(name) >= len(body):
            return None
        at += len(name)
        tag = body[at]
        if is_int and tag <= 0x7F:                 # positive fixint
            fields.append(tag)
            at += 1
            continue
        width = (_UINT_LENGTHS if is_int else _BIN_LENGTHS).get(tag)
        if width is None or at + 1 + width.size > len(body):
            return None
        number = width.unpack_from(body, at + 1)[0]
        at += 1 + width.size
        if is_int:
            fields.append(number)
            continue
        if number > len(body) - at:
            return None
        fields.append(body[at:at + number])
        at += number
    return tuple(fields) if at == len(body) else None


def pure_encode_flat_set_request(msg_type: int, request_id: int, kvs_flat: list) -> bytes:
    return pure_encode_frame(msg_type, 0, request_id, pack({"kvs_flat": kvs_flat}))


if IMPLEMENTATION == "native":
    from .._native import (decode_header_answer, encode_entry_answer, encode_flat_set_request,
                           encode_header_answer, plain_get_key)
else:
    plain_get_key = pure_plain_get_key
    encode_entry_answer = pure_encode_entry_answer
    encode_header_answer = pure_encode_header_answer
    decode_header_answer = pure_decode_header_answer
    encode_flat_set_request = pure_encode_flat_set_request
