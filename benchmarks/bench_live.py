"""Live replication benchmarks (issue targets in brackets), every node durable on loopback:
  * primary write throughput from 32 connections with 0, 1 and 2 async replicas following
    [with replicas >= 80 % of without], and the p99 time from a commit's acknowledgement on the
    primary to its commit on a caught-up replica [<= 50 ms];
  * sync replication, acks 1: durable single-entry writes from 32 connections [>= 5,000 tx/s].
``make test`` runs them for a fraction of a second; ``IMMUCORE_BENCH_FULL=1`` for 10 s each."""
import json
import os

from . import live_workloads as w

FULL = os.environ.get("IMMUCORE_BENCH_FULL") == "1"
SECONDS = 10 if FULL else 0.5


def _report(label: str, result: dict, benchmark):
    print(f"\n[{label}] " + json.dumps({k: round(v, 1) if isinstance(v, float) else v
                                        for k, v in result.items()}))
    benchmark.extra_info.update(result)


def test_live_replication_primary_throughput_and_visibility(benchmark, tmp_path):
    results = {}

    def run():
        for replicas in (0, 1, 2):
            results[replicas] = w.live(str(tmp_path), replicas, seconds=SECONDS)

    benchmark.pedantic(run, rounds=1, iterations=1)
    alone = results[0]["primary_tx_per_s"]
    for replicas, result in results.items():
        result["vs_no_replica"] = result["primary_tx_per_s"] / alone
        _report(f"live replication, {replicas} replicas", result, benchmark)
    assert all(r["primary_tx_per_s"] > 0 for r in results.values())
    assert results[1]["visible_samples"] > 0 and results[2]["visible_samples"] > 0


def test_sync_replication_writes(benchmark, tmp_path):
    result = {}
    benchmark.pedantic(lambda: result.update(w.sync_writes(str(tmp_path), seconds=SECONDS)),
                       rounds=1, iterations=1)
    _report("sync replication", result, benchmark)
    assert result["tx_per_s"] > 0
