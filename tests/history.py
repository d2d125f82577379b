"""A history checker for fault-injection tests (docs/reliability.md, "The history
checker").

A ``History`` records every client operation as invoke, then ok / fail / unknown, with its
database, keys, tx id and Alh when known and monotonic timestamps. After a run, the checks
compare that history with the logs the nodes really hold:

    history = History()
    with WriterPool(history, connect, threads=4):          # writers at full speed
        ...inject faults...
    wait_converged(primary, {"replica": replica}, timeout_seconds=20)
    check_history(history, primary, {"replica": replica})  # prefix, no lost ack, no gaps
    ...stop the nodes...
    check_node_storage(node.dir)                           # every database reopens and audits

``primary`` and each replica are anything with ``current_state()`` and ``export_txs(first,
count)`` (and ``get`` for the rejected-write check): a logged-in ``immucore.client.Client`` on the
right database, or an embedded ``Database`` (the checker's own tests use those). Every violation
raises AssertionError naming the node, the tx id and what differs.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

from immucore import codec
from immucore.client import ConnectionClosedError
from immucore.constants import KEY_SIZE_BYTES_MAX, TX_ENTRIES_MAX, VALUE_SIZE_BYTES_MAX
from immucore.database import open_database
from immucore.errors import ImmucoreError, KeyNotFoundError
from immucore.types import TxHeader

EXPORT_BATCH_TXS = 1000            # headers fetched per export_txs call
BLOB_LIMITS = (TX_ENTRIES_MAX, KEY_SIZE_BYTES_MAX, VALUE_SIZE_BYTES_MAX)
OP_TIMEOUT_SECONDS_DEFAULT = 15.0
REJECTED_CHECKS_MAX = 200          # rejected writes looked up on the primary, at most
POLL_SECONDS = 0.05

INVOKE, OK, FAIL, UNKNOWN = "invoke", "ok", "fail", "unknown"


@dataclass
class Op:
    """One client operation. ``fail`` means it certainly did not happen (the node answered an
    error); ``unknown`` that it may have (the connection died or timed out while in flight)."""
    index: int
    database: str
    keys: tuple
    node: str
    invoked_at: float                     # time.monotonic()
    timeout_seconds: float
    status: str = INVOKE
    ended_at: Optional[float] = None
    tx_id: Optional[int] = None
    alh: Optional[bytes] = None
    error: Optional[str] = None

    def describe(self) -> str:
        where = f" tx {self.tx_id}" if self.tx_id else ""
        return f"op #{self.index} ({self.status}{where}, {self.node}/{self.database}, " \
               f"keys {list(self.keys)[:3]})"


class History:
    """Thread-safe record of operations, in invocation order."""

    def __init__(self):
        self._lock = threading.Lock()
        self.ops: List[Op] = []

    def invoke(self, database: str, keys: Sequence[bytes], node: str = "primary",
               timeout_seconds: float = OP_TIMEOUT_SECONDS_DEFAULT) -> Op:
        with self._lock:
            op = Op(len(self.ops), database, tuple(keys), node, time.monotonic(),
                    timeout_seconds)
            self.ops.append(op)
            return op

    def ok(self, op: Op, tx_id: int, alh: bytes):
        self._end(op, OK, tx_id=tx_id, alh=alh)

    def fail(self, op: Op, error: BaseException):
        self._end(op, FAIL, error=f"{type(error).__name__}: {error}")

    def unknown(self, op: Op, error: BaseException):
        self._end(op, UNKNOWN, error=f"{type(error).__name__}: {error}")

    def _end(self, op: Op, status: str, **fields):
        with self._lock:
            if op.status != INVOKE:
                raise RuntimeError(f"{op.describe()} ended twice")
            op.status, op.ended_at = status, time.monotonic()
            for name, value in fields.items():
                setattr(op, name, value)

    def record_set(self, client, kvs: dict, node: str = "primary",
                   timeout_seconds: float = OP_TIMEOUT_SECONDS_DEFAULT):
        """``client.set(kvs)`` recorded as one op; returns the header, or None if it failed.
        Errors are recorded, not raised: a writer keeps going through faults."""
        database = getattr(client, "database", None) or getattr(client, "name", "")
        op = self.invoke(database, list(kvs), node, timeout_seconds)
        try:
            header = client.set(kvs)
        except BaseException as exc:  # noqa: BLE001 - every outcome is part of the history
            if outcome_unknown(exc):
                self.unknown(op, exc)
            else:
                self.fail(op, exc)
            if not isinstance(exc, Exception):
                raise
            return None
        self.ok(op, header.id, header.alh())
        return header

    def snapshot(self) -> List[Op]:
        with self._lock:
            return list(self.ops)

    def counts(self) -> Dict[str, int]:
        counts = {INVOKE: 0, OK: 0, FAIL: 0, UNKNOWN: 0}
        for op in self.snapshot():
            counts[op.status] += 1
        return counts


def outcome_unknown(exc: BaseException) -> bool:
    """Whether a failed call may still have been applied: the node never answered (connection
    lost, timeout), as opposed to answering with an error."""
    if isinstance(exc, ConnectionClosedError):
        return True
    # Any other ImmucoreError is the node's answer (IndexTimeoutError included); the client's
    # own timeout is a plain TimeoutError.
    return not isinstance(exc, ImmucoreError)


# --- the workload -----------------------------------------------------------------------------

class WriterPool:
    """``threads`` writers, each on its own connection, writing unique keys as fast as they can
    and recording every set in ``history``. A writer whose connection dies reconnects (through
    ``connect()``, which returns a logged-in Client) until the pool stops.

        with WriterPool(history, connect, threads=4, keys_per_tx=3):
            time.sleep(1)
    """

    def __init__(self, history: History, connect: Callable[[], object], *, threads: int = 4,
                 keys_per_tx: int = 1, value_bytes: int = 8, node: str = "primary",
                 name: str = "w", timeout_seconds: float = OP_TIMEOUT_SECONDS_DEFAULT):
        self.history, self._connect, self.node, self.name = history, connect, node, name
        self.keys_per_tx, self.value_bytes = keys_per_tx, value_bytes
        self.timeout_seconds = timeout_seconds
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True,
                                          name=f"writer-{name}{n}") for n in range(threads)]
        self.errors: List[BaseException] = []

    def start(self) -> "WriterPool":
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, timeout_seconds: float = 30.0):
        """Stop and wait: every op of the pool has ended when this returns."""
        self._stop.set()
        deadline = time.monotonic() + timeout_seconds
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
        stuck = [t.name for t in self._threads if t.is_alive()]
        if stuck:
            raise AssertionError(f"writers {stuck} did not stop within {timeout_seconds}s "
                                 "(an operation hangs)")
        if self.errors:
            raise self.errors[0]

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _run(self, number: int):
        sequence = 0
        client = None
        try:
            while not self._stop.is_set():
                if client is None:
                    client = self._connect_or_none()
                    if client is None:
                        self._stop.wait(0.05)         # the node is down: try again soon
                        continue
                value = (b"v%d." % sequence).ljust(self.value_bytes, b"x")
                kvs = {f"{self.name}{number}-{sequence}-{i}".encode(): value
                       for i in range(1 + sequence % self.keys_per_tx)}
                sequence += 1
                if self.history.record_set(client, kvs, self.node, self.timeout_seconds) is None:
                    client = _closed(client)          # a fresh connection after any failure
                    self._stop.wait(0.02)             # and no busy loop against a failing node
        except BaseException as exc:  # noqa: BLE001 - handed to stop(), never lost
            self.errors.append(exc)
        finally:
            _closed(client)

    def _connect_or_none(self):
        try:
            return self._connect()
        except (OSError, ImmucoreError, TimeoutError):
            return None


def _closed(client) -> None:
    if client is not None:
        try:
            client.close()
        except Exception:  # noqa: BLE001 - closing a dead connection may fail any way
            pass
    return None


# --- reading logs -----------------------------------------------------------------------------

def read_alhs(source, label: str, last_tx_id: int) -> List[bytes]:
    """The Alh of every tx 1..last_tx_id of ``source`` (index i holds tx i + 1), fetched in
    batches. Checks on the way: ids contiguous (no gap, no duplicate), every blob's entries hash
    to its Eh, and every tx's prevAlh is the Alh before it."""
    alhs: List[bytes] = []
    previous = codec.sha256(b"")
    while len(alhs) < last_tx_id:
        first = len(alhs) + 1
        blobs = source.export_txs(first, min(EXPORT_BATCH_TXS, last_tx_id - first + 1))
        if not blobs:
            raise AssertionError(f"{label}: tx {first} missing (state says tx {last_tx_id})")
        for blob in blobs:
            expected = len(alhs) + 1
            if expected > last_tx_id:
                break
            header, alh = _verified(blob, label, expected)
            if header.id != expected:
                kind = "duplicate" if header.id < expected else "gap"
                raise AssertionError(f"{label}: tx ids not contiguous ({kind}): expected tx "
                                     f"{expected}, the log holds tx {header.id} there")
            if header.prev_alh != previous:
                raise AssertionError(f"{label}: tx {expected} is not chained to tx "
                                     f"{expected - 1} (prevAlh differs)")
            alhs.append(alh)
            previous = alh
    return alhs


