"""Embedded-store benchmarks (issue targets in brackets), durable unless stated.

``make test`` runs each once at a tiny size so it never rots; ``make bench`` (or
``IMMUCORE_BENCH_FULL=1``) runs the real sizes. Each prints its numbers and settings:
  set of 1000-entry txs, 1 and 4 writers  [>= 1,000,000 entries/s]
  64 concurrent single-entry sets  [>= 20,000 tx/s]
  single-entry sets, 32 kept in flight by callback (no threads waiting: the writer's own
                                   capacity under the node's 32-connection shape)
  index of random keys, 10/tx      [>= 300,000 entries/s]: following live writers, and
                                   indexing a backlog (index rebuilt from the log)
  replicate_txs of 10-entry txs    [>= 100,000 tx/s], with the raw LMDB+SHA-256 floor
"""
import json
import os

import pytest

from . import store_workloads as w

FULL = os.environ.get("IMMUCORE_BENCH_FULL") == "1"
SIZES = {
    "set_txs": 500 if FULL else 5,
    "writers": 64, "txs_per_writer": 500 if FULL else 3,
    "in_flight_txs": 100_000 if FULL else 100,
    "index_txs": 200_000 if FULL else 200,
    "replicate_txs": 100_000 if FULL else 300,
}


def _report(name: str, result: dict):
    print(f"\n[{name}] " + json.dumps({k: round(v, 2) if isinstance(v, float) else v
                                      for k, v in result.items()}))


def _run(benchmark, name, fn, *args, **kwargs):
    result = {}

    def once():
        result.update(fn(*args, **kwargs))

    benchmark.pedantic(once, rounds=3 if FULL else 1, iterations=1)
    _report(name, result)
    benchmark.extra_info.update(result)
    return result


@pytest.mark.parametrize("writers", [1, 4])
def test_set_1000_entry_txs(benchmark, tmp_path, writers):
    r = _run(benchmark, f"set 1000-entry txs, {writers} writer(s)", w.set_large_txs,
             str(tmp_path), SIZES["set_txs"] * writers, writers=writers)
    assert r["entries_per_s"] > 0


def test_concurrent_single_entry_writers(benchmark, tmp_path):
    r = _run(benchmark, "64 concurrent writers", w.concurrent_writers, str(tmp_path),
             SIZES["writers"], SIZES["txs_per_writer"])
    assert r["txs"] == SIZES["writers"] * SIZES["txs_per_writer"]


def test_single_entry_sets_32_in_flight(benchmark, tmp_path):
    r = _run(benchmark, "single-entry sets, 32 in flight", w.sets_in_flight, str(tmp_path), 32,
             SIZES["in_flight_txs"])
    assert r["txs"] == SIZES["in_flight_txs"]


def test_index_throughput(benchmark, tmp_path):
    r = _run(benchmark, "index random keys", w.index_throughput, str(tmp_path),
             SIZES["index_txs"])
    assert r["index_backlog_entries_per_s"] > 0


def test_replicate_apply(benchmark, tmp_path):
    r = _run(benchmark, "replicate_txs apply", w.replicate_apply, str(tmp_path),
             SIZES["replicate_txs"])
    assert r["tx_per_s"] > 0


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-s", "--benchmark-only"]))
