"""Workloads of the embedded-store benchmarks, shared by pytest-benchmark and the script.

Each function takes its sizes as arguments, runs on a fresh database in ``workdir`` and returns a
dict of what it measured (throughputs, and the settings that produced them). Durable unless the
caller says otherwise: every commit fsynced (LMDB sync=True, metasync=True).
"""
from __future__ import annotations

import os
import shutil
import struct
import threading
import time
from concurrent.futures import wait

import lmdb

from immucore import codec
from immucore.database import open_database

_U64 = struct.Struct(">Q")


def _fresh(workdir: str, name: str, **options):
    path = os.path.join(workdir, name)
    shutil.rmtree(path, ignore_errors=True)
    return open_database(path, name=name, **options)


def _kvs(entries: int, key_size: int, value_size: int) -> dict:
    """Random keys (so the index sees random B-tree inserts) and random values."""
    return {os.urandom(key_size): os.urandom(value_size) for _ in range(entries)}


def set_large_txs(workdir: str, txs: int, entries: int = 1000, key_size: int = 32,
                  value_size: int = 100, durable: bool = True, writers: int = 1) -> dict:
    """Durable ``set`` of ``txs`` transactions of ``entries`` entries from ``writers`` threads
    (group commit merges their txs; the key index follows asynchronously and is waited for
    after the clock stops)."""
    payloads = [_kvs(entries, key_size, value_size) for _ in range(txs)]
    db = _fresh(workdir, "set_large", durable=durable)

    def work(share):
        for kvs in share:
            db.set(kvs)

    threads = [threading.Thread(target=work, args=(payloads[i::writers],))
               for i in range(writers)]
    try:
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        db._indexer.wait_for(db.current_state().tx_id, 600)
    finally:
        db.close()
    return {"txs": txs, "entries_per_tx": entries, "writers": writers, "key_bytes": key_size,
            "value_bytes": value_size, "durable": durable, "seconds": elapsed,
            "entries_per_s": txs * entries / elapsed, "tx_per_s": txs / elapsed}


def concurrent_writers(workdir: str, writers: int, txs_per_writer: int,
                       durable: bool = True) -> dict:
    """``writers`` threads each doing ``txs_per_writer`` single-entry durable sets."""
    db = _fresh(workdir, "concurrent", durable=durable)
    barrier = threading.Barrier(writers + 1)

    def work(worker: int):
        keys = [f"w{worker}-{n}".encode() for n in range(txs_per_writer)]
        barrier.wait()
        for key in keys:
            db.set({key: b"x" * 100})

    threads = [threading.Thread(target=work, args=(w,)) for w in range(writers)]
    try:
        for t in threads:
            t.start()
        barrier.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
    finally:
        db.close()
    total = writers * txs_per_writer
    return {"writers": writers, "txs": total, "durable": durable, "seconds": elapsed,
            "tx_per_s": total / elapsed}


def sets_in_flight(workdir: str, in_flight: int, txs: int, durable: bool = True) -> dict:
    """Single-entry sets kept ``in_flight`` at a time by callback: each commit's callback (on a
    writer thread) submits the next set at once, so no thread of the benchmark waits or wakes.
    The writer's own capacity at that concurrency: what the node's 32 connections of
    single-entry SETs would get with no network, event loop or client in between."""
    db = _fresh(workdir, "in-flight", durable=durable)
    lock = threading.Lock()
    done = threading.Event()
    state = {"submitted": 0, "committed": 0, "error": None}

    def submit():
        with lock:
            n = state["submitted"]
            if n >= txs:
                return
            state["submitted"] = n + 1
        db.set_flat_async([b"k%d" % n, b"x" * 100], block=False, on_done=committed)

    def committed(headers, exc):
        with lock:
            state["committed"] += 1
            if exc is not None and state["error"] is None:
                state["error"] = exc
            finished = state["committed"] == txs or state["error"] is not None
        if finished:
            done.set()
            return
        try:
            submit()
        except Exception as error:  # noqa: BLE001 - reported below, not lost on a writer thread
            with lock:
                state["error"] = state["error"] or error
            done.set()

    try:
        start = time.perf_counter()
        for _ in range(in_flight):
            submit()
        if not done.wait(600):
            raise TimeoutError(f"{state['committed']} of {txs} sets committed in 600 s")
        elapsed = time.perf_counter() - start
        if state["error"] is not None:
            raise state["error"]
    finally:
        db.close()
    return {"in_flight": in_flight, "txs": txs, "durable": durable, "seconds": elapsed,
            "tx_per_s": txs / elapsed}


