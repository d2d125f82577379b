"""Signed states, as immudb signs them: ECDSA P-256 over H(u32 len(db) || db || u64 tx_id ||
tx_hash), DER-encoded; the public key travels as the uncompressed point 0x04 || X || Y.

The node signs with ``--signingKey`` (a PEM private key); a client given the public key checks
every state it is handed, so a node cannot show different histories to different clients
without holding the key.
"""
from __future__ import annotations

import struct

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .errors import IllegalArgumentsError, VerificationError


def state_bytes(db: str, tx_id: int, tx_hash: bytes) -> bytes:
    name = db.encode()
    return struct.pack(">I", len(name)) + name + struct.pack(">Q", tx_id) + tx_hash


class StateSigner:
    def __init__(self, private_key: ec.EllipticCurvePrivateKey):
        if not isinstance(private_key, ec.EllipticCurvePrivateKey) or \
                not isinstance(private_key.curve, ec.SECP256R1):
            raise IllegalArgumentsError("the signing key must be an ECDSA P-256 private key")
        self._key = private_key
        self.public_key = private_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)

    @classmethod
    def from_pem_file(cls, path: str) -> "StateSigner":
        with open(path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
        return cls(key)

    def sign(self, db: str, tx_id: int, tx_hash: bytes) -> bytes:
        # ECDSA(SHA256) hashes the message itself: this signs H(state bytes), as immudb does.
        return self._key.sign(state_bytes(db, tx_id, tx_hash), ec.ECDSA(hashes.SHA256()))


def verify_state_signature(public_key: bytes, db: str, tx_id: int, tx_hash: bytes,
                           signature: bytes) -> None:
    """Raise VerificationError unless ``signature`` is the key's signature of that state."""
    try:
        key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), public_key)
        key.verify(signature, state_bytes(db, tx_id, tx_hash), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise VerificationError(f"state signature does not verify for {db} at tx {tx_id}") \
            from exc


def load_public_key(path_or_bytes) -> bytes:
    """A public key from a PEM file path or raw point bytes, as the uncompressed point."""
    if isinstance(path_or_bytes, (bytes, bytearray)):
        return bytes(path_or_bytes)
    with open(path_or_bytes, "rb") as f:
        data = f.read()
    key = serialization.load_pem_public_key(data)
    return key.public_bytes(serialization.Encoding.X962,
                            serialization.PublicFormat.UncompressedPoint)
