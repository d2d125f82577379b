"""Event-loop CPU per single-entry durable SET from 32 connections, in process (stub
transports, a real node and its writer): the loop's share of the 32-connection SET benchmark,
measured with the loop thread's CPU clock so that the machine's swings do not hide a change of
a few microseconds. ``make test`` runs it at a tiny size; ``IMMUCORE_BENCH_FULL=1`` at 400
rounds of 32 sets.
"""
import json
import os

from . import loop_workloads as w

FULL = os.environ.get("IMMUCORE_BENCH_FULL") == "1"


def test_loop_cpu_per_single_entry_set(benchmark):
    results = []
    rounds = 400 if FULL else 20
    benchmark.pedantic(lambda: results.append(w.loop_cpu_per_set(32, rounds)), rounds=1,
                       iterations=1)
    r = results[0]
    print("\n[event-loop CPU per set, 32 connections, in process] "
          + json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()}))
    benchmark.extra_info.update(r)
    assert r["sets"] == 32 * rounds and r["loop_us_per_set_median"] > 0
