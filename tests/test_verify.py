"""The client-side verifiers against the golden vectors (every proof accepted by immudb-py 1.5.0)
and against tampered copies of them, which must all be rejected without raising. Section numbers
(§) are those of docs/immudb-format.md."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from immucore import codec
from immucore.types import DualProof, InclusionProof, LinearProof, TxHeader
from immucore.verify import (verify_aht_consistency, verify_aht_inclusion, verify_dual_proof,
                             verify_inclusion, verify_last_inclusion, verify_linear_proof)

VECTORS_DIR = Path(__file__).resolve().parent / "vectors"
VECTOR_FILES = ("chain-v1.json", "chain-v0.json")


# --- loading the vectors ---------------------------------------------------------------------

def _digests(hex_terms) -> tuple:
    return tuple(bytes.fromhex(term) for term in hex_terms)


def _header(tx: dict) -> TxHeader:
    return TxHeader(id=tx["id"], prev_alh=bytes.fromhex(tx["prevAlh"]), ts=tx["ts"],
                    version=tx["version"], metadata=b"", nentries=tx["nentries"],
                    eh=bytes.fromhex(tx["eh"]), bl_tx_id=tx["blTxId"],
                    bl_root=bytes.fromhex(tx["blRoot"]))


class Chain:
    def __init__(self, name: str):
        data = json.loads((VECTORS_DIR / name).read_text())
        self.name = name
        self.txs = {tx["id"]: tx for tx in data["txs"]}
        self.headers = {tx_id: _header(tx) for tx_id, tx in self.txs.items()}
        self.alhs = {tx_id: bytes.fromhex(tx["alh"]) for tx_id, tx in self.txs.items()}
        self.roots = {int(n): bytes.fromhex(root) for n, root in data["aht"]["roots"].items()}
        self.aht_inclusion = [(c["i"], c["n"], _digests(c["terms"]))
                              for c in data["aht"]["inclusion"]]
        self.aht_consistency = [(c["m"], c["n"], _digests(c["terms"]))
                                for c in data["aht"]["consistency"]]
        self.dual_proofs = [(p["source"], p["target"], self._dual_proof(p))
                            for p in data["dual_proofs"]]

    def leaf(self, tx_id: int) -> bytes:
        return codec.sha256(b"\x00" + self.alhs[tx_id])

    def _dual_proof(self, p: dict) -> DualProof:
        linear = p["linearProof"]
        return DualProof(
            source_tx_header=self.headers[p["source"]],
            target_tx_header=self.headers[p["target"]],
            inclusion_proof=_digests(p["inclusionProof"]),
            consistency_proof=_digests(p["consistencyProof"]),
            target_bl_tx_alh=bytes.fromhex(p["targetBlTxAlh"]),
            last_inclusion_proof=_digests(p["lastInclusionProof"]),
            linear_proof=LinearProof(linear["sourceTxId"], linear["targetTxId"],
                                     _digests(linear["terms"])))

    def entries(self):
        """(tx header, entry digest, InclusionProof) for every entry of every tx."""
        for tx_id, tx in self.txs.items():
            for entry in tx["entries"]:
                proof = entry["inclusion_proof"]
                yield (self.headers[tx_id], bytes.fromhex(entry["digest"]),
                       InclusionProof(proof["leaf"], proof["width"], _digests(proof["terms"])))

    def verify_dual(self, source: int, target: int, proof: DualProof) -> bool:
        return verify_dual_proof(proof, source, target, self.alhs[source], self.alhs[target])


_CHAINS = {name: Chain(name) for name in VECTOR_FILES}


@pytest.fixture(params=VECTOR_FILES)
def chain(request) -> Chain:
    return _CHAINS[request.param]


# --- tampering helpers -----------------------------------------------------------------------

def _flip_bit(digest: bytes, bit: int) -> bytes:
    out = bytearray(digest)
    out[(bit // 8) % len(out)] ^= 1 << (bit % 8)
    return bytes(out)


def _each_term_flipped(terms: tuple):
    """One copy of ``terms`` per term, with one bit of that term flipped (a different bit each)."""
    for index in range(len(terms)):
        yield terms[:index] + (_flip_bit(terms[index], 37 * index + 5),) + terms[index + 1:]


def _length_variants(terms: tuple):
    """Dropped first/last term, an added term at either end, and every adjacent swap."""
    extra = codec.sha256(b"extra term")
    if terms:
        yield terms[1:]
        yield terms[:-1]
    yield terms + (extra,)
    yield (extra,) + terms
    for index in range(len(terms) - 1):
        if terms[index] != terms[index + 1]:
            yield terms[:index] + (terms[index + 1], terms[index]) + terms[index + 2:]


def _tampered_terms(terms: tuple):
    yield from _each_term_flipped(terms)
    yield from _length_variants(terms)


# --- headers and Alh -------------------------------------------------------------------------

def test_header_alh_reproduces_every_vector(chain):
    for tx_id, header in chain.headers.items():
        tx = chain.txs[tx_id]
        assert header.inner_hash().hex() == tx["innerHash"], tx_id
        assert header.alh() == chain.alhs[tx_id], tx_id


def test_every_vector_tx_is_synchronously_linked(chain):
    # The premise of immucore's stricter dual-proof checks holds for the vectors themselves.
    for tx_id, header in chain.headers.items():
        assert header.bl_tx_id == tx_id - 1
        expected_root = chain.roots[tx_id - 1] if tx_id > 1 else bytes(32)
        assert header.bl_root == expected_root
        assert header.prev_alh == chain.alhs.get(tx_id - 1, codec.sha256(b""))


# --- entry inclusion in a tx (§7) ------------------------------------------------------------

def test_every_entry_inclusion_proof_verifies(chain):
    for header, digest, proof in chain.entries():
        assert verify_inclusion(proof, digest, header.eh), (header.id, proof.leaf)


def test_entry_digests_match_the_codec(chain):
    for tx_id, tx in chain.txs.items():
        for entry in tx["entries"]:
            digest = codec.entry_digest(tx["version"], bytes.fromhex(entry["stored_key"]),
                                        bytes.fromhex(entry["metadata_bytes"]),
                                        bytes.fromhex(entry["hValue"]))
            assert digest.hex() == entry["digest"], tx_id


def _path_length(index: int, size: int) -> int:
    """Terms in the audit path of leaf ``index`` of a ``size``-leaf tree, from the codec's own
    proof builder (an oracle independent of the verifier)."""
    return len(codec.htree_inclusion_proof([bytes(32)] * size, index))


def test_tampered_entry_inclusion_proofs_are_rejected(chain):
    for header, digest, proof in chain.entries():
        for terms in _tampered_terms(proof.terms):
            assert not verify_inclusion(dataclasses.replace(proof, terms=terms), digest, header.eh)
        assert not verify_inclusion(proof, _flip_bit(digest, 0), header.eh)
        assert not verify_inclusion(proof, digest, _flip_bit(header.eh, 255))
        for leaf in (proof.leaf - 1, proof.leaf + 1, proof.width):
            wrong = dataclasses.replace(proof, leaf=leaf)
            assert not verify_inclusion(wrong, digest, header.eh), (header.id, leaf)
        for width in (proof.width - 1, proof.width + 1, 2 * proof.width, 0):
            if width > proof.leaf and _path_length(proof.leaf, width) == len(proof.terms):
                continue      # same path shape: see test_path_does_not_bind_the_tree_size
            wrong = dataclasses.replace(proof, width=width)
            assert not verify_inclusion(wrong, digest, header.eh), (header.id, width)


def test_entry_proof_from_another_tx_is_rejected(chain):
    entries = list(chain.entries())
    for header, digest, proof in entries:
        for other_header, _, _ in entries:
            if other_header.eh != header.eh:
                assert not verify_inclusion(proof, digest, other_header.eh)


def test_path_does_not_bind_the_tree_size(chain):
    """A Merkle audit path fixes the leaf's position, not the tree's size: leaf 0 of a 3-entry
    tx has the same path shape as leaf 0 of a 4-entry tree, and its terms are opaque hashes.
    immudb binds the size elsewhere (nentries and bl_tx_id sit under the Alh), so a caller that
    cares must compare proof.width with the header's nentries; the verifiers cannot."""
    header, digest, proof = next((h, d, p) for h, d, p in chain.entries()
                                 if p.width == 3 and p.leaf == 0)
    assert verify_inclusion(dataclasses.replace(proof, width=4), digest, header.eh)


