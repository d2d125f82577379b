"""Result types: plain frozen dataclasses named and shaped after immudb's proto messages.

Hashes are 32-byte ``bytes``; ids are ``int``; keys inside ``TxEntry``/``Tx`` are the stored
(prefixed) keys, as immudb returns them, while ``Entry.key`` is the caller's key.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from typing import Optional, Tuple

from . import codec
from .errors import IllegalArgumentsError


@dataclass(frozen=True, slots=True)
class KVMetadata:
    deleted: bool = False
    expires_at: Optional[int] = None   # Unix seconds (a UTC datetime is accepted and converted)
    non_indexable: bool = False

    def __post_init__(self):
        if isinstance(self.expires_at, _dt.datetime):
            moment = self.expires_at
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=_dt.timezone.utc)
            object.__setattr__(self, "expires_at", int(moment.timestamp()))
        elif self.expires_at is not None:
            if not isinstance(self.expires_at, int) or isinstance(self.expires_at, bool):
                raise IllegalArgumentsError("expires_at must be a datetime or Unix seconds")
            if not 0 <= self.expires_at < 1 << 63:
                raise IllegalArgumentsError("expires_at out of range")

    def to_bytes(self) -> bytes:
        return codec.kv_metadata_bytes(self.deleted, self.expires_at, self.non_indexable)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Optional["KVMetadata"]:
        """None for empty metadata, as immudb returns nil."""
        if not raw:
            return None
        deleted, expires_at, non_indexable = codec.parse_kv_metadata(raw)
        return cls(deleted, expires_at, non_indexable)

    def expired(self, now_seconds: float) -> bool:
        return self.expires_at is not None and self.expires_at <= now_seconds


@dataclass(frozen=True, slots=True)
class TxHeader:
    id: int
    prev_alh: bytes
    ts: int
    version: int
    metadata: bytes          # tx metadata bytes; immucore writes none
    nentries: int
    eh: bytes
    bl_tx_id: int
    bl_root: bytes

    def inner_hash(self) -> bytes:
        return codec.inner_hash(*self.as_tuple())

    def alh(self) -> bytes:
        return codec.alh(self.id, self.prev_alh, self.inner_hash())

    def to_bytes(self) -> bytes:
        """immudb's ``TxHeader.Bytes`` serialization (docs/immudb-format.md §5)."""
        return codec.encode_header(*self.as_tuple())

    def as_tuple(self) -> tuple:
        return (self.id, self.prev_alh, self.ts, self.version, self.metadata, self.nentries,
                self.eh, self.bl_tx_id, self.bl_root)


@dataclass(frozen=True, slots=True)
class TxEntry:
    key: bytes               # stored key, with its 0x00 prefix
    hvalue: bytes
    vlen: int
    metadata: Optional[KVMetadata]


@dataclass(frozen=True, slots=True)
class Tx:
    header: TxHeader
    entries: Tuple[TxEntry, ...]


@dataclass(frozen=True, slots=True)
class Entry:
    tx: int
    key: bytes               # the caller's key
    value: bytes             # the caller's value
    metadata: Optional[KVMetadata]
    revision: int


@dataclass(frozen=True, slots=True)
class InclusionProof:
    leaf: int
    width: int
    terms: Tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class LinearProof:
    source_tx_id: int
    target_tx_id: int
    terms: Tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class DualProof:
    source_tx_header: TxHeader
    target_tx_header: TxHeader
    inclusion_proof: Tuple[bytes, ...]
    consistency_proof: Tuple[bytes, ...]
    target_bl_tx_alh: bytes
    last_inclusion_proof: Tuple[bytes, ...]
    linear_proof: LinearProof


@dataclass(frozen=True, slots=True)
class VerifiableTx:
    tx: Tx
    dual_proof: DualProof


@dataclass(frozen=True, slots=True)
class VerifiableEntry:
    entry: Entry
    verifiable_tx: VerifiableTx
    inclusion_proof: InclusionProof


@dataclass(frozen=True, slots=True)
class State:
    db: str
    tx_id: int
    tx_hash: bytes
