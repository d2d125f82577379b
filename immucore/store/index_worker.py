"""The key indexer in a process of its own: the node's indexer, one worker per database.

Why a process: py-lmdb releases the GIL around every put, so an indexer thread hands the GIL to
the event loop a thousand times per 1000-entry tx and waits to get it back each time. Measured
in the node under 1000-entry sets: 0.85-1.0 us of CPU per index row, against 0.26 alone, and
the writer and the loop slowed by the same hand-offs. The worker does the same steps as the
thread (``indexer.index_step``) with its own GIL; the node only reads the index.

The two ends talk over the worker's stdin and stdout:

The node starts a worker with ``sys.executable`` on the very package it runs (_WORKER_BOOTSTRAP).

* node -> worker, 9-byte commands (one byte, then a u64; one write each, so commands from
  several threads never interleave): ``p <tx>`` tx committed (after every commit; when the
  pipe is full it is dropped, and the latest tx id is sent again after the worker's next step),
  ``h <tx>`` a read is waiting (index now, do not gather), ``P <n>`` pause number n (finish
  the step, answer ``paused <n>``, index nothing until ``R``), ``R <tx>`` resume with tx the
  last committed (the log may have been cut back: the position and the bound are read again).
  End of input: finish the step and exit.
* worker -> node, lines: ``indexed <tx id>`` after every step (and at start and resume),
  ``error <text>`` when a step failed (it is retried with backoff), ``paused <n>``.

The worker indexes up to the tx the node last published as committed, never past it: a read
renews its log snapshot when that changes, so an index row must never point past it. Its LMDB
environments are the node's (LMDB is multi-process); a map one side grows is
adopted by the other (``LmdbEnv.adopt_grown_map``). When the node dies its stdin ends and it
exits after its step; a step writes only if the stored position is still where it began, so a
worker outliving a killed node cannot corrupt the index a new node opens. A worker that exits
is restarted with backoff, its last error kept for readers that time out; one that exits more
than INDEX_WORKER_RESTARTS_MAX times within INDEX_WORKER_RESTART_WINDOW_SECONDS is not: the
index is ``failed`` (with the worker's last stderr line), and reads fail at once until
``restart`` (the node's ``database load``) or a new node. The worker's stderr goes to the
node's log, a line at a time.
"""
from __future__ import annotations

import collections
import faulthandler
import logging
import os
import select
import selectors
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import Callable, Optional

from ..constants import (INDEX_GATHER_SECONDS, INDEX_GATHER_TXS_MAX, INDEX_THREAD_NICE,
                         INDEX_WORKER_RESTART_WINDOW_SECONDS, INDEX_WORKER_RESTARTS_MAX,
                         INDEX_WORKER_STDERR_LINE_CHARS_MAX)
from ..errors import IndexFailedError, IndexTimeoutError
from .indexer import (IndexMovedError, index_step, prepare_index, read_indexed_tx_id,
                      rewind_index, wait_indexed_locked)

log = logging.getLogger("immucore.indexer")
_U64 = struct.Struct(">Q")
_RETRY_SECONDS_MAX = 5.0
_PAUSE_WAIT_SECONDS = 60.0          # a step is bounded (INDEX_BATCH_ENTRIES_MAX); this is ample
_STOP_WAIT_SECONDS = 30.0
# The folder holding the immucore package this node runs (site-packages, or a source tree).
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# How a worker starts: ``python -m`` (or ``-c``) puts the current directory first on sys.path,
# so a node started from a source checkout (no built extension there) or from any folder that
# holds an ``immucore`` package would run its workers on that other package, which dies or
# indexes differently. The bootstrap drops that first entry (with PYTHONSAFEPATH set there is
# none) and puts _PACKAGE_ROOT (argv[1]) first only when it is not on the path already (a
# source tree): an installed package's site-packages keeps its place after the standard
# library, so nothing installed there can shadow a standard module in the worker.
_WORKER_BOOTSTRAP = ("import sys; root = sys.argv.pop(1); "
                     "del sys.path[0:0 if getattr(sys.flags, 'safe_path', False) else 1]; "
                     "root in sys.path or sys.path.insert(0, root); "
                     "from immucore.store.index_worker import main; main()")


