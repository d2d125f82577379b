"""Event-loop CPU per request, in process (stub transports, a real node, its writer and its
index): the loop's share of two node benchmarks, measured with the loop thread's CPU clock so
that the machine's swings do not hide a change of a few microseconds.
  single-entry durable SETs from 32 connections (one SET to a read)
  pipelined GETs on one connection (256 GETs to a read)
``make test`` runs them at a tiny size; ``IMMUCORE_BENCH_FULL=1`` at 400 rounds of 32 sets and
200 reads of 256 gets.
"""
import json
import os

from . import loop_workloads as w

FULL = os.environ.get("IMMUCORE_BENCH_FULL") == "1"


def _measure(benchmark, name: str, fn, *args) -> dict:
    results = []
    benchmark.pedantic(lambda: results.append(fn(*args)), rounds=1, iterations=1)
    r = results[0]
    print(f"\n[{name}] " + json.dumps({k: round(v, 1) if isinstance(v, float) else v
                                      for k, v in r.items()}))
    benchmark.extra_info.update(r)
    return r


def test_loop_cpu_per_single_entry_set(benchmark):
    rounds = 400 if FULL else 20
    r = _measure(benchmark, "event-loop CPU per set, 32 connections, in process",
                 w.loop_cpu_per_set, 32, rounds)
    assert r["sets"] == 32 * rounds and r["loop_us_per_set_median"] > 0


def test_loop_cpu_per_pipelined_get(benchmark):
    rounds = 200 if FULL else 10
    r = _measure(benchmark, "event-loop CPU per get, 256 to a read, in process",
                 w.loop_cpu_per_get, 256, rounds)
    assert r["gets"] == 256 * rounds and r["loop_us_per_get_median"] > 0
