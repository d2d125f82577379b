"""Client-side proof verifiers, mirroring immudb's Go verifiers (docs/immudb-format.md §7–§10).

Every function returns a bool, as immudb's do, and never raises: whatever a server sends — wrong
sizes, wrong term counts, absurd ids, wrong types — is an unverified proof, not a crash.

Where immudb (and more so immudb-py 1.5.0) is lenient, immucore is stricter, because it knows
how its own chain is shaped (every tx has ``bl_tx_id == id - 1``):
  * an inclusion path must have exactly its RFC 6962 length and a consistency proof at most
    one term per tree level plus one, which also bounds the hashing a hostile proof costs us;
  * a linear proof must have exactly ``target - source + 1`` terms (immudb-py skips this);
  * a dual proof's headers must be synchronously linked, the target tree's last leaf must be
    the target's prev_alh, and parts immudb would not send must be empty. So the linear proof
    covers at most one step and no transaction can sit outside the binary-linking tree (the
    CVE-2022-36111 "linear-fake" shape): immudb needs its LinearAdvanceProof for that, immucore
    never does.

Reference: embedded/htree/htree.go, embedded/ahtree/verification.go and
embedded/store/verification.go in the immudb repository.
"""
from __future__ import annotations

from . import codec
from .constants import DIGEST_SIZE, HEADER_VERSION_MAX, TX_METADATA_SIZE_MAX
from .types import DualProof, InclusionProof, LinearProof, TxHeader

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"
_U64_LIMIT = 1 << 64                 # ids, timestamps and tree sizes are u64 in immudb
_ENTRY_COUNT_LIMITS = (1 << 16, 1 << 32)   # NEntries is u16 in a v0 header, u32 in v1


# --- input checks: a malformed value makes a proof fail instead of raising ------------------

def _is_u64(value) -> bool:
    # bool is an int subclass; True is not a tx id.
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _U64_LIMIT


def _is_digest(value) -> bool:
    return isinstance(value, bytes) and len(value) == DIGEST_SIZE


def _are_digests(terms) -> bool:
    # A concatenated bytes object (how immudb-py returns htree terms) is not a list of terms.
    return isinstance(terms, (list, tuple)) and all(_is_digest(term) for term in terms)


def _header_alh(header) -> bytes | None:
    """The header's Alh, or None when a field could not come from a real header (so the codec,
    which raises on such input, is never called with it)."""
    if not isinstance(header, TxHeader):
        return None
    if not (_is_u64(header.id) and _is_u64(header.ts) and _is_u64(header.bl_tx_id)):
        return None
    if not (_is_digest(header.prev_alh) and _is_digest(header.eh) and _is_digest(header.bl_root)):
        return None
    version = header.version
    if not (_is_u64(version) and version <= HEADER_VERSION_MAX):
        return None
    if not isinstance(header.metadata, bytes) or len(header.metadata) > TX_METADATA_SIZE_MAX:
        return None
    if version == 0 and header.metadata:     # v0 headers have no metadata field at all
        return None
    if not (_is_u64(header.nentries) and header.nentries < _ENTRY_COUNT_LIMITS[version]):
        return None
    return header.alh()


# --- hashing ---------------------------------------------------------------------------------

def _leaf_hash(digest: bytes) -> bytes:
    return codec.sha256(_LEAF_PREFIX + digest)


def _node_hash(left: bytes, right: bytes) -> bytes:
    return codec.sha256(_NODE_PREFIX + left + right)


def _audit_path_length(index: int, size: int) -> int:
    """Terms in the RFC 6962 audit path of leaf ``index`` (0-based) in a tree of ``size`` leaves:
    one per level where the node has a sibling (an odd last node is promoted without one)."""
    length = 0
    while size > 1:
        if index ^ 1 < size:
            length += 1
        index >>= 1
        size = (size + 1) >> 1
    return length


def _fold_audit_path(terms, index: int, last: int, acc: bytes) -> bytes:
    """Walk an audit path bottom-up. A node is a left child when its index is even and it is not
    the last node of its level; otherwise the term is its left sibling."""
    for term in terms:
        if index % 2 == 0 and index != last:
            acc = _node_hash(acc, term)
        else:
            acc = _node_hash(term, acc)
        index >>= 1
        last >>= 1
    return acc


# --- the per-tx entries tree (§7) ------------------------------------------------------------

