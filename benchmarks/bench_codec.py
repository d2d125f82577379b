"""Codec benchmarks: the native codec (immucore._native) against the pure reference [targets].

  build_txs of one 10-entry tx, 32-byte keys, 100-byte values   [native >= 10x pure]
  replicate_blobs of 1000 such txs per call, native              [a replica at 100,000 tx/s]
  decode_record / record_entry of such records                   [replica and reads]
  index_items over 1000 such records                             [indexer at 300,000 entries/s]
  encode_frame + FrameDecoder.feed of 256 pipelined frames,      [every request and answer]
    60-byte bodies (the wire protocol's frame codec)

CPU only, in memory: no storage, so no durability mode is involved. Every tx extends an AHT of
1,000,000 leaves (7 peaks), so each also folds its blRoot over 7 peaks, as on a real database.

``make test`` runs each body once (--benchmark-disable); ``make bench`` measures, and each test
prints one line with its settings and, for the native codec, the native/pure ratio.
``python benchmarks/bench_codec.py`` measures without pytest (min of interleaved repeats, which is
what survives a busy machine) and prints a summary with the ratios.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import timeit
from pathlib import Path
from types import SimpleNamespace

if __name__ == "__main__":   # run as a script from anywhere: import the repository's package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402

from immucore.codec import pure  # noqa: E402
from immucore.constants import (FRAME_BODY_BYTES_MAX, KEY_SIZE_BYTES_MAX,  # noqa: E402
                                TX_ENTRIES_MAX, VALUE_SIZE_BYTES_MAX)
from immucore.protocol.frames import PureFrameDecoder, pure_encode_frame  # noqa: E402

try:
    from immucore import _native as native
except ImportError:
    if os.environ.get("IMMUCORE_FORCE_NATIVE") == "1":
        raise       # CI must not benchmark (or pass) on the pure codec alone
    native = None

FULL = os.environ.get("IMMUCORE_BENCH_FULL") == "1"
ROUNDS = 30 if FULL else 10     # for the batch benchmarks, when measuring
LIMITS = (TX_ENTRIES_MAX, KEY_SIZE_BYTES_MAX, VALUE_SIZE_BYTES_MAX)
TX_ENTRIES, KEY_SIZE_BYTES, VALUE_SIZE_BYTES = 10, 32, 100
TREE_LEAVES = 1_000_000
BATCH_TXS = 1000
SETTINGS = (f"{TX_ENTRIES} entries/tx, {KEY_SIZE_BYTES} B keys, {VALUE_SIZE_BYTES} B values, "
            f"header v1, AHT of {TREE_LEAVES:,} leaves")
FRAMES_PIPELINED, FRAME_BODY_BYTES = 256, 60     # a burst of small requests, e.g. GETs
FRAME_SETTINGS = (f"{FRAMES_PIPELINED} pipelined frames of {FRAME_BODY_BYTES} B bodies, "
                  f"encoded, joined and decoded in one feed")
# The pure frame codec, shaped like the native module (which has both names itself).
PURE_FRAMES = SimpleNamespace(IMPLEMENTATION="pure", encode_frame=pure_encode_frame,
                              FrameDecoder=PureFrameDecoder)


def _codecs(pure_codec=pure):
    """Benchmark parameters: the pure codec (or its frame part) and, when built, the native."""
    params = [pytest.param(pure_codec, id="pure")]
    params.append(pytest.param(native, id="native", marks=pytest.mark.skipif(
        native is None, reason="immucore._native is not built")))
    return params


class Workload:
    """One chain position and a batch of txs built on it (the same for every codec)."""

    def __init__(self, seed: int = 1):
        rnd = random.Random(seed)
        self.first_id = TREE_LEAVES + 1
        self.prev_alh = hashlib.sha256(b"tx %d" % TREE_LEAVES).digest()
        self.peaks = [hashlib.sha256(b"peak %d" % i).digest()
                      for i in range(bin(TREE_LEAVES).count("1"))]
        self.ts = 1_700_000_000

        def tx():
            return [(rnd.randbytes(KEY_SIZE_BYTES), rnd.randbytes(VALUE_SIZE_BYTES), b"")
                    for _ in range(TX_ENTRIES)]

        self.tx = tx()
        self.txs = [tx() for _ in range(BATCH_TXS)]
        builder = native or pure
        built = builder.build_txs(1, self.first_id, self.prev_alh, list(self.peaks), self.ts,
                                  self.txs, LIMITS)
        self.records = [r[2] for r in built]
        self.blobs = [builder.record_export_blob(r) for r in self.records]
        self.alhs = [r[1] for r in built]
        self.one_alh = pure.build_txs(1, self.first_id, self.prev_alh, list(self.peaks), self.ts,
                                      [self.tx], LIMITS)[0][1]

    def build_one(self, codec):
        return codec.build_txs(1, self.first_id, self.prev_alh, list(self.peaks), self.ts,
                               [self.tx], LIMITS)

    def replicate(self, codec):
        return codec.replicate_blobs(self.blobs, self.first_id, self.prev_alh, list(self.peaks),
                                     LIMITS)

    def decode_all(self, codec):
        for record in self.records:
            codec.decode_record(record)

    def entry_each(self, codec):
        for record in self.records:
            codec.record_entry(record, 5)

    def index_all(self, codec):
        return codec.index_items(self.first_id, self.records)


@pytest.fixture(scope="module")
def workload():
    return Workload()


class FrameWorkload:
    """A pipelined burst as one client write and one node read: every frame encoded, the
    stream decoded by a fresh decoder."""

    def __init__(self, seed: int = 2):
        rnd = random.Random(seed)
        self.frames = [(11, 0, request_id, rnd.randbytes(FRAME_BODY_BYTES))
                       for request_id in range(1, FRAMES_PIPELINED + 1)]

    def round_trip(self, frame_codec):
        encode = frame_codec.encode_frame
        stream = b"".join([encode(*frame) for frame in self.frames])
        return frame_codec.FrameDecoder(FRAME_BODY_BYTES_MAX).feed(stream)


@pytest.fixture(scope="module")
def frame_workload():
    return FrameWorkload()


_MEASURED: dict = {}    # (benchmark, codec) -> units per second, for the native/pure ratios


def _rounds(benchmark) -> int:
    return 1 if benchmark.disabled else ROUNDS


def _report(capsys, benchmark, name: str, codec, units: int, unit: str, target: str = "",
            settings: str = SETTINGS):
    """Print (and keep) units/s from the benchmark's fastest round, with the ratio to pure."""
    stats = getattr(benchmark, "stats", None)
    if not stats:           # --benchmark-disable: the body ran once, nothing was measured
        return
    per_s = units / stats.stats.min
    _MEASURED[(name, codec.IMPLEMENTATION)] = per_s
    line = {"benchmark": name, "codec": codec.IMPLEMENTATION, f"{unit}_per_s": round(per_s),
            f"us_per_{unit}": round(1e6 / per_s, 3), "settings": settings}
    pure_per_s = _MEASURED.get((name, "pure"))
    if codec.IMPLEMENTATION == "native" and pure_per_s:
        line["native_vs_pure"] = round(per_s / pure_per_s, 1)
    if target:
        line["target"] = target
    benchmark.extra_info.update(line)
    with capsys.disabled():
        print(f"\n[codec] {json.dumps(line)}")