# --- AHT inclusion, consistency and last inclusion (§10.1–§10.3) -----------------------------

def test_every_aht_inclusion_proof_verifies(chain):
    assert chain.aht_inclusion
    for i, j, terms in chain.aht_inclusion:
        assert verify_aht_inclusion(list(terms), i, j, chain.leaf(i), chain.roots[j]), (i, j)


def test_tampered_aht_inclusion_proofs_are_rejected(chain):
    n_max = max(chain.roots)
    for i, j, terms in chain.aht_inclusion:
        leaf, root = chain.leaf(i), chain.roots[j]
        for bad in _tampered_terms(terms):
            assert not verify_aht_inclusion(bad, i, j, leaf, root), (i, j, bad)
        assert not verify_aht_inclusion(terms, i, j, _flip_bit(leaf, 1), root)
        assert not verify_aht_inclusion(terms, i, j, leaf, _flip_bit(root, 100))
        # The Alh itself instead of its leaf hash: the 0x00 prefix matters.
        assert not verify_aht_inclusion(terms, i, j, chain.alhs[i], root)
        # Another position, with that position's real leaf or with this one.
        for wrong_i in (i - 1, i + 1, j + 1, 0):
            assert not verify_aht_inclusion(terms, wrong_i, j, leaf, root), (i, j, wrong_i)
            if wrong_i in chain.alhs:
                assert not verify_aht_inclusion(terms, wrong_i, j, chain.leaf(wrong_i), root)
        # Another tree size, with that tree's real root, or with this root when the path shape
        # differs (same shape: see test_path_does_not_bind_the_tree_size).
        for wrong_j in (j - 1, j + 1, 2 * j, i - 1):
            if 1 <= wrong_j <= n_max:
                assert not verify_aht_inclusion(terms, i, wrong_j, leaf, chain.roots[wrong_j]), \
                    (i, j, wrong_j)
            if wrong_j < i or _path_length(i - 1, wrong_j) != len(terms):
                assert not verify_aht_inclusion(terms, i, wrong_j, leaf, root), (i, j, wrong_j)


