"""The store's proofs are immudb's: replicate the golden chains, then rebuild every vector proof."""
import pytest

from immucore import codec
from immucore.database import open_database
from immucore.store.aht import AhtReader
from immucore.types import TxHeader

from .conftest import load_vectors

h = bytes.fromhex


@pytest.fixture(params=["chain-v1.json", "chain-v0.json"])
def chain(request, tmp_path):
    vectors = load_vectors(request.param)
    database = open_database(str(tmp_path / "chain"), name=vectors["database"], replica=True,
                             header_version=vectors["header_version"])
    database.replicate_txs([h(tx["export_blob"]) for tx in vectors["txs"]])
    yield vectors, database
    database.close()


def test_replicated_chain_has_the_vector_state(chain):
    vectors, database = chain
    last = vectors["txs"][-1]
    state = database.current_state()
    assert (state.tx_id, state.tx_hash.hex()) == (last["id"], last["alh"])


def test_every_header_and_export_blob_round_trips(chain):
    vectors, database = chain
    for tx in vectors["txs"]:
        stored = database.tx_by_id(tx["id"])
        assert stored.header.to_bytes().hex() == tx["header_bytes"]
        assert stored.header.alh().hex() == tx["alh"]
        assert stored.header.inner_hash().hex() == tx["innerHash"]
        assert database.export_tx(tx["id"]).hex() == tx["export_blob"]
        assert [e.hvalue.hex() for e in stored.entries] == [e["hValue"] for e in tx["entries"]]


def test_aht_inclusion_and_consistency_proofs_match(chain):
    vectors, database = chain
    with database._log.read() as txn:
        aht = AhtReader(txn, database._log.dbs["aht"])
        for size, root in vectors["aht"]["roots"].items():
            assert aht.root(int(size)).hex() == root
        for case in vectors["aht"]["inclusion"]:
            assert [t.hex() for t in aht.inclusion_proof(case["i"], case["n"])] == case["terms"]
        for case in vectors["aht"]["consistency"]:
            got = aht.consistency_proof(case["m"], case["n"])
            assert [t.hex() for t in got] == case["terms"], (case["m"], case["n"])


def test_dual_proofs_match(chain):
    vectors, database = chain
    for case in vectors["dual_proofs"]:
        source = database.tx_by_id(case["source"]).header
        target = database.tx_by_id(case["target"]).header
        proof = database.dual_proof(source, target)
        assert [t.hex() for t in proof.inclusion_proof] == case["inclusionProof"]
        assert [t.hex() for t in proof.consistency_proof] == case["consistencyProof"]
        assert proof.target_bl_tx_alh.hex() == case["targetBlTxAlh"]
        assert [t.hex() for t in proof.last_inclusion_proof] == case["lastInclusionProof"]
        linear = case["linearProof"]
        assert (proof.linear_proof.source_tx_id, proof.linear_proof.target_tx_id) == (
            linear["sourceTxId"], linear["targetTxId"])
        assert [t.hex() for t in proof.linear_proof.terms] == linear["terms"]


def test_entry_inclusion_proofs_match(chain):
    vectors, database = chain
    for tx in vectors["txs"]:
        for index, entry in enumerate(tx["entries"]):
            digests = codec.record_digests(database._record(tx["id"]))
            assert digests[index].hex() == entry["digest"]
            terms = codec.htree_inclusion_proof(digests, index)
            assert [t.hex() for t in terms] == entry["inclusion_proof"]["terms"]


def test_vector_headers_rebuild_as_txheader():
    for name in ("chain-v1.json", "chain-v0.json"):
        for tx in load_vectors(name)["txs"]:
            header = TxHeader(tx["id"], h(tx["prevAlh"]), tx["ts"], tx["version"], b"",
                              tx["nentries"], h(tx["eh"]), tx["blTxId"], h(tx["blRoot"]))
            assert header.alh().hex() == tx["alh"]