def _verified(blob: bytes, label: str, expected_tx_id: int):
    try:
        header, alh = codec.verify_blob(bytes(blob), BLOB_LIMITS)
    except ImmucoreError as exc:
        raise AssertionError(f"{label}: tx {expected_tx_id} does not verify: {exc}") from None
    return TxHeader(*header), alh


def _state(source, label: str):
    try:
        return source.current_state()
    except Exception as exc:  # noqa: BLE001 - named in the assertion
        raise AssertionError(f"{label}: current_state failed: {type(exc).__name__}: {exc}") \
            from exc


# --- the checks -------------------------------------------------------------------------------

def check_history(history: History, primary, replicas: Optional[Dict[str, object]] = None, *,
                  sync_acks: int = 0, check_rejected: bool = True,
                  timeout_slack_seconds: float = 2.0) -> dict:
    """Every check of a history against the primary and its replicas; returns a summary.

    1. every op ended, each within its timeout (liveness);
    2. acknowledgements are consistent: no two ok ops got the same tx id, and an op invoked
       after another was acknowledged got a later tx id (real-time order);
    3. the primary's log is whole (contiguous ids, chained Alh) and holds every ok op's tx with
       the acknowledged Alh (no acknowledged write lost);
    4. each replica's log is a prefix of the primary's (same Alh at every tx id up to its last);
    5. with ``sync_acks``: every ok op's tx is on at least that many replicas;
    6. with ``check_rejected``: writes the node refused (``fail``) are not in the primary.
    """
    replicas = replicas or {}
    ops = history.snapshot()
    check_ops_ended(ops, timeout_slack_seconds)
    acked = [op for op in ops if op.status == OK]
    check_acks_consistent(acked)
    primary_alhs = read_alhs(primary, "primary", _state(primary, "primary").tx_id)
    check_acked_present(acked, primary_alhs, "primary")
    replica_last = {}
    for label, replica in replicas.items():
        replica_last[label] = check_prefix(primary_alhs, replica, label)
    if sync_acks:
        check_sync_acks(acked, replica_last, sync_acks)
    if check_rejected:
        check_rejected_absent(ops, primary)
    return {"ops": len(ops), **history.counts(), "primary_tx_id": len(primary_alhs),
            "replicas_tx_id": replica_last}


