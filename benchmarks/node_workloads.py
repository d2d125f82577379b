"""Workloads of the node benchmarks: a real node process on loopback, driven by AsyncClients on
uvloop from this process. Each returns what it measured with its settings. The node is durable
(--synced, the default: every acknowledged commit is fsynced). Client and node share the
machine's cores, so these are end-to-end numbers of one box, not of the node alone. A node
started with ``--synced=false`` is reported as ``"durable": false``."""
from __future__ import annotations

import asyncio
import os
import time

from immucore.client import AsyncClient
from tests.nodes import child_pids, cpu_seconds

try:
    import uvloop
except ImportError:        # uvloop is a dependency; keep the stdlib loop as a fallback
    uvloop = None


def run_on_uvloop(coro):
    """``asyncio.run`` on uvloop, as the node runs (the stdlib loop where uvloop is missing)."""
    if uvloop is not None:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        return asyncio.run(coro)
    finally:
        asyncio.set_event_loop_policy(None)


def _process_cpu_seconds(pid: int):
    """CPU seconds of process ``pid`` (all its threads) and of its live child processes (the
    node's index workers); None where there is no /proc."""
    try:
        own = cpu_seconds(pid)
    except OSError:
        return None
    children = 0.0
    for child in child_pids(pid):
        try:
            children += cpu_seconds(child)
        except (OSError, IndexError, ValueError):
            continue                      # a process that ended meanwhile
    return own, children


def _cpu_per_tx(node, before, client_before: float, txs: int) -> dict:
    """CPU per tx of the node (its event loop and writer threads), its index workers and this
    client process: where the machine's two cores went during the measured writes."""
    after = _process_cpu_seconds(node.process.pid)
    client = time.process_time() - client_before
    out = {"client_cpu_us_per_tx": client / txs * 1e6}
    if before is not None and after is not None:
        out["node_cpu_us_per_tx"] = (after[0] - before[0]) / txs * 1e6
        out["index_workers_cpu_us_per_tx"] = max(0.0, after[1] - before[1]) / txs * 1e6
    return out


def _durable(node) -> bool:
    return "--synced=false" not in node.extra_args


async def _clients(node, count: int):
    clients = [AsyncClient(node.host, node.port) for _ in range(count)]
    for client in clients:
        await client.login("immudb", "immudb")
    return clients


def concurrent_sets(node, connections: int, txs_per_connection: int) -> dict:
    """``connections`` clients, each doing sequential single-entry durable sets."""
    async def main():
        clients = await _clients(node, connections)

        async def work(index, client):
            for n in range(txs_per_connection):
                await client.set({f"c{index}-{n}".encode(): b"x" * 100})

        cpu_before = _process_cpu_seconds(node.process.pid), time.process_time()
        start = time.perf_counter()
        await asyncio.gather(*(work(i, c) for i, c in enumerate(clients)))
        elapsed = time.perf_counter() - start
        cpu = _cpu_per_tx(node, *cpu_before, connections * txs_per_connection)
        for client in clients:
            await client.close()
        return elapsed, cpu

    elapsed, cpu = run_on_uvloop(main())
    total = connections * txs_per_connection
    return {"connections": connections, "txs": total, "entries_per_tx": 1,
            "durable": _durable(node),
            "tx_per_s": total / elapsed, **cpu}


def batched_sets(node, txs: int, entries: int = 1000, in_flight: int = 4) -> dict:
    """One connection sending 1000-entry sets, ``in_flight`` pipelined at a time."""
    payloads = [{os.urandom(32): os.urandom(100) for _ in range(entries)} for _ in range(txs)]

    async def main():
        (client,) = await _clients(node, 1)
        semaphore = asyncio.Semaphore(in_flight)

        async def one(kvs):
            async with semaphore:
                await client.set(kvs)

        start = time.perf_counter()
        await asyncio.gather(*(one(p) for p in payloads))
        elapsed = time.perf_counter() - start
        await client.close()
        return elapsed

    elapsed = run_on_uvloop(main())
    return {"txs": txs, "entries_per_tx": entries, "in_flight": in_flight,
            "durable": _durable(node),
            "entries_per_s": txs * entries / elapsed}


def pipelined_gets(node, gets: int, in_flight: int = 256, bursts: bool = False) -> dict:
    """One connection, ``in_flight`` gets outstanding at all times (pipelining: ``in_flight``
    tasks each sending its next get as soon as its last is answered), on 1000 existing keys.
    ``bursts=True`` instead sends ``in_flight`` gets, waits for all of them, then sends the
    next burst: client and node then take turns instead of working at once. Timed from when the
    index has caught up (a read waits for it): after the 1000-entry set benchmarks the node's
    index worker may still be indexing their entries, and that is not what this measures."""
    async def main():
        (client,) = await _clients(node, 1)
        await client.set({f"key{n}".encode(): b"v" * 100 for n in range(1000)})
        expected = b"v" * 100
        await client.get(b"key0")        # returns once the index covers the set above
        cpu_before = _process_cpu_seconds(node.process.pid), time.process_time()
        start = time.perf_counter()
        if bursts:
            done = 0
            while done < gets:
                burst = min(in_flight, gets - done)
                entries = await asyncio.gather(*(client.get(f"key{(done + i) % 1000}".encode())
                                                 for i in range(burst)))
                if any(e.value != expected for e in entries):
                    raise AssertionError("wrong value")
                done += burst
        else:
            async def worker(first: int):
                for n in range(first, gets, in_flight):
                    if (await client.get(f"key{n % 1000}".encode())).value != expected:
                        raise AssertionError("wrong value")

            await asyncio.gather(*(worker(i) for i in range(in_flight)))
        elapsed = time.perf_counter() - start
        cpu = _cpu_per_tx(node, *cpu_before, gets)
        await client.close()
        return elapsed, cpu

    elapsed, cpu = run_on_uvloop(main())
    return {"gets": gets, "in_flight": in_flight, "mode": "bursts" if bursts else "window",
            "gets_per_s": gets / elapsed,
            **{name.replace("_per_tx", "_per_get"): value for name, value in cpu.items()}}
