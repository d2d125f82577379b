"""The sync primary's acknowledgement table (immucore/replication/acks.py), without a network."""
from __future__ import annotations

import asyncio

import pytest

from immucore.errors import DatabaseClosedError
from immucore.replication.acks import ReplicationTimeoutError, SyncAcks


def _run(coro):
    return asyncio.run(coro)


def test_quorum_is_the_nth_highest_replica():
    required = [2]
    acks = SyncAcks(lambda: required[0])
    acks.acknowledge("a", 10)
    assert acks.held_by_quorum() == 0           # one replica of two
    acks.acknowledge("b", 7)
    assert acks.held_by_quorum() == 7
    acks.acknowledge("c", 9)
    assert acks.held_by_quorum() == 9
    required[0] = 3
    assert acks.held_by_quorum() == 7


def test_a_replica_reconnecting_counts_once_and_never_goes_back():
    acks = SyncAcks(lambda: 2)
    acks.acknowledge("node-1/db", 5)
    acks.acknowledge("node-1/db", 8)
    acks.acknowledge("node-1/db", 3)            # a late, older ack changes nothing
    assert acks.replicas() == {"node-1/db": 8}
    assert acks.held_by_quorum() == 0


def test_a_write_waits_until_the_quorum_holds_it():
    async def scenario():
        acks = SyncAcks(lambda: 1)
        waiting = asyncio.ensure_future(acks.wait(3, 5))
        await asyncio.sleep(0.01)
        acks.acknowledge("r", 2)
        await asyncio.sleep(0.01)
        assert not waiting.done()
        acks.acknowledge("r", 3)
        await asyncio.wait_for(waiting, 1)
    _run(scenario())


def test_too_few_replicas_time_out_with_a_clear_error():
    async def scenario():
        acks = SyncAcks(lambda: 2)
        acks.acknowledge("r", 4)
        with pytest.raises(ReplicationTimeoutError,
                           match="tx 4 is durable on the primary but only 1 of 2 sync replicas"):
            await acks.wait(4, 0.05)
    _run(scenario())


def test_lowering_the_required_acks_releases_waiting_writes():
    async def scenario():
        required = [2]
        acks = SyncAcks(lambda: required[0])
        acks.acknowledge("r", 10)
        waiting = asyncio.ensure_future(acks.wait(10, 5))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        required[0] = 1
        acks.recheck()
        await asyncio.wait_for(waiting, 1)
        required[0] = 0                         # sync turned off: nothing waits at all
        await asyncio.wait_for(acks.wait(99, 5), 1)
    _run(scenario())


def test_closing_fails_every_waiting_write():
    async def scenario():
        acks = SyncAcks(lambda: 1)
        waiting = asyncio.ensure_future(acks.wait(1, 30))
        await asyncio.sleep(0.01)
        acks.fail_all(DatabaseClosedError())
        with pytest.raises(DatabaseClosedError):
            await asyncio.wait_for(waiting, 1)
    _run(scenario())


def test_the_table_is_bounded_forgetting_the_longest_silent_replica():
    acks = SyncAcks(lambda: 1, replicas_max=3)
    for n in range(5):
        acks.acknowledge(f"r{n}", n + 1)
    assert sorted(acks.replicas()) == ["r2", "r3", "r4"]


def test_writes_that_gave_up_do_not_accumulate():
    async def scenario():
        acks = SyncAcks(lambda: 1)
        for tx_id in range(1, 50):
            with pytest.raises(ReplicationTimeoutError):
                await acks.wait(tx_id, 0.001)
        assert len(acks._waiters) == 0
    _run(scenario())


def test_after_closing_no_write_waits_not_even_one_committed_later():
    async def scenario():
        acks = SyncAcks(lambda: 1)
        acks.fail_all(DatabaseClosedError())
        with pytest.raises(DatabaseClosedError):
            await asyncio.wait_for(acks.wait(5, 30), 1)
    _run(scenario())


def test_many_writes_giving_up_at_once_stay_cheap():
    """An outage with thousands of waiting writes: their timeouts must not cost the event loop
    quadratic time."""
    async def scenario():
        acks = SyncAcks(lambda: 1)
        started = asyncio.get_running_loop().time()
        results = await asyncio.gather(*(acks.wait(n, 0.2) for n in range(1, 5001)),
                                       return_exceptions=True)
        assert all(isinstance(r, ReplicationTimeoutError) for r in results)
        assert asyncio.get_running_loop().time() - started < 3
        assert len(acks._waiters) <= 2500
    _run(scenario())