def check_ops_ended(ops: Sequence[Op], slack_seconds: float = 2.0):
    for op in ops:
        if op.status == INVOKE:
            raise AssertionError(f"{op.describe()} never ended")
        took = op.ended_at - op.invoked_at
        if took > op.timeout_seconds + slack_seconds:
            raise AssertionError(f"{op.describe()} took {took:.2f}s, over its timeout of "
                                 f"{op.timeout_seconds:g}s")


def check_acks_consistent(acked: Sequence[Op]):
    by_tx: Dict[int, Op] = {}
    for op in acked:
        other = by_tx.setdefault(op.tx_id, op)
        if other is not op:
            raise AssertionError(f"tx {op.tx_id} acknowledged twice: {other.describe()} and "
                                 f"{op.describe()}")
    # Real-time order: once an ack is received, every later write must land after it.
    ended = sorted(acked, key=lambda op: op.ended_at)
    position, highest = 0, None
    for op in sorted(acked, key=lambda op: op.invoked_at):
        while position < len(ended) and ended[position].ended_at < op.invoked_at:
            if highest is None or ended[position].tx_id > highest.tx_id:
                highest = ended[position]
            position += 1
        if highest is not None and op.tx_id <= highest.tx_id:
            raise AssertionError(f"{op.describe()} was invoked after {highest.describe()} was "
                                 "acknowledged but got an earlier tx id")


def check_acked_present(acked: Sequence[Op], alhs: List[bytes], label: str):
    for op in sorted(acked, key=lambda op: op.tx_id):
        if op.tx_id > len(alhs):
            raise AssertionError(f"acknowledged write lost: {op.describe()} but {label} ends at "
                                 f"tx {len(alhs)}")
        if alhs[op.tx_id - 1] != op.alh:
            raise AssertionError(f"acknowledged write lost: {op.describe()} was acknowledged "
                                 f"with Alh {op.alh.hex()[:16]}…, {label} holds "
                                 f"{alhs[op.tx_id - 1].hex()[:16]}… at tx {op.tx_id}")