@pytest.mark.parametrize("codec", _codecs())
def test_build_txs_one_10_entry_tx(benchmark, capsys, workload, codec):
    (header, alh, record, nodes), = benchmark(workload.build_one, codec)
    assert header[0] == workload.first_id and alh == workload.one_alh
    _report(capsys, benchmark, "build_txs 1 tx", codec, 1, "tx", "native >= 10x pure")


@pytest.mark.parametrize("codec", _codecs())
def test_replicate_blobs_1000_txs(benchmark, capsys, workload, codec):
    result = benchmark.pedantic(workload.replicate, args=(codec,), rounds=_rounds(benchmark),
                                iterations=1)
    assert [r[1] for r in result] == workload.alhs
    _report(capsys, benchmark, "replicate_blobs 1000 txs", codec, BATCH_TXS, "tx",
            "100,000 tx/s for the whole replica")


@pytest.mark.parametrize("codec", _codecs())
def test_decode_record_1000_records(benchmark, capsys, workload, codec):
    benchmark.pedantic(workload.decode_all, args=(codec,), rounds=_rounds(benchmark),
                       iterations=1)
    _report(capsys, benchmark, "decode_record", codec, BATCH_TXS, "tx")


@pytest.mark.parametrize("codec", _codecs())
def test_record_entry_1000_records(benchmark, capsys, workload, codec):
    benchmark.pedantic(workload.entry_each, args=(codec,), rounds=_rounds(benchmark),
                       iterations=1)
    _report(capsys, benchmark, "record_entry", codec, BATCH_TXS, "entry")


@pytest.mark.parametrize("codec", _codecs())
def test_index_items_1000_records(benchmark, capsys, workload, codec):
    rows = benchmark.pedantic(workload.index_all, args=(codec,), rounds=_rounds(benchmark),
                              iterations=1)
    assert len(rows) == BATCH_TXS * TX_ENTRIES
    _report(capsys, benchmark, "index_items", codec, BATCH_TXS * TX_ENTRIES, "entry",
            "300,000 entries/s for the whole indexer")


