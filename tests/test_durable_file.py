"""Power loss on immucore's own small files (docs/reliability.md R3a):
``durable_file.replace_durably`` against a model file system in which a crash drops or keeps each
operation not yet made durable by an fsync, in any combination (a torn file, a rename without its
data, a lost rename).

Whatever the crash point and whatever survives, the file holds its old content or the new one,
whole, and once the call returned, the new one. The same steps without the fsyncs do lose data in
this model: that is what shows the model can catch the bug it is for. The users of
``replace_durably`` (the client's trusted states, the CLI's token, the node's id) are checked to
go through it, and an unreadable state file to be refused rather than silently reset.
"""
from __future__ import annotations

import itertools
import os
import random

import pytest

from immucore import client as client_module, durable_file
from immucore.errors import ImmucoreError
from immucore.types import State


class Crash(Exception):
    """The power went out during this operation: it did not happen."""


class CrashFS:
    """Files and one level of directories in memory. Writes change a file's content at once
    but become durable only with an fsync of that file; creating, renaming and unlinking change
    the directory at once but become durable only with an fsync of the directory. ``crash()``
    gives what a reboot finds: the durable state plus any subset of the unsynced operations (for
    a file, any subset of its unsynced writes; for the directory, any subset of its pending
    changes, applied in order)."""

    O_RDONLY, O_WRONLY, O_CREAT, O_EXCL, O_TRUNC = os.O_RDONLY, os.O_WRONLY, os.O_CREAT, \
        os.O_EXCL, os.O_TRUNC
    path = os.path

    def __init__(self, crash_at: int = -1):
        self.data = {}            # inode -> current content
        self.durable_data = {}    # inode -> content an fsync made durable
        self.unsynced = {}        # inode -> [(offset, bytes)] written since its last fsync
        self.entries = {}         # path -> inode
        self.durable_entries = {}
        self.pending = []         # directory changes since its last fsync: (path, inode | None)
        self.fds = {}
        self._inodes = itertools.count(1)
        self._fds = itertools.count(3)
        self.operations = 0
        self.crash_at = crash_at

    def _step(self):
        """Every operation counts; the ``crash_at``-th one is cut off by the power loss."""
        if self.operations == self.crash_at:
            raise Crash()
        self.operations += 1

    def _change_entry(self, path, inode):
        if inode is None:
            del self.entries[path]
        else:
            self.entries[path] = inode
        self.pending.append((path, inode))

    # --- the os functions durable_file uses --------------------------------------------------

    def open(self, path, flags, mode=0o777):
        self._step()
        if path in self.dirs():
            fd = next(self._fds)
            self.fds[fd] = ("dir", path)
            return fd
        if path in self.entries:
            if flags & self.O_CREAT and flags & self.O_EXCL:
                raise FileExistsError(path)
            inode = self.entries[path]
        elif flags & self.O_CREAT:
            inode = next(self._inodes)
            self.data[inode], self.durable_data[inode], self.unsynced[inode] = b"", b"", []
            self._change_entry(path, inode)
        else:
            raise FileNotFoundError(path)
        fd = next(self._fds)
        self.fds[fd] = ("file", inode)
        return fd

    def write(self, fd, data):
        self._step()
        inode = self.fds[fd][1]
        piece = bytes(data[:max(1, len(data) // 2)])      # short writes happen
        offset = len(self.data[inode])
        self.data[inode] += piece
        self.unsynced[inode].append((offset, piece))
        return len(piece)

    def fsync(self, fd):
        self._step()
        kind, target = self.fds[fd]
        if kind == "dir":
            self.durable_entries = dict(self.entries)
            self.pending = []
        else:
            self.durable_data[target] = self.data[target]
            self.unsynced[target] = []

    def close(self, fd):
        self._step()
        del self.fds[fd]

    def replace(self, src, dst):
        self._step()
        inode = self.entries[src]
        self._change_entry(src, None)
        self._change_entry(dst, inode)

    def unlink(self, path):
        self._step()
        if path not in self.entries:
            raise FileNotFoundError(path)
        self._change_entry(path, None)

    # --- set up and inspect ------------------------------------------------------------------

    def dirs(self):
        return {os.path.dirname(p) for p in self.entries} | {"/d"}

    def durable_file(self, path, content: bytes):
        inode = next(self._inodes)
        self.data[inode] = self.durable_data[inode] = content
        self.unsynced[inode] = []
        self.entries[path] = self.durable_entries[path] = inode

    def crash(self, rng: random.Random, path: str):
        """``path``'s content after a reboot (None: no such file), one random outcome."""
        entries = dict(self.durable_entries)
        for name, inode in self.pending:
            if rng.random() < 0.5:
                continue
            if inode is None:
                entries.pop(name, None)
            else:
                entries[name] = inode
        inode = entries.get(path)
        if inode is None:
            return None
        content = bytearray(self.durable_data[inode])
        for offset, piece in self.unsynced[inode]:
            if rng.random() < 0.5:              # this write reached the disk
                if len(content) < offset:       # after one that did not: a hole of zeros
                    content.extend(b"\0" * (offset - len(content)))
                content[offset:offset + len(piece)] = piece
        return bytes(content)


def _naive_replace(path: str, data: bytes, mode: int = 0o600) -> None:
    """What the three writers did before: write a temporary file and rename it, no fsync."""
    os = durable_file.os
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.close(fd)
    os.replace(path + ".tmp", path)


PATH, OLD, NEW = "/d/state.json", b'{"old": "state"}', b'{"new": "state, longer"}'


def _outcomes(monkeypatch, write, old, outcomes_per_crash=40):
    """``(crash point, finished, content after the reboot)`` for every crash point of one call
    of ``write(PATH, NEW)`` and many random reboots each."""
    results = []
    for crash_at in itertools.count():
        fs = CrashFS(crash_at)
        if old is not None:
            fs.durable_file(PATH, old)
        monkeypatch.setattr(durable_file, "os", fs)
        try:
            write(PATH, NEW)
            finished = True
        except Crash:
            finished = False
        rng = random.Random(crash_at)
        results += [(crash_at, finished, fs.crash(rng, PATH)) for _ in range(outcomes_per_crash)]
        if finished:
            return results


@pytest.mark.parametrize("old", [OLD, None], ids=["replacing", "first write"])
def test_after_a_crash_the_file_is_old_or_new_and_new_once_written(monkeypatch, old):
    results = _outcomes(monkeypatch, durable_file.replace_durably, old)
    assert len({crash_at for crash_at, _, _ in results}) > 8       # every step was cut once
    for crash_at, finished, content in results:
        if finished:
            assert content == NEW, "the call returned, so the new content must survive"
        else:
            assert content in (old, NEW), (crash_at, content)


@pytest.mark.parametrize("old", [OLD, None], ids=["replacing", "first write"])
def test_without_the_fsyncs_the_same_steps_lose_data(monkeypatch, old):
    results = _outcomes(monkeypatch, _naive_replace, old)
    lost = [(crash_at, content) for crash_at, finished, content in results
            if content not in (old, NEW) or (finished and content != NEW)]
    assert lost, "the model file system must be able to show the bug the fsyncs prevent"


def test_a_leftover_temporary_file_does_not_stop_the_next_write(monkeypatch):
    fs = CrashFS()
    fs.durable_file(PATH + ".tmp", b"half written before a crash")
    monkeypatch.setattr(durable_file, "os", fs)
    durable_file.replace_durably(PATH, NEW)
    assert fs.data[fs.entries[PATH]] == NEW and PATH + ".tmp" not in fs.entries


def test_the_writers_of_small_files_replace_them_durably(tmp_path, monkeypatch):
    """The client's trusted states, the CLI's token and the node's id all go through
    replace_durably (so the crash model above covers them)."""
    from immucore.cli import common
    from immucore.server import node
    written = []
    real = durable_file.replace_durably

    def recording(path, data, mode=0o600):
        written.append(os.path.basename(path))
        real(path, data, mode)

    for module in (client_module, common, node):
        monkeypatch.setattr(module, "replace_durably", recording)
    client_module.StateStore(str(tmp_path / "states.json")).put(
        "node:3322", State("defaultdb", 3, b"\x01" * 32))
    node._node_id(str(tmp_path))
    session = common.Session.__new__(common.Session)
    session.path = str(tmp_path / "token")
    session.save("127.0.0.1", 3322, {"token": "t", "user": "immudb", "database": "defaultdb"})
    assert written == ["states.json", "node_id", "token"]
    assert oct(os.stat(tmp_path / "token").st_mode & 0o777) == "0o600"
    store = client_module.StateStore(str(tmp_path / "states.json"))
    assert store.get("node:3322", "defaultdb") == State("defaultdb", 3, b"\x01" * 32)


@pytest.mark.parametrize("content", [b"", b'{"node:3322/defaultdb": {"tx_id": 3, "tx_h',
                                     b"[]", b'{"x": {"tx_id": "3", "tx_hash": "00"}}',
                                     b'{"x": {"tx_id": 3, "tx_hash": "zz"}}'])
def test_an_unreadable_state_file_is_refused_not_reset(tmp_path, content):
    """Starting from an empty store would trust whatever state the node shows next."""
    path = tmp_path / "states.json"
    path.write_bytes(content)
    with pytest.raises(ImmucoreError, match="trusted state file .* is unreadable"):
        client_module.StateStore(str(path))
