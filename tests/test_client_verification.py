"""The client's own checks of what a node proves: the proofs come from a real embedded database
(what a node would send), and each test alters one part the way a lying or broken node
could. Every alteration is refused with VerificationError and leaves the trusted state as it
was; the untouched proofs pass and move it forward."""
from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest

from immucore import client as client_module
from immucore.client import AsyncClient, StateStore, default_state_path
from immucore.database import open_database
from immucore.errors import ImmucoreError, VerificationError
from immucore.types import State

replace = dataclasses.replace


@pytest.fixture
def db(tmp_path):
    database = open_database(str(tmp_path / "db"))
    for n in range(1, 9):
        database.set({b"k%d" % n: b"v%d" % n})
    yield database
    database.close()


def _client(db, tamper=lambda answer: answer, state_store="memory") -> AsyncClient:
    """An AsyncClient whose node is ``db``: its verifiable calls answer with the database's own
    proofs, passed through ``tamper`` first. Its trusted states in memory, unless
    ``state_store`` is None (the default file)."""
    client = AsyncClient("127.0.0.1", 1,
                         state_store=StateStore() if state_store == "memory" else state_store)
    client.database = "defaultdb"

    async def verifiable_get(key, *, prove_since_tx, **options):
        return tamper(db.verifiable_get(key, prove_since_tx=prove_since_tx, **options))

    async def verifiable_tx_by_id(tx_id, *, prove_since_tx):
        return tamper(db.verifiable_tx_by_id(tx_id, prove_since_tx=prove_since_tx))

    client.verifiable_get = verifiable_get
    client.verifiable_tx_by_id = verifiable_tx_by_id
    return client


def _trusted(client):
    return client.state_store.get(client._server_id(), client.database)


def test_untouched_proofs_verify_and_move_the_trusted_state(db):
    client = _client(db)
    assert asyncio.run(client.verified_tx_by_id(3)).header.id == 3
    assert _trusted(client).tx_id == 3
    assert asyncio.run(client.verified_get(b"k7")).value == b"v7"
    assert _trusted(client).tx_id == 7
    assert _trusted(client).tx_hash == db.tx_by_id(7).header.alh()


def _on_vtx(change):
    """Apply ``change`` to the VerifiableTx of a verifiable tx or entry."""
    def tamper(answer):
        if hasattr(answer, "verifiable_tx"):
            return replace(answer, verifiable_tx=change(answer.verifiable_tx))
        return change(answer)
    return tamper


def _on_dual(change):
    return _on_vtx(lambda vtx: replace(vtx, dual_proof=change(vtx.dual_proof)))


def _flip(data: bytes) -> bytes:
    return bytes([data[0] ^ 1]) + data[1:]


TX_TAMPERS = {
    "entry hash": _on_vtx(lambda vtx: replace(vtx, tx=replace(vtx.tx, entries=(
        replace(vtx.tx.entries[0], hvalue=_flip(vtx.tx.entries[0].hvalue)),)))),
    "entry dropped": _on_vtx(lambda vtx: replace(vtx, tx=replace(vtx.tx, entries=()))),
    "header eh": _on_vtx(lambda vtx: replace(vtx, tx=replace(
        vtx.tx, header=replace(vtx.tx.header, eh=_flip(vtx.tx.header.eh))))),
    "target bl_root": _on_dual(lambda p: replace(p, target_tx_header=replace(
        p.target_tx_header, bl_root=_flip(p.target_tx_header.bl_root)))),
    "inclusion term": _on_dual(lambda p: replace(
        p, inclusion_proof=(_flip(p.inclusion_proof[0]),) + tuple(p.inclusion_proof[1:]))),
    "consistency term": _on_dual(lambda p: replace(
        p, consistency_proof=(_flip(p.consistency_proof[0]),) + tuple(p.consistency_proof[1:]))),
    "linear proof term": _on_dual(lambda p: replace(p, linear_proof=replace(
        p.linear_proof, terms=tuple(p.linear_proof.terms[:-1]) + (
            _flip(p.linear_proof.terms[-1]),)))),
    "no dual proof": _on_vtx(lambda vtx: replace(vtx, dual_proof=None)),
    "no linear proof": _on_dual(lambda p: replace(p, linear_proof=None)),
    "terms not bytes": _on_dual(lambda p: replace(p, inclusion_proof=(5,))),
}


@pytest.mark.parametrize("how", sorted(TX_TAMPERS))
def test_an_altered_tx_proof_is_refused_and_trusted_state_kept(db, how):
    client = _client(db)
    asyncio.run(client.verified_tx_by_id(2))             # trust tx 2 first: a real dual proof
    before = _trusted(client)
    client_lied = _client(db, TX_TAMPERS[how])
    client_lied.state_store = client.state_store
    with pytest.raises(VerificationError):
        asyncio.run(client_lied.verified_tx_by_id(6))
    assert _trusted(client) == before


ENTRY_TAMPERS = {
    "value": lambda ve: replace(ve, entry=replace(ve.entry, value=b"other")),
    "key": lambda ve: replace(ve, entry=replace(ve.entry, key=b"k1")),
    "entry tx": lambda ve: replace(ve, entry=replace(ve.entry, tx=ve.entry.tx - 1)),
    "inclusion leaf": lambda ve: replace(ve, inclusion_proof=replace(ve.inclusion_proof, leaf=1)),
    "no inclusion proof": lambda ve: replace(ve, inclusion_proof=None),
    "no entry": lambda ve: replace(ve, entry=None),
    **{f"tx: {how}": tamper for how, tamper in TX_TAMPERS.items()},
}