def test_every_aht_consistency_proof_verifies(chain):
    assert chain.aht_consistency
    for i, j, terms in chain.aht_consistency:
        assert verify_aht_consistency(terms, i, j, chain.roots[i], chain.roots[j]), (i, j)


def test_equal_sizes_need_equal_roots(chain):
    for n, root in chain.roots.items():
        assert verify_aht_consistency((), n, n, root, root)
        if n > 1:
            assert not verify_aht_consistency((), n, n, chain.roots[n - 1], root)


def test_tampered_aht_consistency_proofs_are_rejected(chain):
    for i, j, terms in chain.aht_consistency:
        old, new = chain.roots[i], chain.roots[j]
        for bad in _tampered_terms(terms):
            if not bad and i == j:
                continue          # an empty proof for equal sizes is valid (roots are equal)
            assert not verify_aht_consistency(bad, i, j, old, new), (i, j, bad)
        assert not verify_aht_consistency(terms, i, j, _flip_bit(old, 7), new)
        assert not verify_aht_consistency(terms, i, j, old, _flip_bit(new, 7))
        if i != j:
            assert not verify_aht_consistency(terms, i, j, new, old)
            assert not verify_aht_consistency(terms, j, i, new, old)
        assert not verify_aht_consistency(terms, 0, j, old, new)


def test_consistency_proof_proves_only_its_own_sizes(chain):
    # Presented for any other pair of sizes, with that pair's real roots, it must fail.
    proofs = {(i, j): terms for i, j, terms in chain.aht_consistency}
    for (i, j), terms in proofs.items():
        for (other_i, other_j), other_terms in proofs.items():
            if (other_i, other_j) == (i, j) or other_terms == terms:
                continue
            old, new = chain.roots[other_i], chain.roots[other_j]
            if other_i == other_j and not terms:
                continue          # the empty proof is valid for every pair of equal sizes
            assert not verify_aht_consistency(terms, other_i, other_j, old, new), \
                ((i, j), (other_i, other_j))


