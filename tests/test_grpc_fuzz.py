"""Fuzzing the gRPC face of a running node: hypothesis builds requests for every method of our
ImmuService descriptor (each message filled from the descriptor pool with random field values,
streamed methods with random chunks, under a valid token, a bogus one or none), and raw HTTP/2
(garbage, frames of random type and length, cut frames, gRPC messages whose length prefix
promises gigabytes) on connections of their own. Afterwards the node is alive, answers immudb's
SDK as before, and its memory (the node and its index workers) grew by less than
GRPC_FUZZ_RSS_GROWTH_BYTES_MAX.

The fuzzer is a readwrite user of defaultdb: its data calls are served for real, and
administration (users, databases) is refused before it could change the node under the test.
``Logout`` and ``CloseSession`` are left out: they would only end the fuzzer's own token.

The default run is short; ``make test-slow`` runs the long one
(IMMUCORE_GRPC_FUZZ_EXAMPLES sets the long run's count)."""
from __future__ import annotations

import os
import socket
import time

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, event, given, settings, strategies as st

from immucore import Client
from immucore.grpc import schema

from .test_fuzz_live import _tree_rss_bytes
from .test_grpc_immudb_sdk import grpc_node, sdk

GRPC_FUZZ_RSS_GROWTH_BYTES_MAX = 150 << 20
FAST_EXAMPLES, FAST_RAW_EXAMPLES = 120, 50        # the default suite's run: well under 30 s
SLOW_EXAMPLES = int(os.environ.get("IMMUCORE_GRPC_FUZZ_EXAMPLES", "3000"))
FUZZER = ("fuzzer", "Fuzzer1!pw")
CALL_TIMEOUT_SECONDS = 5.0
RAW_WAIT_SECONDS = 0.3
LEFT_OUT = {"Logout", "CloseSession"}
METHODS = [m for m in schema.SERVICE.methods if m.name not in LEFT_OUT]
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_SENT = [0]


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with grpc_node(tmp_path_factory.mktemp("grpc-fuzz")) as running:
        with Client(running.host, running.port) as admin:
            admin.login("immudb", "immudb")
            admin.create_user(*FUZZER, "readwrite", "defaultdb")
            # the fuzzer reads and writes fuzz-canary; the untouched key proves nothing was lost
            admin.set({b"fuzz-canary": b"alive", b"untouched-canary": b"alive"})
        running.channel = grpc.insecure_channel(running.grpc_address)
        login = running.channel.unary_unary(
            f"/{schema.SERVICE_NAME}/Login", request_serializer=_serialize,
            response_deserializer=schema.LoginResponse.FromString)
        token = login(schema.LoginRequest(user=FUZZER[0].encode(), password=FUZZER[1].encode()))
        use = running.channel.unary_unary(
            f"/{schema.SERVICE_NAME}/UseDatabase", request_serializer=_serialize,
            response_deserializer=schema.UseDatabaseReply.FromString)
        use(schema.Database(databaseName="defaultdb"),
            metadata=[("authorization", token.token)])
        running.token = token.token
        running.rss_before = _tree_rss_bytes(running.process.pid)
        yield running
        running.channel.close()


def _serialize(message) -> bytes:
    return message.SerializeToString()


# --- messages from the descriptor pool ------------------------------------------------------

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-2**31, 2**31 - 1), FieldDescriptor.TYPE_SINT32: (-2**31, 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-2**31, 2**31 - 1), FieldDescriptor.TYPE_INT64: (-2**63, 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-2**63, 2**63 - 1), FieldDescriptor.TYPE_SFIXED64: (-2**63, 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1), FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1), FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _scalar(field) -> st.SearchStrategy:
    kind = field.type
    if kind in _INT_RANGES:
        low, high = _INT_RANGES[kind]
        # small numbers reach real txs, revisions and limits; the extremes find overflows
        return st.integers(-3, 50).filter(lambda n: low <= n <= high) | st.integers(low, high) \
            | st.sampled_from([low, high])
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return st.floats(width=32 if kind == FieldDescriptor.TYPE_FLOAT else 64)
    if kind == FieldDescriptor.TYPE_STRING:
        return st.text(max_size=24) | st.sampled_from(["defaultdb", "systemdb", "immudb", ""])
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64) | st.sampled_from([b"fuzz-canary", b"", b"\x00" * 1100])
    if kind == FieldDescriptor.TYPE_ENUM:
        # proto3 enums are open: a number no value names is valid on the wire
        return st.sampled_from([v.number for v in field.enum_type.values]) | st.integers(0, 9)
    raise AssertionError(f"no strategy for {field.full_name}")


def _is_map(field) -> bool:
    return (field.type == FieldDescriptor.TYPE_MESSAGE
            and field.message_type.GetOptions().map_entry)


def _is_repeated(field) -> bool:
    if hasattr(field, "is_repeated"):                    # protobuf 6 (``label`` is gone)
        return field.is_repeated
    return field.label == FieldDescriptor.LABEL_REPEATED


