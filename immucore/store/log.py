"""The tx log's read side: records, Alhs, chain-state recovery and exports, over ``<db>/log``.

The writer (``store/writer.py``) is the only code that writes the log; everything that reads
it goes through ``TxLog``. Layouts: ``store/layout.py``.
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple

from .. import codec
from ..errors import CorruptedDataError, TxNotFoundError
from .aht import AhtReader, peaks_for
from .layout import SETTINGS_KEY, decode_settings, record_alh, tx_id_of_key, tx_key
from .writer import ChainState

EMPTY_ALH = codec.sha256(b"")


class ExportRange(NamedTuple):
    """Consecutive committed txs as export blobs, all read from one LMDB snapshot."""
    blobs: List[bytes]
    last_alh: bytes            # the Alh of the last blob's tx (None when there is no blob)
    committed_tx_id: int       # the last committed tx when the snapshot was taken


class TxLog:
    """Reads of the log environment ``env``; ``state()`` is the writer's committed chain state
    (replaced by every commit, and so also what a ``ReadBurst`` renews its snapshot on)."""

    def __init__(self, env, state: Callable[[], ChainState]):
        self.env = env
        self.state = state
        self._tx_db = env.dbs["tx"]
        self._aht_db = env.dbs["aht"]

    # --- one tx -------------------------------------------------------------------------------

    def record(self, tx_id: int) -> bytes:
        """Tx ``tx_id``'s record (TxNotFoundError if the log has none)."""
        with self.env.read() as txn:
            return self.record_in(txn, tx_id)

    def record_in(self, txn, tx_id: int):
        """Tx ``tx_id``'s record in an open read transaction (a buffer if it has buffers)."""
        record = txn.get(tx_key(tx_id), db=self._tx_db)
        if record is None:
            raise TxNotFoundError()
        return record

    def alh_in(self, txn, tx_id: int) -> bytes:
        return record_alh(self.record_in(txn, tx_id))

    def alh(self, tx_id: int) -> bytes:
        with self.env.read(buffers=True) as txn:
            return self.alh_in(txn, tx_id)

    def aht_nodes_in(self, txn, tx_id: int):
        """The AHT nodes tx ``tx_id`` completed (None if it has none)."""
        return txn.get(tx_key(tx_id), db=self._aht_db)

    def aht_in(self, txn) -> AhtReader:
        return AhtReader(txn, self._aht_db)

    def settings(self):
        """The database's stored settings (a dict), or None for a new log."""
        with self.env.read() as txn:
            return decode_settings(txn.get(SETTINGS_KEY, db=self.env.dbs["meta"]))

    # --- recovery -----------------------------------------------------------------------------

    def load_chain_state(self) -> ChainState:
        """Read the last tx and the AHT peaks; check the log's tail is whole and consistent."""
        with self.env.read() as txn:
            cursor = txn.cursor(self._tx_db)
            if not cursor.last():
                return ChainState(0, EMPTY_ALH, [])
            tx_id = tx_id_of_key(cursor.key())
            header, alh, _ = codec.decode_record(cursor.value())
            if header[0] != tx_id or codec.alh(header[0], header[1],
                                               codec.inner_hash(*header)) != alh:
                raise CorruptedDataError(f"data is corrupted: ALH mismatch at tx {tx_id}")
            reader = self.aht_in(txn)
            if self.aht_nodes_in(txn, tx_id) is None:
                raise CorruptedDataError(f"data is corrupted: AHT has no leaf for tx {tx_id}")
            peaks = peaks_for(reader, tx_id)
            if header[7] and codec.aht_root(peaks_for(reader, header[7])) != header[8]:
                raise CorruptedDataError(f"data is corrupted: blRoot mismatch at tx {tx_id}")
            return ChainState(tx_id, alh, peaks)

    # --- exports ------------------------------------------------------------------------------

    def export_range(self, first: int, count: int, size_max: int) -> ExportRange:
        """Export blobs of up to ``count`` committed txs from ``first``, stopping before their
        total passes ``size_max`` (at least one blob when there is one), with the last one's
        Alh and the committed tx id: all from one snapshot, so the Alh is the one of the very
        record the last blob was cut from."""
        state = self.state()        # before the snapshot: it holds every tx up to state's
        last = min(state.tx_id, first + count - 1)
        blobs, size, last_alh = [], 0, None
        if first > last:
            return ExportRange(blobs, last_alh, state.tx_id)
        with self.env.read(buffers=True) as txn:
            cursor = txn.cursor(self._tx_db)
            if cursor.set_key(tx_key(first)):
                for key, record in cursor:
                    if tx_id_of_key(key) > last:
                        break
                    blob = codec.record_export_blob(record)
                    if blobs and size + len(blob) > size_max:
                        break
                    blobs.append(blob)
                    size += len(blob)
                    last_record = record
                if blobs:
                    last_alh = record_alh(last_record)
        return ExportRange(blobs, last_alh, state.tx_id)
