"""One process per folder: an exclusive ``flock`` on ``<folder>/immucore.lock``, held for as long
as the folder is open.

LMDB itself lets several processes open one environment (the index workers rely on it), so
nothing else stops a second node, or a script's ``open_database``, from opening a folder a node
serves: it would run a writer and an index of its own on the same files, see a stale state and
fail its writes. The node locks its data folder and every ``Database`` locks its own folder;
the index workers open the environments directly (``store/index_worker.py``), not through
``Database``, and take no lock: they are the holder's helpers.

``flock`` locks belong to an open file description: the kernel drops it when the holder exits,
killed or not (no stale lock to clean up), and a second open in the same process conflicts too.
The descriptor is close-on-exec, so subprocesses (the index workers) never inherit it. The file
holds the holder's pid, for the message of the process refused; it is never removed (removing a
lock file races with a process about to lock it).
"""
from __future__ import annotations

import fcntl
import os
import time
from typing import Callable, Optional

from ..constants import FOLDER_LOCK_POLL_SECONDS
from ..errors import FolderInUseError

LOCK_FILE_NAME = "immucore.lock"
_PID_BYTES_MAX = 32             # "<pid>\n": a pid has at most 7 digits on Linux


class FolderLock:
    """The exclusive lock of one folder (``what`` names it in messages: "data folder")."""

    def __init__(self, folder: str, what: str):
        self.folder = os.path.abspath(folder)
        self.what = what
        self.path = os.path.join(self.folder, LOCK_FILE_NAME)
        self._fd: Optional[int] = None

    def acquire(self, wait_seconds: float = 0.0,
                on_wait: Optional[Callable[[str], None]] = None) -> "FolderLock":
        """Lock, waiting up to ``wait_seconds`` for a holder to end; else ``FolderInUseError``
        naming the folder and the holder's pid. ``on_wait(text)`` is told once, when it waits."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            deadline = time.monotonic() + wait_seconds
            told = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    holder = _holder(fd)
                    if time.monotonic() >= deadline:
                        raise FolderInUseError(self._refusal(holder, wait_seconds)) from None
                    if on_wait is not None and not told:
                        told = True
                        on_wait(f"{self.what} {self.folder} is in use by {_who(holder)}: "
                                f"waiting up to {wait_seconds:g} s for it to end")
                    time.sleep(FOLDER_LOCK_POLL_SECONDS)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Unlock (closing the descriptor drops the lock); the pid stays until the next holder."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _refusal(self, holder: Optional[int], waited: float) -> str:
        text = f"{self.what} {self.folder} is in use by {_who(holder)}"
        if waited > 0:
            text += f" (waited {waited:g} s for it to end)"
        if holder == os.getpid():
            return text + ": close the other opening of it first"
        return (text + ": one folder is never shared by two processes; stop that one first, "
                       "or use another folder")


def _holder(fd: int) -> Optional[int]:
    """The pid the holder wrote (None while it is between locking and writing it)."""
    try:
        return int(os.pread(fd, _PID_BYTES_MAX, 0).decode().strip())
    except (OSError, ValueError):
        return None


def _who(pid: Optional[int]) -> str:
    if pid is None:
        return "another process (pid unknown)"
    if pid == os.getpid():
        return f"this process (pid {pid})"
    return f"another process (pid {pid})"
