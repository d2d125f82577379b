"""The replicator of one replica database: pull committed txs from the primary, verify, apply.

    1. connect to the primary and log in with the configured user (admin on the primary db);
    2. compare states: the primary's tx at our last id must have our Alh — else the logs
       diverged, and replication stops with a terminal error (immudb's async replicas retry
       forever instead);
    3. loop: ask for everything after our last tx (EXPORT_TXS, up to REPLICATION_BATCH_TXS, long
       polling REPLICATION_WAIT_MS when caught up, so a new commit arrives within milliseconds);
       while one batch is verified and applied (``replicate_txs_async``: every Eh, prevAlh,
       blRoot checked, one LMDB transaction and fsync), the next one is already being fetched;
    4. any failure: disconnect, back off (capped exponential with jitter), resume from the
       last durable tx + 1. Nothing is re-downloaded and nothing applied twice.
Status (state, lag, last error, retries) is read by ``immuadmin database list`` and metrics.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Optional

from ..client import AsyncClient
from ..constants import (REPLICATION_BACKOFF_SECONDS_MAX, REPLICATION_BACKOFF_SECONDS_MIN,
                         REPLICATION_BATCH_TXS, REPLICATION_WAIT_MS)
from ..errors import ReplicaDivergedError

log = logging.getLogger("immucore.replication")


class Replicator:
    def __init__(self, database, settings: dict, tls=None):
        self.database = database
        self._tls = tls                    # an ssl.SSLContext verifying the primary, or None
        self.primary = (f"{settings['primary_host']}:{settings['primary_port']}/"
                        f"{settings['primary_database']}")
        self._settings = settings
        self.state = "starting"
        self.last_error: Optional[str] = None
        self.retries = 0
        self.primary_committed_tx_id = 0
        self.last_applied_at = 0.0
        self._task: Optional[asyncio.Task] = None

    # --- lifecycle ------------------------------------------------------------------------

    def start(self):
        self._task = asyncio.ensure_future(self._run())

    async def stop(self):
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.state != "diverged":
            self.state = "stopped"

    def status(self) -> dict:
        local = self.database.current_state().tx_id
        return {"state": self.state, "primary": self.primary, "last_error": self.last_error,
                "retries": self.retries, "primary_committed_tx_id": self.primary_committed_tx_id,
                "lag_txs": max(self.primary_committed_tx_id - local, 0),
                "seconds_since_last_apply": (round(time.time() - self.last_applied_at, 3)
                                             if self.last_applied_at else None)}

    # --- the loop -------------------------------------------------------------------------

    async def _run(self):
        failures = 0
        while True:
            client = AsyncClient(self._settings["primary_host"], self._settings["primary_port"],
                                 timeout=REPLICATION_WAIT_MS / 1000 + 30, ssl=self._tls)
            try:
                await self._follow(client)
            except asyncio.CancelledError:
                raise
            except ReplicaDivergedError as exc:
                self.state, self.last_error = "diverged", str(exc)
                log.error("replication of %s stopped: %s", self.database.name, exc)
                return
            except Exception as exc:  # noqa: BLE001 - reported, retried with backoff
                failures += 1
                self.retries += 1
                self.state = "retrying"
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("replication of %s from %s failed (%d in a row): %s",
                            self.database.name, self.primary, failures, exc)
            finally:
                await client.close()
            delay = min(REPLICATION_BACKOFF_SECONDS_MIN * 2 ** max(failures - 1, 0),
                        REPLICATION_BACKOFF_SECONDS_MAX)
            await asyncio.sleep(delay * random.uniform(0.9, 1.0))

    async def _follow(self, client: AsyncClient):
        s = self._settings
        await client.login(s["primary_username"], s["primary_password"], s["primary_database"])
        await self._check_divergence(client)
        self.state, self.last_error = "following", None
        db = self.database
        fetch = asyncio.ensure_future(self._fetch(client, db.current_state().tx_id + 1))
        try:
            while True:
                blobs = await fetch
                if not blobs:
                    fetch = asyncio.ensure_future(self._fetch(client,
                                                              db.current_state().tx_id + 1))
                    continue
                next_id = int.from_bytes(blobs[-1][4:12], "big") + 1
                fetch = asyncio.ensure_future(self._fetch(client, next_id))   # overlaps the apply
                await asyncio.wrap_future(db.replicate_txs_async(blobs))
                self.last_applied_at = time.time()
        finally:
            fetch.cancel()
            await asyncio.gather(fetch, return_exceptions=True)

    async def _fetch(self, client: AsyncClient, first_tx_id: int):
        blobs, committed = await client.export_txs(first_tx_id, REPLICATION_BATCH_TXS,
                                                   wait_ms=REPLICATION_WAIT_MS, with_state=True)
        self.primary_committed_tx_id = committed
        return blobs

    async def _check_divergence(self, client: AsyncClient):
        """Our last tx must be the primary's tx at that id (same Alh), or the logs diverged."""
        local = self.database.current_state()
        if local.tx_id == 0:
            return
        primary_state = await client.current_state()
        if primary_state.tx_id < local.tx_id:
            raise ReplicaDivergedError(
                f"replica diverged from primary: replica is at tx {local.tx_id}, primary "
                f"{self.primary} only at tx {primary_state.tx_id}")
        header = (await client.tx_by_id(local.tx_id)).header
        if header.alh() != local.tx_hash:
            raise ReplicaDivergedError(
                f"replica diverged from primary: tx {local.tx_id} has a different Alh on "
                f"{self.primary}")