def test_every_last_inclusion_proof_verifies(chain):
    for i, j, terms in chain.aht_inclusion:
        if i == j:
            assert verify_last_inclusion(terms, i, chain.leaf(i), chain.roots[i]), i


def test_tampered_last_inclusion_proofs_are_rejected(chain):
    n_max = max(chain.roots)
    for i, j, terms in chain.aht_inclusion:
        if i != j:
            continue
        leaf, root = chain.leaf(i), chain.roots[i]
        for bad in _tampered_terms(terms):
            assert not verify_last_inclusion(bad, i, leaf, root), (i, bad)
        assert not verify_last_inclusion(terms, 0, leaf, root)
        for wrong_i in (i - 1, i + 1):
            if 1 <= wrong_i <= n_max:
                assert not verify_last_inclusion(terms, wrong_i, chain.leaf(wrong_i),
                                                 chain.roots[wrong_i]), (i, wrong_i)
            # The path is all left siblings, so only its length depends on the size.
            if wrong_i >= 1 and _path_length(wrong_i - 1, wrong_i) != len(terms):
                assert not verify_last_inclusion(terms, wrong_i, leaf, root), (i, wrong_i)
        if i > 1:
            assert not verify_last_inclusion(terms, i, chain.leaf(i - 1), root)
            assert not verify_last_inclusion(terms, i, leaf, chain.roots[i - 1])


def test_inclusion_in_larger_trees_built_from_the_vector_alhs(chain):
    # Beyond the vectors: every leaf of every tree up to 40 leaves (reusing the chain's Alhs),
    # with the codec's audit paths. AHT leaves and entries-tree leaves hash the same way.
    alhs = [chain.alhs[tx_id] for tx_id in sorted(chain.alhs)]
    payloads = [codec.sha256(alhs[n % len(alhs)] + bytes([n])) for n in range(40)]
    for size in range(1, len(payloads) + 1):
        root = codec.entries_hash(payloads[:size])
        for index in range(size):
            terms = tuple(codec.htree_inclusion_proof(payloads[:size], index))
            leaf = codec.sha256(b"\x00" + payloads[index])
            assert verify_aht_inclusion(terms, index + 1, size, leaf, root)
            assert verify_inclusion(InclusionProof(index, size, terms), payloads[index], root)
            if index == size - 1:
                assert verify_last_inclusion(terms, size, leaf, root)


# --- linear proofs ---------------------------------------------------------------------------

def _linear_proof(chain: Chain, source: int, target: int) -> LinearProof:
    """A genuine linear proof from the headers: [Alh_s, innerHash_s+1, ..., innerHash_t]."""
    inners = tuple(chain.headers[tx_id].inner_hash() for tx_id in range(source + 1, target + 1))
    return LinearProof(source, target, (chain.alhs[source],) + inners)


def test_linear_proofs_over_any_range_verify(chain):
    ids = sorted(chain.alhs)
    for source in ids:
        for target in ids[source - 1:]:
            proof = _linear_proof(chain, source, target)
            assert verify_linear_proof(proof, source, target, chain.alhs[source],
                                       chain.alhs[target]), (source, target)


def test_tampered_linear_proofs_are_rejected(chain):
    ids = sorted(chain.alhs)
    for source in ids:
        for target in ids[source - 1:]:
            proof = _linear_proof(chain, source, target)
            s_alh, t_alh = chain.alhs[source], chain.alhs[target]
            for terms in _tampered_terms(proof.terms):
                bad = dataclasses.replace(proof, terms=terms)
                assert not verify_linear_proof(bad, source, target, s_alh, t_alh)
            # The proof's own ids must match the ones asked about.
            for s, t in ((source - 1, target), (source, target + 1), (source + 1, target)):
                bad = LinearProof(s, t, proof.terms)
                assert not verify_linear_proof(bad, source, target, s_alh, t_alh)
            if source != target:
                assert not verify_linear_proof(proof, target, source, t_alh, s_alh)
                assert not verify_linear_proof(proof, source, target, t_alh, s_alh)


