"""``immucore-demo``: what ``make run`` starts until the network node lands.

It opens ``<dir>/defaultdb``, writes a transaction, reads it back with a proof that it checks
client-side, then brings ``<dir>/replicadb`` (a replica) up to date by exporting and replicating
every transaction it lacks, and prints both states: equal Alh means an identical log.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from . import codec
from .database import open_database


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="immucore-demo", description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="./data", help="data folder (default ./data)")
    args = parser.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    from . import verify    # imported late: the demo is also a smoke test of the verifiers

    with open_database(os.path.join(args.dir, "defaultdb"), name="defaultdb") as primary, \
            open_database(os.path.join(args.dir, "replicadb"), name="replicadb",
                          replica=True) as replica:
        trusted = primary.current_state()
        key = f"demo-{int(time.time())}".encode()
        header = primary.set({key: b"hello from immucore", b"demo-last": key})
        print(f"set {key.decode()!r} in tx {header.id} (codec: {codec.IMPLEMENTATION})")

        proof = primary.verifiable_get(key, prove_since_tx=trusted.tx_id)
        entry = proof.entry
        tx = proof.verifiable_tx.tx
        index = proof.inclusion_proof.leaf
        digest = codec.entry_digest(tx.header.version, tx.entries[index].key,
                                    b"", tx.entries[index].hvalue)
        included = verify.verify_inclusion(proof.inclusion_proof, digest, tx.header.eh)
        dual = proof.verifiable_tx.dual_proof
        consistent = trusted.tx_id == 0 or verify.verify_dual_proof(
            dual, trusted.tx_id, tx.header.id, trusted.tx_hash, tx.header.alh())
        print(f"get {entry.key.decode()!r} = {entry.value.decode()!r} (revision {entry.revision}); "
              f"inclusion proof {'verified' if included else 'FAILED'}, consistency with tx "
              f"{trusted.tx_id} {'verified' if consistent else 'FAILED'}")

        start = replica.current_state().tx_id + 1
        copied = 0
        while True:
            blobs = primary.export_txs(start + copied, 1000)
            if not blobs:
                break
            replica.replicate_txs(blobs)
            copied += len(blobs)
        p_state, r_state = primary.current_state(), replica.current_state()
        print(f"replicated {copied} txs; primary tx {p_state.tx_id} alh {p_state.tx_hash.hex()}")
        print(f"                       replica tx {r_state.tx_id} alh {r_state.tx_hash.hex()}")
        ok = included and consistent and p_state.tx_hash == r_state.tx_hash
    print("all checks passed" if ok else "CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
