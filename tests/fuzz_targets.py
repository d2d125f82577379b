"""atheris (coverage-guided) fuzzing of what reads bytes from the network: the frame decoder,
request bodies, a plain GET's key and a SET's answer (read in C on the node and the client),
export blobs (the replica's input), stored records and the proof verifiers.

    python tests/fuzz_targets.py -runs=200000 -rss_limit_mb=1024     # on demand, longer

Inputs are valid frames, bodies, blobs and records (built here) cut and mutated where the fuzzer
says, so it starts deep in every parser instead of at its first magic byte; raw bytes are tried
too. Frames are decoded by the active decoder and by the pure one, which must agree. Every
target may only raise the errors it documents; anything else, a crash, or memory past the RSS
limit is a finding. ``tests/test_fuzz.py`` runs a short budget in ``make test``.
"""
import os
import sys

import atheris

with atheris.instrument_imports():
    from immucore import codec
    from immucore.constants import KEY_SIZE_BYTES_MAX, TX_ENTRIES_MAX, VALUE_SIZE_BYTES_MAX
    from immucore.errors import CorruptedDataError, IllegalArgumentsError
    from immucore.protocol.frames import (FrameDecoder, ProtocolError, PureFrameDecoder,
                                          encode_frame)
    from immucore.protocol import answers
    from immucore.protocol.messages import header_to_wire, pack, unpack
    from immucore import verify

LIMITS = (TX_ENTRIES_MAX, KEY_SIZE_BYTES_MAX, VALUE_SIZE_BYTES_MAX)
DATA_ERRORS = (IllegalArgumentsError, CorruptedDataError)
_EMPTY = codec.sha256(b"")
_SEALED = codec.build_txs(1, 1, _EMPTY, [], 1700000000, [
    [(b"key-1", b"value-1", b""), (b"key-2", b"", codec.kv_metadata_bytes(True, 1900000000,
                                                                          False))],
    [(b"k" * 40, os.urandom(300), codec.kv_metadata_bytes(False, None, True))],
], LIMITS)
RECORDS = [record for _, _, record, _ in _SEALED]
SET_ANSWER = pack({"header": header_to_wire(_SEALED[1][0])})
BLOBS = [codec.record_export_blob(record) for record in RECORDS]


def _mutate(fdp, base: bytes) -> bytes:
    """Cut ``base`` and overwrite a few of its bytes, where the fuzzer chooses."""
    data = bytearray(base[:fdp.ConsumeIntInRange(0, len(base))])
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        if data:
            data[fdp.ConsumeIntInRange(0, len(data) - 1)] = fdp.ConsumeIntInRange(0, 255)
    return bytes(data) + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 16))


def _decode(decoder, pieces) -> list:
    """The frames a decoder returns for each piece, or the error it stopped at."""
    answers = []
    try:
        for piece in pieces:
            answers.append(decoder.feed(piece))
    except ProtocolError as exc:
        answers.append((exc.code, str(exc)))
    return answers


def one_input(data: bytes):
    fdp = atheris.FuzzedDataProvider(data)
    target = fdp.ConsumeIntInRange(0, 6)
    if target == 0:
        body = pack({"key": fdp.ConsumeBytes(8), "at_tx": fdp.ConsumeIntInRange(0, 9)})
        frame = encode_frame(fdp.ConsumeIntInRange(0, 255), fdp.ConsumeIntInRange(0, 7),
                             fdp.ConsumeIntInRange(0, 2**32), body)
        stream = _mutate(fdp, frame * 2)
        limit = fdp.ConsumeIntInRange(0, 1 << 16)
        third = len(stream) // 3
        pieces = (stream[:third], stream[third:])      # two pieces, as a socket delivers them
        # the active decoder (native under IMMUCORE_FORCE_NATIVE) must answer as the pure one
        if _decode(FrameDecoder(limit), pieces) != _decode(PureFrameDecoder(limit), pieces):
            raise AssertionError("the native and the pure frame decoders disagree")
    elif target == 1:
        raw = _mutate(fdp, pack({"kvs": [[b"k", b"v"]], "n": 1, "s": "x"}))
        try:
            unpack(raw)
        except Exception:  # noqa: BLE001 - the node answers any undecodable body with bad_body
            pass
    elif target == 2:
        blob = _mutate(fdp, BLOBS[fdp.ConsumeIntInRange(0, len(BLOBS) - 1)])
        try:
            codec.verify_blob(blob, LIMITS)
        except DATA_ERRORS:
            pass
        try:
            codec.replicate_blobs([blob], 1, _EMPTY, [], LIMITS)
        except DATA_ERRORS:
            pass
    elif target == 3:
        record = _mutate(fdp, RECORDS[fdp.ConsumeIntInRange(0, len(RECORDS) - 1)])
        for read in (codec.decode_record, codec.record_digests,
                     lambda r: codec.record_entry(r, 0), lambda r: codec.index_items(1, [r])):
            try:
                read(record)
            except DATA_ERRORS:
                pass
    elif target == 4:
        # proof verifiers take terms and sizes from the node: they must answer True/False
        i, j = fdp.ConsumeIntInRange(0, 70), fdp.ConsumeIntInRange(0, 70)
        terms = [fdp.ConsumeBytes(fdp.ConsumeIntInRange(31, 33))
                 for _ in range(fdp.ConsumeIntInRange(0, 8))]
        a, b = fdp.ConsumeBytes(32), fdp.ConsumeBytes(32)
        for check in (lambda: verify.verify_aht_inclusion(terms, i, j, a, b),
                      lambda: verify.verify_aht_consistency(terms, i, j, a, b),
                      lambda: verify.verify_last_inclusion(terms, i, a, b)):
            if check() not in (True, False):
                raise AssertionError("a verifier answered neither True nor False")
    elif target == 5:
        # what the node reads of a GET and the client of a SET's answer: the active reader must
        # answer as the pure one, and a key or header it accepts must be what unpack reads
        base = pack({"key": fdp.ConsumeBytes(300)}) if fdp.ConsumeBool() else SET_ANSWER
        # cut from the end and overwrite a byte or two: a short input keeps the body whole, so
        # the accepting paths are reached too, not only the refusals
        raw = bytearray(base[:len(base) - fdp.ConsumeIntInRange(0, 8)])
        for _ in range(fdp.ConsumeIntInRange(0, 2)):
            if raw:
                raw[fdp.ConsumeIntInRange(0, len(raw) - 1)] = fdp.ConsumeIntInRange(0, 255)
        raw = bytes(raw) + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4))
        key, header = answers.plain_get_key(raw), answers.decode_header_answer(raw)
        if (key, header) != (answers.pure_plain_get_key(raw),
                             answers.pure_decode_header_answer(raw)):
            raise AssertionError("the native and the pure body readers disagree")
        if key is not None and unpack(raw) != {"key": key}:
            raise AssertionError("a plain GET's key is not what unpack reads")
        if header is not None and unpack(raw) != {"header": header_to_wire(header)}:
            raise AssertionError("a SET's answer header is not what unpack reads")
    else:
        raw = fdp.ConsumeBytes(fdp.remaining_bytes())
        try:
            FrameDecoder(16 << 10).feed(raw)
        except ProtocolError:
            pass
        try:
            codec.verify_blob(raw, LIMITS)
        except DATA_ERRORS:
            pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
