"""``immuclient audit-mode``: a continuous auditor of one node (immudb's command and flags).

Every ``--audit-interval`` it logs in as ``--audit-username``, lists the node's databases (those
whose names start with one of ``--audit-databases``, or all), and for each one:

  1. fetches the current state; with ``--server-signing-pub-key`` the state must carry the node's
     valid signature under that key;
  2. asks for a proof from the state it last trusted (kept in ``--audit-state-file``) to that state,
     and checks it: the proof's ends must be exactly the trusted state and the state just shown,
     and the dual proof must verify;
  3. trusts the new state only then (the file is replaced durably). A state behind the trusted
     one (a cut log), another hash for a trusted tx (a replaced log), a proof that does not
     verify: reported as tampering, and the trusted state is kept. Nothing here ever resets trust:
     a changed history fails every round until an operator removes the state file.

Results go to the log (stdout) and to Prometheus metrics served on ``--audit-monitoring-host``
and ``--audit-monitoring-port`` (immudb's ``immuclient_audit_*_per_server`` names, plus
``*_per_database`` series). docs/audit.md is the operator's page.
"""
from __future__ import annotations

import base64
import contextlib
import datetime
import http.server
import json
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from .. import verify
from ..client import Client, StateStore
from ..constants import (AUDIT_CALL_TIMEOUT_SECONDS, AUDIT_DATABASES_MAX,
                         AUDIT_HEALTH_TIMEOUT_SECONDS, AUDIT_INTERVAL_SECONDS_MIN,
                         AUDIT_ROUNDS_MAX)
from ..errors import ImmucoreError, VerificationError
from ..types import State
from ..version import VERSION
from .common import CliError, Session, home_path, tls_context

# immudb's defaults (cmd/immuclient/command/init.go; the interval: its audit-agent-interval)
AUDIT_INTERVAL_DEFAULT = "60s"
AUDIT_MONITORING_HOST_DEFAULT = "0.0.0.0"
AUDIT_MONITORING_PORT_DEFAULT = 9477
AUDIT_STATE_FILE = ".immuclient_audit_state.json"
IMMUDB_INTERVAL_ENV = "audit-agent-interval"       # immudb reads its interval from this variable
ENV_PREFIX = "IMMUCLIENT_"                         # immudb's viper: IMMUCLIENT_AUDIT_USERNAME, ...

# immudb's values of immuclient_audit_result_per_server
RESULT_OK, RESULT_TAMPERED, RESULT_NOT_CHECKED, RESULT_ERROR = 1, 0, -1, -2
# the per-server result of a round is its worst database: a tampered one is never hidden by
# the databases audited after it; an empty database (not checked) does not hide the checked ones
_SEVERITY = {RESULT_NOT_CHECKED: 0, RESULT_OK: 1, RESULT_ERROR: 2, RESULT_TAMPERED: 3}

EXIT_OK, EXIT_ERRORS, EXIT_TAMPERED = 0, 1, 2
# a login on defaultdb refused for these reasons is tried again on each --audit-databases name
# (no permission on it; it is missing or not loaded: DatabaseError's code)
LOGIN_ELSEWHERE_CODES = frozenset({"no_database_permission", "database"})


# --- flags ------------------------------------------------------------------------------------

def _env(name: str, default):
    return os.environ.get(ENV_PREFIX + name.upper().replace("-", "_"), default)


