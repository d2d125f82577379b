"""The node: one process serving many databases — systemdb (users, database settings),
defaultdb and user databases — over the framed protocol.

Folder layout under ``--dir``: ``systemdb/``, ``defaultdb/`` and one folder per user database,
each an immucore database (docs/storage.md), and ``immucore.lock``: the node holds it for its
life, so a second node on the folder is refused (``store/folder_lock.py``). Database settings
live in systemdb under ``0x02 || name`` (JSON, immudb's field names), so they persist and are
restored on restart.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import logging
import os
import shutil
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from .. import __version__
from ..constants import (CONNECTIONS_MAX_DEFAULT, DATABASES_ACTIVE_MAX_DEFAULT,
                         FOLDER_LOCK_WAIT_SECONDS, NODE_STOP_ANSWERS_SECONDS_MAX,
                         PREAUTH_CONNECTIONS_MAX,
                         REPLICATION_SYNC_TIMEOUT_SECONDS, SESSION_INACTIVITY_SECONDS,
                         SESSIONS_MAX_DEFAULT, TOKEN_SESSION_INACTIVITY_SECONDS,
                         TOKEN_SESSIONS_PER_USER_MAX, REPLICATION_CHAIN_IDS_MAX)
from ..database import Database, open_database
from ..durable_file import replace_durably
from ..errors import (DatabaseClosedError, IllegalArgumentsError, ImmucoreError,
                      ReplicationLoopError)
from ..store.folder_lock import FolderLock
from . import auth, settings as dbsettings
from ..replication.acks import SyncAcks
from ..replication.replicator import Replicator
from .connection import Connection

log = logging.getLogger("immucore.node")
SETTINGS_PREFIX = b"\x02"
READ_THREADS = 8


def _is_loopback(peer) -> bool:
    """Whether a peer address (asyncio's peername) is loopback; an IPv4 peer of a dual-stack
    listener arrives as ``::ffff:127.0.0.1``. An address that cannot be read is not."""
    try:
        address = ipaddress.ip_address(peer[0])
    except (TypeError, IndexError, ValueError):
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


class DatabaseError(ImmucoreError):
    """A database management request that cannot be done (missing, exists, reserved…)."""


class TooManyDatabasesError(DatabaseError):
    """A create or load past --max-active-databases (wire code ``too_many_databases``)."""


class NotPrimaryError(ImmucoreError):
    """A sync write's database was demoted to a replica before enough replicas held it."""


class FollowingReplicaError(ImmucoreError):
    """REPLICATE_TX into a replica that follows a primary with its own replicator."""


@dataclass
class NodeOptions:
    dir: str = "./data"
    address: str = "0.0.0.0"
    port: int = 3322
    grpc_port: int = 0             # immudb's gRPC API on its own port (immucore/grpc); 0: off
    admin_password: str = "immudb"
    synced: bool = True
    max_sessions: int = SESSIONS_MAX_DEFAULT
    max_connections: int = CONNECTIONS_MAX_DEFAULT
    # databases loaded at once, systemdb aside (each runs an index worker process)
    max_active_databases: int = DATABASES_ACTIVE_MAX_DEFAULT
    metrics_server: bool = True
    metrics_server_port: int = 9497
    pidfile: str = ""
    logfile: str = ""
    signing_key: str = ""
    certificate: str = ""          # TLS for clients and replicas (with pkey); off when empty
    pkey: str = ""
    replication_tls_ca: str = ""   # replicators use TLS and verify primaries against this CA
    # a sync commit not acknowledged by enough replicas within this fails (it stays durable)
    replication_sync_timeout: float = REPLICATION_SYNC_TIMEOUT_SECONDS
    # server-level replication flags: on a replica, systemdb and defaultdb follow the primary's;
    # on a primary, the sync flags apply to defaultdb
    replication: dict = field(default_factory=dict)


def _resolve_quietly(waiter: asyncio.Future):
    if not waiter.done():
        waiter.set_result(None)


class Node:
    def __init__(self, options: NodeOptions):
        self.options = options
        self.started_at = time.time()
        self.started_monotonic = time.monotonic()   # uptime: immune to clock steps
        if options.max_connections < 1:
            raise IllegalArgumentsError(
                f"max connections must be at least 1, not {options.max_connections}")
        if options.max_active_databases < 1:
            raise IllegalArgumentsError("--max-active-databases must be at least 1 (defaultdb), "
                                        f"not {options.max_active_databases}")
        self.connections = set()
        # gRPC connections spliced from the shared port to the internal gRPC endpoint
        # (server/shared_port.py); they count against --max-connections
        self.spliced = set()
        self.spliced_peers: Dict[int, tuple] = {}  # a splice's local port -> its real peer
        self.grpc_internal_endpoint = None   # (host, port) when gRPC shares --port
        self.logged_in_connections = 0   # of them; kept by Connection.logged_in/logged_out
        self.databases: Dict[str, Database] = {}
        self.settings: Dict[str, dict] = {}
        self.read_pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="immucore-read")
        self._judging_passwords = False     # a read thread is judging user records (exposed_users)
        # create/update/load/unload/delete run on read threads: one at a time
        self.management_lock = threading.Lock()
        os.makedirs(options.dir, exist_ok=True)
        # One node per data folder, locked before anything in it is read or written: a start
        # overlapping the old process's stop waits for it, a second node is refused.
        self.folder_lock = FolderLock(options.dir, "data folder").acquire(
            FOLDER_LOCK_WAIT_SECONDS, on_wait=log.warning)
        self.systemdb = None
        try:
            self._open_all(options)
        except BaseException:
            for database in [*self.databases.values(), self.systemdb]:
                if database is not None:
                    database.close()
            self.folder_lock.release()
            self.read_pool.shutdown(wait=False)
            raise

    def _open_all(self, options: NodeOptions):
        self.node_id = _node_id(options.dir)
        self.sync_acks: Dict[str, SyncAcks] = {}
        # Server-level replication (immudb's --replication-is-replica flags): systemdb and
        # defaultdb follow the primary's, so users and their passwords come from the primary.
        self.server_replication = _server_replication(options.replication)
        replica = self.server_replication is not None
        self.systemdb = open_database(os.path.join(options.dir, "systemdb"), name="systemdb",
                                      durable=options.synced, replica=replica)
        self.users = auth.UserStore(self.systemdb)
        auth.ensure_sysadmin(self.users, options.admin_password)   # not on a replica systemdb
        self.sessions = auth.SessionManager(options.max_sessions,
                                            inactivity_timeout_seconds=SESSION_INACTIVITY_SECONDS)
        self.token_sessions = auth.SessionManager(
            options.max_sessions, inactivity_timeout_seconds=TOKEN_SESSION_INACTIVITY_SECONDS,
            per_user_max=TOKEN_SESSIONS_PER_USER_MAX)
        self.sessions.share_limit(self.token_sessions)       # --max-sessions: both together
        # Any change of a user (password, permissions, deactivation) ends its sessions.
        self.users.add_listener(self.sessions.user_changed)
        self.users.add_listener(self.token_sessions.user_changed)
        default_settings = dbsettings.defaults() | {"created_by": auth.SYSADMIN_USERNAME}
        if replica:
            default_settings |= self.server_replication | {"primary_database": "defaultdb"}
        else:
            default_settings |= _server_sync(options.replication)
        self._open("defaultdb", default_settings)
        if not replica:
            # On a server-level replica, the settings records in systemdb are the primary's:
            # its databases are not this node's, so none of them is loaded here.
            for name, stored in self._stored_settings().items():
                self.settings[name] = stored
                if stored["autoload"]:
                    try:
                        self._open(name, stored)
                    except TooManyDatabasesError as exc:    # it names the database
                        log.error("%s", exc)
                    except Exception as exc:  # noqa: BLE001 - one bad database must not stop it
                        log.error("database %s not loaded: %s", name, exc)
        self._server = None
        self.loop = None
        self._commit_waiters: Dict[str, list] = {}
        self._stopping = False          # close() began: long polls no longer wait
        self.replicators: Dict[str, Replicator] = {}
        # requests served per (database, read|write|admin): Prometheus derives the rates
        self.request_counts: Dict[tuple, int] = {}
        self.signer = None
        if options.signing_key:
            from ..signing import StateSigner
            self.signer = StateSigner.from_pem_file(options.signing_key)

    # --- databases ------------------------------------------------------------------------

    def _stored_settings(self) -> Dict[str, dict]:
        out = {}
        for entry in self.systemdb.scan(prefix=SETTINGS_PREFIX, limit=1000):
            record = json.loads(entry.value)
            out[entry.key[1:].decode()] = dbsettings.from_stored(record["settings"]) | {
                "created_by": record.get("createdBy", ""),
                "created_at": record.get("createdAt", "")}
        return out

    def _check_room(self, name: str, doing: str):
        """Refuse to load one database more than --max-active-databases, before anything of it
        is written or opened."""
        loaded, most = len(self.databases), self.options.max_active_databases
        if loaded >= most:
            raise TooManyDatabasesError(
                f"database {name} not {doing}: {loaded} databases are loaded, the most this node "
                f"keeps active (--max-active-databases {most}, systemdb not counted); unload "
                "one or start the node with a higher limit")

    def _open(self, name: str, s: dict) -> Database:
        self._check_room(name, "loaded")
        database = open_database(os.path.join(self.options.dir, name), name=name,
                                 replica=bool(s["replica"]), durable=self.options.synced,
                                 header_version=s["write_tx_header_version"],
                                 max_tx_entries=s["max_tx_entries"], max_key_len=s["max_key_len"],
                                 max_value_len=s["max_value_len"],
                                 index_worker=True)   # its own GIL: docs/storage.md
        database.add_commit_listener(lambda tx_id, name=name: self._committed(name, tx_id))
        self.databases[name] = database
        self.sync_acks[name] = SyncAcks(lambda name=name: self.required_acks(name))
        self.settings.setdefault(name, s)
        return database

    # --- waiting for commits (long-polling EXPORT_TXS) --------------------------------------

    def _committed(self, name: str, tx_id: int):
        """On the committer thread: wake the event loop's waiters of this database."""
        if self.loop is not None and self._commit_waiters.get(name):
            self.loop.call_soon_threadsafe(self._wake, name)

    def _wake(self, name: str):
        for waiter in self._commit_waiters.pop(name, []):
            if not waiter.done():
                waiter.set_result(None)

    async def wait_for_commit(self, name: str, after_tx_id: int, timeout_seconds: float):
        """Return once ``name`` has a tx after ``after_tx_id``, or the timeout passed; a long
        poll of a stopping node ends with ``database_closed`` (its replica backs off, instead
        of asking again at once while the node waits for its answers)."""
        database = self.database(name)
        if database.current_state().tx_id > after_tx_id or timeout_seconds <= 0:
            return
        if self._stopping:
            raise DatabaseClosedError("the node is stopping")
        waiter = self.loop.create_future()
        self._commit_waiters.setdefault(name, []).append(waiter)
        if database.current_state().tx_id > after_tx_id:     # a commit raced the registration
            return
        # a timer on the waiter, not asyncio.wait_for: from Python 3.12 that needs a current
        # task, and a request's first step runs before it has one (connection._serve_now)
        timer = self.loop.call_later(timeout_seconds, _resolve_quietly, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
        if self._stopping and database.current_state().tx_id <= after_tx_id:
            raise DatabaseClosedError("the node is stopping")

    # --- synchronous replication --------------------------------------------------------------

    def required_acks(self, name: str) -> int:
        """How many replicas must hold a commit of ``name`` before it is acknowledged."""
        s = self.settings.get(name)
        if not s or s["replica"] or not s.get("sync_replication"):
            return 0
        return s["sync_acks"]

    def replicated_at_once(self, name: str, tx_id: int) -> bool:
        """Whether ``replicated(name, tx_id)`` would return at once: every write of an async
        database, so its answer needs no task."""
        acks = self.sync_acks.get(name)
        return acks.holds(tx_id) if acks is not None else not self.required_acks(name)

    async def replicated(self, name: str, tx_id: int):
        """Return once enough replicas hold ``tx_id`` (at once for an async database)."""
        acks = self.sync_acks.get(name)
        if acks is not None:
            await acks.wait(tx_id, self.options.replication_sync_timeout)
        elif self.required_acks(name):
            raise DatabaseClosedError()      # unloaded while the write was committing

    def acked_tx_id(self, database) -> int:
        """The highest tx of ``database`` acknowledged to its clients — what a replica may never
        discard: every commit on an async primary, what the quorum holds on a sync one, and on
        a replica (the middle of a chain) what its own primary acknowledged."""
        committed = database.current_state().tx_id
        if database.is_replica:
            return database.discard_floor
        acks = self.sync_acks.get(database.name)
        if acks is not None and self.required_acks(database.name):
            return min(acks.held_by_quorum(), committed)
        return committed

    def _persist(self, name: str, s: dict, by_user: str):
        record = {"settings": dbsettings.to_stored(s), "createdBy": s.get("created_by") or by_user,
                  "createdAt": s.get("created_at") or dt.datetime.now(dt.timezone.utc).isoformat(),
                  "updatedBy": by_user}
        self.systemdb.set({SETTINGS_PREFIX + name.encode(): json.dumps(record).encode()})

    def signed_state(self, state) -> dict:
        """A state for the wire, with immudb's signature when the node has a signing key."""
        out = {"db": state.db, "tx_id": state.tx_id, "tx_hash": state.tx_hash}
        if self.signer is not None:
            out["signature"] = self.signer.sign(state.db, state.tx_id, state.tx_hash)
            out["public_key"] = self.signer.public_key
        return out

    def count_request(self, name: str, action: str, requests: int = 1):
        key = (name, action)
        self.request_counts[key] = self.request_counts.get(key, 0) + requests

    def database(self, name: str) -> Database:
        if name == "systemdb":
            return self.systemdb
        database = self.databases.get(name)
        if database is None:
            if name in self.settings:
                raise DatabaseError(f"database {name} is not loaded")
            raise DatabaseError(f"database {name} does not exist")
        return database

    def create_database(self, name: str, requested: dict, by_user: str,
                        if_not_exists: bool = False) -> dict:
        dbsettings.check_database_name(name)
        if name in dbsettings.RESERVED_DATABASES:
            raise DatabaseError("database is reserved")
        if name in self.settings:
            if if_not_exists:
                return self.settings[name]
            raise DatabaseError("database already exists")
        s = self._local_primary(dbsettings.merge(None, requested, creating=True))
        dbsettings.validate(name, s)
        self._check_no_local_loop(name, s)
        self._check_room(name, "created")
        s["created_by"] = by_user
        s["created_at"] = dt.datetime.now(dt.timezone.utc).isoformat()
        self._persist(name, s, by_user)
        self.settings[name] = s
        self._open(name, s)
        self._replication_changed(name)
        log.info("database %s created by %s (replica: %s)", name, by_user, s["replica"])
        return s

    def _local_primary(self, s: dict) -> dict:
        """A replica of a named primary database without a primary address follows that
        database on this node (the replication guide's ``--replication-master-database=defaultdb
        replicadb``); a replica with no primary database at all is fed from outside."""
        if s["replica"] and s["primary_database"] and not s["primary_host"]:
            s = dict(s, primary_host="127.0.0.1",
                     primary_port=s["primary_port"] or self.options.port)
        return s

    def _is_this_node(self, host: str, port: int) -> bool:
        """Does ``host:port`` name this node? (loopback, or the address it listens on; a name
        that resolves elsewhere, or another interface of this machine, is caught at run time.)"""
        if port != self.options.port:
            return False
        if host in ("localhost", self.options.address):
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def _check_no_local_loop(self, name: str, s: dict):
        """Refuse settings that make ``name`` follow itself through replicas of this node (a
        loop through other nodes is found at run time: docs/replication.md)."""
        path, current = [name], s
        while dbsettings.replicator_required(current) and self._is_this_node(
                current["primary_host"], current["primary_port"]):
            followed = current["primary_database"]
            if followed in path:
                raise ReplicationLoopError(
                    f"replication loop: database '{name}' would follow itself "
                    f"({' -> '.join(path + [followed])}, all on this node "
                    f"{self.options.address}:{self.options.port})")
            path.append(followed)
            current = self.settings.get(followed)
            if current is None:
                return

    def update_database(self, name: str, requested: dict, by_user: str) -> dict:
        dbsettings.check_database_name(name)
        if name in dbsettings.RESERVED_DATABASES:
            raise DatabaseError("database is reserved")
        current = self.settings.get(name)
        if current is None:
            raise DatabaseError(f"database {name} does not exist")
        s = self._local_primary(dbsettings.merge(current, requested, creating=False))
        dbsettings.validate(name, s)
        self._check_no_local_loop(name, s)
        self._replication_changed(name, stop_first=True)   # as immudb: stop, apply, restart
        self._persist(name, s, by_user)
        self.settings[name] = s
        if name in self.databases:
            self.databases[name].set_replica(bool(s["replica"]))
        self._replication_changed(name)
        _log_update(name, current, s, by_user)
        acks = self.sync_acks.get(name)
        if acks is not None and self.loop is not None:
            if s["replica"]:
                # demoted: writes still waiting were never replicated, and nothing will be now
                self.loop.call_soon_threadsafe(acks.fail_all, NotPrimaryError(
                    f"database {name} became a replica: the write is durable here but was not "
                    "acknowledged by its sync replicas"))
                self.sync_acks[name] = SyncAcks(lambda name=name: self.required_acks(name))
            else:          # fewer acks (or sync off) answers the writes the quorum now covers
                self.loop.call_soon_threadsafe(acks.recheck)
        return s

    def load_database(self, name: str):
        """Load ``name``; a loaded database whose index failed for good (its worker kept dying)
        gets its index worker started again instead: the way back for defaultdb, which cannot
        be unloaded."""
        if name in self.databases and self.databases[name].restart_index():
            log.info("database %s: index worker started again", name)
            return
        if name not in self.settings:
            raise DatabaseError(f"database {name} does not exist")
        if name in self.databases:
            raise DatabaseError(f"database {name} is already loaded")
        self._open(name, self.settings[name])
        self._replication_changed(name)
        log.info("database %s loaded", name)

    def unload_database(self, name: str):
        if name in dbsettings.RESERVED_DATABASES:
            raise DatabaseError("database is reserved")
        if name not in self.settings:
            raise DatabaseError(f"database {name} does not exist")
        if name not in self.databases:
            raise DatabaseError(f"database {name} is not loaded")
        self._replication_changed(name, stop_first=True)
        self._fail_sync_waiters(name)
        self.databases.pop(name).close()
        log.info("database %s unloaded", name)

    def _fail_sync_waiters(self, name: str):
        acks = self.sync_acks.pop(name, None)
        if acks is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(acks.fail_all, DatabaseClosedError())

    def delete_database(self, name: str, by_user: str):
        """Delete an unloaded database: its settings are marked deleted and its folder removed."""
        dbsettings.check_database_name(name)
        if name in dbsettings.RESERVED_DATABASES:
            raise DatabaseError("database is reserved")
        if name not in self.settings:
            raise DatabaseError(f"database {name} does not exist")
        if name in self.databases:
            raise DatabaseError(f"database {name} must be unloaded before it is deleted")
        self.systemdb.delete([SETTINGS_PREFIX + name.encode()])
        del self.settings[name]
        shutil.rmtree(os.path.join(self.options.dir, name), ignore_errors=True)
        log.info("database %s deleted by %s", name, by_user)

    # --- replicators ------------------------------------------------------------------------

    def _replication_changed(self, name: str, stop_first: bool = False):
        """From any thread: stop (if asked) and start the database's replicator as its settings
        now say. Waits until it is done, so callers see the new state."""
        if self.loop is None:
            return          # not serving yet: serve() starts every replicator
        future = asyncio.run_coroutine_threadsafe(
            self._restart_replicator(name, start=not stop_first), self.loop)
        future.result()

    async def _restart_replicator(self, name: str, start: bool = True):
        old = self.replicators.pop(name, None)
        if old is not None:
            await old.stop()
        if name == "systemdb":
            s = (self.server_replication | {"primary_database": "systemdb"}
                 if self.server_replication is not None else None)
            database = self.systemdb
        else:
            s, database = self.settings.get(name), self.databases.get(name)
        if start and s is not None and database is not None and \
                dbsettings.replicator_required(s):
            replicator = Replicator(database, s, tls=self.replication_tls(),
                                    replica_id=self.database_id(name),
                                    tls_ca_file=self.options.replication_tls_ca)
            self.replicators[name] = replicator
            replicator.start()

    def database_id(self, name: str) -> str:
        """This database among all nodes: the node's id and the name (what replicas ack under)."""
        return f"{self.node_id}/{name}"

    def replication_role(self, database) -> dict:
        """What EXPORT_TXS tells a replica about the database it follows: its role, its own
        primary (a replica with a replicator) and its chain — its id, then the ids of the
        primaries above it as its replicator last heard them, nearest first."""
        replicator = self.replicators.get(database.name) if database.is_replica else None
        chain = [self.database_id(database.name)]
        if replicator is not None:
            chain += replicator.upstream_chain[:REPLICATION_CHAIN_IDS_MAX - 1]
        return {"role": "replica" if database.is_replica else "primary",
                "primary": replicator.primary if replicator is not None else "",
                "chain": chain}

    def check_takes_pushes(self, name: str) -> None:
        """Only a replica without a replicator of its own takes REPLICATE_TX (the external
        replicator's, ``immuadmin replication push``): one that follows a primary applies
        that primary's txs alone. A primary is left to the database (``not_replica``)."""
        if name == "systemdb":
            s = self.server_replication
            s = s | {"primary_database": "systemdb"} if s is not None else None
        else:
            s = self.settings.get(name)
        if s is not None and dbsettings.replicator_required(s):
            raise FollowingReplicaError(
                f"database {name} follows its primary {s['primary_host']}:{s['primary_port']}/"
                f"{s['primary_database']} with its own replicator and takes no pushes: only a "
                "replica without a primary database is fed from outside")

    def replication_status(self, name: str) -> Optional[dict]:
        replicator = self.replicators.get(name)
        return replicator.status() if replicator is not None else None

    def list_databases(self) -> list:
        out = []
        for name in ["defaultdb"] + sorted(n for n in self.settings if n != "defaultdb"):
            s = self.settings.get(name, dbsettings.defaults())
            database = self.databases.get(name)
            out.append({
                "name": name, "loaded": database is not None, "replica": bool(s["replica"]),
                "created_by": s.get("created_by", ""), "created_at": s.get("created_at", ""),
                "tx_count": database.current_state().tx_id if database else None,
                "disk_size_bytes": _folder_size(os.path.join(self.options.dir, name)),
                "primary": (f"{s['primary_host']}:{s['primary_port']}/{s['primary_database']}"
                            if s["replica"] and s["primary_host"] else ""),
                "replication": self.replication_status(name),
                "index": database.index_status() if database else None,
            })
        return out

    def close_session(self, session_id: str, *, detached: bool):
        """End a session if it still exists (it may have ended already: logout elsewhere, a
        change of its user, expiry)."""
        manager = self.token_sessions if detached else self.sessions
        try:
            manager.close(session_id)
        except auth.AuthError:
            pass

    def manage(self, fn, *args, permit=None):
        """Run a database management call under the node's management lock. ``permit`` (the
        caller's, server/handlers.py) is checked again once the lock is held: a caller whose
        right was revoked while it waited for another management call changes nothing."""
        if self.server_replication is not None:
            raise DatabaseError(
                "database management is not available on a server-level replica: its systemdb "
                "(users and database settings) follows the primary")
        with self.management_lock:
            if permit is not None:
                permit.check_anywhere()
            return fn(*args)

    # --- connections ----------------------------------------------------------------------

    @property
    def preauth_connections_max(self) -> int:
        """Connections not logged in yet: a quarter of --max-connections, at most
        PREAUTH_CONNECTIONS_MAX, so logged-in users keep most of the room."""
        return min(PREAUTH_CONNECTIONS_MAX, max(1, self.options.max_connections // 4))

    def refuse_connection(self, peer, protected_mode: bool = True) -> Optional[Tuple[str, str]]:
        """(code, message) when a new connection must be turned away: past the connection
        caps, or in protected mode (while any active user has a well-known password, such as
        the sysadmin's default ``immudb``, only loopback peers). ``self.connections`` does not
        hold the new connection yet. ``protected_mode=False``: the caps only (the shared port,
        before the first bytes say which protocol: gRPC checks protected mode on each call,
        with its own status)."""
        if len(self.connections) + len(self.spliced) >= self.options.max_connections:
            return ("too_many_connections",
                    f"too many connections: this node serves at most "
                    f"{self.options.max_connections} (--max-connections); try again later")
        preauth_max = self.preauth_connections_max
        if len(self.connections) - self.logged_in_connections >= preauth_max:
            return ("too_many_connections",
                    f"too many connections waiting to log in ({preauth_max}); try again later")
        if not protected_mode or _is_loopback(peer):
            return None
        exposed, judged = self.exposed_users()
        if not exposed:
            return None
        return ("protected_mode", protected_mode_message(exposed, judged))

    def exposed_users(self) -> Tuple[Tuple[str, ...], bool]:
        """Protected mode's users, on the event loop without hashing (scrypt costs ~50 ms a
        record): users not judged yet count as exposed, and a read thread judges them."""
        exposed, judged = self.users.well_known_users_judged()
        if not judged and not self._judging_passwords:
            self._judging_passwords = True
            done = self.read_pool.submit(self.users.users_with_well_known_password)
            done.add_done_callback(lambda _: setattr(self, "_judging_passwords", False))
        return exposed, judged

    async def serve(self, dispatch):
        loop = self.loop = asyncio.get_running_loop()
        if self.grpc_internal_endpoint is not None:     # gRPC shares the port
            from .shared_port import FirstBytes

            def factory():
                return FirstBytes(self, dispatch)
        else:
            def factory():
                return Connection(self, dispatch)
        self._server = await loop.create_server(factory,
                                                self.options.address, self.options.port,
                                                reuse_address=True, ssl=self._server_tls())
        for name in ["systemdb"] + list(self.databases):
            await self._restart_replicator(name)
        return self._server

    def _server_tls(self):
        """A TLS context when --certificate and --pkey are given (then every client uses TLS)."""
        if not self.options.certificate and not self.options.pkey:
            return None
        if not (self.options.certificate and self.options.pkey):
            raise IllegalArgumentsError("TLS needs both --certificate and --pkey")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.options.certificate, self.options.pkey)
        if self.grpc_internal_endpoint is not None:
            # gRPC clients insist on ALPN h2; immucore's own clients offer no ALPN at all, and
            # the first decrypted bytes tell the two apart either way
            context.set_alpn_protocols(["h2"])
        return context

    def replication_tls(self):
        """The client TLS context replicators use (None: plain TCP)."""
        if not self.options.replication_tls_ca:
            return None
        return ssl.create_default_context(cafile=self.options.replication_tls_ca)

    async def close(self):
        """Stop accepting, let in-flight requests finish, then close every database."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for name in list(self.replicators):
            await self._restart_replicator(name, start=False)
        self._stopping = True
        for acks in self.sync_acks.values():       # writes waiting for replicas end now
            acks.fail_all(DatabaseClosedError())
        for name in list(self._commit_waiters):    # long polls end (database_closed)
            self._wake(name)
        await self._answer_in_flight()
        for connection in [*self.connections, *self.spliced]:
            if connection.transport is not None:
                connection.transport.close()
        self.read_pool.shutdown(wait=True)
        for database in list(self.databases.values()):
            database.close()
        self.databases.clear()
        self.systemdb.close()
        self.folder_lock.release()

    async def _answer_in_flight(self):
        """Let the requests still being served send their answers (bounded by
        NODE_STOP_ANSWERS_SECONDS_MAX): closing their connections at once would tell a sync
        write waiting for acks ``connection closed`` instead of its ``database_closed``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + NODE_STOP_ANSWERS_SECONDS_MAX
        while any(c.in_flight for c in self.connections) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)          # the answers of the last step are written at its end

    def banner(self) -> str:
        roles = ", ".join(name + _role(self.settings.get(name, {})) for name in self.databases)
        text = (f"immucore {__version__} listening on {self.options.address}:{self.options.port}"
                f", data in {os.path.abspath(self.options.dir)}, databases: systemdb, {roles}")
        if self.server_replication is not None:
            s = self.server_replication
            text += f"; systemdb and defaultdb replica of {s['primary_host']}:{s['primary_port']}"
        return text


def _log_update(name: str, before: dict, after: dict, by_user: str):
    """One line in the node's log for an update: what changed and, first, a change of role
    (a promotion or demotion is what an operator looks for after a failover)."""
    changed = sorted(key for key in after if key not in ("created_by", "created_at")
                     and after.get(key) != before.get(key))
    shown = ", ".join(f"{key}={'********' if 'password' in key else after[key]!r}"
                      for key in changed) or "nothing changed"
    if bool(before.get("replica")) == bool(after.get("replica")):
        what = "updated"
    elif not after.get("replica"):
        what = "promoted to primary"
    elif after.get("primary_host"):
        what = (f"demoted to a replica of {after['primary_host']}:{after.get('primary_port')}/"
                f"{after.get('primary_database') or name}")
    else:
        what = "demoted to a replica (fed from outside)"
    log.info("database %s %s by %s (%s)", name, what, by_user, shown)


def _role(settings: dict) -> str:
    """A database's role for the banner: `` (replica)``, `` (sync replica)``,
    `` (sync primary, 2 acks)``, or nothing for a plain primary."""
    if settings.get("replica"):
        return " (sync replica)" if settings.get("sync_replication") else " (replica)"
    if settings.get("sync_replication"):
        acks = settings.get("sync_acks") or 0
        return f" (sync primary, {acks} ack{'s' if acks != 1 else ''})"
    return ""


def _server_replication(flags: dict) -> Optional[dict]:
    """The replication settings of systemdb and defaultdb from the node's flags (None: this node
    is not a server-level replica). As immudb: the port defaults to 3322, and the primary
    database is forced to the same name."""
    if not flags.get("replica"):
        return None
    s = dbsettings.defaults()
    s.update({key: value for key, value in flags.items() if key in s and value is not None})
    s["replica"] = True
    s["primary_port"] = s["primary_port"] or 3322
    s["prefetch_tx_buffer_size"] = s["prefetch_tx_buffer_size"] or dbsettings.PREFETCH_DEFAULT
    s["replication_commit_concurrency"] = (s["replication_commit_concurrency"]
                                           or dbsettings.COMMIT_CONCURRENCY_DEFAULT)
    dbsettings.validate("defaultdb", s)
    return s


def _server_sync(flags: dict) -> dict:
    """On a primary node, the sync replication flags configure defaultdb."""
    if not flags.get("sync_replication"):
        return {}
    s = dbsettings.defaults() | {"sync_replication": True,
                                 "sync_acks": flags.get("sync_acks") or 0}
    dbsettings.validate("defaultdb", s)
    return {"sync_replication": True, "sync_acks": s["sync_acks"]}


def protected_mode_message(users, judged: bool = True) -> str:
    """What a refused peer (and the node's log) reads: who holds a well-known password and how
    to leave protected mode. The passwords themselves are not repeated. ``judged`` False:
    some of ``users`` are still being checked (just after a start, or after replicated user
    records came in)."""
    names = ", ".join(users)
    if not judged:
        return (f"immucore is in protected mode while it checks whether user(s) {names} still "
                "have a well-known password (only loopback connections are accepted meanwhile); "
                "try again in a moment")
    how = ("immuadmin login immudb, then immuadmin user changepassword immudb"
           if auth.SYSADMIN_USERNAME in users else
           "immuadmin user changepassword USER, or immuadmin user deactivate USER")
    return (f"immucore is in protected mode: user(s) {names} still have a well-known password "
            "(a published default such as immudb's or immudb-tools' follower password), so only "
            f"loopback connections are accepted. Change it from this machine ({how}); "
            "--admin-password sets the sysadmin's only when a node creates its data folder")


def _node_id(folder: str) -> str:
    """This node's identity, kept in its data folder: a replica acknowledges under it, so a
    primary counts each replica once however often it reconnects."""
    path = os.path.join(folder, "node_id")
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        import uuid
        node_id = uuid.uuid4().hex
        replace_durably(path, node_id.encode())
        return node_id


def _folder_size(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total

