"""The embedded store: LMDB environments, the writer thread, the key indexer and proofs."""
