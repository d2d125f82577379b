"""The asyncio driver of one replica database: carries out what ``ReplicaMachine`` decides.

The machine (machine.py) holds every rule; this driver only does I/O, one task per command:
    * log in to the primary with the configured user (admin on the primary database);
    * CheckPrimary: read the primary's state and its Alh at our tip (and floor) — divergence;
    * Fetch: EXPORT_TXS for everything after our tip; a caught-up replica's request waits on the
      primary and is answered by the next commit, so new txs arrive within milliseconds;
    * Apply: ``replicate_txs_async`` verifies every Eh, prevAlh and blRoot and writes the batch
      with one LMDB transaction and fsync, while the next batch is already being fetched;
    * Ack: REPLICA_ACK tells the primary what we durably hold (sync replication counts it);
    * Discard: drop precommitted txs above the floor (``--replication-allow-tx-discarding``);
    * Backoff: close, wait (capped exponential with jitter), connect again — resuming at the
      last durable tx + 1;
    * Stop: terminal divergence, reported by status, log and metrics.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Optional

from ..client import AsyncClient
from ..constants import (REPLICATION_BACKOFF_SECONDS_MAX, REPLICATION_BACKOFF_SECONDS_MIN,
                         REPLICATION_BATCH_TXS, REPLICATION_CHAIN_IDS_MAX,
                         REPLICATION_GRACE_SECONDS,
                         REPLICATION_QUEUE_BATCHES,
                         REPLICATION_QUEUE_BYTES_MAX, REPLICATION_WAIT_MS)
from ..errors import ReplicaDivergedError
from . import machine as m
from .grpc_source import GrpcPrimary

log = logging.getLogger("immucore.replication")


class Durations:
    """A histogram of durations for Prometheus (cumulative counts per upper bound, in seconds),
    kept here and read when metrics are scraped."""
    BOUNDS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)

    def __init__(self):
        self.counts = [0] * (len(self.BOUNDS) + 1)      # the last one: above every bound
        self.total_seconds = 0.0

    def observe(self, seconds: float):
        self.counts[next((i for i, bound in enumerate(self.BOUNDS) if seconds <= bound),
                         len(self.BOUNDS))] += 1
        self.total_seconds += seconds

    def buckets(self) -> list:
        """``[(le, cumulative count), ...]`` ending with ``+Inf``, as Prometheus wants them."""
        out, running = [], 0
        for bound, count in zip([str(b) for b in self.BOUNDS] + ["+Inf"], self.counts):
            running += count
            out.append((bound, running))
        return out


class Replicator:
    def __init__(self, database, settings: dict, tls=None, replica_id: str = "",
                 tls_ca_file: str = ""):
        self.database = database
        self._tls = tls                    # an ssl.SSLContext verifying the primary, or None
        self._tls_ca_file = tls_ca_file    # the same CA, for a primary followed over gRPC
        self.primary = (f"{settings['primary_host']}:{settings['primary_port']}/"
                        f"{settings['primary_database']}")
        self._settings = settings
        self._replica_id = replica_id or f"{id(self):x}/{database.name}"
        state = database.current_state()
        self.machine = m.ReplicaMachine(
            state.tx_id, state.tx_hash, database.discard_floor,
            batch_txs=REPLICATION_BATCH_TXS, queue_batches=REPLICATION_QUEUE_BATCHES,
            queue_bytes=REPLICATION_QUEUE_BYTES_MAX,
            backoff_seconds_min=REPLICATION_BACKOFF_SECONDS_MIN,
            backoff_seconds_max=REPLICATION_BACKOFF_SECONDS_MAX,
            allow_discarding=bool(settings.get("allow_tx_discarding")), primary=self.primary)
        self.last_applied_at = 0.0
        self.last_contact_at = 0.0          # time.time() of the primary's last answer
        self._contact_monotonic = 0.0       # the same on the monotonic clock
        self.retry_delay_seconds = 0.0      # the backoff under way, 0 when not retrying
        self.apply_seconds = Durations()    # each applied batch: immudb_replication_commit_time
        self._caught_up_at = time.monotonic()   # lag_seconds: how long we have been behind
        self._task: Optional[asyncio.Task] = None
        self._client: Optional[AsyncClient] = None
        self._events: Optional[asyncio.Queue] = None
        self._tasks: set = set()            # fetch/ack/check tasks of the current connection
        self._apply_task: Optional[asyncio.Task] = None
        # the chain of the primary's last EXPORT_TXS answer (its id first): what this database
        # reports above itself to its own replicas, so that a loop of replicas is seen
        self.upstream_chain: list = []
        self._answered_on_connection = False   # the first fetch of a connection does not wait

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self.machine.state

    @property
    def last_error(self) -> Optional[str]:
        return self.machine.last_error

    @property
    def retries(self) -> int:
        return self.machine.retries

    @property
    def primary_committed_tx_id(self) -> Optional[int]:
        """The primary's last tx as last heard; None until it was."""
        return self.machine.primary_committed_tx_id if self.machine.primary_known else None

    def start(self):
        self._task = asyncio.ensure_future(self._run())

    async def stop(self):
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self.machine.stopped()

    def status(self) -> dict:
        """What ``database list`` and the metrics show. The lag is None (unknown) until the
        primary's last tx was heard and once the logs diverged; while the primary is not
        followed (retrying, checking) it is the last known one, as of the last contact."""
        primary_tx_id = self.primary_committed_tx_id
        lag_txs = lag_seconds = None
        now = time.monotonic()
        if primary_tx_id is not None and self.state != "diverged":
            lag_txs = max(primary_tx_id - self.database.current_state().tx_id, 0)
            following = self.state == "following"
            if lag_txs == 0:
                if following:
                    self._caught_up_at = now
                lag_seconds = 0.0
            else:
                # an upper bound: the replica held everything the primary had committed then
                lag_seconds = round((now if following else self._contact_monotonic)
                                    - self._caught_up_at, 3)
        return {"state": self.state, "primary": self.primary, "last_error": self.last_error,
                "retries": self.retries, "primary_committed_tx_id": primary_tx_id,
                "lag_txs": lag_txs, "lag_seconds": lag_seconds,
                "seconds_since_last_contact": (round(time.time() - self.last_contact_at, 3)
                                               if self.last_contact_at else None),
                "seconds_since_last_apply": (round(time.time() - self.last_applied_at, 3)
                                             if self.last_applied_at else None),
                "retry_delay_seconds": self.retry_delay_seconds}

    def _contact(self):
        """The primary answered (a login, a check, an export, an ack)."""
        self.last_contact_at, self._contact_monotonic = time.time(), time.monotonic()

    # --- the event loop of the machine --------------------------------------------------

    async def _run(self):
        self._events = asyncio.Queue()
        try:
            self._spawn(self._connect())
            while True:
                event, args = await self._events.get()
                if event == "backoff":
                    commands = await self._backoff(*args)
                else:
                    commands = getattr(self.machine, event)(*args)
                if self.machine.lag_txs == 0 and self.state == "following":
                    self._caught_up_at = time.monotonic()
                for command in commands:
                    if isinstance(command, m.Stop):
                        log.error("replication of %s stopped: %s", self.database.name,
                                  command.reason)
                        return
                    self._execute(command)
        finally:
            await self._drop_connection()
            if self._apply_task is not None:
                await asyncio.gather(self._apply_task, return_exceptions=True)

    def _post(self, event: str, *args):
        self._events.put_nowait((event, args))

    def _spawn(self, coro, *, apply: bool = False) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        if apply:
            self._apply_task = task
        else:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return task

    def _execute(self, command):
        if isinstance(command, m.Fetch):
            self._spawn(self._fetch(command))
        elif isinstance(command, m.Apply):
            self._spawn(self._apply(command), apply=True)
        elif isinstance(command, m.Ack):
            self._spawn(self._ack(command))
        elif isinstance(command, m.CheckPrimary):
            self._spawn(self._check_primary(command))
        elif isinstance(command, m.Discard):
            # like an apply, a discard is local work that outlives the connection
            self._spawn(self._discard(command), apply=True)
        elif isinstance(command, m.Backoff):
            self._post("backoff", command.seconds)
        else:
            raise TypeError(f"unknown replication command {command!r}")

    def _fail(self, exc: BaseException, diverged_is_terminal: bool = True):
        diverged = diverged_is_terminal and isinstance(exc, ReplicaDivergedError)
        self._post("failed", self._explained(exc), diverged)

    def _explained(self, exc: BaseException) -> str:
        """The error as the status shows it; a permission refusal says what is needed."""
        text = f"{type(exc).__name__}: {exc}"
        if getattr(exc, "code", None) in ("permission_denied", "no_database_permission"):
            s = self._settings
            text += (f" (user {s['primary_username']} needs admin on database "
                     f"{s['primary_database']} of the primary {s['primary_host']}:"
                     f"{s['primary_port']})")
        return text

    # --- commands ---------------------------------------------------------------------------

    def _primary_client(self):
        """The transport to the primary: the native client, or immudb's gRPC replication
        protocol (``--replication-primary-protocol grpc``, replication/grpc_source.py) behind
        the same calls; the machine and the verification are the same either way."""
        s = self._settings
        timeout = REPLICATION_WAIT_MS / 1000 + REPLICATION_GRACE_SECONDS
        if s.get("primary_protocol") == "grpc":
            credentials = None
            if self._tls is not None or self._tls_ca_file:
                import grpc
                roots = None
                if self._tls_ca_file:
                    with open(self._tls_ca_file, "rb") as f:
                        roots = f.read()
                credentials = grpc.ssl_channel_credentials(root_certificates=roots)
            return GrpcPrimary(self.database, s["primary_host"], s["primary_port"],
                               credentials=credentials, timeout_seconds=timeout,
                               primary=self.primary, replica_id=self._replica_id)
        return AsyncClient(s["primary_host"], s["primary_port"], timeout=timeout, ssl=self._tls)

    async def _connect(self):
        s = self._settings
        client = self._primary_client()
        try:
            await client.login(s["primary_username"], s["primary_password"],
                               s["primary_database"])
        except asyncio.CancelledError:
            await client.close()
            raise
        except Exception as exc:  # noqa: BLE001 - reported by the machine, retried with backoff
            await client.close()
            log.warning("replication of %s: cannot log in to %s: %s", self.database.name,
                        self.primary, exc)
            self._fail(exc)
            return
        self._client = client
        self._answered_on_connection = False
        self._contact()
        self._post("connected")

    async def _backoff(self, seconds: float) -> list:
        log.warning("replication of %s from %s failed (%d in a row): %s; retrying in %.1fs",
                    self.database.name, self.primary, self.machine.failures_in_a_row,
                    self.machine.last_error, seconds)
        await self._drop_connection()
        if self._apply_task is not None:     # resume after what is being applied now
            await asyncio.gather(self._apply_task, return_exceptions=True)
            self._apply_task = None
        commands = self._drain_apply_events()
        self.retry_delay_seconds = seconds
        try:
            await asyncio.sleep(seconds)
        finally:
            self.retry_delay_seconds = 0.0
        self._spawn(self._connect())
        return [c for c in commands if not isinstance(c, (m.Fetch, m.Ack))]

    def _drain_apply_events(self) -> list:
        """Feed the outcome of the apply that just ended to the machine (before reconnecting);
        other events of the dropped connection are stale and skipped."""
        commands = []
        while not self._events.empty():
            event, args = self._events.get_nowait()
            if event in ("applied", "apply_failed", "discarded"):
                commands += getattr(self.machine, event)(*args)
        return commands

    async def _drop_connection(self):
        tasks, self._tasks = list(self._tasks), set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def _fetch(self, command: m.Fetch):
        try:
            # the first answer of a connection comes at once, without waiting for a commit:
            # it tells who the primary follows (a loop is seen now, not after a long poll)
            answer = await self._client.export_batch(
                command.first_tx_id, command.count,
                wait_ms=REPLICATION_WAIT_MS if self._answered_on_connection else 0)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)
            return
        self._contact()
        self._answered_on_connection = True
        chain = answer.get("chain")       # a primary that does not say: no loop can be seen
        if isinstance(chain, list):
            self.upstream_chain = [c for c in chain if isinstance(c, str)][
                :REPLICATION_CHAIN_IDS_MAX]
            if self._replica_id in self.upstream_chain:
                self._post("loop_detected",
                           f"replication loop: the primary {self.primary} follows this "
                           f"database ({self.database.name}), "
                           f"{self.upstream_chain.index(self._replica_id)} hop(s) up")
                return
        blobs = answer["blobs"]
        last = int.from_bytes(blobs[-1][4:12], "big") if blobs else command.first_tx_id - 1
        self._post("received", command.epoch, command.first_tx_id, blobs, last,
                   # a primary that does not say what it acknowledged: assume all of it
                   answer["committed_tx_id"], answer.get("acked_tx_id", last),
                   answer.get("last_alh"))

    async def _apply(self, command: m.Apply):
        started = time.monotonic()
        try:
            headers = await asyncio.wrap_future(self.database.replicate_txs_async(
                command.blobs, floor_tx_id=command.floor_tx_id, last_alh=command.last_alh))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - nothing of the batch was applied
            log.error("replication of %s: batch %d..%d rejected: %s", self.database.name,
                      command.first_tx_id, command.last_tx_id, exc)
            self._post("apply_failed", f"{type(exc).__name__}: {exc}",
                       isinstance(exc, ReplicaDivergedError))
            return
        self.last_applied_at = time.time()
        self.apply_seconds.observe(time.monotonic() - started)
        last = headers[-1]
        self._post("applied", last[0], headers.last_alh)     # the writer's: no LMDB read here

    async def _ack(self, command: m.Ack):
        try:
            await self._client.replica_ack(self._replica_id, command.tx_id, command.alh)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - even "diverged": the reconnect's check decides
            self._fail(exc, diverged_is_terminal=False)
            return
        self._contact()

    async def _check_primary(self, command: m.CheckPrimary):
        try:
            state = await self._client.current_state()
            primary_alhs = {}
            for tx_id in command.tx_ids:
                primary_alhs[tx_id] = ((await self._client.tx_by_id(tx_id)).header.alh()
                                       if 0 < tx_id <= state.tx_id else None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)
            return
        self._contact()
        try:
            local_alhs = {tx_id: self.database.alh_of(tx_id) for tx_id in command.tx_ids}
        except Exception as exc:  # noqa: BLE001 - e.g. the database is closing
            self._fail(exc)
            return
        self._post("primary_checked", command.epoch, state.tx_id, primary_alhs, local_alhs)

    async def _discard(self, command: m.Discard):
        log.warning("replication of %s: discarding txs after %d (not acknowledged by the "
                    "primary): %s", self.database.name, command.after_tx_id, self.last_error)
        try:
            state = await asyncio.get_running_loop().run_in_executor(
                None, self.database.discard_txs_after, command.after_tx_id)
        except Exception as exc:  # noqa: BLE001
            self._post("failed", f"discarding failed: {exc}", True)
            return
        self._post("discarded", state.tx_id, state.tx_hash)