def verify_inclusion(proof: InclusionProof, entry_digest: bytes, eh: bytes) -> bool:
    """An entry digest is leaf ``proof.leaf`` of the tx's entries tree whose root is ``eh``.

    Mirrors immudb's ``htree.VerifyInclusion`` (and ``store.VerifyInclusion``, which passes it
    ``kv.Digest()``), plus an exact term count. The path binds the leaf's position, not the
    tree's size (same-shape widths accept it too): compare ``proof.width`` with the header's
    ``nentries`` where the size matters.
    """
    if not isinstance(proof, InclusionProof):
        return False
    leaf, width, terms = proof.leaf, proof.width, proof.terms
    if not (_is_u64(leaf) and _is_u64(width) and leaf < width):
        return False
    if not (_is_digest(entry_digest) and _is_digest(eh) and _are_digests(terms)):
        return False
    if len(terms) != _audit_path_length(leaf, width):
        return False
    return _fold_audit_path(terms, leaf, width - 1, _leaf_hash(entry_digest)) == eh


# --- the binary-linking tree, AHT (§9, §10.1–§10.3) ------------------------------------------

def verify_aht_inclusion(terms, i: int, j: int, leaf: bytes, root: bytes) -> bool:
    """``leaf`` (= H(0x00 || Alh_i)) is leaf ``i`` of the AHT of size ``j`` whose root is ``root``.

    Mirrors immudb's ``ahtree.VerifyInclusion`` (requires 0 < i <= j), plus an exact term count.
    """
    if not (_is_u64(i) and _is_u64(j) and 0 < i <= j):
        return False
    if not (_is_digest(leaf) and _is_digest(root) and _are_digests(terms)):
        return False
    if len(terms) != _audit_path_length(i - 1, j):
        return False
    return _fold_audit_path(terms, i - 1, j - 1, leaf) == root


def verify_aht_consistency(terms, i: int, j: int, root_i: bytes, root_j: bytes) -> bool:
    """The AHT of size ``j`` with root ``root_j`` extends the one of size ``i`` with ``root_i``.

    Mirrors immudb's ``ahtree.VerifyConsistency``. immudb's proof differs from RFC 6962: its
    first term is always the old tree's root or subtree node, and ``i == j`` gives either an
    empty proof (then the roots must be equal) or a short one that rebuilds that root.
    """
    if not (_is_u64(i) and _is_u64(j) and 0 < i <= j):
        return False
    if not (_is_digest(root_i) and _is_digest(root_j) and _are_digests(terms)):
        return False
    if not terms:
        return i == j and root_i == root_j
    # Past the old subtree node every term lifts the new root one level, so a proof cannot be
    # longer than the tree is tall (immudb's generator never makes one that is).
    if len(terms) > 1 + (j - 1).bit_length():
        return False

    old_index, new_index = i - 1, j - 1
    # The old tree's rightmost complete subtree is the first term; climb to its top.
    while old_index % 2 == 1:
        old_index >>= 1
        new_index >>= 1
    old_acc = new_acc = terms[0]
    for term in terms[1:]:
        if old_index % 2 == 1 or old_index == new_index:
            # A left sibling: part of both trees.
            old_acc = _node_hash(term, old_acc)
            new_acc = _node_hash(term, new_acc)
            while old_index % 2 == 0 and old_index != 0:
                old_index >>= 1
                new_index >>= 1
        else:
            # A right sibling: only in the new tree.
            new_acc = _node_hash(new_acc, term)
        old_index >>= 1
        new_index >>= 1
    return old_acc == root_i and new_acc == root_j


def verify_last_inclusion(terms, i: int, leaf: bytes, root: bytes) -> bool:
    """``leaf`` is the last leaf of the AHT of size ``i`` whose root is ``root``.

    Mirrors immudb's ``ahtree.VerifyLastInclusion``: on the tree's right edge every term is a
    left sibling. Plus an exact term count (one per 1-bit of ``i - 1``).
    """
    if not (_is_u64(i) and i > 0):
        return False
    if not (_is_digest(leaf) and _is_digest(root) and _are_digests(terms)):
        return False
    if len(terms) != _audit_path_length(i - 1, i):
        return False
    acc = leaf
    for term in terms:
        acc = _node_hash(term, acc)
    return acc == root


# --- linear and dual proofs (§10.4, §10.5) ---------------------------------------------------