@pytest.mark.parametrize("how", sorted(ENTRY_TAMPERS))
def test_an_altered_entry_proof_is_refused_and_trusted_state_kept(db, how):
    client = _client(db)
    asyncio.run(client.verified_get(b"k2"))
    before = _trusted(client)
    client_lied = _client(db, ENTRY_TAMPERS[how])
    client_lied.state_store = client.state_store
    with pytest.raises(VerificationError):
        asyncio.run(client_lied.verified_get(b"k6"))
    assert _trusted(client) == before


def test_a_proof_from_a_state_it_does_not_trust_is_refused(db):
    """A node that answers as if the client trusted another tx (here: no trusted state at all
    although the client trusts tx 4)."""
    client = _client(db)
    asyncio.run(client.verified_tx_by_id(4))

    async def from_scratch(tx_id, *, prove_since_tx):
        return db.verifiable_tx_by_id(tx_id, prove_since_tx=tx_id)

    client.verifiable_tx_by_id = from_scratch
    with pytest.raises(VerificationError, match="trusted state"):
        asyncio.run(client.verified_tx_by_id(7))
    assert _trusted(client).tx_id == 4


# --- the trusted states' file -------------------------------------------------------------------

def test_by_default_the_trusted_state_is_kept_in_a_file_a_new_client_reads(db):
    client = _client(db, state_store=None)
    asyncio.run(client.verified_tx_by_id(5))
    path = default_state_path()
    assert StateStore(path).get(client._server_id(), "defaultdb").tx_id == 5   # as after a restart
    client_module._DEFAULT_STORES.clear()                # as in a program started again
    again = _client(db, state_store=None)
    assert _trusted(again).tx_id == 5                   # a new client starts from it
    asyncio.run(again.verified_tx_by_id(7))
    assert StateStore(path).get(client._server_id(), "defaultdb").tx_id == 7


def test_clients_sharing_the_file_keep_each_others_states_and_only_move_forward(tmp_path):
    path = str(tmp_path / "states.json")
    first, second = StateStore(path), StateStore(path)     # as two processes would hold them
    first.put("a:1", State("defaultdb", 7, b"\x07" * 32))
    second.put("b:2", State("defaultdb", 3, b"\x03" * 32))
    second.put("a:1", State("defaultdb", 4, b"\x04" * 32))   # older than what first saved
    on_disk = StateStore(path)
    assert on_disk.get("a:1", "defaultdb").tx_id == 7
    assert on_disk.get("b:2", "defaultdb").tx_id == 3
    with pytest.raises(VerificationError, match="two different histories"):
        second.put("a:1", State("defaultdb", 7, b"\x08" * 32))  # tx 7 with another hash
    assert StateStore(path).get("a:1", "defaultdb").tx_hash == b"\x07" * 32


def test_an_entry_removed_from_the_file_stays_removed(tmp_path):
    """The README's advice for a node rebuilt on the same address: remove its entry. A
    running client's next change must not write it back."""
    path = tmp_path / "states.json"
    store = StateStore(str(path))
    store.put("rebuilt:1", State("defaultdb", 9, b"\x09" * 32))
    store.put("other:2", State("defaultdb", 2, b"\x02" * 32))
    states = json.loads(path.read_text())
    del states["rebuilt:1/defaultdb"]
    path.write_text(json.dumps(states))
    store.put("other:2", State("defaultdb", 3, b"\x03" * 32))
    assert set(json.loads(path.read_text())) == {"other:2/defaultdb"}


def test_a_change_waits_for_the_lock_another_client_holds(tmp_path, monkeypatch):
    import fcntl
    monkeypatch.setattr(client_module, "STATE_FILE_LOCK_WAIT_SECONDS", 0.3)
    path = str(tmp_path / "states.json")
    with open(path + ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ImmucoreError, match="stayed locked"):
            StateStore(path).put("a:1", State("defaultdb", 1, b"\x01" * 32))
    StateStore(path).put("a:1", State("defaultdb", 1, b"\x01" * 32))       # free again
    assert StateStore(path).get("a:1", "defaultdb").tx_id == 1


def test_a_client_that_never_verifies_never_reads_the_file(db, monkeypatch, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    monkeypatch.setenv("IMMUCORE_STATE_FILE", str(broken))
    client = _client(db, state_store=None)              # constructing it reads nothing
    with pytest.raises(ImmucoreError, match="unreadable"):
        asyncio.run(client.verified_tx_by_id(2))


@pytest.mark.parametrize("field, wire", [
    ("verifiable_tx", 5), ("verifiable_tx", {"_t": "State"}), ("verifiable_tx", {}),
    ("nothing", None)], ids=["an int", "another type", "an empty map", "missing"])
def test_an_answer_that_is_no_proof_at_all_fails_verification(field, wire):
    """What the node sends in place of a proof is decoded inside the checks too."""
    client = AsyncClient("127.0.0.1", 1, state_store=StateStore())
    client.database = "defaultdb"

    async def call(msg, body=None):
        return {field: wire}

    client.call = call
    with pytest.raises(VerificationError, match="malformed proof"):
        asyncio.run(client.verified_tx_by_id(1))
