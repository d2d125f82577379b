"""Fuzzing a running node over its socket: hypothesis builds requests of every message type
(and unknown ones), with bodies of likely and unlikely fields and values, raw bytes, cut and
flipped frames, before and after login, and sends each on a connection of its own. After all
of them the node is alive, serves a well-behaved client as before, and its memory (the node
and its index workers) grew by less than LIVE_FUZZ_RSS_GROWTH_BYTES_MAX.

The logged-in fuzzing uses a readwrite user of defaultdb: its data requests are fuzzed for
real, and administration (users, databases, exports) is refused before it could change the
node under the test (a sysadmin's random DATABASE_CREATE would start a worker per name)."""
from __future__ import annotations

import os
import socket
import time

import msgpack
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from immucore.client import Client
from immucore.constants import FRAME_BODY_BYTES_MAX
from immucore.protocol.frames import FLAG_ERROR, FrameDecoder, encode_frame
from immucore.protocol.messages import Msg

from .nodes import child_pids, running_node

EXAMPLES = int(os.environ.get("IMMUCORE_LIVE_FUZZ_EXAMPLES", "300"))
LIVE_FUZZ_RSS_GROWTH_BYTES_MAX = 150 << 20
FUZZER = ("fuzzer", "Fuzzer1!pw")
_ANSWER_WAIT_SECONDS = 2.0
_SENT = [0]                       # fuzzed requests sent to the module's node so far


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _tree_rss_bytes(pid: int) -> int:
    total = _rss_bytes(pid)
    for child in child_pids(pid):
        try:
            total += _rss_bytes(child)
        except OSError:
            continue
    return total


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with running_node(tmp_path_factory.mktemp("live-fuzz")) as running:
        with Client(running.host, running.port) as admin:
            admin.login("immudb", "immudb")
            admin.create_user(*FUZZER, "readwrite", "defaultdb")
            admin.set({b"fuzz-canary": b"alive"})
        running.rss_before = _tree_rss_bytes(running.process.pid)
        yield running


FIELDS = ["key", "keys", "value", "kvs", "kvs_flat", "metadata", "metadata_by_key", "at_tx",
          "since_tx", "at_revision", "tx_id", "prove_since_tx", "prefix", "seek_key", "end_key",
          "limit", "offset", "desc", "first_tx_id", "count", "wait_ms", "blobs", "last_alh",
          "database", "settings", "user", "password", "token", "detached", "permission",
          "action", "active", "old_password", "new_password", "replica_id", "alh"]

_leaf = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats()
         | st.binary(max_size=64) | st.text(max_size=32)
         | st.sampled_from([b"fuzz-canary", "defaultdb", "systemdb", "", b"", 0, 1, 2**32]))
_value = st.recursive(_leaf, lambda inner: st.lists(inner, max_size=6)
                      | st.dictionaries(st.text(max_size=8) | st.sampled_from(FIELDS), inner,
                                        max_size=4), max_leaves=20)
_fields_body = st.dictionaries(st.sampled_from(FIELDS), _value, max_size=6).map(
    lambda d: msgpack.packb(d, use_bin_type=True))
_body = st.sampled_from(["fields"] * 8 + ["value", "bytes"]).flatmap(
    lambda kind: _fields_body if kind == "fields" else
    _value.map(lambda v: msgpack.packb(v, use_bin_type=True)) if kind == "value" else
    st.binary(max_size=256))
_KNOWN = [int(m) for m in Msg]
# mostly real message types (each a handler to reach), now and then any byte
_msg_type = st.sampled_from(["known"] * 19 + ["any"]).flatmap(
    lambda kind: st.sampled_from(_KNOWN) if kind == "known" else st.integers(0, 255))


@st.composite
def _request(draw):
    msg, flags = draw(_msg_type), draw(st.sampled_from([0] * 12 + [1, 2, 4, 0xFFFF]))
    frame = encode_frame(msg, flags, draw(st.integers(0, 2**64 - 1)), draw(_body))
    damage = draw(st.sampled_from(["none"] * 7 + ["cut", "flip", "twice"]))
    if damage == "cut":
        frame = frame[:draw(st.integers(0, len(frame) - 1))]
    elif damage == "flip":
        at = draw(st.integers(0, len(frame) - 1))
        frame = frame[:at] + bytes([frame[at] ^ (1 << draw(st.integers(0, 7)))]) + frame[at + 1:]
    elif damage == "twice":
        frame = frame * 2
    return draw(st.sampled_from([True] * 4 + [False])), frame    # four in five logged in


def _login_frame() -> bytes:
    return encode_frame(int(Msg.LOGIN), 0, 1, msgpack.packb(
        {"user": FUZZER[0], "password": FUZZER[1]}, use_bin_type=True))


def _send(port: int, logged_in: bool, frame: bytes):
    with socket.create_connection(("127.0.0.1", port), timeout=_ANSWER_WAIT_SECONDS) as sock:
        if logged_in:
            sock.sendall(_login_frame())
            login = sock.recv(1 << 16)
            if _outcome(login) != "answered":
                raise AssertionError(f"the fuzzer's login failed: {_outcome(login)}")
        try:
            sock.sendall(frame)
            # end of input: the node serves what it has (a cut frame never completes) and
            # closes, so the read below ends at once instead of waiting for the timeout
            sock.shutdown(socket.SHUT_WR)
            deadline, received = time.monotonic() + _ANSWER_WAIT_SECONDS, b""
            while time.monotonic() < deadline:
                data = sock.recv(1 << 16)        # answers or an error frame, then the close
                if not data:
                    break
                received += data
        except (socket.timeout, ConnectionResetError, BrokenPipeError):
            return
    event(_outcome(received) + (" (logged in)" if logged_in else " (not logged in)"))


def _outcome(received: bytes) -> str:
    """What the node answered first, for ``--hypothesis-show-statistics``: the error code, or
    "answered" (so a run shows its requests got past the decoder, not only refused)."""
    try:
        frames = FrameDecoder(FRAME_BODY_BYTES_MAX).feed(received)
    except Exception:  # noqa: BLE001 - a cut answer: the node closed mid-frame
        return "cut answer"
    if not frames:
        return "closed without answer"
    _, flags, _, body = frames[0]
    return f"error {msgpack.unpackb(body).get('code')}" if flags & FLAG_ERROR else "answered"


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(request=_request())
def test_fuzzed_requests_on_a_live_node(node, request):
    logged_in, frame = request
    _send(node.port, logged_in, frame)
    _SENT[0] += 1
    assert node.process.poll() is None, "the node exited:\n" + node.log()[-3000:]


def test_after_the_fuzzing_the_node_serves_and_its_memory_is_bounded(node):
    """Runs after the fuzzing above (file order); alone it would prove nothing."""
    if not _SENT[0]:
        pytest.skip("run with test_fuzzed_requests_on_a_live_node, which must come first")
    with Client(node.host, node.port) as admin:
        admin.login("immudb", "immudb")
        assert admin.get(b"fuzz-canary").value == b"alive"
        assert admin.set({b"after-fuzz": b"ok"}).id > 0
    growth = _tree_rss_bytes(node.process.pid) - node.rss_before
    assert growth < LIVE_FUZZ_RSS_GROWTH_BYTES_MAX, f"RSS grew by {growth >> 20} MiB"
    assert "Traceback" not in node.log(), node.log()[-5000:]
