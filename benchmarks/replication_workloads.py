"""Catch-up of a replica over loopback: real primary and replica nodes, durable, all checks on.

The primary's log is built with the embedded API before its node starts (that is not what is
measured); then a fresh replica database is created on a second node and the clock runs until it
holds every tx. Printed beside it, in the same run: the same copy in immudb's shape (one
EXPORT_TX and one REPLICATE_TX round trip per tx, over a bounded prefix), the catch-up of a
replica following the primary over immudb's gRPC ``streamExportTx`` (one tx per message,
pipelined: replication/grpc_source.py) over the first ``grpc_txs``, and the raw floor (LMDB
putmulti + one SHA-256 per blob of the same bytes)."""
from __future__ import annotations

import os
import time
from concurrent.futures import wait

from immucore.client import Client
from immucore.database import open_database

from . import store_workloads
from tests.nodes import NodeProcess, free_port


def build_primary(base_dir: str, txs: int, entries: int) -> None:
    """A node folder's defaultdb holding ``txs`` txs of ``entries`` random 32-byte keys and
    100-byte values, indexed, built with the embedded API before the node starts."""
    db = open_database(os.path.join(base_dir, "data", "defaultdb"), name="defaultdb")
    try:
        window = []
        for _ in range(txs):
            window.append(db.set_async({os.urandom(32): os.urandom(100) for _ in range(entries)}))
            if len(window) >= 2000:
                wait(window)
                window = []
        wait(window)
        # A primary still indexing what was just written would take a core from the catch-up
        # being measured; a primary in service has long indexed its old txs.
        while not db.index_covers():
            time.sleep(0.1)
    finally:
        db.close()


def _memory_bytes(pid: int, field: str) -> int:
    """A /proc/<pid>/status field: ``RssAnon`` is the process's own memory; ``VmHWM`` (peak
    RSS) also counts the LMDB files' pages mapped in, which the kernel can drop at will."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _tree_memory_bytes(pid: int, field: str) -> int:
    """``_memory_bytes`` summed over a node and its child processes (its index workers)."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            total += _memory_bytes(current, field)
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    pending += [int(child) for child in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue                  # a process or thread that ended meanwhile
    return total


def _held(client, txs: int, start: float, progress, what: str) -> None:
    """Wait until ``client``'s database holds ``txs`` txs, printing progress."""
    last_print = 0.0
    while True:
        held = client.current_state().tx_id
        now = time.perf_counter() - start
        if held >= txs:
            return
        if now - last_print >= 2:
            progress(f"  {what}: {held:,}/{txs:,} txs, {held / max(now, 1e-9):,.0f} tx/s")
            last_print = now
        if now > 3600:
            raise TimeoutError(f"{what} did not finish within an hour")
        time.sleep(0.02)


def catch_up(workdir: str, txs: int, entries: int = 10, baseline_txs: int = 2000,
             progress=print, grpc_txs: int = 0) -> dict:
    grpc_port = free_port()
    primary = NodeProcess(os.path.join(workdir, "primary"), ["--grpc-port", str(grpc_port)])
    build_primary(primary.base_dir, txs, entries)
    replica = NodeProcess(os.path.join(workdir, "replica"))
    primary.start()
    replica.start()
    try:
        with Client(primary.host, primary.port) as p, Client(replica.host, replica.port) as r:
            p.login("immudb", "immudb")
            r.login("immudb", "immudb")
            start = time.perf_counter()
            r.create_database("replicadb", {
                "replica": True, "primary_database": "defaultdb", "primary_host": primary.host,
                "primary_port": primary.port, "primary_username": "immudb",
                "primary_password": "immudb"})
            r.use_database("replicadb")
            last_print = 0.0
            anon_peak = 0
            while True:
                anon_peak = max(anon_peak, _tree_memory_bytes(replica.process.pid, "RssAnon"))
                held = r.current_state().tx_id
                now = time.perf_counter() - start
                if held >= txs:
                    break
                if now - last_print >= 2:
                    progress(f"  catch-up: {held:,}/{txs:,} txs, {held / max(now, 1e-9):,.0f} tx/s")
                    last_print = now
                if now > 3600:
                    raise TimeoutError("catch-up did not finish within an hour")
                time.sleep(0.02)
            elapsed = time.perf_counter() - start
            assert r.current_state().tx_hash == p.current_state().tx_hash
            rss = _tree_memory_bytes(replica.process.pid, "VmHWM")

            # immudb's shape: one export and one replicate round trip per tx
            r.create_database("onebyone", {"replica": True})
            r.use_database("onebyone")
            count = min(baseline_txs, txs)
            t0 = time.perf_counter()
            for tx_id in range(1, count + 1):
                r.replicate_tx(p.export_tx(tx_id))
            one_by_one = count / (time.perf_counter() - t0)

            # immudb's gRPC replication: streamExportTx, one tx per message
            grpc_count = min(grpc_txs or txs, txs)
            t0 = time.perf_counter()
            r.create_database("grpcdb", {
                "replica": True, "primary_database": "defaultdb", "primary_host": primary.host,
                "primary_port": grpc_port, "primary_username": "immudb",
                "primary_password": "immudb", "primary_protocol": "grpc"})
            r.use_database("grpcdb")
            _held(r, grpc_count, t0, progress, "gRPC catch-up")
            over_grpc = grpc_count / (time.perf_counter() - t0)
            r.update_database("grpcdb", {"replica": True, "primary_host": ""})   # stop it
            blobs = p.export_txs(1, min(txs, 10_000))
    finally:
        primary.stop()
        replica.stop()
    floor = store_workloads.raw_floor(workdir, blobs, 1000, True)
    rate = txs / elapsed
    return {"txs": txs, "entries_per_tx": entries, "durable": True, "checks": "all",
            "tx_per_s": rate, "entries_per_s": rate * entries,
            "replica_anon_rss_peak_mb": round(anon_peak / 2**20, 1),
            "replica_rss_peak_incl_mapped_files_mb": round(rss / 2**20, 1),
            "one_tx_per_round_trip_tx_per_s": one_by_one,
            "batched_vs_one_by_one": rate / one_by_one,
            "grpc_stream_export_txs": grpc_count, "grpc_stream_export_tx_per_s": over_grpc,
            "batched_vs_grpc_stream_export": rate / over_grpc, "floor_tx_per_s": floor}