def check_prefix(primary_alhs: List[bytes], replica, label: str) -> int:
    """The replica's log is a prefix of the primary's; returns the replica's last tx id."""
    last = _state(replica, label).tx_id
    if last > len(primary_alhs):
        raise AssertionError(f"{label} holds tx {last} but the primary ends at tx "
                             f"{len(primary_alhs)}: not a prefix")
    for index, alh in enumerate(read_alhs(replica, label, last)):
        if alh != primary_alhs[index]:
            raise AssertionError(f"{label} diverged from the primary at tx {index + 1}: Alh "
                                 f"{alh.hex()[:16]}… vs {primary_alhs[index].hex()[:16]}…")
    return last


def check_sync_acks(acked: Sequence[Op], replica_last: Dict[str, int], sync_acks: int):
    for op in acked:
        holders = [label for label, last in replica_last.items() if last >= op.tx_id]
        if len(holders) < sync_acks:
            raise AssertionError(f"{op.describe()} is on {len(holders)} replica(s) {holders}, "
                                 f"fewer than the {sync_acks} acknowledgements required")


def check_rejected_absent(ops: Sequence[Op], primary):
    """A write the node answered with an error must not have happened (its keys are unique)."""
    rejected = [op for op in ops if op.status == FAIL][:REJECTED_CHECKS_MAX]
    for op in rejected:
        for key in op.keys:
            try:
                entry = primary.get(key)
            except KeyNotFoundError:
                continue
            raise AssertionError(f"{op.describe()} was refused ({op.error}) but key {key!r} is "
                                 f"in the primary at tx {entry.tx}")


def wait_converged(primary, replicas: Dict[str, object], timeout_seconds: float = 30.0,
                   describe: Optional[Callable[[str], object]] = None) -> float:
    """Wait until every replica has the primary's state (tx id and Alh); returns the seconds it
    took. On timeout, the assertion names each replica behind, with ``describe(label)`` (e.g.
    its replicator status) when given."""
    start = time.monotonic()
    deadline = start + timeout_seconds
    while True:
        target = _state(primary, "primary")
        behind = {label: _state(replica, label) for label, replica in replicas.items()}
        behind = {label: state for label, state in behind.items()
                  if (state.tx_id, state.tx_hash) != (target.tx_id, target.tx_hash)}
        if not behind:
            return time.monotonic() - start
        if time.monotonic() > deadline:
            details = "; ".join(
                f"{label} at tx {state.tx_id}"
                + (f" ({describe(label)})" if describe is not None else "")
                for label, state in behind.items())
            raise AssertionError(f"replicas did not converge to the primary's tx "
                                 f"{target.tx_id} within {timeout_seconds:g}s: {details}")
        time.sleep(POLL_SECONDS)


# --- storage sanity ---------------------------------------------------------------------------

def check_storage(path: str, label: Optional[str] = None) -> int:
    """Reopen the database folder ``path`` (its node stopped) and re-verify its whole log:
    every Eh, Alh, blRoot and stored AHT node (``Database.audit``). Returns its last tx id."""
    label = label or path
    try:
        db = open_database(path)
    except Exception as exc:  # noqa: BLE001 - named in the assertion
        raise AssertionError(f"{label}: does not reopen: {type(exc).__name__}: {exc}") from exc
    try:
        last = db.current_state().tx_id
        try:
            audited = db.audit()
        except Exception as exc:  # noqa: BLE001 - named in the assertion
            raise AssertionError(f"{label}: audit failed: {type(exc).__name__}: {exc}") from exc
        if audited != last:
            raise AssertionError(f"{label}: audit checked {audited} txs, the log ends at {last}")
        return last
    finally:
        db.close()


def check_node_storage(node_dir: str) -> Dict[str, int]:
    """``check_storage`` for every database folder of a stopped node; {name: last tx id}."""
    found = {}
    for name in sorted(os.listdir(node_dir)):
        path = os.path.join(node_dir, name)
        if os.path.isdir(os.path.join(path, "log")):
            found[name] = check_storage(path, f"{node_dir}/{name}")
    if "systemdb" not in found:
        raise AssertionError(f"{node_dir}: no systemdb folder")
    return found