def test_linear_proof_with_a_skipped_or_extra_term_is_rejected(chain):
    # immudb-py 1.5.0 does not check the term count; a proof that skips a transaction (or
    # carries one too many) must still fail, whatever ids it claims.
    ids = sorted(chain.alhs)
    for source in ids:
        for target in ids[source + 2:]:
            genuine = _linear_proof(chain, source, target)
            s_alh, t_alh = chain.alhs[source], chain.alhs[target]
            skipped = genuine.terms[:2] + genuine.terms[3:]
            assert not verify_linear_proof(LinearProof(source, target, skipped),
                                           source, target, s_alh, t_alh)
            extra = genuine.terms + (genuine.terms[-1],)
            assert not verify_linear_proof(LinearProof(source, target, extra),
                                           source, target, s_alh, t_alh)


# --- dual proofs (§10.5) ---------------------------------------------------------------------

def test_every_dual_proof_verifies(chain):
    assert chain.dual_proofs
    for source, target, proof in chain.dual_proofs:
        assert chain.verify_dual(source, target, proof), (source, target)


def test_dual_proof_linear_part_has_the_synchronous_length(chain):
    for source, target, proof in chain.dual_proofs:
        start = max(source, target - 1)
        assert len(proof.linear_proof.terms) == target - start + 1


def _dual_proof_variants(proof: DualProof):
    """Copies of ``proof`` with exactly one of its proof parts tampered with."""
    for field in ("inclusion_proof", "consistency_proof", "last_inclusion_proof"):
        for terms in _tampered_terms(getattr(proof, field)):
            yield field, dataclasses.replace(proof, **{field: terms})
    for terms in _tampered_terms(proof.linear_proof.terms):
        linear = dataclasses.replace(proof.linear_proof, terms=terms)
        yield "linear_proof", dataclasses.replace(proof, linear_proof=linear)
    if proof.target_tx_header.bl_tx_id > 0:   # only read when the target has a tree
        bad = _flip_bit(proof.target_bl_tx_alh, 77)
        yield "target_bl_tx_alh", dataclasses.replace(proof, target_bl_tx_alh=bad)
    for which in ("source_tx_header", "target_tx_header"):
        header = getattr(proof, which)
        for field, value in (("ts", header.ts + 1), ("nentries", header.nentries + 1),
                             ("eh", _flip_bit(header.eh, 3)),
                             ("prev_alh", _flip_bit(header.prev_alh, 9)),
                             ("bl_root", _flip_bit(header.bl_root, 200))):
            yield f"{which}.{field}", dataclasses.replace(
                proof, **{which: dataclasses.replace(header, **{field: value})})


def test_tampered_dual_proofs_are_rejected(chain):
    for source, target, proof in chain.dual_proofs:
        for what, bad in _dual_proof_variants(proof):
            assert not chain.verify_dual(source, target, bad), (source, target, what)


def test_dual_proof_with_wrong_ids_or_alhs_is_rejected(chain):
    n_max = max(chain.alhs)
    for source, target, proof in chain.dual_proofs:
        s_alh, t_alh = chain.alhs[source], chain.alhs[target]
        for s, t in ((source + 1, target), (source - 1, target), (source, target + 1),
                     (source, target - 1), (0, target)):
            assert not verify_dual_proof(proof, s, t, s_alh, t_alh), (source, target, s, t)
        for other in (source - 1, source + 1):
            if 1 <= other <= n_max:
                assert not verify_dual_proof(proof, source, target, chain.alhs[other], t_alh)
        for other in (target - 1, target + 1):
            if 1 <= other <= n_max:
                assert not verify_dual_proof(proof, source, target, s_alh, chain.alhs[other])


def test_swapped_source_and_target_are_rejected(chain):
    for source, target, proof in chain.dual_proofs:
        if source == target:
            continue
        s_alh, t_alh = chain.alhs[source], chain.alhs[target]
        assert not verify_dual_proof(proof, target, source, t_alh, s_alh)
        swapped = dataclasses.replace(proof, source_tx_header=proof.target_tx_header,
                                      target_tx_header=proof.source_tx_header)
        assert not verify_dual_proof(swapped, target, source, t_alh, s_alh)
        assert not verify_dual_proof(swapped, source, target, s_alh, t_alh)