def index_throughput(workdir: str, txs: int, entries: int = 10, key_size: int = 32,
                     value_size: int = 100, durable: bool = True) -> dict:
    """Random keys, ``entries`` per tx. Two measures: how fast the async index follows the log
    while writers run (bounded by the writers), and how fast it indexes a backlog by itself
    (the index folder removed and rebuilt from the log on reopen: the index's own capacity)."""
    payloads = [_kvs(entries, key_size, value_size) for _ in range(txs)]
    db = _fresh(workdir, "index", durable=durable)
    try:
        start = time.perf_counter()
        window = []
        for kvs in payloads:          # keep many txs in flight so group commit batches them
            window.append(db.set_async(kvs))
            if len(window) >= 2000:
                wait(window)
                window = []
        wait(window)
        log_done = time.perf_counter() - start
        lag_txs_at_log_end = db.current_state().tx_id - db.indexed_tx_id
        db._indexer.wait_for(db.current_state().tx_id, 3600)
        index_done = time.perf_counter() - start
    finally:
        db.close()
    shutil.rmtree(os.path.join(workdir, "index", "index"))
    start = time.perf_counter()
    db = open_database(os.path.join(workdir, "index"), name="index", durable=durable)
    try:
        db._indexer.wait_for(txs, 3600)
        rebuild = time.perf_counter() - start
    finally:
        db.close()
    return {"txs": txs, "entries_per_tx": entries, "durable": durable,
            "log_entries_per_s": txs * entries / log_done,
            "index_following_entries_per_s": txs * entries / index_done,
            "index_lag_txs_when_log_finished": lag_txs_at_log_end,
            "index_backlog_entries_per_s": txs * entries / rebuild}


def replicate_apply(workdir: str, txs: int, batch_txs: int = 1000, entries: int = 10,
                    durable: bool = True, in_flight: int = 3) -> dict:
    """Apply ``txs`` exported txs on a replica in batches of ``batch_txs``, keeping up to
    ``in_flight`` batches submitted (as a replicator does: the next batch hashes while the
    previous one is fsynced); also the same-run floor and the index catch-up time."""
    source = _fresh(workdir, "rep_source", durable=False)
    try:
        window = []
        for n in range(txs):
            window.append(source.set_async(_kvs(entries, 32, 100)))
            if len(window) >= 2000:
                wait(window)
                window = []
        wait(window)
        blobs = source.export_txs(1, txs)
    finally:
        source.close()
    replica = _fresh(workdir, "rep_replica", replica=True, durable=durable)
    try:
        start = time.perf_counter()
        window = []
        for i in range(0, txs, batch_txs):
            window.append(replica.replicate_txs_async(blobs[i:i + batch_txs]))
            if len(window) >= in_flight:
                window.pop(0).result()
        for future in window:
            future.result()
        elapsed = time.perf_counter() - start
        replica._indexer.wait_for(txs, 3600)
        indexed = time.perf_counter() - start
    finally:
        replica.close()
    floor = raw_floor(workdir, blobs, batch_txs, durable)
    rate = txs / elapsed
    return {"txs": txs, "entries_per_tx": entries, "batch_txs": batch_txs, "durable": durable,
            "in_flight_batches": in_flight, "codec": codec.IMPLEMENTATION, "tx_per_s": rate,
            "indexed_tx_per_s": txs / indexed,
            "floor_tx_per_s": floor, "ratio_to_floor": rate / floor}


def raw_floor(workdir: str, blobs: list, batch_txs: int, durable: bool) -> float:
    """Raw LMDB ``putmulti`` of the same bytes + one SHA-256 over each blob: the least any
    verifying replica must do."""
    path = os.path.join(workdir, "rep_floor")
    shutil.rmtree(path, ignore_errors=True)
    env = lmdb.open(path, map_size=1 << 36, sync=durable, metasync=durable, max_dbs=1,
                    writemap=False, map_async=False, readahead=False)
    try:
        start = time.perf_counter()
        for i in range(0, len(blobs), batch_txs):
            rows = [(_U64.pack(i + n + 1), blob + codec.sha256(blob))
                    for n, blob in enumerate(blobs[i:i + batch_txs])]
            with env.begin(write=True) as txn:
                txn.cursor().putmulti(rows, append=True)
        return len(blobs) / (time.perf_counter() - start)
    finally:
        env.close()
        shutil.rmtree(path, ignore_errors=True)
