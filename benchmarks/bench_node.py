"""Node benchmarks over loopback (issue targets in brackets), durable:
  32 connections, single-entry sets   [>= 15,000 tx/s]
  1000-entry sets on one connection    [>= 500,000 entries/s] (4 in flight; also 16)
  pipelined gets on one connection     [>= 50,000 gets/s] (256 in flight; also in bursts of 256)
``make test`` runs them once at a tiny size; ``IMMUCORE_BENCH_FULL=1`` (``make bench``) at size,
three rounds each: a benchmark prints its median round and every round's rate (client and node
share one machine, whose speed swings by 20 % or more from minute to minute). Beside each
round's rate it prints the machine's speed just before it (``machine_probe``: a pure-Python
loop's time and a device flush's), so that a slow round can be told from a slow machine. The
32-connection and the gets benchmarks also print the CPU per tx (per get) of the node, its
index workers and the client (from /proc, Linux): where the two cores went.

The 32-connection sets also run on a node started with ``--synced=false`` (commits not
fsynced): the same requests without the two device flushes of each commit, which shows how
much of a durable SET's time is the disk and how much is CPU. And with 64 connections: each
connection has one SET in flight, so the 32-connection rate is 32 / round trip, a bound of
latency; twice the connections show how much more the node commits when more wait.
"""
import json
import os

import pytest

from tests.nodes import running_node

from . import node_workloads as w
from .machine_probe import probe

FULL = os.environ.get("IMMUCORE_BENCH_FULL") == "1"


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with running_node(tmp_path_factory.mktemp("bench-node")) as running:
        yield running


@pytest.fixture(scope="module")
def unsynced_node(tmp_path_factory):
    with running_node(tmp_path_factory.mktemp("bench-node-unsynced"), "--synced=false") as running:
        yield running


def _run(benchmark, name, fn, node, *args):
    rounds, probes = [], []
    benchmark.pedantic(lambda: rounds.append(fn(node, *args)), rounds=3 if FULL else 1,
                       iterations=1, setup=lambda: probes.append(probe(node.dir)))
    for measured, machine in zip(rounds, probes):
        measured.update(machine)
    rate = next(key for key in rounds[0] if key.endswith("_per_s"))
    rounds.sort(key=lambda r: r[rate])
    result = dict(rounds[len(rounds) // 2])              # the median round
    result[f"{rate}_rounds"] = [round(r[rate]) for r in rounds]
    for key in probes[0]:                  # in the same order: each round's machine beside it
        result[f"{key}_rounds"] = [r[key] for r in rounds]
    print(f"\n[{name}] " + json.dumps({k: round(v, 1) if isinstance(v, float) else v
                                      for k, v in result.items()}))
    benchmark.extra_info.update(result)
    return result


def test_concurrent_single_entry_sets(benchmark, node):
    r = _run(benchmark, "32 connections x sets", w.concurrent_sets, node, 32,
             300 if FULL else 3)
    assert r["txs"] == 32 * (300 if FULL else 3)


def test_concurrent_single_entry_sets_64_connections(benchmark, node):
    r = _run(benchmark, "64 connections x sets", w.concurrent_sets, node, 64,
             150 if FULL else 2)
    assert r["txs"] == 64 * (150 if FULL else 2)


def test_concurrent_single_entry_sets_not_synced(benchmark, unsynced_node):
    r = _run(benchmark, "32 connections x sets, --synced=false", w.concurrent_sets,
             unsynced_node, 32, 300 if FULL else 3)
    assert r["txs"] == 32 * (300 if FULL else 3) and r["durable"] is False


def test_batched_1000_entry_sets(benchmark, node):
    r = _run(benchmark, "1000-entry sets, 1 connection", w.batched_sets, node,
             300 if FULL else 2)
    assert r["entries_per_s"] > 0


def test_batched_1000_entry_sets_16_in_flight(benchmark, node):
    """The same with a deeper pipeline (a bulk loader's shape): the node's stages overlap."""
    r = _run(benchmark, "1000-entry sets, 1 connection, 16 in flight", w.batched_sets, node,
             300 if FULL else 2, 1000, 16)
    assert r["entries_per_s"] > 0


def test_pipelined_gets(benchmark, node):
    r = _run(benchmark, "pipelined gets, 1 connection, 256 in flight", w.pipelined_gets, node,
             100_000 if FULL else 300)
    assert r["gets"] == (100_000 if FULL else 300)


def test_pipelined_gets_in_bursts(benchmark, node):
    r = _run(benchmark, "pipelined gets, 1 connection, bursts of 256", w.pipelined_gets, node,
             100_000 if FULL else 300, 256, True)
    assert r["gets"] == (100_000 if FULL else 300)