def test_dual_proof_with_a_longer_hash_valid_linear_part_is_rejected(chain):
    # A linear proof that starts before target.bl_tx_id is hash-valid, but the tree already
    # vouches for that stretch: the proof must start at max(source, target.bl_tx_id).
    for source, target, proof in chain.dual_proofs:
        if source >= target - 1:
            continue
        longer = _linear_proof(chain, target - 2, target)
        assert verify_linear_proof(longer, target - 2, target, chain.alhs[target - 2],
                                   chain.alhs[target])
        bad = dataclasses.replace(proof, linear_proof=longer)
        assert not chain.verify_dual(source, target, bad), (source, target)


def test_unused_proof_parts_must_be_empty(chain):
    junk = (codec.sha256(b"junk"),)
    for source, target, proof in chain.dual_proofs:
        header = proof.target_tx_header
        if source >= header.bl_tx_id:
            bad = dataclasses.replace(proof, inclusion_proof=junk)
            assert not chain.verify_dual(source, target, bad)
        if proof.source_tx_header.bl_tx_id == 0:
            bad = dataclasses.replace(proof, consistency_proof=junk)
            assert not chain.verify_dual(source, target, bad)
        if header.bl_tx_id == 0:
            bad = dataclasses.replace(proof, last_inclusion_proof=junk)
            assert not chain.verify_dual(source, target, bad)


def _relinked(header: TxHeader, bl_tx_id: int, bl_root: bytes) -> TxHeader:
    return dataclasses.replace(header, bl_tx_id=bl_tx_id, bl_root=bl_root)


def test_linear_fake_target_linked_too_far_back_is_rejected(chain):
    """CVE-2022-36111 ("linear-fake"): a target header whose bl_tx_id lags behind lets a long
    linear proof vouch for transactions the binary-linking tree never saw. Every part of such a
    proof verifies on its own, as immudb's VerifyDualProof without its LinearAdvanceProof would
    check them; immucore rejects it because the target is not linked to its predecessor
    (bl_tx_id != id - 1, and the tree's last leaf is not its prev_alh)."""
    ids = sorted(chain.alhs)
    for source in ids[1:]:
        for target in ids[source + 1:]:
            real_source = chain.headers[source]
            fake_target = _relinked(chain.headers[target], source, chain.roots[source])
            fake_target_alh = fake_target.alh()
            inners = tuple(chain.headers[tx_id].inner_hash() for tx_id in range(source + 1, target))
            linear = LinearProof(source, target,
                                 (chain.alhs[source],) + inners + (fake_target.inner_hash(),))
            last_inclusion = next(t for i, j, t in chain.aht_inclusion if i == j == source)
            consistency = next(t for i, j, t in chain.aht_consistency
                               if (i, j) == (real_source.bl_tx_id, source))
            fake = DualProof(real_source, fake_target, (), consistency, chain.alhs[source],
                             last_inclusion, linear)
            # Each check immudb would make passes ...
            assert verify_aht_consistency(consistency, real_source.bl_tx_id, source,
                                          real_source.bl_root, fake_target.bl_root)
            assert verify_last_inclusion(last_inclusion, source, chain.leaf(source),
                                         fake_target.bl_root)
            assert verify_linear_proof(linear, source, target, chain.alhs[source],
                                       fake_target_alh)
            # ... but the target is not synchronously linked.
            assert not verify_dual_proof(fake, source, target, chain.alhs[source],
                                         fake_target_alh), (source, target)


def test_source_header_not_synchronously_linked_is_rejected(chain):
    for source, target, proof in chain.dual_proofs:
        header = proof.source_tx_header
        if header.id < 3:
            continue
        fake_source = _relinked(header, header.id - 2, chain.roots[header.id - 2])
        fake = dataclasses.replace(proof, source_tx_header=fake_source)
        if source == target:
            fake = dataclasses.replace(fake, target_tx_header=fake_source)
        assert not verify_dual_proof(fake, source, target, fake_source.alh(),
                                     fake.target_tx_header.alh()), (source, target)


