"""immudb's stream methods and GetAll on real immucore nodes, driven by immudb's own Python SDK
(immudb-py, unmodified): values larger than one chunk set and read back through streamSet and
streamGet, streamScan, streamHistory, streamVerifiedSet/streamVerifiedGet (the SDK checks the
proofs), GetAll; and streams that end inside a value or promise more than the limits, refused
with a clear status while the node goes on serving (docs/grpc.md)."""
from __future__ import annotations

import io
import os
import threading
import time

import grpc
import pytest

from immudb.grpc import schema_pb2

from immucore import Client
from immucore.constants import (GRPC_STREAM_CHUNK_BYTES, GRPC_STREAM_KEY_BYTES_MAX,
                                GRPC_STREAM_VALUES_BYTES_MAX, GRPC_STREAMS_GATHERED_BYTES_MAX)

from .test_grpc_immudb_sdk import READER_PASSWORD, grpc_node, rpc_error, sdk

BIG = 5 << 20            # a value of many chunks (immudb's chunk is 64 KiB)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with grpc_node(tmp_path_factory.mktemp("grpc-streams")) as node:
        with Client(node.host, node.port) as native:
            native.login("immudb", "immudb")
            native.create_user("reader", READER_PASSWORD, "read", "defaultdb")
        yield node


def _message(payload: bytes) -> bytes:
    """immudb's framing of one streamed key or value: a u64 big-endian length, then it."""
    return len(payload).to_bytes(8, "big") + payload


def _chunks(*contents):
    return iter([schema_pb2.Chunk(content=c) for c in contents])


def _serves(node, client):
    """The node still answers: over gRPC (a write and a read) and its native port."""
    client.set(b"still-serving", b"yes")
    assert client.get(b"still-serving").value == b"yes"
    with Client(node.host, node.port) as native:
        native.login("immudb", "immudb")
        assert native.get(b"still-serving").value == b"yes"