@st.composite
def _message(draw, descriptor, depth: int = 0):
    message = schema.message_class(descriptor.full_name)()
    for field in descriptor.fields:
        if not draw(st.booleans()):                  # about half the fields left unset
            continue
        is_message = field.type == FieldDescriptor.TYPE_MESSAGE
        if is_message and depth >= 3 and not _is_map(field):
            continue
        target = getattr(message, field.name) if _is_repeated(field) else None
        if _is_map(field):
            key_field, value_field = field.message_type.fields_by_name["key"], \
                field.message_type.fields_by_name["value"]
            if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                if depth >= 3:
                    continue
                items = draw(st.dictionaries(_scalar(key_field),
                                             _message(value_field.message_type, depth + 1),
                                             max_size=3))
                for k, v in items.items():
                    target[k].CopyFrom(v)
            else:
                target.update(draw(st.dictionaries(_scalar(key_field), _scalar(value_field),
                                                   max_size=3)))
        elif _is_repeated(field):
            if is_message:
                for item in draw(st.lists(_message(field.message_type, depth + 1), max_size=3)):
                    target.add().CopyFrom(item)
            else:
                target.extend(draw(st.lists(_scalar(field), max_size=4)))
        elif is_message:
            getattr(message, field.name).CopyFrom(draw(_message(field.message_type, depth + 1)))
        else:
            setattr(message, field.name, draw(_scalar(field)))
    return message


def _u64(n: int) -> bytes:
    return n.to_bytes(8, "big")


# streamed requests: chunks of immudb's framing (lengths true, short, or huge) or plain bytes
_framed = st.binary(max_size=80).flatmap(lambda payload: st.sampled_from([
    _u64(len(payload)) + payload, _u64(len(payload) + 7) + payload, _u64(2**64 - 1) + payload,
    _u64(8) + _u64(1), payload]))
_chunk_content = _framed | st.binary(max_size=32)
_random_chunks = st.lists(st.builds(lambda c: schema.Chunk(content=c), _chunk_content),
                          max_size=8)


@st.composite
def _framed_stream(draw, method):
    """A streamed set as immudb frames it (proveSinceTx first for the verifiable one), now and
    then cut anywhere, its bytes split into chunks at random places."""
    messages = []
    if method.name == "streamVerifiableSet" and draw(st.integers(0, 4)):
        messages.append(_u64(draw(st.integers(0, 20) | st.integers(0, 2**64 - 1))))
    for key, value in draw(st.lists(st.tuples(
            st.binary(max_size=40) | st.sampled_from([b"fuzz-canary", b""]),
            st.binary(max_size=300)), max_size=3)):
        messages += [key, value]
    if messages and draw(st.integers(0, 4)) == 0:
        messages.pop()                                  # a key without its value
    wire = b"".join(_u64(len(m)) + m for m in messages)
    if draw(st.integers(0, 3)) == 0:
        wire = wire[:draw(st.integers(0, len(wire)))]
    cuts = sorted(draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    bounds = [0] + cuts + [len(wire)]
    return [schema.Chunk(content=wire[a:b]) for a, b in zip(bounds, bounds[1:])]

_metadata = st.sampled_from(["token"] * 6 + ["bearer", "none", "bogus", "sessionid"])


@st.composite
def _call(draw):
    # streamed requests have the most ways to go wrong: drawn three times as often
    method = draw(st.sampled_from(METHODS + [m for m in METHODS if m.client_streaming] * 2))
    if method.client_streaming:
        request = draw(_framed_stream(method) | _random_chunks)
    else:
        request = draw(_message(method.input_type))
    return method, request, draw(_metadata)


def _credentials(node, kind: str) -> list:
    return {"token": [("authorization", node.token)],
            "bearer": [("authorization", "Bearer " + node.token)],
            "none": [], "bogus": [("authorization", "not-a-token")],
            "sessionid": [("sessionid", "no-such-session")]}[kind]


def _invoke(node, method, request, metadata):
    path = f"/{schema.SERVICE_NAME}/{method.name}"
    kind = {(False, False): node.channel.unary_unary, (False, True): node.channel.unary_stream,
            (True, False): node.channel.stream_unary,
            (True, True): node.channel.stream_stream}[
        (method.client_streaming, method.server_streaming)]
    call = kind(path, request_serializer=_serialize, response_deserializer=bytes)
    sent = iter(request) if method.client_streaming else request
    answer = call(sent, metadata=metadata, timeout=CALL_TIMEOUT_SECONDS)
    if method.server_streaming:
        list(answer)


def _fuzz_call(node, call):
    method, request, credentials = call
    try:
        _invoke(node, method, request, _credentials(node, credentials))
        event(f"{method.name}: answered")
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
        event(f"{method.name}: {code.name}")
        # the catch-all of the service's handlers (grpc/errors.py): an error no handler
        # expected, i.e. a bug the fuzzer found
        assert not details.startswith("internal error"), f"{method.name}({request}): {details}"
        assert code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), (
            f"{method.name}({request}): {code.name} {details}\n{node.log()[-3000:]}")
    _SENT[0] += 1
    assert node.process.poll() is None, "the node exited:\n" + node.log()[-3000:]


