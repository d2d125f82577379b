"""The codec: immudb's encodings and hashes, native (Cython, ``immucore._native``) or pure Python.

``IMMUCORE_FORCE_NATIVE=1`` makes a missing or broken extension an import error (``make test``
sets it, so CI can never pass on the fallback alone); ``IMMUCORE_FORCE_PURE=1`` selects the
pure-Python reference. Otherwise the native codec is used when it imports.
"""
import os

_force_native = os.environ.get("IMMUCORE_FORCE_NATIVE") == "1"
_force_pure = os.environ.get("IMMUCORE_FORCE_PURE") == "1"
if _force_native and _force_pure:
    raise ImportError("IMMUCORE_FORCE_NATIVE and IMMUCORE_FORCE_PURE are both set")

if _force_pure:
    from .pure import *  # noqa: F401,F403
    from .pure import IMPLEMENTATION  # noqa: F401 - re-exported
else:
    try:
        from .._native import *  # noqa: F401,F403
        from .._native import IMPLEMENTATION  # noqa: F401 - re-exported
    except ImportError as exc:
        if _force_native:
            raise ImportError(
                "IMMUCORE_FORCE_NATIVE=1 but the native codec immucore._native does not import "
                f"({exc}); build it with `pip install -e .` or `make test`") from exc
        from .pure import *  # noqa: F401,F403
        from .pure import IMPLEMENTATION  # noqa: F401 - re-exported

API = ("sha256", "kv_metadata_bytes", "parse_kv_metadata", "encode_header", "decode_header",
       "inner_hash", "alh", "entry_digest", "entries_hash", "htree_inclusion_proof", "aht_root",
       "aht_append", "build_txs", "blob_tx_id", "verify_blob", "replicate_blobs", "record_export_blob",
       "record_alh", "decode_record", "record_entry", "record_entry_at", "record_entry_count",
       "record_digests", "index_key", "index_items")