def test_stream_set_and_get_of_a_value_of_many_chunks(node):
    client = sdk(node)
    value = os.urandom(BIG)
    header = client.streamSet(b"big", io.BytesIO(value), len(value))
    assert header.id > 0
    with Client(node.host, node.port) as native:              # the native protocol agrees
        native.login("immudb", "immudb")
        assert native.get(b"big").value == value
    key, reader = client.streamGet(b"big")
    assert key == b"big" and len(reader) == BIG
    assert reader.read(1000) + reader.read() == value         # read as a buffered stream
    assert client.streamGetFull(b"big").value == value

    # immudb's chunking: the key alone in one chunk, the value's first chunk with its length
    chunks = list(client._stub.streamGet(schema_pb2.KeyRequest(key=b"big")))
    assert chunks[0].content == _message(b"big")
    assert int.from_bytes(chunks[1].content[:8], "big") == BIG
    assert all(len(c.content) <= GRPC_STREAM_CHUNK_BYTES for c in chunks)
    assert len(chunks) == 1 + -(-(BIG + 8) // GRPC_STREAM_CHUNK_BYTES)
    assert b"".join(c.content for c in chunks[1:])[8:] == value


def test_stream_set_of_an_empty_value_and_a_missing_key(node):
    client = sdk(node)
    client.streamSetFullValue(b"empty", b"")
    assert client.streamGetFull(b"empty").value == b""
    error = rpc_error(client.streamGetFull, b"no-such-key")
    assert error.code() == grpc.StatusCode.UNKNOWN and error.details() == "key not found"


def test_stream_scan_and_history(node):
    client = sdk(node)
    big = os.urandom(GRPC_STREAM_CHUNK_BYTES * 3 + 5)
    client.streamSetFullValue(b"scan:a", b"1")
    client.streamSetFullValue(b"scan:b", big)
    client.set(b"scan:c", b"3")
    client.set(b"scan:a", b"1 again")
    scanned = list(client.streamScan(prefix=b"scan:"))
    assert [(kv.key, kv.value) for kv in scanned] == [
        (b"scan:a", b"1 again"), (b"scan:b", big), (b"scan:c", b"3")]
    assert [kv.key for kv in client.streamScan(prefix=b"scan:", desc=True, limit=2)] == [
        b"scan:c", b"scan:b"]
    history = list(client.streamHistory(b"scan:a"))
    assert [kv.value for kv in history] == [b"1", b"1 again"]
    assert [kv.value for kv in client.streamHistory(b"scan:a", desc=True, limit=1)] == [
        b"1 again"]


def test_stream_verified_set_and_get_are_proven(node):
    client = sdk(node)
    # the SDK's streamVerifiedSet verifies from its saved state, which must be past tx 0
    # (its verifier has no first-tx case; the same against immudb): a verified call first
    client.verifiedSet(b"verified:first", b"1")
    value = os.urandom(2 * GRPC_STREAM_CHUNK_BYTES + 17)
    answer = client.streamVerifiedSetFullValue(b"verified:big", value)
    assert answer.verified
    got = client.streamVerifiedGet(b"verified:big")
    assert got.verified and got.value == value and got.id == answer.id
    client.set(b"later", b"x")                            # proven again to a newer state
    assert client.streamVerifiedGet(b"verified:first").verified
    assert client.verifiedGet(b"verified:big").value == value

    # immudb's order: entry without value, VerifiableTx, InclusionProof, then the value
    chunks = list(client._stub.streamVerifiableGet(schema_pb2.VerifiableGetRequest(
        keyRequest=schema_pb2.KeyRequest(key=b"verified:big"), proveSinceTx=1)))
    entry = schema_pb2.Entry.FromString(chunks[0].content[8:])
    assert entry.key == b"verified:big" and entry.tx == answer.id and entry.value == b""
    assert schema_pb2.VerifiableTx.FromString(chunks[1].content[8:]).tx.header.id == answer.id
    schema_pb2.InclusionProof.FromString(chunks[2].content[8:])
    assert b"".join(c.content for c in chunks[3:])[8:] == value


def test_get_all_leaves_out_keys_not_found(node):
    client = sdk(node)
    client.setAll({b"all:a": b"1", b"all:b": b"2", b"all:gone": b"3"})
    client.delete(schema_pb2.DeleteKeysRequest(keys=[b"all:gone"]))
    assert client.getAll([b"all:a", b"all:missing", b"all:b", b"all:gone"]) == {
        b"all:a": b"1", b"all:b": b"2"}
    entries = client._stub.GetAll(schema_pb2.KeyListRequest(keys=[b"all:b", b"all:a"])).entries
    assert [(e.key, e.value) for e in entries] == [(b"all:b", b"2"), (b"all:a", b"1")]


def test_a_stream_ending_inside_a_value_is_refused_and_nothing_is_written(node):
    client = sdk(node)
    cut = _message(b"cut:value")[:-3]                 # the value's bytes stop short
    error = rpc_error(client._stub.streamSet, _chunks(_message(b"cut:key"), cut))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the stream ended inside a value" in error.details(), error.details()
    error = rpc_error(client._stub.streamSet, _chunks(_message(b"cut:key")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "after a key, before its value" in error.details(), error.details()
    error = rpc_error(client._stub.streamSet, _chunks(b"\x00\x00\x00"))   # a length cut short
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the length of a key" in error.details(), error.details()
    assert client.get(b"cut:key") is None              # the SDK's answer for "key not found"
    _serves(node, client)


def test_a_stream_promising_too_much_is_refused_before_it_is_gathered(node):
    client = sdk(node)
    # a value's declared length over what one streamed set may hold, with none of its bytes:
    # refused with immudb's text at once, not waited for (nor allocated)
    error = rpc_error(client._stub.streamSet, _chunks(
        _message(b"long:key"), (GRPC_STREAM_VALUES_BYTES_MAX + 1).to_bytes(8, "big")))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == "max transaction values length exceeded"
    error = rpc_error(client._stub.streamSet, _chunks(_message(b"k"), (2**64 - 1).to_bytes(8, "big")))
    assert error.details() == "max transaction values length exceeded"
    # values together: a first real one, then one that would pass the total
    first = os.urandom(1 << 20)
    error = rpc_error(client._stub.streamSet, _chunks(
        _message(b"long:1"), _message(first), _message(b"long:2"),
        (GRPC_STREAM_VALUES_BYTES_MAX - len(first) + 1).to_bytes(8, "big")))
    assert error.details() == "max transaction values length exceeded"
    # a key longer than any key may be
    error = rpc_error(client._stub.streamSet, _chunks(
        (GRPC_STREAM_KEY_BYTES_MAX + 1).to_bytes(8, "big")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"a key of {GRPC_STREAM_KEY_BYTES_MAX + 1} bytes" in error.details()
    assert client.get(b"long:1") is None
    _serves(node, client)


def test_a_verifiable_stream_without_its_prove_since_tx_is_refused(node):
    client = sdk(node)
    error = rpc_error(client._stub.streamVerifiableSet, _chunks(_message(b"1234")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "proveSinceTx" in error.details()
    _serves(node, client)


def test_stream_calls_are_checked_as_the_unary_ones(node):
    reader = sdk(node, "reader", READER_PASSWORD)
    client = sdk(node)
    client.streamSetFullValue(b"checked", b"v")
    assert reader.streamGetFull(b"checked").value == b"v"
    assert reader.getAll([b"checked"]) == {b"checked": b"v"}
    # a read user's streamed set is refused before its stream is read
    error = rpc_error(reader.streamSetFullValue, b"checked", os.urandom(BIG))
    assert error.code() == grpc.StatusCode.INTERNAL and error.details() == "permission denied"
    with grpc.insecure_channel(node.grpc_address) as channel:      # no token at all
        stream_get = channel.unary_stream(
            "/immudb.schema.ImmuService/streamGet",
            request_serializer=schema_pb2.KeyRequest.SerializeToString,
            response_deserializer=schema_pb2.Chunk.FromString)
        error = rpc_error(lambda: list(stream_get(schema_pb2.KeyRequest(key=b"checked"))))
        assert error.code() == grpc.StatusCode.UNKNOWN and error.details() == "not logged in"
    assert client.get(b"checked").value == b"v"


def test_streamed_sets_together_are_bounded_in_what_they_may_gather(node):
    """Streamed sets that declared values and then stall hold their reservation: once they
    declared GRPC_STREAMS_GATHERED_BYTES_MAX together, one more is refused before its bytes
    come, and when they end the node takes streamed sets again."""
    client = sdk(node)
    declared = 30 << 20                      # under one set's values limit
    count = GRPC_STREAMS_GATHERED_BYTES_MAX // declared + 1
    release = threading.Event()

    def stalled(i):
        yield schema_pb2.Chunk(content=_message(b"stalled:%d" % i))
        yield schema_pb2.Chunk(content=declared.to_bytes(8, "big"))
        release.wait(60)                      # ... and no bytes of the value

    calls = [client._stub.streamSet.future(stalled(i)) for i in range(count)]
    try:
        deadline = time.monotonic() + 30
        while not any(c.done() for c in calls):
            assert time.monotonic() < deadline, "no stalled stream was refused"
            time.sleep(0.05)
        time.sleep(0.5)                       # (had two been refused, both would be done)
        refused = [c for c in calls if c.done()]
        assert len(refused) == 1
        error = refused[0].exception()
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        assert "GRPC_STREAMS_GATHERED_BYTES_MAX" in error.details()
    finally:
        release.set()
    for c in calls:
        c.exception(30)                       # the stalled ones end cut short: refused
    value = os.urandom(declared)
    assert client.streamSetFullValue(b"after-stalled", value).id > 0
    assert client.streamGetFull(b"after-stalled").value == value



def test_a_streamed_chunk_that_is_not_protobuf_is_refused(node):
    """grpc.aio decodes a stream's messages as the handler reads them: a chunk that is not
    protobuf is refused with a clear status, not an internal error, and nothing is written."""
    with grpc.insecure_channel(node.grpc_address) as channel:
        login = channel.unary_unary("/immudb.schema.ImmuService/Login",
                                    request_serializer=schema_pb2.LoginRequest.SerializeToString,
                                    response_deserializer=schema_pb2.LoginResponse.FromString)
        token = login(schema_pb2.LoginRequest(user=b"immudb", password=b"immudb")).token
        use = channel.unary_unary("/immudb.schema.ImmuService/UseDatabase",
                                  request_serializer=schema_pb2.Database.SerializeToString,
                                  response_deserializer=schema_pb2.UseDatabaseReply.FromString)
        token = use(schema_pb2.Database(databaseName="defaultdb"),
                    metadata=[("authorization", token)]).token
        raw_set = channel.stream_unary("/immudb.schema.ImmuService/streamSet",
                                       request_serializer=lambda raw: raw,
                                       response_deserializer=schema_pb2.TxHeader.FromString)
        key = schema_pb2.Chunk(content=_message(b"raw:key")).SerializeToString()
        with pytest.raises(grpc.RpcError) as raised:
            raw_set(iter([key, b"\xff\xff\xff"]), metadata=[("authorization", token)])
    error = raised.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "chunk 2 of the stream is not a valid Chunk message" in error.details()
    client = sdk(node)
    assert client.get(b"raw:key") is None
    _serves(node, client)