def add_audit_flags(sub):
    sub.add_argument("--audit-username", default=_env("audit-username", ""),
                     help="immudb username used to login during audit")
    sub.add_argument("--audit-password", default=_env("audit-password", ""),
                     help="immudb password used to login during audit; can be plain-text or "
                          "base64 encoded (must be prefixed with 'enc:' if it is encoded)")
    sub.add_argument("--audit-databases", default=_env("audit-databases", ""),
                     help="optional comma-separated list of databases (names) to be audited; "
                          "full names or name prefixes (default: every database)")
    sub.add_argument("--audit-monitoring-host",
                     default=_env("audit-monitoring-host", AUDIT_MONITORING_HOST_DEFAULT),
                     help="host of the monitoring HTTP server (metrics, health, version; "
                          f"default {AUDIT_MONITORING_HOST_DEFAULT})")
    sub.add_argument("--audit-monitoring-port", type=int,
                     default=str(_env("audit-monitoring-port", AUDIT_MONITORING_PORT_DEFAULT)),
                     help="port of the monitoring HTTP server (default "
                          f"{AUDIT_MONITORING_PORT_DEFAULT})")
    sub.add_argument("--audit-interval",
                     default=_env("audit-interval",
                                  os.environ.get(IMMUDB_INTERVAL_ENV, AUDIT_INTERVAL_DEFAULT)),
                     help="time between audit rounds, a Go duration such as 60s, 5m, 500ms "
                          f"(default {AUDIT_INTERVAL_DEFAULT}, or immudb's "
                          f"${IMMUDB_INTERVAL_ENV})")
    sub.add_argument("--audit-state-file", default=_env("audit-state-file", AUDIT_STATE_FILE),
                     help="the auditor's trusted states, relative to the home directory "
                          f"(default ~/{AUDIT_STATE_FILE}); never reset by the auditor")
    # string defaults: argparse converts them only when audit-mode runs, so a bad variable
    # never breaks immuclient's other commands
    sub.add_argument("--audit-rounds", type=int, default=str(_env("audit-rounds", 0)),
                     help="stop after this many rounds (immucore's; default 0: run until "
                          "SIGINT or SIGTERM)")
    sub.add_argument("--server-signing-pub-key", dest="server_signing_pub_key",
                     default=_env("server-signing-pub-key", ""),
                     help="path to the node's public key (PEM): every state must carry the "
                          "node's valid signature under it")


_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_GO_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def parse_go_duration(text: str, flag: str = "--audit-interval") -> float:
    """A Go duration (``1m30s``, ``500ms``) in seconds; a bare number is seconds."""
    value = text.strip()
    with contextlib.suppress(ValueError):
        return float(value)
    pos, total = 0, 0.0
    while pos < len(value):
        match = _GO_PART.match(value, pos)
        if match is None:
            raise CliError(f"invalid {flag} {text!r}: expected a duration such as 60s, 5m or "
                           "500ms")
        total += float(match.group(1)) * _GO_UNITS[match.group(2)]
        pos = match.end()
    if not value:
        raise CliError(f"invalid {flag}: empty")
    return total


def go_duration_text(seconds: float) -> str:
    """Seconds as Go prints a duration: ``1m0s``, ``2.5s``, ``200ms``."""
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    secs_text = f"{secs:g}s"
    return (f"{hours}h{minutes}m{secs_text}" if hours else
            f"{minutes}m{secs_text}" if minutes else secs_text)


def decode_password(text: str) -> str:
    """immudb's DecodeBase64Password: ``enc:<base64>`` is decoded, anything else is plain."""
    password = text.strip()
    if password and password.startswith("enc:"):
        try:
            return base64.b64decode(text[4:], validate=True).decode("utf-8")
        except ValueError as exc:
            raise CliError(f"error decoding password from base64 string {text[4:]}: {exc}") \
                from None
    return password