def test_header_linked_further_back_than_its_predecessor_is_rejected(chain):
    """A forked tx k whose prev_alh and bl_tx_id both point at tx k-2. Proven against itself,
    every part immudb checks holds (equal-size consistency, last inclusion of Alh_k-2 in the
    k-2 tree, a 1-term linear proof); only the rule bl_tx_id == id - 1 catches it."""
    for k in sorted(chain.alhs)[3:]:
        fork = dataclasses.replace(chain.headers[k], prev_alh=chain.alhs[k - 2],
                                   bl_tx_id=k - 2, bl_root=chain.roots[k - 2])
        consistency = next(t for i, j, t in chain.aht_consistency if i == j == k - 2)
        last_inclusion = next(t for i, j, t in chain.aht_inclusion if i == j == k - 2)
        linear = LinearProof(k, k, (fork.alh(),))
        fake = DualProof(fork, fork, (), consistency, chain.alhs[k - 2], last_inclusion, linear)
        assert verify_aht_consistency(consistency, k - 2, k - 2, fork.bl_root, fork.bl_root)
        assert verify_last_inclusion(last_inclusion, k - 2, chain.leaf(k - 2), fork.bl_root)
        assert verify_linear_proof(linear, k, k, fork.alh(), fork.alh())
        assert not verify_dual_proof(fake, k, k, fork.alh(), fork.alh()), k


def test_consistency_proof_longer_than_the_tree_is_tall_is_rejected(chain):
    # Past the top of the tree an extra term would just wrap both roots in one more node, so
    # its hashes line up with roots made to match; the proof is still malformed.
    extra = codec.sha256(b"above the root")
    for i, j, terms in chain.aht_consistency:
        if len(terms) < 1 + (j - 1).bit_length():
            continue            # not full height: an extra term is still inside the tree
        old = codec.sha256(b"\x01" + extra + chain.roots[i])
        new = codec.sha256(b"\x01" + extra + chain.roots[j])
        assert not verify_aht_consistency(terms + (extra,), i, j, old, new), (i, j)


def test_target_tree_whose_last_leaf_is_not_the_previous_tx_is_rejected(chain):
    """With bl_tx_id == id - 1 the target tree's last leaf must be the target's prev_alh. Here a
    server forks the tree: its last leaf is some X, not Alh_source. Every part immudb checks
    passes (the linear proof starts at the source and never looks at X); immucore rejects it."""
    fork_alh = codec.sha256(b"a different history")
    fork_leaf = codec.sha256(b"\x00" + fork_alh)
    real_leaf_checked = 0
    for source, target, proof in chain.dual_proofs:
        if source != target - 1 or source < 2:
            continue
        last_terms = next(t for i, j, t in chain.aht_inclusion if i == j == source)
        fork_root = fork_leaf
        for term in last_terms:
            fork_root = codec.sha256(b"\x01" + term + fork_root)
        consistency = tuple(fork_leaf if term == chain.leaf(source) else term
                            for term in next(t for i, j, t in chain.aht_consistency
                                             if (i, j) == (source - 1, source)))
        real_leaf_checked += chain.leaf(source) in proof.consistency_proof
        forked_target = dataclasses.replace(proof.target_tx_header, bl_root=fork_root)
        linear = LinearProof(source, target, (chain.alhs[source], forked_target.inner_hash()))
        fake = DualProof(proof.source_tx_header, forked_target, (), consistency, fork_alh,
                         last_terms, linear)
        source_header = proof.source_tx_header
        assert verify_aht_consistency(consistency, source - 1, source, source_header.bl_root,
                                      fork_root)
        assert verify_last_inclusion(last_terms, source, fork_leaf, fork_root)
        assert verify_linear_proof(linear, source, target, chain.alhs[source],
                                   forked_target.alh())
        assert not verify_dual_proof(fake, source, target, chain.alhs[source],
                                     forked_target.alh()), (source, target)
    assert real_leaf_checked      # the fork really replaced a term of the consistency proof