_SETTINGS = dict(deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                        HealthCheck.data_too_large])


@settings(max_examples=FAST_EXAMPLES, **_SETTINGS)
@given(call=_call())
def test_fuzzed_requests_to_every_method(node, call):
    _fuzz_call(node, call)


@pytest.mark.slow
@settings(max_examples=SLOW_EXAMPLES, **_SETTINGS)
@given(call=_call())
def test_fuzzed_requests_to_every_method_long(node, call):
    _fuzz_call(node, call)


# --- raw HTTP/2 ---------------------------------------------------------------------------

def _frame(kind: int, flags: int, stream: int, payload: bytes, length: int = None) -> bytes:
    length = len(payload) if length is None else length
    return (length.to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big")
            + payload)


def _literal(name: bytes, value: bytes) -> bytes:
    """An HPACK literal header field without indexing, new name, no Huffman (short strings)."""
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def _grpc_headers(node, method: str) -> bytes:
    fields = [(b":method", b"POST"), (b":scheme", b"http"),
              (b":path", f"/{schema.SERVICE_NAME}/{method}".encode()),
              (b":authority", node.grpc_address.encode()),
              (b"content-type", b"application/grpc"), (b"te", b"trailers"),
              (b"authorization", node.token.encode())]
    return b"".join(_literal(n, v) for n, v in fields)


_SETTINGS_FRAME = _frame(4, 0, 0, b"")


@st.composite
def _raw(draw, node):
    kind = draw(st.sampled_from(["garbage", "preface+garbage", "frames", "grpc", "grpc"]))
    if kind == "garbage":
        return draw(st.binary(min_size=1, max_size=300))
    if kind == "preface+garbage":
        return PREFACE + draw(st.binary(max_size=300))
    if kind == "frames":
        frames = draw(st.lists(st.tuples(
            st.integers(0, 12), st.integers(0, 255), st.integers(0, 2**31 - 1),
            st.binary(max_size=64), st.none() | st.integers(0, 2**24 - 1)), max_size=6))
        return PREFACE + _SETTINGS_FRAME + b"".join(_frame(*f) for f in frames)
    # a gRPC call by hand: real headers, then a DATA frame whose message length prefix may
    # promise far more than comes (up to 4 GiB), cut short or not
    method = draw(st.sampled_from(METHODS)).name
    payload = draw(st.binary(max_size=64))
    declared = draw(st.sampled_from([len(payload), 2**32 - 1, 64 << 20, len(payload) + 1]))
    message = b"\x00" + declared.to_bytes(4, "big") + payload
    data = _frame(0, draw(st.sampled_from([0, 1])), 1, message)
    wire = (PREFACE + _SETTINGS_FRAME + _frame(1, 4, 1, _grpc_headers(node, method)) + data)
    if draw(st.booleans()):
        wire = wire[:draw(st.integers(len(PREFACE), len(wire) - 1))]
    return wire


def _send_raw(node, wire: bytes):
    host, port = node.grpc_address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=RAW_WAIT_SECONDS) as sock:
        try:
            sock.sendall(wire)
            deadline = time.monotonic() + RAW_WAIT_SECONDS
            while time.monotonic() < deadline:
                if not sock.recv(1 << 16):              # the node closed the connection
                    event("closed by the node")
                    return
        except socket.timeout:
            event("left open")
        except (ConnectionResetError, BrokenPipeError):
            event("reset")


@settings(max_examples=FAST_RAW_EXAMPLES, **_SETTINGS)
@given(data=st.data())
def test_raw_http2_garbage_and_cut_frames(node, data):
    _send_raw(node, data.draw(_raw(node)))
    _SENT[0] += 1
    assert node.process.poll() is None, "the node exited:\n" + node.log()[-3000:]


@pytest.mark.slow
@settings(max_examples=SLOW_EXAMPLES // 5, **_SETTINGS)
@given(data=st.data())
def test_raw_http2_garbage_and_cut_frames_long(node, data):
    _send_raw(node, data.draw(_raw(node)))
    _SENT[0] += 1
    assert node.process.poll() is None, "the node exited:\n" + node.log()[-3000:]


def test_after_the_fuzzing_the_node_serves_and_its_memory_is_bounded(node):
    """Runs after the fuzzing above (file order); alone it would prove nothing."""
    if not _SENT[0]:
        pytest.skip("run with the fuzzing tests above, which must come first")
    client = sdk(node)
    assert client.get(b"untouched-canary").value == b"alive"
    assert client.set(b"after-fuzz", b"ok").id > 0
    assert client.streamGetFull(b"after-fuzz").value == b"ok"
    growth = _tree_rss_bytes(node.process.pid) - node.rss_before
    assert growth < GRPC_FUZZ_RSS_GROWTH_BYTES_MAX, f"RSS grew by {growth >> 20} MiB"
    # gRPC itself logs a traceback for a unary request that is not protobuf (answered before
    # any handler of ours runs); a traceback through immucore's code would be a bug
    ours = [line for line in node.log().splitlines()
            if line.strip().startswith('File "') and "/immucore/" in line]
    assert not ours, node.log()[-5000:]
