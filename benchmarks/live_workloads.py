"""Live replication: writers at full speed on a primary node while replicas follow it.

Every node is a real process on loopback, durable (every acknowledged commit fsynced on the
node that acknowledged it). Writers are AsyncClients on uvloop in this process, doing single-
entry sets from ``connections`` connections for ``seconds``. A probe measures, for one write in
each ``probe_every_ms``, the time from its acknowledgement on the primary to its commit on each
replica, seen through a standing EXPORT_TXS on the replica database (answered at that commit).
Everything shares the machine's cores: primary, replicas and the clients.
"""
from __future__ import annotations

import asyncio
import os
import statistics
import time

from immucore.client import AsyncClient

from .node_workloads import run_on_uvloop
from tests.nodes import NodeProcess

REPLICA_DB = "replicadb"


def _replica_settings(primary) -> dict:
    return {"replica": True, "primary_database": "defaultdb", "primary_host": primary.host,
            "primary_port": primary.port, "primary_username": "immudb",
            "primary_password": "immudb"}


async def _client(node, database="defaultdb") -> AsyncClient:
    client = AsyncClient(node.host, node.port)
    await client.login("immudb", "immudb", database)
    return client


async def _visible_at(replica_client: AsyncClient, tx_id: int, timeout_s: float = 30) -> float:
    """Wait until the replica database holds ``tx_id``; the moment it does."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        blobs = await replica_client.export_txs(tx_id, 1, wait_ms=5000)
        if blobs:
            return time.perf_counter()
    raise TimeoutError(f"tx {tx_id} not on the replica within {timeout_s}s")


async def _write_for(nodes_primary, connections: int, seconds: float, replicas: list,
                     probe_every_ms: float):
    writers = [await _client(nodes_primary) for _ in range(connections)]
    probe = await _client(nodes_primary)
    watchers = [await _client(r, REPLICA_DB) for r in replicas]
    stop_at = time.perf_counter() + seconds
    done = [0]
    latencies_ms = []

    async def write(index, client):
        n = 0
        while time.perf_counter() < stop_at:
            await client.set({f"c{index}-{n}".encode(): b"x" * 100})
            n += 1
        done[0] += n

    async def measure():
        while time.perf_counter() < stop_at:
            header = await probe.set({b"probe": b"p"})
            acked = time.perf_counter()
            seen = await asyncio.gather(*(_visible_at(w, header.id) for w in watchers))
            latencies_ms.extend((t - acked) * 1000 for t in seen)
            await asyncio.sleep(probe_every_ms / 1000)

    start = time.perf_counter()
    tasks = [write(i, c) for i, c in enumerate(writers)]
    if watchers:
        tasks.append(measure())
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    for client in writers + [probe] + watchers:
        await client.close()
    return done[0] / elapsed, latencies_ms


def _percentile(values, q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def _start_cluster(workdir: str, replica_count: int, primary_flags=()):
    primary = NodeProcess(os.path.join(workdir, "primary"), primary_flags)
    primary.start()
    replicas = []
    for n in range(replica_count):
        node = NodeProcess(os.path.join(workdir, f"replica{n}"))
        node.start()
        replicas.append(node)

    async def create():
        for node in replicas:
            client = await _client(node)
            await client.create_database(REPLICA_DB, _replica_settings(primary))
            await client.close()
    run_on_uvloop(create())
    return primary, replicas


def _stop(*nodes):
    for node in nodes:
        node.stop()


def live(workdir: str, replica_count: int, connections: int = 32, seconds: float = 10,
         probe_every_ms: float = 10) -> dict:
    """Primary write throughput with ``replica_count`` async replicas following it, and the
    commit-to-visible latency on each replica."""
    primary, replicas = _start_cluster(os.path.join(workdir, f"live{replica_count}"),
                                       replica_count)
    try:
        rate, latencies = run_on_uvloop(_write_for(primary, connections, seconds, replicas,
                                                   probe_every_ms))
    finally:
        _stop(primary, *replicas)
    return {"replicas": replica_count, "connections": connections, "seconds": seconds,
            "entries_per_tx": 1, "durable": True, "primary_tx_per_s": rate,
            "visible_samples": len(latencies),
            "visible_p50_ms": statistics.median(latencies) if latencies else float("nan"),
            "visible_p99_ms": _percentile(latencies, 0.99),
            "visible_max_ms": max(latencies) if latencies else float("nan")}


def sync_writes(workdir: str, connections: int = 32, seconds: float = 10, acks: int = 1) -> dict:
    """Durable single-entry writes to a sync primary (``acks`` replicas must hold each)."""
    primary, replicas = _start_cluster(
        os.path.join(workdir, "sync"), acks,
        ("--replication-sync-enabled=true", f"--replication-sync-acks={acks}"))
    try:
        async def settle():        # the replicas are connected and acknowledging
            client = await _client(primary)
            await client.set({b"warm": b"up"})
            await client.close()
        run_on_uvloop(settle())
        rate, _ = run_on_uvloop(_write_for(primary, connections, seconds, [], 0))
    finally:
        _stop(primary, *replicas)
    return {"sync_acks": acks, "replicas": len(replicas), "connections": connections,
            "seconds": seconds, "entries_per_tx": 1, "durable": True, "tx_per_s": rate}
