"""Shared helpers of the codec tests: both implementations, the golden vectors, chain builders.

The native module is imported directly. Without it, its tests skip, unless
IMMUCORE_FORCE_NATIVE=1: then every native test fails with the import error, so CI can never go
green on the pure codec alone.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest

from immucore.codec import pure
from immucore.constants import KEY_SIZE_BYTES_MAX, TX_ENTRIES_MAX, VALUE_SIZE_BYTES_MAX

FORCE_NATIVE = os.environ.get("IMMUCORE_FORCE_NATIVE") == "1"
try:
    from immucore import _native as native
    NATIVE_IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - depends on the build
    native = None
    NATIVE_IMPORT_ERROR = exc

# The golden vectors live beside the tests (made for this project, accepted by immudb-py).
VECTORS_DIR = Path(__file__).resolve().parent / "vectors"
LIMITS = (TX_ENTRIES_MAX, KEY_SIZE_BYTES_MAX, VALUE_SIZE_BYTES_MAX)
EMPTY_ALH = hashlib.sha256(b"").digest()


def impl_params():
    """pytest params for both codecs; the native one fails (forced) or skips when missing."""
    if native is not None:
        native_param = pytest.param(native, id="native")
    elif FORCE_NATIVE:
        native_param = pytest.param(None, id="native")
    else:
        native_param = pytest.param(None, id="native", marks=pytest.mark.skip(
            reason=f"immucore._native is not built ({NATIVE_IMPORT_ERROR})"))
    return [pytest.param(pure, id="pure"), native_param]


def require(impl):
    """The fixture body: a codec module, or a failure saying why the native one is missing."""
    if impl is None:
        pytest.fail(f"IMMUCORE_FORCE_NATIVE=1 but immucore._native does not import "
                    f"({NATIVE_IMPORT_ERROR}); build it with "
                    f"`.venv/bin/python setup.py build_ext --inplace`")
    return impl


def require_native():
    if native is None:
        if FORCE_NATIVE:
            pytest.fail(f"IMMUCORE_FORCE_NATIVE=1 but immucore._native does not import "
                        f"({NATIVE_IMPORT_ERROR})")
        pytest.skip(f"immucore._native is not built ({NATIVE_IMPORT_ERROR})")
    return native


def hx(text: str) -> bytes:
    return bytes.fromhex(text)


def load_chain(name: str) -> dict:
    path = VECTORS_DIR / name
    if not path.exists():
        pytest.fail(f"golden vectors missing: {path}")
    return json.loads(path.read_text())


CHAIN_FILES = ("chain-v1.json", "chain-v0.json")


def tx_entries(tx: dict) -> list:
    """A vector tx as build_txs input: (user key, user value, kv metadata bytes)."""
    return [(hx(e["key"]), hx(e["value"]), hx(e["metadata_bytes"])) for e in tx["entries"]]


def header_tuple(tx: dict) -> tuple:
    return (tx["id"], hx(tx["prevAlh"]), tx["ts"], tx["version"], b"", tx["nentries"],
            hx(tx["eh"]), tx["blTxId"], hx(tx["blRoot"]))


def build_chain(impl, chain: dict):
    """Build every vector tx with ``impl``, one build_txs call per tx (each has its own ts)."""
    peaks, prev, results = [], hx(chain["empty_state"]["txHash"]), []
    for tx in chain["txs"]:
        (result,) = impl.build_txs(chain["header_version"], tx["id"], prev, peaks, tx["ts"],
                                   [tx_entries(tx)], LIMITS)
        results.append(result)
        prev = result[1]
    return results, peaks


def peaks_for(leaf_count: int, seed: int = 0) -> list:
    """A made-up AHT with ``leaf_count`` leaves: one random 32-byte peak per 1-bit of the count."""
    rnd = hashlib.sha256(seed.to_bytes(8, "big"))
    peaks = []
    for i in range(bin(leaf_count).count("1")):
        rnd = hashlib.sha256(rnd.digest())
        peaks.append(rnd.digest())
    return peaks


def random_tx(rnd, entries: int, key_size: int, value_size: int) -> list:
    return [(rnd.randbytes(key_size), rnd.randbytes(value_size), b"") for _ in range(entries)]


def outcome(fn, *args):
    """('ok', result) or ('raise', exception type, message): for comparing the two codecs."""
    try:
        return ("ok", fn(*args))
    except Exception as exc:    # compared by exact type and message
        return ("raise", type(exc), str(exc))


def pure_record_blob_len(record: bytes):
    """The pure codec's record layout arithmetic, or None where it has no defined answer.

    Both codecs raise CorruptedDataError where this returns None (a record too short for its
    counts or its hashes); tests compare their other outcomes only where it returns a length.
    """
    try:
        if struct.unpack_from(">H", record, 52)[0] == 0:
            nentries = struct.unpack_from(">H", record, 54)[0]
        else:
            md_len = struct.unpack_from(">H", record, 54)[0]
            nentries = struct.unpack_from(">I", record, 56 + md_len)[0]
    except struct.error:
        return None
    blob_len = len(record) - 32 * (nentries + 1)
    return blob_len if blob_len >= 0 else None