def verify_linear_proof(proof: LinearProof, source_tx_id: int, target_tx_id: int,
                        source_alh: bytes, target_alh: bytes) -> bool:
    """The Alh chain leads from ``source_alh`` (tx ``source_tx_id``) to ``target_alh``.

    Mirrors immudb's ``store.VerifyLinearProof``: terms are ``[Alh_s, innerHash_s+1, ...,
    innerHash_t]`` and each step is ``Alh_n = H(u64 n || Alh_n-1 || innerHash_n)``. The term count
    must be exactly ``t - s + 1``: immudb-py 1.5.0 does not check it.
    """
    if not isinstance(proof, LinearProof):
        return False
    if not (_is_u64(source_tx_id) and _is_u64(target_tx_id) and 0 < source_tx_id <= target_tx_id):
        return False
    if proof.source_tx_id != source_tx_id or proof.target_tx_id != target_tx_id:
        return False
    if not (_is_digest(source_alh) and _is_digest(target_alh) and _are_digests(proof.terms)):
        return False
    terms = proof.terms
    if len(terms) != target_tx_id - source_tx_id + 1 or terms[0] != source_alh:
        return False
    acc = terms[0]
    for offset, inner in enumerate(terms[1:], start=1):
        acc = codec.alh(source_tx_id + offset, acc, inner)   # the same hash the tx's Alh uses
    return acc == target_alh


def verify_dual_proof(proof: DualProof, source_tx_id: int, target_tx_id: int,
                      source_alh: bytes, target_alh: bytes) -> bool:
    """Tx ``target_tx_id`` (Alh ``target_alh``) extends the history ending at ``source_tx_id``.

    Mirrors immudb's ``store.VerifyDualProof``, after immucore's own checks: both headers are
    synchronously linked (``bl_tx_id == id - 1``), ``target_bl_tx_alh`` is the target's
    ``prev_alh``, the parts immudb would not send are empty, and the linear proof has exactly
    ``target - max(source, target.bl_tx_id) + 1`` terms. With synchronous linking the
    LinearAdvanceProof is never needed, so none is read.
    """
    if not isinstance(proof, DualProof):
        return False
    source, target = proof.source_tx_header, proof.target_tx_header
    if not (isinstance(source, TxHeader) and isinstance(target, TxHeader)):
        return False
    if not (_is_u64(source_tx_id) and _is_u64(target_tx_id) and 0 < source_tx_id <= target_tx_id):
        return False
    if source.id != source_tx_id or target.id != target_tx_id:
        return False
    if not (_is_digest(source_alh) and _is_digest(target_alh)
            and _is_digest(proof.target_bl_tx_alh)):
        return False
    if not all(_are_digests(part) for part in
               (proof.inclusion_proof, proof.consistency_proof, proof.last_inclusion_proof)):
        return False

    # immucore's chain: each tx is linked to its predecessor, so tx bl_tx_id is the previous tx
    # and its Alh is the target's prev_alh. A header linked further back would let a linear
    # proof vouch for transactions the tree never saw (CVE-2022-36111).
    if source.bl_tx_id != source.id - 1 or target.bl_tx_id != target.id - 1:
        return False
    if target.bl_tx_id > 0 and proof.target_bl_tx_alh != target.prev_alh:
        return False
    # immudb builds each of these parts only when it is checked below; one that would go
    # unchecked is not part of an honest proof.
    if source_tx_id >= target.bl_tx_id and proof.inclusion_proof:
        return False
    if source.bl_tx_id == 0 and proof.consistency_proof:
        return False
    if target.bl_tx_id == 0 and proof.last_inclusion_proof:
        return False

    # From here on, immudb's VerifyDualProof, in its order.
    if _header_alh(source) != source_alh or _header_alh(target) != target_alh:
        return False
    if source_tx_id < target.bl_tx_id:
        if not verify_aht_inclusion(proof.inclusion_proof, source_tx_id, target.bl_tx_id,
                                    _leaf_hash(source_alh), target.bl_root):
            return False
    if source.bl_tx_id > 0:
        if not verify_aht_consistency(proof.consistency_proof, source.bl_tx_id, target.bl_tx_id,
                                      source.bl_root, target.bl_root):
            return False
    if target.bl_tx_id > 0:
        if not verify_last_inclusion(proof.last_inclusion_proof, target.bl_tx_id,
                                     _leaf_hash(proof.target_bl_tx_alh), target.bl_root):
            return False
    # The linear proof starts where the tree stops vouching: at target.bl_tx_id when the source
    # is inside the tree, else at the source itself. Its length check lives in
    # verify_linear_proof: target_tx_id - max(source_tx_id, target.bl_tx_id) + 1 terms.
    if source_tx_id < target.bl_tx_id:
        return verify_linear_proof(proof.linear_proof, target.bl_tx_id, target_tx_id,
                                   proof.target_bl_tx_alh, target_alh)
    return verify_linear_proof(proof.linear_proof, source_tx_id, target_tx_id,
                               source_alh, target_alh)
