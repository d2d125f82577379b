"""immucore's result types (immucore/types.py, shaped after immudb's messages) as immudb's
protobuf messages, and request messages as the embedded API's arguments."""
from __future__ import annotations

from typing import Optional

from ..errors import IllegalArgumentsError
from ..types import KVMetadata
from . import schema


def kv_metadata(md: Optional[KVMetadata]):
    """None (the field stays unset, as immudb sends nil) for an entry without metadata."""
    if md is None:
        return None
    out = schema.KVMetadata(deleted=md.deleted, nonIndexable=md.non_indexable)
    if md.expires_at is not None:
        out.expiration.expiresAt = md.expires_at
    return out


def kv_metadata_from(message) -> Optional[KVMetadata]:
    """A request's KVMetadata; an unset one is none."""
    expires_at = message.expiration.expiresAt if message.HasField("expiration") else None
    if not (message.deleted or message.nonIndexable or expires_at is not None):
        return None
    if expires_at is not None and expires_at < 0:
        raise IllegalArgumentsError("expiresAt must not be negative")
    return KVMetadata(deleted=message.deleted, expires_at=expires_at,
                      non_indexable=message.nonIndexable)


def header(h) -> "schema.TxHeader":
    """A TxHeader from the dataclass or from the writer's header tuple (its fields in order:
    id, prev_alh, ts, version, metadata, nentries, eh, bl_tx_id, bl_root)."""
    if isinstance(h, tuple):
        tx_id, prev_alh, ts, version, _metadata, nentries, eh, bl_tx_id, bl_root = h
    else:
        tx_id, prev_alh, ts, version, nentries, eh, bl_tx_id, bl_root = (
            h.id, h.prev_alh, h.ts, h.version, h.nentries, h.eh, h.bl_tx_id, h.bl_root)
    # immucore writes no tx metadata (types.TxHeader.metadata is empty): immudb sends none then
    return schema.TxHeader(id=tx_id, prevAlh=prev_alh, ts=ts, version=version,
                           nentries=nentries, eH=eh, blTxId=bl_tx_id, blRoot=bl_root)


def entry(e) -> "schema.Entry":
    out = schema.Entry(tx=e.tx, key=e.key, value=e.value, revision=e.revision)
    md = kv_metadata(e.metadata)
    if md is not None:
        out.metadata.CopyFrom(md)
    return out


def entries(items) -> "schema.Entries":
    return schema.Entries(entries=[entry(e) for e in items])


def tx(t) -> "schema.Tx":
    out = schema.Tx(header=header(t.header))
    for item in t.entries:
        proto = out.entries.add(key=item.key, hValue=item.hvalue, vLen=item.vlen)
        md = kv_metadata(item.metadata)
        if md is not None:
            proto.metadata.CopyFrom(md)
    return out


def inclusion_proof(p) -> "schema.InclusionProof":
    return schema.InclusionProof(leaf=p.leaf, width=p.width, terms=list(p.terms))


def dual_proof(p) -> "schema.DualProof":
    linear = p.linear_proof
    return schema.DualProof(
        sourceTxHeader=header(p.source_tx_header), targetTxHeader=header(p.target_tx_header),
        inclusionProof=list(p.inclusion_proof), consistencyProof=list(p.consistency_proof),
        targetBlTxAlh=p.target_bl_tx_alh, lastInclusionProof=list(p.last_inclusion_proof),
        linearProof=schema.LinearProof(sourceTxId=linear.source_tx_id,
                                       TargetTxId=linear.target_tx_id,
                                       terms=list(linear.terms)))


def signature(signed: dict):
    """The node's signature of a state (``Node.signed_state``), None without --signingKey."""
    if "signature" not in signed:
        return None
    return schema.Signature(publicKey=signed["public_key"], signature=signed["signature"])


def verifiable_tx(vtx, signed: dict) -> "schema.VerifiableTx":
    out = schema.VerifiableTx(tx=tx(vtx.tx), dualProof=dual_proof(vtx.dual_proof))
    sig = signature(signed)
    if sig is not None:
        out.signature.CopyFrom(sig)
    return out


def verifiable_entry(ventry, signed: dict) -> "schema.VerifiableEntry":
    return schema.VerifiableEntry(entry=entry(ventry.entry),
                                  verifiableTx=verifiable_tx(ventry.verifiable_tx, signed),
                                  inclusionProof=inclusion_proof(ventry.inclusion_proof))


def state(signed: dict) -> "schema.ImmutableState":
    out = schema.ImmutableState(db=signed["db"], txId=signed["tx_id"], txHash=signed["tx_hash"])
    sig = signature(signed)
    if sig is not None:
        out.signature.CopyFrom(sig)
    return out