class WorkerIndexer:
    """``Indexer``'s interface (notify, wait_for, pause_and_rewind, resume, close, and the
    ``indexed_tx_id`` / ``version`` / ``last_error`` readers use) over a worker process."""

    def __init__(self, index_env, log_env, *, committed_tx_id: Callable[[], int], name: str,
                 path: str, durable: bool, map_size_bytes: int = 0):
        self._env = index_env
        self._log_env = log_env
        self._name, self._path, self._durable = name, path, durable
        self._map_size_bytes = map_size_bytes
        self._committed_tx_id = committed_tx_id
        self._cond = threading.Condition()
        self._stopping = False
        self._pause = 0             # the pause under way (0: none); a worker answers its number
        self._pause_count = 0
        self._paused_answer = 0     # the last pause number a worker answered
        self.version = 0
        self.last_error: Optional[str] = None
        # set when the worker kept dying and is not restarted: why, for readers, the database
        # list and /metrics (None: the index is running)
        self.failed: Optional[str] = None
        self.restarts = 0           # workers started again after one exited (for /metrics)
        self._exits = collections.deque()   # when workers exited, within the restart window
        self._stderr_line = ""      # the current worker's last line on stderr
        self.indexed_tx_id = prepare_index(index_env, committed_tx_id(), name)
        self._process: Optional[subprocess.Popen] = None
        self._started_at = 0.0
        self._poke_dropped = False  # a commit's poke was lost (full pipe, dead worker): re-sent
        self._send_lock = threading.Lock()
        self._start_worker()
        self._start_reader()

    def _start_reader(self):
        self._reader = threading.Thread(target=self._follow, name=f"immucore-indexer-{self._name}",
                                        daemon=True)
        self._reader.start()

    @property
    def worker_pid(self) -> Optional[int]:
        """The running worker's process id (None when the index failed or is closed)."""
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    def restart(self) -> bool:
        """Start a failed index's worker again, its restart count for the window cleared (the
        operator's ``database load`` of a loaded database). False if it had not failed."""
        with self._cond:
            if self.failed is None or self._stopping:
                return False
        self._reader.join()                 # it ended when the index failed
        with self._cond:
            self._exits.clear()
            self._start_worker()            # (raises OSError: the index stays failed)
            self.failed = None
            self.last_error = None
        log.info("index worker of %s started again", self._name)
        self._start_reader()
        return True

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
            wait_indexed_locked(self, tx_id, deadline, timeout_seconds)

    def _check_running_locked(self):
        if self.failed is not None:
            raise IndexFailedError(self.failed)

    def pause_and_rewind(self, tx_id: int):
        """Pause the worker (its step under way finishes first), then forget the keys of every
        indexed tx after ``tx_id`` here. ``resume`` restarts indexing (call it whatever
        happened: a failed pause or rewind leaves the worker paused until then)."""
        with self._cond:
            self._pause_count += 1
            self._pause = number = self._pause_count
        self._send(b"P", number)
        deadline = time.monotonic() + _PAUSE_WAIT_SECONDS
        with self._cond:
            while self._paused_answer != number:
                self._check_running_locked()
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping:
                    raise IndexTimeoutError(f"index worker of {self._name} did not pause")
                self._cond.wait(remaining)
            # Positions the worker reported while pausing were ignored (a worker restarted
            # meanwhile reports a stale one): the stored position is the truth now.
            stored = read_indexed_tx_id(self._env)
            if stored != self.indexed_tx_id:
                self.version += 1
                self.indexed_tx_id = stored
        rewind_index(self._env, self._log_env, tx_id, self)

    def resume(self):
        with self._cond:
            self._pause = 0
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
        command = [sys.executable, "-c", _WORKER_BOOTSTRAP, _PACKAGE_ROOT,
                   os.path.abspath(self._path), self._name, "1" if self._durable else "0",
                   str(self._pause), str(self._committed_tx_id()), str(self._map_size_bytes)]
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, close_fds=True)
        self._stderr_line = ""
        os.set_blocking(process.stdin.fileno(), False)
        self._process = process
        self._started_at = time.monotonic()

    def _send(self, kind: bytes, value: Optional[int] = None, must_arrive: bool = True):
        """Write one command. ``value`` None: the committed tx id, read under the send lock
        right before the write, so ids reach the worker in the order they were read (a
        resume's bound then truly replaces every poke and hurry before it)."""
        deadline = time.monotonic() + _STOP_WAIT_SECONDS
        while True:
            with self._send_lock:
                process = self._process
                if process is None:
                    return
                command = kind + _U64.pack(self._committed_tx_id() if value is None else value)
                try:
                    os.write(process.stdin.fileno(), command)    # 9 bytes: all or nothing
                    return
                except BlockingIOError:
                    # The pipe holds 64 KiB of unread commands: the worker will wake, but a
                    # dropped poke's tx id is lost, so it is sent again after the worker's next
                    # report (_on_line). A command waits for room (the worker reads between
                    # steps).
                    if not must_arrive or time.monotonic() > deadline:
                        self._poke_dropped |= kind == b"p"
                        return
                except (OSError, ValueError):
                    # the worker is gone: _follow restarts it, and its first report (or the
                    # resume, if it starts paused) brings the tx id this poke carried
                    self._poke_dropped |= kind == b"p"
                    return
            time.sleep(0.001)

    def _follow(self):
        """Read the worker's lines; restart it when it exits, unless closing or it keeps dying
        (then the index fails)."""
        while True:
            process = self._process
            self._read_until_exit(process)
            code = process.wait()
            # a worker killed inside a read transaction leaves its LMDB reader slot behind:
            # pages freed after that snapshot would never be reused
            for env in (self._env, self._log_env):
                try:
                    env.env.reader_check()
                except Exception:  # noqa: BLE001 - closed meanwhile; nothing to clear then
                    pass
            with self._cond:
                if self._stopping:
                    return
                now = time.monotonic()
                self._exits.append(now)
                while now - self._exits[0] > INDEX_WORKER_RESTART_WINDOW_SECONDS:
                    self._exits.popleft()
                said = (f"its last stderr line: {self._stderr_line}" if self._stderr_line
                        else "it wrote nothing on stderr")
                self.last_error = f"index worker of {self._name} {_exit_text(code)}; {said}"
                if len(self._exits) > INDEX_WORKER_RESTARTS_MAX:
                    self._fail_locked(
                        f"index worker of {self._name} exited {len(self._exits)} times within "
                        f"{INDEX_WORKER_RESTART_WINDOW_SECONDS:g}s and is not restarted (at "
                        f"most {INDEX_WORKER_RESTARTS_MAX}); the last {_exit_text(code)}, {said}")
                    return
                log.error("%s; restarting it", self.last_error)
                deadline = now + min(0.05 * 2 ** len(self._exits), _RETRY_SECONDS_MAX)
                while not self._stopping and (remaining := deadline - time.monotonic()) > 0:
                    self._cond.wait(remaining)
                if self._stopping:
                    return
                try:
                    self._start_worker()      # paused, answering the pause, if one is under way
                    self.restarts += 1
                except OSError as exc:
                    self._fail_locked(f"cannot start the index worker of {self._name}: {exc}")
                    return

    def _fail_locked(self, why: str):
        """The index stops for good: readers waiting now and later fail at once with ``why``."""
        self.failed = self.last_error = why
        log.error("%s; reads of %s fail until it is loaded again (immuadmin database unload "
                  "and load, or database load for defaultdb) or the node restarts",
                  why, self._name)
        self._cond.notify_all()

    def _read_until_exit(self, process):
        """Until the worker's stdout and stderr both end: each stdout line is a report
        (_on_line), each stderr line goes to the log and the last one is kept. One thread
        reads both, so a chatty stderr can never fill its pipe and stall the worker."""
        pending = {process.stdout.fileno(): b"", process.stderr.fileno(): b""}
        with selectors.DefaultSelector() as selector:
            for fd in pending:
                selector.register(fd, selectors.EVENT_READ)
            while pending:
                for key, _ in selector.select():
                    data = os.read(key.fd, 65536)
                    lines = (pending[key.fd] + data).split(b"\n")
                    if data:
                        pending[key.fd] = lines.pop()
                    else:                       # its end: the last line may lack its newline
                        selector.unregister(key.fd)
                        del pending[key.fd]
                    for raw in lines:
                        if key.fd == process.stdout.fileno():
                            if raw:
                                self._on_line(raw.decode("utf-8", "replace"))
                        else:
                            self._on_stderr_line(raw.decode("utf-8", "replace").rstrip())
        _close_quietly(process.stdout)
        _close_quietly(process.stderr)

    def _on_stderr_line(self, line: str):
        if line.strip():
            log.warning("index worker of %s: %s", self._name, line)
            self._stderr_line = line.strip()[:INDEX_WORKER_STDERR_LINE_CHARS_MAX]

    def _on_line(self, line: str):
        kind, _, rest = line.partition(" ")
        if kind == "indexed":
            tx_id = int(rest)
            with self._cond:
                if self._pause:
                    return      # pausing: the stored position is read once the pause is answered
                if tx_id != self.indexed_tx_id:
                    self.version += 1         # first: a reader that sees the new id must renew
                    self.indexed_tx_id = tx_id
                self.last_error = None
                self._cond.notify_all()
            if self._poke_dropped:           # the worker just emptied the pipe: tell it again
                self._poke_dropped = False
                self._send(b"p", must_arrive=False)
        elif kind == "error":
            self.last_error = rest
            log.error("indexing %s failed: %s", self._name, rest)
        elif kind == "paused":
            with self._cond:
                self._paused_answer = int(rest)
                self._cond.notify_all()


