"""What the shared port costs a gRPC request (docs/grpc.md "One port"): single-entry gRPC ``Get``s
through the node's own port (the node splices the connection to its internal gRPC endpoint)
against the same ``Get``s on a node with ``--grpc-port`` (grpc.aio's own listener, no splice).

One client, one call at a time, so a call's time is a round trip and the difference between the
two is what the splice adds to each request. Rounds alternate between the two nodes (the
machine's speed swings from minute to minute: alternating gives both the same machine; which
side goes first alternates too), and each side's median round is compared, as is the median of
the paired rounds' differences. Beside the wall time, each round reads the node's CPU per
call (/proc): the splice runs on the node's event loop, beside the gRPC server.

``make test`` runs it once at a tiny size; ``IMMUCORE_BENCH_FULL=1`` (``make bench``) runs
BENCH_ROUNDS rounds of BENCH_GETS gets on each side.
"""
from __future__ import annotations

import json
import os
import statistics
import time

import grpc
from immudb.grpc import schema_pb2, schema_pb2_grpc

from tests.nodes import HOST, cpu_seconds, free_port, port_accepts, running_node

from .machine_probe import probe

FULL = os.environ.get("IMMUCORE_BENCH_FULL") == "1"
BENCH_ROUNDS = 9 if FULL else 1          # per side
BENCH_GETS = 3000 if FULL else 20        # per round
KEYS = 100


def _stub(address: str):
    channel = grpc.insecure_channel(address)
    stub = schema_pb2_grpc.ImmuServiceStub(channel)
    token = stub.Login(schema_pb2.LoginRequest(user=b"immudb", password=b"immudb")).token
    token = stub.UseDatabase(schema_pb2.Database(databaseName="defaultdb"),
                             metadata=(("authorization", token),)).token
    metadata = (("authorization", token),)
    for i in range(KEYS):
        stub.Set(schema_pb2.SetRequest(KVs=[schema_pb2.KeyValue(key=b"k%d" % i, value=b"v" * 32)]),
                 metadata=metadata)
    return channel, stub, metadata


def _round(node, stub, metadata, gets: int) -> dict:
    requests = [schema_pb2.KeyRequest(key=b"k%d" % (i % KEYS)) for i in range(gets)]
    cpu_before, start = cpu_seconds(node.process.pid), time.perf_counter()
    for request in requests:
        stub.Get(request, metadata=metadata)
    elapsed = time.perf_counter() - start
    cpu = cpu_seconds(node.process.pid) - cpu_before
    return {"us_per_get": elapsed / gets * 1e6, "node_cpu_us_per_get": cpu / gets * 1e6}


def test_grpc_get_shared_port_vs_dedicated_port(benchmark, tmp_path):
    grpc_port = free_port()
    with running_node(tmp_path / "one_port") as shared, \
            running_node(tmp_path / "dedicated", "--grpc-port", str(grpc_port)) as dedicated:
        while not port_accepts(HOST, grpc_port):
            time.sleep(0.05)
        sides = {"shared_port": (shared, *_stub(shared.address)),
                 "dedicated_port": (dedicated, *_stub(f"{HOST}:{grpc_port}"))}
        for node, _, stub, metadata in sides.values():      # warm both: connections, caches
            _round(node, stub, metadata, min(BENCH_GETS, 200))
        rounds = {name: [] for name in sides}
        machine = []

        def alternate():
            for i in range(BENCH_ROUNDS):
                machine.append(probe(shared.dir))
                order = list(sides.items())
                for name, (node, _, stub, metadata) in order[::-1] if i % 2 else order:
                    rounds[name].append(_round(node, stub, metadata, BENCH_GETS))

        benchmark.pedantic(alternate, rounds=1, iterations=1)
        result = {}
        for name, measured in rounds.items():
            for key in ("us_per_get", "node_cpu_us_per_get"):
                result[f"{name}_{key}"] = statistics.median(r[key] for r in measured)
            result[f"{name}_us_per_get_rounds"] = [round(r["us_per_get"], 1) for r in measured]
        result["shared_port_costs_us_per_get"] = (result["shared_port_us_per_get"]
                                                  - result["dedicated_port_us_per_get"])
        result["shared_port_costs_node_cpu_us_per_get"] = (
            result["shared_port_node_cpu_us_per_get"]
            - result["dedicated_port_node_cpu_us_per_get"])
        # each shared round ran right beside its dedicated one (first on even rounds, second on
        # odd ones), on the same machine: the median of the pairs' differences is the steadier
        # number when the machine's speed swings
        result["shared_port_costs_us_per_get_paired_median"] = statistics.median(
            a["us_per_get"] - b["us_per_get"]
            for a, b in zip(rounds["shared_port"], rounds["dedicated_port"]))
        result["gets_per_round"] = BENCH_GETS
        for key in machine[0]:
            result[f"{key}_rounds"] = [m[key] for m in machine]
        print("\n[gRPC Get, shared port vs dedicated port] "
              + json.dumps({k: round(v, 1) if isinstance(v, float) else v
                            for k, v in result.items()}))
        benchmark.extra_info.update(result)
        for _, channel, _, _ in sides.values():
            channel.close()
        assert all(len(r) == BENCH_ROUNDS for r in rounds.values())


NATIVE_ROUNDS = 5 if FULL else 1
NATIVE_GETS = 50_000 if FULL else 200


def test_native_gets_with_grpc_sharing_the_port_vs_grpc_off(benchmark, tmp_path):
    """The native side of the same question: pipelined native GETs (256 in flight, one
    connection) on a node whose port also serves gRPC, and on one with ``--grpc-port -1``.
    A native connection on the shared port is handed to the same ``Connection`` as on a node
    without gRPC, so the two should not differ beyond the machine's noise."""
    from . import node_workloads as w
    with running_node(tmp_path / "one_port") as shared, \
            running_node(tmp_path / "off", "--grpc-port", "-1") as off:
        sides = {"grpc_shared": shared, "grpc_off": off}
        rounds = {name: [] for name in sides}

        def alternate():
            for i in range(NATIVE_ROUNDS):
                order = list(sides.items())
                for name, node in order[::-1] if i % 2 else order:
                    rounds[name].append(w.pipelined_gets(node, NATIVE_GETS))

        benchmark.pedantic(alternate, rounds=1, iterations=1)
        result = {"gets_per_round": NATIVE_GETS}
        for name, measured in rounds.items():
            result[f"{name}_gets_per_s"] = statistics.median(r["gets_per_s"] for r in measured)
            result[f"{name}_gets_per_s_rounds"] = [round(r["gets_per_s"]) for r in measured]
            cpu_key = next(k for k in measured[0] if k.startswith("node_cpu"))
            result[f"{name}_{cpu_key}"] = statistics.median(r[cpu_key] for r in measured)
        print("\n[native pipelined gets, gRPC sharing the port vs gRPC off] "
              + json.dumps({k: round(v, 2) if isinstance(v, float) else v
                            for k, v in result.items()}))
        benchmark.extra_info.update(result)
        assert all(len(r) == NATIVE_ROUNDS for r in rounds.values())
