"""R12 (docs/reliability.md): many small databases, each with a replica, on one
node. Writers hit every primary at once; every replica must converge (no replicator starves the
others), and the node's threads, open files and worker processes must stay within a bound per
database and not grow from one round of writes to the next.

The node runs per database a sealer and a committer thread, and per user database an index
worker process (docs/storage.md); a replica adds its replicator, a task on the event loop.
"""
import asyncio
import os
import time

import pytest

from immucore.client import AsyncClient, Client
from immucore.protocol.messages import RemoteError

from .nodes import child_pids, running_node

PRIMARIES = 50
TXS_PER_ROUND = 10
CONVERGE_SECONDS = 60
# measured: ~3.1 threads, ~9 open files and one index worker per database
THREADS_PER_DATABASE_MAX = 4
FILES_PER_DATABASE_MAX = 12
BASE_THREADS_MAX = 32           # the event loop, read pool, systemdb/defaultdb and their kin
BASE_FILES_MAX = 64             # listening socket, logs, the client connections of this test


def _resources(pid: int) -> dict:
    return {"threads": len(os.listdir(f"/proc/{pid}/task")),
            "files": len(os.listdir(f"/proc/{pid}/fd")), "children": len(child_pids(pid))}


def _replica_settings(node, primary: str) -> dict:
    return {"replica": True, "primary_database": primary, "primary_host": node.host,
            "primary_port": node.port, "primary_username": "immudb",
            "primary_password": "immudb"}


async def _write_to_every_primary(node, round_number: int):
    """One connection per primary, all writing at once."""
    async def write(index: int):
        client = AsyncClient(node.host, node.port)
        await client.login("immudb", "immudb", f"primary{index}")
        for n in range(TXS_PER_ROUND):
            await client.set({f"r{round_number}-{n}".encode(): f"{index}".encode()})
        await client.close()

    await asyncio.gather(*(write(index) for index in range(PRIMARIES)))


def _lagging(admin: Client) -> list:
    """Replicas whose state differs from their primary's."""
    lagging = []
    for index in range(PRIMARIES):
        admin.use_database(f"primary{index}")
        primary = admin.current_state()
        admin.use_database(f"replica{index}")
        replica = admin.current_state()
        if (replica.tx_id, replica.tx_hash) != (primary.tx_id, primary.tx_hash):
            lagging.append(f"replica{index} at {replica.tx_id} of {primary.tx_id}")
    return lagging


def _wait_converged(admin: Client):
    deadline = time.monotonic() + CONVERGE_SECONDS
    while True:
        lagging = _lagging(admin)
        if not lagging:
            return
        assert time.monotonic() < deadline, f"not converged: {lagging[:5]}"
        time.sleep(0.2)


def test_fifty_databases_each_with_a_replica_on_one_node(tmp_path):
    # every replicator holds a session on its primary, as in immudb: 50 of them, 50 writers and
    # this admin pass the default of 100 sessions; 101 databases pass the default of 100 active
    with running_node(tmp_path / "node", "--max-sessions=200",
                      f"--max-active-databases={2 * PRIMARIES + 1}") as node, \
            Client(node.host, node.port) as admin:
        admin.login("immudb", "immudb")
        for index in range(PRIMARIES):
            admin.create_database(f"primary{index}")
        for index in range(PRIMARIES):
            admin.create_database(f"replica{index}",
                                  _replica_settings(node, f"primary{index}"))
        databases = 2 * PRIMARIES + 2                     # with systemdb and defaultdb
        rounds = []
        for round_number in range(2):
            asyncio.run(_write_to_every_primary(node, round_number))
            _wait_converged(admin)
            rounds.append(_resources(node.process.pid))
        print(f"\n{databases} databases: {rounds}")
        first, second = rounds
        assert first["threads"] <= THREADS_PER_DATABASE_MAX * databases + BASE_THREADS_MAX
        assert first["files"] <= FILES_PER_DATABASE_MAX * databases + BASE_FILES_MAX
        assert first["children"] == 2 * PRIMARIES + 1     # an index worker per user database
        # nothing piles up from one round of writes to the next (pools may add a thread)
        assert second["threads"] <= first["threads"] + 2
        assert second["children"] == first["children"]
        assert second["files"] <= first["files"] + 4      # a connection closing meanwhile
        for index in (0, PRIMARIES - 1):
            admin.use_database(f"replica{index}")
            assert admin.get(f"r1-{TXS_PER_ROUND - 1}".encode()).value == f"{index}".encode()
            status = next(d for d in admin.list_databases()
                          if d["name"] == f"replica{index}")["replication"]
            assert status["state"] == "following" and status["lag_txs"] == 0


def test_databases_past_the_active_limit_are_refused_naming_the_flag(tmp_path):
    """--max-active-databases bounds the databases loaded at once (each runs an index worker):
    a create or load past it is refused before anything is written, a start loads what fits."""
    with running_node(tmp_path / "node", "--max-active-databases=3") as node, \
            Client(node.host, node.port) as admin:
        admin.login("immudb", "immudb")
        admin.create_database("first")
        admin.create_database("second")             # with defaultdb: 3
        workers = len(child_pids(node.process.pid))
        with pytest.raises(RemoteError) as refused:
            admin.create_database("third")
        assert refused.value.code == "too_many_databases"
        assert "database third not created: 3 databases are loaded" in str(refused.value)
        assert "--max-active-databases 3" in str(refused.value)
        listed = [d["name"] for d in admin.list_databases()]
        assert "third" not in listed and len(child_pids(node.process.pid)) == workers
        admin.unload_database("second")
        admin.create_database("third")              # room again
        with pytest.raises(RemoteError) as refused:
            admin.load_database("second")
        assert refused.value.code == "too_many_databases"
        assert "database second not loaded" in str(refused.value)
        admin.unload_database("third")
        admin.load_database("second")
        admin.use_database("second")
        admin.set({b"key": b"value"})
        assert admin.get(b"key").value == b"value"
        # all three user databases load at start (autoload): the node loads what fits, says so
        node.restart()
        with Client(node.host, node.port) as again:
            again.login("immudb", "immudb")
            loaded = {d["name"]: d["loaded"] for d in again.list_databases()}
        assert sum(loaded.values()) == 3 and not all(loaded.values()), loaded
        left_out = next(name for name, up in loaded.items() if not up)
        assert f"database {left_out} not loaded: 3 databases are loaded" in node.log()