def _exit_text(code: int) -> str:
    """``exited with code 1``, or ``was killed by SIGSEGV (code -11)``."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"was killed by {name} (code {code})"


def _close_quietly(stream):
    try:
        stream.close()
    except OSError:
        pass


# --- the worker's side ----------------------------------------------------------------------

class _Commands:
    """The node's 9-byte commands on stdin, applied in order."""

    def __init__(self, committed: int, pause: int):
        self.committed = committed      # the last tx the node published as committed
        self.pause = pause              # a pause to answer (its number), 0: none
        self.resumed = False            # a resume came: read the position again
        self.hurry = self.ended = False
        self._pending = b""

    def read(self, timeout: Optional[float]) -> bool:
        """Take what has arrived, waiting up to ``timeout`` (None: until something does).
        True if anything (or the end of input) came."""
        ready, _, _ = select.select([0], [], [], timeout)
        if not ready:
            return False
        data = os.read(0, 65536)
        if not data:
            self.ended = True
            return True
        data = self._pending + data
        whole = len(data) - len(data) % 9
        self._pending = data[whole:]
        for at in range(0, whole, 9):
            kind, value = data[at:at + 1], _U64.unpack_from(data, at + 1)[0]
            if kind == b"p":
                self.committed = max(self.committed, value)
            elif kind == b"h":
                self.hurry, self.committed = True, max(self.committed, value)
            elif kind == b"P":
                self.pause = value
            elif kind == b"R":
                # in order after every poke of txs a discard cut away: this bound replaces them
                self.pause, self.resumed, self.committed = 0, True, value
        return True