@pytest.mark.parametrize("frame_codec", _codecs(PURE_FRAMES))
def test_frames_encode_decode_256_pipelined(benchmark, capsys, frame_workload, frame_codec):
    assert benchmark(frame_workload.round_trip, frame_codec) == frame_workload.frames
    _report(capsys, benchmark, "frames encode+decode", frame_codec, FRAMES_PIPELINED, "frame",
            settings=FRAME_SETTINGS)


# --- script mode -------------------------------------------------------------------------------

def _min_per_call(fn, calls: int, repeats: int) -> float:
    return min(timeit.repeat(fn, number=calls, repeat=repeats)) / calls


def _sha256_blocks(message_bytes: int) -> int:
    return (message_bytes + 9 + 63) // 64


def sha256_blocks_per_tx(w: Workload) -> int:
    """SHA-256 compressions the format requires to seal ``w.tx`` (docs/immudb-format.md
    §6–§9)."""
    entries = len(w.tx)
    blocks = 0
    for key, value, md in w.tx:
        blocks += _sha256_blocks(1 + len(value))                        # hValue of 0x00||value
        blocks += _sha256_blocks(2 + len(md) + 2 + 1 + len(key) + 32)   # v1 entry digest
        blocks += _sha256_blocks(1 + 32)                                # htree leaf
    blocks += (entries - 1) * _sha256_blocks(1 + 64)                    # htree nodes
    blocks += _sha256_blocks(8 + 2 + 2 + 4 + 32 + 8 + 32)               # inner hash
    blocks += _sha256_blocks(8 + 32 + 32)                               # Alh
    merges = bin(w.first_id - 1)[::-1].index("0") if (w.first_id - 1) & 1 else 0
    blocks += _sha256_blocks(33) + merges * _sha256_blocks(65)          # AHT leaf and parents
    blocks += (len(w.peaks) - 1) * _sha256_blocks(65)                   # blRoot over the peaks
    return blocks


def main() -> None:
    if native is None:
        raise SystemExit("immucore._native is not built: "
                         "`.venv/bin/python setup.py build_ext --inplace`")
    import platform
    import ssl
    w = Workload()
    fw = FrameWorkload()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    print(f"codec benchmark: {SETTINGS}; Python {platform.python_version()}, {ssl.OPENSSL_VERSION},"
          f" {cpu}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    cases = [  # name, fn, calls per timing (native), (pure), units per call, unit
        ("build_txs 1 tx", w.build_one, 2000, 200, 1, "tx"),
        ("replicate_blobs 1000 txs", w.replicate, 3, 1, BATCH_TXS, "tx"),
        ("decode_record", w.decode_all, 3, 1, BATCH_TXS, "tx"),
        ("record_entry", w.entry_each, 3, 1, BATCH_TXS, "entry"),
        ("index_items", w.index_all, 3, 1, BATCH_TXS * TX_ENTRIES, "entry"),
        ("frames encode+decode",         # the frame codec of the same implementation
         lambda codec: fw.round_trip(native if codec is native else PURE_FRAMES), 200, 20,
         FRAMES_PIPELINED, "frame"),
    ]
    for name, fn, native_calls, pure_calls, units, unit in cases:
        best = {"native": float("inf"), "pure": float("inf")}
        for _ in range(7):      # interleaved, so both see the same machine
            best["native"] = min(best["native"], _min_per_call(lambda: fn(native), native_calls, 3))
            best["pure"] = min(best["pure"], _min_per_call(lambda: fn(pure), pure_calls, 2))
        native_rate, pure_rate = units / best["native"], units / best["pure"]
        print(f"  {name:26s} native {native_rate:>12,.0f} {unit}/s  pure {pure_rate:>10,.0f} "
              f"{unit}/s  native/pure {native_rate / pure_rate:5.1f}x")
        if fn == w.build_one:
            floor_s = _hashing_floor_s(w)
            print(f"  {'':26s} SHA-256 floor: {sha256_blocks_per_tx(w)} blocks/tx at OpenSSL's "
                  f"streaming rate = {floor_s * 1e6:.1f} us/tx, so no codec builds more than "
                  f"{1 / floor_s:,.0f} tx/s here and native/pure is at most "
                  f"{best['pure'] / floor_s:.1f}x")


def _hashing_floor_s(w: Workload) -> float:
    """Seconds of pure compression per tx: the blocks it needs at the best rate OpenSSL hashes."""
    data = bytes(1 << 20)
    per_block = min(timeit.repeat(lambda: native.sha256(data), number=20, repeat=5)) / 20 / (
        len(data) // 64)
    return sha256_blocks_per_tx(w) * per_block


if __name__ == "__main__":
    main()
