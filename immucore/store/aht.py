"""Proofs over the append-only hash tree (AHT), read from the nodes the store keeps in LMDB.

Every tx appends one leaf, H(0x00 || Alh), and the parents it completes; the store keeps them as
one value per tx in the ``aht`` database: ``u64 tx_id -> leaf hash || parent(level 1) || …``.
The node at ``level`` covering leaves ``[index * 2**level, (index + 1) * 2**level)`` (0-based) is
therefore completed by the tx whose id is ``(index + 1) * 2**level`` and sits at offset
``level * 32`` of its value. Inclusion proofs are RFC 6962 audit paths; consistency proofs
follow immudb's variant (docs/immudb-format.md §10.2).
"""
from __future__ import annotations

from .. import codec
from ..constants import DIGEST_SIZE
from ..errors import CorruptedDataError
from .layout import aht_node, tx_key

_NODE_PREFIX = b"\x01"


class AhtReader:
    """Reads AHT nodes through one LMDB read transaction and builds proofs from them."""

    def __init__(self, txn, aht_db):
        self._txn = txn
        self._db = aht_db

    def node(self, level: int, index: int) -> bytes:
        tx_id = (index + 1) << level
        node = aht_node(self._txn.get(tx_key(tx_id), db=self._db), level)
        if node is None:
            raise CorruptedDataError(f"data is corrupted: AHT node ({level}, {index}) is missing")
        return node

    def subtree_hash(self, lo: int, hi: int) -> bytes:
        """RFC 6962 MTH of leaves [lo, hi) (0-based); stored directly when it is a full subtree."""
        width = hi - lo
        if width & (width - 1) == 0 and lo % width == 0:
            return self.node(width.bit_length() - 1, lo // width)
        split = 1 << ((width - 1).bit_length() - 1)     # largest power of two below width
        return codec.sha256(_NODE_PREFIX + self.subtree_hash(lo, lo + split)
                            + self.subtree_hash(lo + split, hi))

    def root(self, size: int) -> bytes:
        return self.subtree_hash(0, size) if size else bytes(DIGEST_SIZE)

    def inclusion_proof(self, i: int, j: int) -> list:
        """Audit path of leaf ``i`` (1-based) in the tree of the first ``j`` leaves, bottom-up."""
        if not 0 < i <= j:
            raise ValueError(f"inclusion proof needs 0 < i <= j, got i={i}, j={j}")
        return self._path(i - 1, 0, j)

    def _path(self, m: int, lo: int, hi: int) -> list:
        if hi - lo == 1:
            return []
        split = 1 << ((hi - lo - 1).bit_length() - 1)
        if m < split:
            return self._path(m, lo, lo + split) + [self.subtree_hash(lo + split, hi)]
        return self._path(m - split, lo + split, hi) + [self.subtree_hash(lo, lo + split)]

    def consistency_proof(self, i: int, j: int) -> list:
        """Proof that the tree of ``i`` leaves is a prefix of the tree of ``j``, in immudb's form.

        It walks the set bits of ``j - 1`` from the top, as immudb's ahtree does: at each split
        the part the old tree does not reach contributes its root; where the old tree ends on a
        split, the root of its last part comes first. Unlike RFC 6962 it always starts with that
        node, and for ``i == j > 1`` it still returns terms (the golden vectors pin all of it).
        """
        if not 0 < i <= j:
            raise ValueError(f"consistency proof needs 0 < i <= j, got i={i}, j={j}")
        return self._consistency(i, j, (j - 1).bit_length())

    def _consistency(self, i: int, j: int, height: int) -> list:
        tail = []                      # built from the root down; returned reversed
        for level in range(height - 1, -1, -1):
            if not (j - 1) >> level & 1:
                continue
            split = ((j - 1) >> level) << level
            if i <= split:
                tail.append(self._highest_node(j, level))
                if i < split:
                    return self._consistency(i, split, level) + tail[::-1]
                tail.append(self._highest_node(i, level))
                return tail[::-1]
            tail.append(self._node_ending(split, level))
            if i == j:
                tail.append(self._highest_node(i, level))
                return tail[::-1]
        return tail[::-1]

    def _node_ending(self, n: int, level: int) -> bytes:
        """The stored node of height ``level`` whose last leaf is leaf ``n`` (1-based)."""
        return self.subtree_hash(n - (1 << level), n)

    def _highest_node(self, n: int, depth: int) -> bytes:
        """Root of the leaves after the last split of height ``depth`` up to leaf ``n`` (1-based)."""
        return self.subtree_hash(((n - 1) >> depth) << depth, n)


def peaks_for(reader: AhtReader, size: int) -> list:
    """The perfect-subtree roots of a tree of ``size`` leaves, largest first (the append state)."""
    peaks, start = [], 0
    for level in range(size.bit_length() - 1, -1, -1):
        if size >> level & 1:
            peaks.append(reader.node(level, start >> level))
            start += 1 << level
    return peaks
