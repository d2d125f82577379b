"""Real node processes for integration tests: ``python -m immucore`` on a free loopback port.

    with running_node(tmp_path) as node:          # node.host, node.port, node.dir
        ...
        node.restart()                            # SIGTERM, wait, start again on the same port
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Iterator, Optional

HOST = "127.0.0.1"
START_SECONDS_MAX = 60.0        # a bound, not a wait: a loaded disk can stall a first fsync
STOP_SECONDS_MAX = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class NodeProcess:
    """One node: its data folder, port and process; the log is kept in ``<dir>/../node.log``."""

    def __init__(self, base_dir, extra_args=(), *, console_script: bool = False,
                 cwd: Optional[str] = None):
        self.base_dir = str(base_dir)
        os.makedirs(self.base_dir, exist_ok=True)
        self.dir = os.path.join(self.base_dir, "data")
        self.log_path = os.path.join(self.base_dir, "node.log")
        self.host, self.port = HOST, free_port()
        self.extra_args = list(extra_args)
        # started as a user does (the installed `immucore` script) instead of `python -m`,
        # from ``cwd`` (default: this process's)
        self.console_script, self.cwd = console_script, cwd
        self.process: Optional[subprocess.Popen] = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self):
        program = ([os.path.join(os.path.dirname(sys.executable), "immucore")]
                   if self.console_script else [sys.executable, "-m", "immucore"])
        command = [*program, "--dir", self.dir, "--address", self.host, "--port", str(self.port),
                   "--metrics-server=false", *self.extra_args]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            cwd=self.cwd)
        deadline = time.monotonic() + START_SECONDS_MAX
        while not port_accepts(self.host, self.port):
            if self.process.poll() is not None:
                raise RuntimeError(f"node exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"node did not listen within {START_SECONDS_MAX}s:\n"
                                   f"{self.log()}")
            time.sleep(0.05)

    def stop(self) -> Optional[int]:
        """SIGTERM, then wait (SIGKILL only if it does not stop in time); the exit code."""
        if self.process is None:
            return None
        process, self.process = self.process, None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_SECONDS_MAX)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def restart(self):
        self.stop()
        self.start()

    def kill(self):
        """SIGKILL: no shutdown at all, as a crash."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def log(self) -> str:
        with contextlib.suppress(OSError), open(self.log_path, errors="replace") as f:
            return f.read()
        return ""


@contextlib.contextmanager
def running_node(tmp_path, *extra_args, **options) -> Iterator[NodeProcess]:
    """A node in ``tmp_path`` (its data in ``tmp_path/data``), stopped with SIGTERM at the end;
    ``options``: NodeProcess's (console_script, cwd)."""
    node = NodeProcess(tmp_path, extra_args, **options)
    node.start()
    try:
        yield node
    finally:
        node.stop()


def _stat(pid) -> list:
    """The fields of /proc/<pid>/stat after the command name: state, parent pid, ...; utime and
    stime (clock ticks) are fields 11 and 12 of this list."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU of process ``pid``, all its threads (Linux /proc)."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list:
    """The live (or zombie) child processes of ``pid`` (a node's index workers)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(_stat(entry)[1]) == pid:
                    children.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue                  # a process that ended meanwhile
    return children


def index_worker_pid(node, database: str) -> int:
    """The pid of the index worker process of ``database`` on a node of this module (its
    command line names the module and the database's folder)."""
    folder = os.path.abspath(os.path.join(node.dir, database)).encode()
    for pid in child_pids(node.process.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue                      # ended meanwhile
        if any(b"immucore.store.index_worker" in arg for arg in argv) and folder in argv:
            return pid
    raise AssertionError(f"no index worker of {database}")
