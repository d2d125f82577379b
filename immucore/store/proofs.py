"""Proofs a database serves and the audit of its whole log, over the log (``store/log.py``) and
its append-only hash tree (``store/aht.py``).

The proofs are immudb's: a DualProof (v1) links two tx headers (inclusion of the older one in
the newer one's tree, consistency of the two trees, and the linear part after the newer one's
``blTxID``), an InclusionProof places one entry in its tx's entry tree. The client-side checks
of all of them are ``immucore/verify.py``.
"""
from __future__ import annotations

from .. import codec
from ..constants import DIGEST_SIZE
from ..errors import CorruptedDataError, IllegalArgumentsError
from ..types import DualProof, InclusionProof, LinearProof, TxHeader
from .log import EMPTY_ALH

_ZERO_DIGEST = bytes(DIGEST_SIZE)


def dual_proof(txs, source: TxHeader, target: TxHeader) -> DualProof:
    """immudb's DualProof (v1) linking tx header ``source`` to ``target``, read from one
    snapshot of the log ``txs`` (a ``TxLog``)."""
    if source.id > target.id:
        raise IllegalArgumentsError("source tx must not be newer than target tx")
    with txs.env.read(buffers=True) as txn:
        aht = txs.aht_in(txn)
        inclusion = (aht.inclusion_proof(source.id, target.bl_tx_id)
                     if source.id < target.bl_tx_id else [])
        consistency = (aht.consistency_proof(source.bl_tx_id, target.bl_tx_id)
                       if source.bl_tx_id > 0 else [])
        if target.bl_tx_id > 0:
            target_bl_tx_alh = txs.alh_in(txn, target.bl_tx_id)
            last_inclusion = aht.inclusion_proof(target.bl_tx_id, target.bl_tx_id)
        else:
            target_bl_tx_alh, last_inclusion = _ZERO_DIGEST, []
        linear_from = max(source.id, target.bl_tx_id)
        terms = [txs.alh_in(txn, linear_from)]
        for tx_id in range(linear_from + 1, target.id + 1):
            header = codec.decode_record(txs.record_in(txn, tx_id))[0]
            terms.append(codec.inner_hash(*header))
    return DualProof(source, target, tuple(inclusion), tuple(consistency), target_bl_tx_alh,
                     tuple(last_inclusion), LinearProof(linear_from, target.id, tuple(terms)))


def entry_inclusion_proof(record, entry_index: int) -> InclusionProof:
    """Where entry ``entry_index`` of the tx ``record`` sits in the tx's entry tree."""
    digests = codec.record_digests(record)
    return InclusionProof(entry_index, len(digests),
                          tuple(codec.htree_inclusion_proof(digests, entry_index)))


def audit(txs, last: int, limits: tuple, batch_txs: int) -> int:
    """Re-verify the log ``txs`` from tx 1 to ``last``: every Eh, Alh, blRoot and stored AHT
    node, by sealing the stored txs again and comparing. Reads ``batch_txs`` at a time (one
    snapshot each), so its memory stays bounded whatever the log size."""
    chain_alh, peaks, next_id = EMPTY_ALH, [], 1
    while next_id <= last:
        count = min(batch_txs, last - next_id + 1)
        ids = range(next_id, next_id + count)
        with txs.env.read() as txn:
            records = [txs.record_in(txn, tx_id) for tx_id in ids]
            stored_nodes = [txs.aht_nodes_in(txn, tx_id) for tx_id in ids]
        try:
            sealed = codec.replicate_blobs([codec.record_export_blob(r) for r in records],
                                           next_id, chain_alh, peaks, limits)
        except IllegalArgumentsError as exc:
            raise CorruptedDataError(f"data is corrupted: {exc}") from exc
        for (header, alh, record, nodes), stored, nodes_stored in zip(sealed, records,
                                                                      stored_nodes):
            if record != stored or nodes != nodes_stored:
                raise CorruptedDataError(
                    f"data is corrupted: stored tx {header[0]} differs from its recomputation")
        chain_alh = sealed[-1][1]
        next_id += count
    return last
