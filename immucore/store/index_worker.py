"""The key indexer in a process of its own: the node's indexer, one worker per database.

Why a process: py-lmdb releases the GIL around every put, so an indexer thread hands the GIL to
the event loop a thousand times per 1000-entry tx and waits to get it back each time. Measured
in the node under 1000-entry sets: 0.85-1.0 us of CPU per index row, against 0.26 alone, and
the writer and the loop slowed by the same hand-offs. The worker does the same steps as the
thread (``indexer.index_step``) with its own GIL; the node only reads the index.

The two ends talk over the worker's stdin and stdout:

* node -> worker, one byte each: ``p`` a commit (sent after every commit; dropped when the
  pipe is full, which means the worker has thousands waiting already), ``h`` a read is
  waiting (index now, do not gather), ``P`` pause (finish the step, answer ``paused``, index
  nothing until ``R``), ``R`` resume (re-read the position: a rewind may have moved it).
  End of input: finish the step and exit.
* worker -> node, lines: ``indexed <tx id>`` after every step (and at start and resume),
  ``error <text>`` when a step failed (it is retried with backoff), ``paused``.

The worker follows the log's own tail (what LMDB committed), so it needs no tx ids from the
node. Its LMDB environments are the node's (LMDB is multi-process); a map one side grows is
adopted by the other (``LmdbEnv.adopt_grown_map``). When the node dies its stdin ends and it
exits after its step; a step writes only if the stored position is still where it began, so a
worker outliving a killed node cannot corrupt the index a new node opens. A worker that exits
is restarted with backoff, its last error kept for readers that time out.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import Callable, Optional

from ..constants import INDEX_GATHER_SECONDS, INDEX_GATHER_TXS_MAX, INDEX_THREAD_NICE
from ..errors import DatabaseClosedError, IndexTimeoutError
from .indexer import (IndexMovedError, index_step, prepare_index, read_indexed_tx_id,
                      rewind_index)

log = logging.getLogger("immucore.indexer")
_U64 = struct.Struct(">Q")
_RETRY_SECONDS_MAX = 5.0
_PAUSE_WAIT_SECONDS = 60.0          # a step is bounded (INDEX_BATCH_ENTRIES_MAX); this is ample
_STOP_WAIT_SECONDS = 30.0


class WorkerIndexer:
    """``Indexer``'s interface (notify, wait_for, pause_and_rewind, resume, close, and the
    ``indexed_tx_id`` / ``version`` / ``last_error`` readers use) over a worker process."""

    def __init__(self, index_env, log_env, *, committed_tx_id: Callable[[], int], name: str,
                 path: str, durable: bool, map_size_bytes: int = 0):
        self._env = index_env
        self._log_env = log_env
        self._name, self._path, self._durable = name, path, durable
        self._map_size_bytes = map_size_bytes
        self._cond = threading.Condition()
        self._stopping = False
        self._paused = False
        self._paused_reply = threading.Event()
        self._readers_waiting = 0
        self.version = 0
        self.last_error: Optional[str] = None
        self.indexed_tx_id = prepare_index(index_env, committed_tx_id(), name)
        self._process: Optional[subprocess.Popen] = None
        self._start_worker()
        self._reader = threading.Thread(target=self._follow, name=f"immucore-indexer-{name}",
                                        daemon=True)
        self._reader.start()

    # --- the interface readers and the writer use ----------------------------------------

    def notify(self):
        """After each commit (on the committer thread): never blocks."""
        self._send(b"p", must_arrive=False)

    def wait_for(self, tx_id: int, timeout_seconds: float):
        if self.indexed_tx_id >= tx_id:
            return
        deadline = time.monotonic() + timeout_seconds
        self._send(b"h")
        with self._cond:
            while self.indexed_tx_id < tx_id:
                if self._stopping:
                    raise DatabaseClosedError()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    detail = f" (last error: {self.last_error})" if self.last_error else ""
                    raise IndexTimeoutError(
                        f"index did not reach tx {tx_id} within {timeout_seconds:g}s; indexed "
                        f"up to tx {self.indexed_tx_id}{detail}")
                self._cond.wait(remaining)

    def pause_and_rewind(self, tx_id: int):
        """Pause the worker (its step under way finishes first), then forget the keys of every
        indexed tx after ``tx_id`` here. ``resume`` restarts indexing."""
        with self._cond:
            self._paused = True
            self._paused_reply.clear()
        self._send(b"P")
        if not self._paused_reply.wait(_PAUSE_WAIT_SECONDS):
            raise IndexTimeoutError(f"index worker of {self._name} did not pause")
        # every "indexed" line the worker sent before "paused" has been read by now; a worker
        # restarted meanwhile may not have sent its last, so the stored position decides
        stored = read_indexed_tx_id(self._env)
        with self._cond:
            if stored != self.indexed_tx_id:
                self.version += 1
                self.indexed_tx_id = stored
        rewind_index(self._env, self._log_env, tx_id, self)

    def resume(self):
        with self._cond:
            self._paused = False
        self._send(b"R")

    def close(self):
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            process = self._process
        if process is not None:
            _close_quietly(process.stdin)       # the worker finishes its step and exits
        self._reader.join(_STOP_WAIT_SECONDS)
        if self._reader.is_alive():
            log.error("index worker of %s did not stop; killing it", self._name)
            self._process.kill()
            self._reader.join()

    # --- the worker process ---------------------------------------------------------------

    def _start_worker(self):
        command = [sys.executable, "-m", "immucore.store.index_worker", self._path, self._name,
                   "1" if self._durable else "0", "1" if self._paused else "0",
                   str(self._map_size_bytes)]
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   close_fds=True)
        os.set_blocking(process.stdin.fileno(), False)
        self._process = process

    def _send(self, command: bytes, must_arrive: bool = True):
        process = self._process
        if process is None:
            return
        deadline = time.monotonic() + _STOP_WAIT_SECONDS
        while True:
            try:
                os.write(process.stdin.fileno(), command)
                return
            except BlockingIOError:
                # the pipe holds 64 KiB of unread commands: a commit's poke is redundant then;
                # a command waits for room (the worker reads between steps)
                if not must_arrive or time.monotonic() > deadline:
                    return
                time.sleep(0.001)
            except (OSError, ValueError):
                return            # the worker is gone: _follow restarts it (or we are closing)

    def _follow(self):
        """Read the worker's lines; restart it when it exits, unless closing."""
        failures = 0
        while True:
            process = self._process
            for raw in process.stdout:
                self._on_line(raw.decode("utf-8", "replace").rstrip("\n"))
                failures = 0
            code = process.wait()
            _close_quietly(process.stdout)
            with self._cond:
                if self._stopping:
                    return
                self.last_error = f"index worker of {self._name} exited with code {code}"
                failures += 1
                log.error("%s; restarting it", self.last_error)
                deadline = time.monotonic() + min(0.05 * 2 ** failures, _RETRY_SECONDS_MAX)
                while not self._stopping and (remaining := deadline - time.monotonic()) > 0:
                    self._cond.wait(remaining)
                if self._stopping:
                    return
                try:
                    self._start_worker()           # starts paused if a rewind is under way
                except OSError as exc:
                    self.last_error = f"cannot start the index worker of {self._name}: {exc}"
                    log.error("%s", self.last_error)
                    return
            if self._paused:
                self._paused_reply.set()        # the new worker starts paused

    def _on_line(self, line: str):
        kind, _, rest = line.partition(" ")
        if kind == "indexed":
            tx_id = int(rest)
            with self._cond:
                if tx_id != self.indexed_tx_id:
                    self.version += 1         # first: a reader that sees the new id must renew
                    self.indexed_tx_id = tx_id
                self.last_error = None
                self._cond.notify_all()
        elif kind == "error":
            self.last_error = rest
            log.error("indexing %s failed: %s", self._name, rest)
        elif kind == "paused":
            self._paused_reply.set()