def _say(line: str):
    sys.stdout.write(line.replace("\n", " ") + "\n")
    sys.stdout.flush()


def work(path: str, name: str, durable: bool, pause: int, committed: int,
         map_size_bytes: int) -> int:
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
    commands = _Commands(committed, pause)
    indexed = read_indexed_tx_id(index_env)
    if not pause:
        # (started paused, during a rewind: its position is reported after the resume; one
        # read now could be stale by then and arrive after the node resumed)
        _say(f"indexed {indexed}")
    answered_pause = 0
    failures = 0
    try:
        while not commands.ended:
            if commands.pause and commands.pause != answered_pause:
                answered_pause = commands.pause
                _say(f"paused {answered_pause}")
            if commands.resumed and not commands.pause:   # (a pause right after: report later)
                commands.resumed, failures = False, 0
                indexed = read_indexed_tx_id(index_env)
                _say(f"indexed {indexed}")
            if commands.pause or indexed >= commands.committed:
                commands.hurry = False
                commands.read(None)
                continue
            if failures:
                # back off for the whole delay: pokes must not turn it into a retry storm
                deadline = time.monotonic() + min(0.01 * 2 ** failures, _RETRY_SECONDS_MAX)
                while not (commands.ended or commands.pause) and (
                        remaining := deadline - time.monotonic()) > 0:
                    commands.read(remaining)
            elif not commands.hurry and commands.committed - indexed < INDEX_GATHER_TXS_MAX:
                # let commits gather so one step indexes them all; a waiting read ends it
                deadline = time.monotonic() + INDEX_GATHER_SECONDS
                while not (commands.hurry or commands.ended or commands.pause) and (
                        remaining := deadline - time.monotonic()) > 0:
                    commands.read(remaining)
            commands.read(0)                       # take the commands that arrived meanwhile
            if commands.ended or commands.pause or commands.resumed:
                continue
            commands.hurry = False
            try:
                indexed = index_step(index_env, log_env, indexed + 1, commands.committed)
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


def main():
    """The worker process's entry (see _WORKER_BOOTSTRAP): ``<path> <name> <durable> <pause>
    <committed> <map size>``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                                                   "%(message)s")
    # a crash in native code (LMDB, the Cython core) leaves its Python stack on stderr, which
    # the node logs and keeps for the database's error state
    faulthandler.enable()
    try:
        sys.exit(work(sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]),
                      int(sys.argv[5]), int(sys.argv[6])))
    except BrokenPipeError:          # the node is gone
        sys.exit(0)


if __name__ == "__main__":
    main()