# --- malformed input never raises ------------------------------------------------------------

_ANY_INT = st.one_of(st.integers(min_value=-3, max_value=70),
                     st.integers(min_value=-(1 << 70), max_value=1 << 70),
                     st.sampled_from([0, 1, (1 << 64) - 1, 1 << 64, True]))
_ANY_BYTES = st.one_of(st.binary(min_size=32, max_size=32), st.binary(max_size=70))
_ANY_VALUE = st.one_of(_ANY_BYTES, _ANY_INT, st.none(), st.text(max_size=4))
_ANY_TERMS = st.one_of(st.lists(_ANY_BYTES, max_size=8),
                       st.lists(st.binary(min_size=32, max_size=32), max_size=8).map(tuple),
                       _ANY_VALUE)
_ANY_HEADER = st.one_of(
    st.builds(TxHeader, id=_ANY_INT, prev_alh=_ANY_VALUE, ts=_ANY_INT,
              version=st.one_of(st.integers(min_value=-1, max_value=3), _ANY_VALUE),
              metadata=_ANY_VALUE, nentries=_ANY_INT, eh=_ANY_BYTES, bl_tx_id=_ANY_INT,
              bl_root=_ANY_VALUE),
    st.none())
_ANY_LINEAR = st.one_of(st.builds(LinearProof, _ANY_INT, _ANY_INT, _ANY_TERMS), _ANY_VALUE)


@settings(max_examples=300, deadline=None)
@given(terms=_ANY_TERMS, i=_ANY_INT, j=_ANY_INT, a=_ANY_VALUE, b=_ANY_VALUE)
def test_tree_verifiers_never_raise(terms, i, j, a, b):
    assert verify_aht_inclusion(terms, i, j, a, b) in (True, False)
    assert verify_aht_consistency(terms, i, j, a, b) in (True, False)
    assert verify_last_inclusion(terms, i, a, b) in (True, False)
    proof = InclusionProof(i, j, terms)
    assert verify_inclusion(proof, a, b) in (True, False)
    assert verify_inclusion(terms, a, b) is False


@settings(max_examples=300, deadline=None)
@given(linear=_ANY_LINEAR, s=_ANY_INT, t=_ANY_INT, a=_ANY_VALUE, b=_ANY_VALUE)
def test_linear_verifier_never_raises(linear, s, t, a, b):
    assert verify_linear_proof(linear, s, t, a, b) in (True, False)


@settings(max_examples=300, deadline=None)
@given(source=_ANY_HEADER, target=_ANY_HEADER, inclusion=_ANY_TERMS, consistency=_ANY_TERMS,
       bl_alh=_ANY_VALUE, last=_ANY_TERMS, linear=_ANY_LINEAR, s=_ANY_INT, t=_ANY_INT,
       a=_ANY_VALUE, b=_ANY_VALUE)
def test_dual_verifier_never_raises(source, target, inclusion, consistency, bl_alh, last, linear,
                                    s, t, a, b):
    proof = DualProof(source, target, inclusion, consistency, bl_alh, last, linear)
    assert verify_dual_proof(proof, s, t, a, b) in (True, False)
    assert verify_dual_proof(None, s, t, a, b) is False


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_dual_verifier_never_raises_on_near_valid_proofs(data):
    """Random mutations of real vectors: ids and fields close to valid reach the deep checks."""
    chain = _CHAINS[data.draw(st.sampled_from(VECTOR_FILES))]
    source, target, proof = data.draw(st.sampled_from(chain.dual_proofs))
    which = data.draw(st.sampled_from(["source_tx_header", "target_tx_header"]))
    field = data.draw(st.sampled_from([f.name for f in dataclasses.fields(TxHeader)]))
    header = dataclasses.replace(getattr(proof, which), **{field: data.draw(_ANY_VALUE)})
    mutated = dataclasses.replace(proof, **{which: header})
    s = data.draw(st.one_of(st.just(source), _ANY_INT))
    t = data.draw(st.one_of(st.just(target), _ANY_INT))
    assert verify_dual_proof(mutated, s, t, chain.alhs[source], chain.alhs[target]) in (True, False)
