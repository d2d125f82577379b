"""A replica discarding precommitted txs (``--replication-allow-tx-discarding``): the log, its
hash tree and the key index are cut back together, never at or below the discard floor, and the
replica then follows another history as if the discarded txs had never been there."""
from __future__ import annotations

import pytest

from immucore.database import open_database
from immucore.errors import IllegalArgumentsError, KeyNotFoundError, NotReplicaError

from .test_database import assert_chain_verifies


def _history(primary, first: int, last: int, tag: bytes):
    for n in range(first, last + 1):
        primary.set({b"k%d" % n: tag + b"%d" % n, b"shared": tag + b"%d" % n})


def _replicate(primary, replica, first: int, floor: int = 0):
    blobs = primary.export_txs(first, 1000)
    replica.replicate_txs_async(blobs, floor_tx_id=floor).result()


@pytest.fixture(params=["index thread", "index worker"])
def replica(request, tmp_path):
    """The replica, indexed by a thread (embedded) or by a worker process (as in the node):
    a discard pauses either, rewinds the index and resumes it."""
    database = open_database(str(tmp_path / "replica"), name="replicadb", replica=True,
                             index_worker=request.param == "index worker")
    yield database
    database.close()


@pytest.fixture
def fork(tmp_path):
    """Two primaries sharing txs 1..5, then each with its own txs 6..8."""
    a = open_database(str(tmp_path / "a"), name="a")
    b = open_database(str(tmp_path / "b"), name="b", replica=True)
    _history(a, 1, 5, b"common")
    _replicate(a, b, 1)
    b.set_replica(False)
    _history(a, 6, 8, b"a")
    _history(b, 6, 8, b"b")
    yield a, b
    a.close()
    b.close()


def test_discarding_cuts_log_index_and_hash_tree_back(fork, replica):
    a, _ = fork
    _replicate(a, replica, 1, floor=5)
    assert replica.get(b"k7").value == b"a7"
    state = replica.discard_txs_after(5)
    assert state.tx_id == 5 and state.tx_hash == a.tx_by_id(5).header.alh()
    assert replica.current_state() == state
    with pytest.raises(KeyNotFoundError):
        replica.get(b"k7")
    assert replica.get(b"shared").value == b"common5"
    assert [e.tx for e in replica.history(b"shared")] == [1, 2, 3, 4, 5]
    assert_chain_verifies(replica)
    assert replica.audit() == 5


def test_after_discarding_the_replica_follows_the_other_history(fork, replica):
    a, b = fork
    _replicate(a, replica, 1, floor=5)
    replica.discard_txs_after(5)
    _replicate(b, replica, 6, floor=8)
    assert replica.current_state().tx_hash == b.current_state().tx_hash
    assert replica.get(b"k7").value == b"b7"
    assert replica.get(b"shared").value == b"b8"
    assert_chain_verifies(replica)
    # proofs against the new history verify from the replica's own hash tree
    assert replica.verifiable_tx_by_id(8, prove_since_tx=3).dual_proof is not None


def test_nothing_at_or_below_the_floor_is_ever_discarded(fork, replica):
    a, _ = fork
    _replicate(a, replica, 1, floor=6)
    assert replica.discard_floor == 6
    with pytest.raises(IllegalArgumentsError, match="only precommitted transactions"):
        replica.discard_txs_after(5)
    assert replica.current_state().tx_id == 8
    assert replica.discard_txs_after(6).tx_id == 6


def test_the_floor_survives_a_restart_and_never_decreases(fork, tmp_path):
    a, _ = fork
    path = str(tmp_path / "r")
    replica = open_database(path, name="r", replica=True)
    _replicate(a, replica, 1, floor=6)
    replica.replicate_txs_async([], floor_tx_id=2).result()     # a lower report changes nothing
    replica.close()
    replica = open_database(path, name="r", replica=True)
    try:
        assert replica.discard_floor == 6
        with pytest.raises(IllegalArgumentsError):
            replica.discard_txs_after(4)
    finally:
        replica.close()


def test_a_discard_survives_a_restart(fork, tmp_path):
    a, b = fork
    path = str(tmp_path / "r")
    replica = open_database(path, name="r", replica=True)
    _replicate(a, replica, 1, floor=5)
    replica.discard_txs_after(5)
    replica.close()
    replica = open_database(path, name="r", replica=True)
    try:
        assert replica.current_state().tx_id == 5
        with pytest.raises(KeyNotFoundError):
            replica.get(b"k6")
        _replicate(b, replica, 6)
        assert replica.current_state().tx_hash == b.current_state().tx_hash
        assert replica.audit() == 8
    finally:
        replica.close()


def test_discarding_everything_leaves_an_empty_replica(fork, replica):
    a, _ = fork
    _replicate(a, replica, 1)
    assert replica.discard_txs_after(0).tx_id == 0
    with pytest.raises(KeyNotFoundError):
        replica.get(b"k1")
    _replicate(a, replica, 1)
    assert replica.current_state().tx_hash == a.current_state().tx_hash


def test_a_primary_never_discards(db):
    db.set({b"a": b"1"})
    with pytest.raises(NotReplicaError):
        db.discard_txs_after(0)


def test_a_demoted_primary_never_discards_what_it_acknowledged(db):
    _history(db, 1, 4, b"mine")
    db.set_replica(True)
    assert db.discard_floor == 4
    with pytest.raises(IllegalArgumentsError, match="only precommitted transactions"):
        db.discard_txs_after(3)


def test_updating_a_replica_keeps_its_floor(fork, replica):
    a, _ = fork
    _replicate(a, replica, 1, floor=5)
    replica.set_replica(True)                 # e.g. re-pointed at another primary
    assert replica.discard_floor == 5
    assert replica.discard_txs_after(5).tx_id == 5
