"""hot-backup and hot-restore throughput: the real immuadmin CLI against a real node.

The source database's log (N txs of ``entries`` random 32-byte keys and 100-byte values) is
built with the embedded API before its node starts (that is not what is measured). Then, timed
from the CLI's start to its exit (process start-up included, durable on both ends): hot-backup
of the whole database to a file, and hot-restore of that file into a new database on the same
node (every tx verified, applied and fsynced)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

from immucore.client import Client

from tests.nodes import NodeProcess

from .replication_workloads import build_primary

CLI_SECONDS_MAX = 3600



def _immuadmin(node, home: str, *args, stdin: bytes = b"") -> float:
    """Run immuadmin; return its wall time in seconds."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "immucore.cli.immuadmin", "-p", str(node.port),
                           *args], input=stdin, capture_output=True, timeout=CLI_SECONDS_MAX,
                          env=dict(os.environ, IMMUCORE_CLI_HOME=home))
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"immuadmin {args}: {done.stderr.decode()}")
    return elapsed


def backup_and_restore(workdir: str, txs: int, entries: int = 10) -> dict:
    node = NodeProcess(os.path.join(workdir, "node"))
    build_primary(node.base_dir, txs, entries)
    home = os.path.join(workdir, "home")
    os.makedirs(home, exist_ok=True)
    path = os.path.join(workdir, "full.bak")
    node.start()
    try:
        _immuadmin(node, home, "login", "immudb", stdin=b"immudb\n")
        backup_s = _immuadmin(node, home, "hot-backup", "defaultdb", "-o", path)
        restore_s = _immuadmin(node, home, "hot-restore", "restored", "-i", path)
        with Client(node.host, node.port) as client:
            client.login("immudb", "immudb")
            source = client.current_state()
            client.use_database("restored")
            assert client.current_state().tx_hash == source.tx_hash
    finally:
        node.stop()
    return {"txs": txs, "entries_per_tx": entries, "durable": True,
            "file_mb": round(os.path.getsize(path) / 2**20, 1),
            "backup_s": backup_s, "backup_tx_per_s": txs / backup_s,
            "restore_s": restore_s, "restore_tx_per_s": txs / restore_s}
