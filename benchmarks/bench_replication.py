"""Replication benchmarks (issue targets in brackets): catch-up of a fresh replica from a primary
holding N 10-entry txs, durable, all checks on [>= 100,000 tx/s at N = 1,000,000, replica RSS
<= 300 MB], with the one-tx-per-round-trip shape (immudb's), the catch-up over immudb's gRPC streamExportTx
and the raw floor in the same run.
``make test`` runs N = 500; ``IMMUCORE_BENCH_FULL=1`` N = 1,000,000 (``make bench``)."""
import json
import os

from . import replication_workloads as w

FULL = os.environ.get("IMMUCORE_BENCH_FULL") == "1"


def test_catch_up_of_a_fresh_replica(benchmark, tmp_path):
    result = {}
    benchmark.pedantic(lambda: result.update(w.catch_up(str(tmp_path),
                                                        1_000_000 if FULL else 500,
                                                        baseline_txs=2000 if FULL else 100,
                                                        grpc_txs=100_000 if FULL else 0)),
                       rounds=1, iterations=1)
    print("\n[replica catch-up] " + json.dumps({k: round(v, 1) if isinstance(v, float) else v
                                                 for k, v in result.items()}))
    benchmark.extra_info.update(result)
    assert result["tx_per_s"] > 0
