"""How fast this machine is at the moment, measured beside each round of the node benchmarks.

The machine's speed swings from minute to minute (its two cores are shared): the same code has
run the 32-connection sets at 11,000 tx/s in one hour and 19,000 in another. A rate alone
cannot say whether a change or the machine moved it, so every round records two probes taken
just before it:

* ``machine_python_loop_ms``: one thread running a fixed pure-Python loop (the kind of work
  the node's event loop does), best of PROBE_LOOP_REPEATS; higher means a slower CPU;
* ``machine_flush_us``: the median time to overwrite one 4 KiB page of a file in the node's
  data folder and ``fdatasync`` it (the device flush that bounds a durable commit).
"""
from __future__ import annotations

import os
import statistics
import time

PROBE_LOOP_ITERATIONS = 1_000_000
PROBE_LOOP_REPEATS = 2
PROBE_FLUSHES = 20
_PAGE = b"\xa5" * 4096


def python_loop_ms() -> float:
    best = float("inf")
    for _ in range(PROBE_LOOP_REPEATS):
        start = time.perf_counter()
        total = 0
        for i in range(PROBE_LOOP_ITERATIONS):
            total += i
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def flush_us(directory: str) -> float:
    """Median page-overwrite + fdatasync time in ``directory`` (the file is removed after)."""
    path = os.path.join(directory, ".machine-probe")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.pwrite(fd, _PAGE, 0)
        os.fsync(fd)                  # the block is allocated: later flushes are data only
        times = []
        for _ in range(PROBE_FLUSHES):
            os.pwrite(fd, _PAGE, 0)
            start = time.perf_counter()
            os.fdatasync(fd)
            times.append(time.perf_counter() - start)
    finally:
        os.close(fd)
        os.unlink(path)
    return statistics.median(times) * 1e6


def probe(directory: str) -> dict:
    return {"machine_python_loop_ms": round(python_loop_ms(), 1),
            "machine_flush_us": round(flush_us(directory))}
