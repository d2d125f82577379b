"""``FlatTx``: one transaction's entries in the shape the wire carries them.

A SET arrives as ``kvs_flat: [k1, v1, k2, v2, ...]`` plus at most one kv-metadata for all of its
entries. ``build_txs`` takes that list as it is, so a 1000-entry SET is checked and laid out in C
instead of being rebuilt in Python as a thousand ``(key, value, metadata)`` tuples first (that
rebuilding was about half of the event loop's time per 1000-entry SET).

Its own module, importing nothing from immucore: both codecs import it, and the native one loads
while the ``immucore.codec`` package is still being imported.
"""
from typing import NamedTuple


class FlatTx(NamedTuple):
    kvs: list     # keys and values alternating: [k1, v1, k2, v2, ...], each bytes
    md: bytes     # the kv-metadata of every entry (``KVMetadata.to_bytes()``), b"" for none
