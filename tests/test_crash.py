"""Acknowledged writes survive SIGKILL: a child writes, is killed at a seeded moment, we reopen.

Each round checks that every acknowledged tx is present with the acknowledged Alh, that nothing
half-written is visible (the reopened log audits clean: every Eh, Alh, blRoot and AHT node
recomputed), and that the database accepts new writes afterwards.
"""
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from immucore.database import open_database

ROUNDS = int(os.environ.get("IMMUCORE_CRASH_ROUNDS", "6"))
HERE = os.path.dirname(os.path.abspath(__file__))


def _run_and_kill(path: str, mode: str, seed: int) -> dict:
    """Start the child, kill -9 it after a seeded delay, return {tx_id: alh_hex} it acknowledged."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE) + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen([sys.executable, os.path.join(HERE, "crash_writer.py"), path, mode,
                              str(seed)], stdout=subprocess.PIPE, text=True, env=env)
    lines = []
    # Drain stdout while the child runs: a full pipe would block it and the kill would then
    # always land on a blocked write instead of a random point of a commit.
    reader = threading.Thread(target=lambda: lines.extend(child.stdout), daemon=True)
    try:
        reader.start()
        deadline = time.monotonic() + 30
        while not lines and time.monotonic() < deadline:
            time.sleep(0.005)
        assert lines and lines[0].strip() == "ready", "the child did not start"
        time.sleep(random.Random(seed).uniform(0.05, 0.6))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        reader.join(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    acked = {}
    for line in lines[1:]:
        parts = line.split()
        if len(parts) == 3 and parts[0] == "ack":    # the last line may be cut by the kill
            acked[int(parts[1])] = parts[2]
    return acked


def _check_reopened(path: str, acked: dict, replica: bool = False):
    db = open_database(path, replica=replica)
    try:
        state = db.current_state()
        if acked:
            assert state.tx_id >= max(acked), "an acknowledged tx was lost"
        for tx_id, alh_hex in acked.items():
            assert db.tx_by_id(tx_id).header.alh().hex() == alh_hex
        assert db.audit() == state.tx_id
        db.indexed_tx_id  # the index reopened too
        return state.tx_id
    finally:
        db.close()


@pytest.mark.parametrize("round_index", range(ROUNDS))
def test_sigkill_during_group_committed_writes(tmp_path, round_index):
    seed = 1000 + round_index
    path = str(tmp_path / "db")
    total_acked = {}
    for restart in range(2):        # kill, reopen, write more, kill again
        acked = _run_and_kill(path, "set", seed * 10 + restart)
        total_acked.update(acked)
        last = _check_reopened(path, total_acked)
        print(f"seed {seed} restart {restart}: {len(acked)} acked, log ends at tx {last}")
    with open_database(path) as db:
        header = db.set({b"after-crash": b"ok"})
        assert db.get(b"after-crash", since_tx=header.id).value == b"ok"


@pytest.mark.parametrize("round_index", range(max(2, ROUNDS // 2)))
def test_sigkill_during_replication_apply(tmp_path, round_index):
    seed = 2000 + round_index
    path = str(tmp_path / "replica")
    with open_database(path + "-source") as source:
        for n in range(300):
            source.set({f"k{n}-{i}".encode(): os.urandom(64) for i in range(10)})
        source_alhs = {tx_id: source.tx_by_id(tx_id).header.alh().hex()
                       for tx_id in range(1, 301)}
    acked = _run_and_kill(path, "replicate", seed)
    last = _check_reopened(path, acked, replica=True)
    for tx_id in range(1, last + 1):     # the replica is a prefix of its source
        assert acked.get(tx_id, source_alhs[tx_id]) == source_alhs[tx_id]
    # Resume from last durable + 1: the rest applies, nothing is applied twice.
    with open_database(path + "-source") as source, open_database(path, replica=True) as db:
        db.replicate_txs(source.export_txs(last + 1, 10_000))
        assert db.current_state().tx_hash == source.current_state().tx_hash