def database_prefixes(text: str) -> List[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


# --- one audit --------------------------------------------------------------------------------

@dataclass
class DatabaseAudit:
    database: str
    result: int
    prev_tx: int            # the trusted tx before this audit (-1: none)
    curr_tx: int            # the node's state (-1: not fetched, -2: fetching it failed)
    seconds: float
    message: str


class Log:
    """immudb's SimpleLogger lines: ``immuclientd 2006/01/02 15:04:05 INFO: ...`` on stdout."""

    def __init__(self, out=None):
        self.out = out or sys.stdout
        self._lock = threading.Lock()

    def _line(self, level: str, text: str):
        now = datetime.datetime.now().strftime("%Y/%m/%d %H:%M:%S")
        with self._lock:
            print(f"immuclientd {now} {level}: {text}", file=self.out, flush=True)

    def info(self, text):
        self._line("INFO", text)

    def warning(self, text):
        self._line("WARNING", text)

    def error(self, text):
        self._line("ERROR", text)


def server_id_of(address: str) -> str:
    """immudb's fallback server id (no server UUID): the address, ``.`` → ``-``, ``:`` → ``_``."""
    slug = address.replace(".", "-").replace(":", "_")
    return re.sub(r"[^a-zA-Z0-9\-_]+", "", slug)


class Auditor:
    """Audits every database of one node each round; ``metrics`` receives the results."""

    def __init__(self, host: str, port: int, *, username: str, password: str,
                 prefixes: List[str], store: StateStore, public_key: Optional[str],
                 ssl, metrics: "AuditMetrics", log: Log):
        self.host, self.port = host, port
        self.address = f"{host}:{port}"
        self.server_id = server_id_of(self.address)
        self.username, self.password, self.prefixes = username, password, prefixes
        self.store, self.public_key, self.ssl = store, public_key, ssl
        self.metrics, self.log = metrics, log
        self.number = 0

    def _wanted(self, name: str) -> bool:
        return not self.prefixes or any(name.startswith(p) for p in self.prefixes)

    def _trusted_names(self) -> List[str]:
        """The databases of this node the state file trusts (kept across runs)."""
        return self.store.databases(self.address)

    def run_round(self) -> Tuple[int, List[DatabaseAudit]]:
        """One round over every database; (the server's result, each database's audit)."""
        self.number += 1
        started, start = time.monotonic(), datetime.datetime.now().astimezone()
        self.log.info(f"audit #{self.number} started @ {start.isoformat()}")
        audits: List[DatabaseAudit] = []
        try:
            client = Client(self.host, self.port, ssl=self.ssl,
                            timeout=AUDIT_CALL_TIMEOUT_SECONDS,
                            server_public_key=self.public_key or None,
                            state_store=StateStore(None))
        except OSError as exc:
            return self._round_failed(f"could not connect to {self.address}: "
                                      f"{exc.strerror or str(exc) or type(exc).__name__}",
                                      started)
        try:
            try:
                self._login(client)
            except (ImmucoreError, OSError, TimeoutError) as exc:
                return self._round_failed(f"error logging in with user {self.username}: {exc}",
                                          started)
            try:
                names = [d["name"] for d in client.list_databases() if self._wanted(d["name"])]
            except (ImmucoreError, OSError, TimeoutError) as exc:
                return self._round_failed(f"error getting a list of databases: {exc}", started)
            if len(names) > AUDIT_DATABASES_MAX:
                return self._round_failed(
                    f"{len(names)} databases match --audit-databases, more than "
                    f"{AUDIT_DATABASES_MAX} a round can audit: name fewer", started)
            if not names:
                return self._round_failed("no databases to audit found after (re)loading the "
                                          "list of databases", started)
            for name in names:
                audits.append(self.audit_database(client, name))
            for name in self._trusted_names():
                if name not in names and self._wanted(name):
                    audits.append(self._missing(name))
            with contextlib.suppress(ImmucoreError, OSError, TimeoutError):
                client.logout()
        finally:
            client.close()
        return self._round_done(audits, started)

    def _login(self, client: Client):
        """Log in on defaultdb, as immudb's Login does; an auditor allowed to read only some
        databases logs in on the first of --audit-databases it may read instead."""
        first_error = None
        for database in ("defaultdb", *self.prefixes):
            try:
                client.login(self.username, self.password, database)
                return
            except ImmucoreError as exc:
                if getattr(exc, "code", None) not in LOGIN_ELSEWHERE_CODES:
                    raise
                first_error = first_error or exc
        raise first_error

    def _round_failed(self, message: str, started: float):
        self.log.error(f"audit #{self.number} aborted: {message}")
        audits = [DatabaseAudit(name, RESULT_ERROR, self._trusted_tx(name), RESULT_ERROR, 0.0,
                                message) for name in self._trusted_names() if self._wanted(name)]
        return self._round_done(audits, started, failed=True)

    def _round_done(self, audits: List[DatabaseAudit], started: float, failed: bool = False):
        worst = RESULT_ERROR if failed else RESULT_NOT_CHECKED
        for audit in audits:
            if _SEVERITY[audit.result] > _SEVERITY[worst]:
                worst = audit.result
        seconds = time.monotonic() - started
        self.metrics.round_done(self, worst, audits, seconds)
        self.log.info(f"audit #{self.number} finished in {go_duration_text(seconds)} @ "
                      f"{datetime.datetime.now().astimezone().isoformat()}")
        return worst, audits

    def _trusted_tx(self, name: str) -> int:
        return self.store.get(self.address, name).tx_id or -1

    def _missing(self, name: str) -> DatabaseAudit:
        trusted = self.store.get(self.address, name)
        message = (f"database {name}, trusted at tx {trusted.tx_id}, is no longer listed by "
                   f"{self.address}")
        self.log.error(f"audit #{self.number} - {message}")
        return DatabaseAudit(name, RESULT_ERROR, trusted.tx_id, RESULT_ERROR, 0.0, message)

    def audit_database(self, client: Client, name: str) -> DatabaseAudit:
        started = time.monotonic()
        trusted = self.store.get(self.address, name)
        prev_tx = trusted.tx_id or -1
        n = self.number

        def done(result: int, curr_tx: int, message: str) -> DatabaseAudit:
            return DatabaseAudit(name, result, prev_tx, curr_tx, time.monotonic() - started,
                                 message)

        self.log.info(f"audit #{n} - auditing database {name}")
        try:
            client.use_database(name)
            state = client.current_state()      # with a public key: its signature is checked
        except VerificationError as exc:         # unsigned, or not signed by that key
            message = f"state of db {name} from {self.address} rejected: {exc}"
            self.log.error(f"audit #{n} aborted: {message}")
            return done(RESULT_ERROR, RESULT_ERROR, message)
        except (ImmucoreError, OSError, TimeoutError) as exc:
            message = f"error getting current state of db {name}: {exc}"
            self.log.error(f"audit #{n} - {message}")
            return done(RESULT_ERROR, RESULT_ERROR, message)

        def tampered(reason: str) -> DatabaseAudit:
            self.log.error(f"audit #{n} result: db: {name}, consistent: false - {reason}")
            self.log.warning(
                f"audit #{n} detected possible tampering of db {name} remote state (at id "
                f"{state.tx_id}) so it will not overwrite the previous local state (at id "
                f"{trusted.tx_id})")
            return done(RESULT_TAMPERED, state.tx_id, reason)

        if trusted.tx_id and state.tx_id < trusted.tx_id:
            return tampered(f"the node's state is at tx {state.tx_id}, behind the trusted "
                            f"state at tx {trusted.tx_id}: its log was cut or replaced")
        if state.tx_id == 0:
            message = f"database is empty on server {self.server_id} @ {self.address}"
            self.log.warning(f"audit #{n} canceled: {message}")
            return done(RESULT_NOT_CHECKED, 0, message)
        try:
            vtx = client.verifiable_tx_by_id(state.tx_id, prove_since_tx=trusted.tx_id)
            reason = proof_failure(vtx.dual_proof, trusted, state)
        except VerificationError as exc:
            reason = str(exc)
        except (ImmucoreError, OSError, TimeoutError) as exc:
            message = (f"error fetching consistency proof for previous state {trusted.tx_id} "
                       f"of db {name}: {exc}")
            self.log.error(f"audit #{n} - {message}")
            return done(RESULT_ERROR, state.tx_id, message)
        if reason:
            return tampered(reason)
        if state.tx_id != trusted.tx_id:
            try:
                self.store.put(self.address, state)
            except (ImmucoreError, OSError) as exc:      # the state stays unproven next time
                message = f"could not keep the state of db {name}: {exc}"
                self.log.error(f"audit #{n} - {message}")
                return done(RESULT_ERROR, state.tx_id, message)
        if trusted.tx_id:
            self.log.info(f"audit #{n} result: db: {name}, consistent: true, previous state: "
                          f"{trusted.tx_hash.hex()} at tx: {trusted.tx_id}, current state: "
                          f"{state.tx_hash.hex()} at tx: {state.tx_id}")
        else:
            self.log.info(f"audit #{n} - db {name}: no previous state, the current state "
                          f"{state.tx_hash.hex()} at tx {state.tx_id} is trusted from now on")
        return done(RESULT_OK, state.tx_id, "consistent")


def proof_failure(proof, trusted: State, state: State) -> Optional[str]:
    """Why the dual proof does not carry ``trusted`` to ``state`` (None: it does). Its ends must
    be those two states exactly (the node chooses neither), and it must verify."""
    try:
        source, target = proof.source_tx_header, proof.target_tx_header
        if target.id != state.tx_id or target.alh() != state.tx_hash:
            return (f"the proof ends at tx {target.id}, not at the state shown (tx "
                    f"{state.tx_id})")
        if trusted.tx_id:
            if source.id != trusted.tx_id:
                return f"the proof starts at tx {source.id}, not at the trusted tx {trusted.tx_id}"
            if source.alh() != trusted.tx_hash:
                return (f"tx {trusted.tx_id} now hashes to {source.alh().hex()}, but "
                        f"{trusted.tx_hash.hex()} was trusted: the log was replaced")
        elif source != target:
            return "a first proof must be about the state's tx alone"
        if not verify.verify_dual_proof(proof, source.id, target.id, source.alh(), target.alh()):
            return (f"the consistency proof from tx {source.id} to tx {target.id} does not "
                    "verify")
    except (AttributeError, TypeError, ValueError, IndexError, KeyError) as exc:
        return f"malformed proof: {type(exc).__name__}: {exc}"
    return None


# --- metrics ----------------------------------------------------------------------------------

# (name, help); the first four are immudb's (cmd/immuclient/audit/metrics.go), labelled
# server_id and server_address; the *_per_database ones add a database label.
SERVER_METRICS = (
    ("immuclient_audit_result_per_server",
     "Latest audit result (1 = ok, 0 = tampered)."),
    ("immuclient_audit_curr_root_per_server",
     "Current root index used for the latest audit."),
    ("immuclient_audit_run_at_per_server",
     "Timestamp in unix seconds at which latest audit run."),
    ("immuclient_audit_prev_root_per_server",
     "Previous root index used for the latest audit."),
)
DATABASE_METRICS = (
    ("immuclient_audit_result_per_database",
     "Latest audit result of the database (1 = ok, 0 = tampered, -1 = not checked, "
     "-2 = error)."),
    ("immuclient_audit_curr_root_per_database",
     "Tx id of the database's state checked by the latest audit (its last checked tx)."),
    ("immuclient_audit_prev_root_per_database",
     "Tx id of the database's trusted state the latest audit started from."),
    ("immuclient_audit_run_at_per_database",
     "Timestamp in unix seconds at which the database's latest audit ran."),
    ("immuclient_audit_duration_seconds_per_database",
     "Run time in seconds of the database's latest audit."),
)
ROUND_METRICS = (
    ("immuclient_audit_duration_seconds", "Run time in seconds of the latest audit round."),
    ("immuclient_audit_rounds_total", "Audit rounds completed since the auditor started."),
)


class AuditMetrics:
    """The gauges, rendered in Prometheus' text format."""

    def __init__(self, server_id: str, server_address: str):
        self._lock = threading.Lock()
        self.server_labels = (("server_address", server_address), ("server_id", server_id))
        now = time.time()
        # immudb's initial values: not audited yet
        self.values: Dict[str, Dict[tuple, float]] = {
            "immuclient_audit_result_per_server": {self.server_labels: RESULT_NOT_CHECKED},
            "immuclient_audit_curr_root_per_server": {self.server_labels: -1},
            "immuclient_audit_run_at_per_server": {self.server_labels: now},
            "immuclient_audit_prev_root_per_server": {self.server_labels: -1},
            "immuclient_audit_duration_seconds": {self.server_labels: 0},
            "immuclient_audit_rounds_total": {self.server_labels: 0},
        }
        for name, _ in DATABASE_METRICS:
            self.values[name] = {}

    def round_done(self, auditor: Auditor, result: int, audits: List[DatabaseAudit],
                   seconds: float):
        now = time.time()
        with self._lock:
            v, labels = self.values, self.server_labels
            v["immuclient_audit_result_per_server"][labels] = result
            if audits:                         # immudb's: the roots of the last audit
                v["immuclient_audit_curr_root_per_server"][labels] = audits[-1].curr_tx
                v["immuclient_audit_prev_root_per_server"][labels] = audits[-1].prev_tx
            elif result == RESULT_ERROR:
                v["immuclient_audit_curr_root_per_server"][labels] = RESULT_ERROR
                v["immuclient_audit_prev_root_per_server"][labels] = RESULT_ERROR
            v["immuclient_audit_run_at_per_server"][labels] = now
            v["immuclient_audit_duration_seconds"][labels] = seconds
            v["immuclient_audit_rounds_total"][labels] += 1
            for audit in audits:
                db_labels = (("database", audit.database), *labels)
                v["immuclient_audit_result_per_database"][db_labels] = audit.result
                v["immuclient_audit_curr_root_per_database"][db_labels] = audit.curr_tx
                v["immuclient_audit_prev_root_per_database"][db_labels] = audit.prev_tx
                v["immuclient_audit_run_at_per_database"][db_labels] = now
                v["immuclient_audit_duration_seconds_per_database"][db_labels] = audit.seconds

    def render(self) -> str:
        lines = []
        with self._lock:
            for name, help_text in (*SERVER_METRICS, *DATABASE_METRICS, *ROUND_METRICS):
                kind = "counter" if name.endswith("_total") else "gauge"
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
                for labels, value in sorted(self.values[name].items()):
                    text = ",".join(f'{k}="{_label_value(val)}"' for k, val in labels)
                    lines.append(f"{name}{{{text}}} {value!r}")
        return "\n".join(lines) + "\n"


def _label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


# --- the monitoring HTTP server -----------------------------------------------------------------

def start_monitoring(host: str, port: int, metrics: AuditMetrics, auditor: Auditor, log: Log):
    """immudb's auditor endpoints: ``/`` and ``/metrics`` (Prometheus), ``/initz``, ``/readyz``,
    ``/livez`` (the node's health, 503 when it does not answer) and ``/version``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            path = self.path.split("?", 1)[0]
            if path in ("/", "/metrics"):
                self._send(200, "text/plain; version=0.0.4; charset=utf-8",
                           metrics.render().encode())
            elif path in ("/initz", "/readyz", "/livez"):
                status, health = node_health(auditor)
                self._send(status, "application/json", json.dumps({"immudb": health}).encode())
            elif path == "/version":
                self._send(200, "application/json", json.dumps(
                    {"component": "immuclient", "version": VERSION}).encode())
            else:
                self._send(404, "text/plain", b"404 page not found\n")

        def _send(self, status: int, content_type: str, body: bytes):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Access-Control-Allow-Origin", "*")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):      # requests are not logged (immudb's neither)
            pass

    try:
        server = http.server.ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:
        raise CliError(f"cannot start the monitoring HTTP server on {host}:{port} "
                       f"(--audit-monitoring-host/--audit-monitoring-port): "
                       f"{exc.strerror or exc}") from None
    server.daemon_threads = True
    log.info(f"auditor monitoring HTTP server starting on {host}:{port} ...")
    threading.Thread(target=server.serve_forever, name="audit-monitoring", daemon=True).start()
    return server


def node_health(auditor: Auditor) -> Tuple[int, str]:
    try:
        with Client(auditor.host, auditor.port, ssl=auditor.ssl,
                    timeout=AUDIT_HEALTH_TIMEOUT_SECONDS) as client:
            health = client.health()
    except (ImmucoreError, OSError, TimeoutError) as exc:
        return 503, str(exc) or type(exc).__name__
    return (200, "OK") if health.get("status") else (503, "unhealthy")


# --- the command ------------------------------------------------------------------------------

def cmd_audit_mode(args) -> int:
    interval = parse_go_duration(args.audit_interval)
    if interval < AUDIT_INTERVAL_SECONDS_MIN:
        raise CliError(f"--audit-interval {args.audit_interval} is shorter than "
                       f"{go_duration_text(AUDIT_INTERVAL_SECONDS_MIN)}")
    if not 0 <= args.audit_rounds <= AUDIT_ROUNDS_MAX:
        raise CliError(f"--audit-rounds must be between 0 and {AUDIT_ROUNDS_MAX}")
    if not 0 <= args.audit_monitoring_port <= 65535:
        raise CliError(f"--audit-monitoring-port {args.audit_monitoring_port} is not a port")
    if not args.audit_username:
        raise CliError("audit-mode needs --audit-username and --audit-password (or "
                       "IMMUCLIENT_AUDIT_USERNAME and IMMUCLIENT_AUDIT_PASSWORD)")
    password = decode_password(args.audit_password)
    public_key = args.server_signing_pub_key or None
    if public_key:
        from ..signing import load_public_key
        try:
            load_public_key(public_key)
        except (OSError, ValueError) as exc:
            raise CliError(f"cannot read --server-signing-pub-key {public_key}: {exc}") from None
    session = Session(args)       # the node: the flags, else the saved login's, else defaults;
    try:                          # its token is not used (the auditor logs in as its own user)
        saved = session.load()
    except CliError:
        saved = None
    host, port = session.server(saved)
    store = StateStore(home_path(args.audit_state_file))    # unreadable: an error, never reset
    log = Log()
    address = f"{host}:{port}"
    metrics = AuditMetrics(server_id_of(address), address)
    auditor = Auditor(host, port, username=args.audit_username, password=password,
                      prefixes=database_prefixes(args.audit_databases), store=store,
                      public_key=public_key, ssl=tls_context(getattr(args, "tls_ca", None)),
                      metrics=metrics, log=log)
    if not public_key:
        log.warning("no --server-signing-pub-key: the node's state signatures are not checked")

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    server = start_monitoring(args.audit_monitoring_host, args.audit_monitoring_port, metrics,
                              auditor, log)
    worst = RESULT_NOT_CHECKED
    log.info(f"starting auditor with a {go_duration_text(interval)} interval ...")
    try:
        rounds = 0
        while not stop.is_set():
            started = time.monotonic()
            result, _ = auditor.run_round()
            if _SEVERITY[result] > _SEVERITY[worst]:
                worst = result
            rounds += 1
            if args.audit_rounds and rounds >= args.audit_rounds:
                break
            stop.wait(max(0.0, interval - (time.monotonic() - started)))
    finally:
        server.shutdown()
        server.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("auditor stopped")
    return (EXIT_TAMPERED if worst == RESULT_TAMPERED else
            EXIT_ERRORS if worst == RESULT_ERROR else EXIT_OK)