def _close_quietly(stream):
    try:
        stream.close()
    except OSError:
        pass


# --- the worker's side ----------------------------------------------------------------------

class _Commands:
    """The node's one-byte commands on stdin."""

    def __init__(self):
        self.hurry = self.pause = self.resume = self.ended = False

    def read(self, timeout: Optional[float]) -> bool:
        """Take what has arrived, waiting up to ``timeout`` (None: until something does).
        True if anything (or the end of input) came."""
        ready, _, _ = select.select([0], [], [], timeout)
        if not ready:
            return False
        data = os.read(0, 65536)
        if not data:
            self.ended = True
        self.hurry |= b"h" in data
        # the last of P/R wins: a pause and resume both sent before this read cancel out
        last_pause, last_resume = data.rfind(b"P"), data.rfind(b"R")
        if last_pause > last_resume:
            self.pause, self.resume = True, False
        elif last_resume > last_pause:
            self.resume, self.pause = True, False
        return True


def _say(line: str):
    sys.stdout.write(line.replace("\n", " ") + "\n")
    sys.stdout.flush()


def _log_tail(log_env) -> int:
    with log_env.read() as txn:
        cursor = txn.cursor(log_env.dbs["tx"])
        return _U64.unpack(cursor.key())[0] if cursor.last() else 0


def work(path: str, name: str, durable: bool, paused: bool, map_size_bytes: int) -> int:
    from .env import INDEX_DBS, LOG_DBS, LmdbEnv
    # The node decides when this worker ends (its stdin ends): a Ctrl-C or a service manager's
    # SIGTERM to the whole process group must not end it under the node's feet.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, INDEX_THREAD_NICE)
    except (AttributeError, OSError):
        pass
    log_env = LmdbEnv(os.path.join(path, "log"), LOG_DBS, durable=durable,
                      map_size_bytes=map_size_bytes)
    index_env = LmdbEnv(os.path.join(path, "index"), INDEX_DBS, durable=durable,
                        map_size_bytes=map_size_bytes, metasync=False)
    commands = _Commands()
    indexed = read_indexed_tx_id(index_env)
    _say(f"indexed {indexed}")
    if paused:
        _say("paused")
    failures = 0
    try:
        while not commands.ended:
            if commands.pause:
                commands.pause, paused = False, True
                _say("paused")
            if commands.resume:
                commands.resume, paused = False, False
                indexed = read_indexed_tx_id(index_env)
                _say(f"indexed {indexed}")
            tail = 0 if paused else _log_tail(log_env)
            if paused or indexed >= tail:
                commands.hurry = False
                commands.read(None)
                continue
            if failures:
                # back off for the whole delay: pokes must not turn it into a retry storm
                deadline = time.monotonic() + min(0.01 * 2 ** failures, _RETRY_SECONDS_MAX)
                while not (commands.ended or commands.pause) and (
                        remaining := deadline - time.monotonic()) > 0:
                    commands.read(remaining)
            elif not commands.hurry and tail - indexed < INDEX_GATHER_TXS_MAX:
                # let commits gather so one step indexes them all; a waiting read ends it
                deadline = time.monotonic() + INDEX_GATHER_SECONDS
                while not (commands.hurry or commands.ended or commands.pause) and (
                        remaining := deadline - time.monotonic()) > 0:
                    commands.read(remaining)
            if commands.ended or commands.pause:
                continue
            commands.hurry = False
            commands.read(0)                       # take the pokes that arrived meanwhile
            try:
                indexed = index_step(index_env, log_env, indexed + 1, _log_tail(log_env))
                failures = 0
                _say(f"indexed {indexed}")
            except IndexMovedError:
                indexed = read_indexed_tx_id(index_env)
                _say(f"indexed {indexed}")
            except Exception as exc:  # noqa: BLE001 - reported, retried with backoff
                failures += 1
                _say(f"error {exc}")
    finally:
        index_env.close()
        log_env.close()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                                                   "%(message)s")
    try:
        sys.exit(work(sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1",
                      int(sys.argv[5])))
    except BrokenPipeError:          # the node is gone
        sys.exit(0)
