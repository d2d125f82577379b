"""Opening LMDB environments with every option explicit, and growing their map safely.

LMDB may only be remapped (``set_mapsize``) while no transaction of this process is open, so every
transaction goes through ``LmdbEnv.read()`` / ``LmdbEnv.write()``, which take a shared/exclusive
guard. The guard costs two uncontended lock operations per transaction.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import threading

import lmdb

from ..constants import MAP_SIZE_BYTES_INITIAL, MAP_SIZE_BYTES_MAX, STORAGE_FREE_BYTES_LOW
from ..errors import DatabaseClosedError, ImmucoreError


# The named databases of a database's two environments (``<db>/log`` and ``<db>/index``).
LOG_DBS = {"tx": {}, "aht": {}, "meta": {}}
INDEX_DBS = {"keys": {"dupsort": True}, "meta": {}}


class StorageFullError(ImmucoreError):
    """The LMDB map cannot grow any further (MAP_SIZE_BYTES_MAX) or the disk is full."""


class LmdbEnv:
    """One LMDB environment (a folder holding data.mdb and lock.mdb) and its named databases."""

    def __init__(self, path: str, db_specs: dict, *, durable: bool, map_size_bytes: int = 0,
                 metasync: bool = True):
        """``durable``: fsync every commit. ``metasync=False`` also skips the second fsync (of
        the meta page): a crash may then undo the last commit, but never corrupts — only for
        derived data that can be recomputed (the key index)."""
        os.makedirs(path, exist_ok=True)
        map_size = max(map_size_bytes or MAP_SIZE_BYTES_INITIAL, _existing_size(path))
        self.path = path
        self.env = lmdb.open(
            path,
            map_size=map_size,
            subdir=True,
            readonly=False,
            metasync=durable and metasync,   # durable: a commit is on disk before it is acked
            sync=durable,
            map_async=False,
            mode=0o600,
            create=True,
            readahead=False,           # random reads of records; readahead only evicts cache
            writemap=False,            # a stray native write must not corrupt the map
            meminit=False,
            max_readers=510,
            max_dbs=len(db_specs),
            max_spare_txns=64,
            lock=True,
        )
        # a process that died inside a read transaction (a killed index worker, a killed node)
        # left its reader slot: LMDB would never reuse the pages freed after its snapshot
        self.env.reader_check()
        self.dbs = {name: self.env.open_db(name.encode(), **spec) for name, spec in db_specs.items()}
        self._lock = threading.Lock()
        self._guard = threading.Condition(self._lock)
        self._readers = 0
        self._resizing = False
        self._closed = False

    def read(self, buffers: bool = False, version=None):
        """A read-only LMDB transaction (``buffers=True`` returns memoryviews valid inside it).
        A class, not a generator context manager: a get opens two of these, and the generator
        machinery cost more than the LMDB lookups themselves.

        Inside a ``ReadBurst`` on this thread, a read that passes ``version`` (what the caller
        needs the snapshot to include, taken *before* this call: a commit makes it differ)
        shares the burst's transaction, renewed when ``version`` changed."""
        if version is not None:
            held = getattr(_burst, "txns", None)
            if held is not None:
                return self._burst_read(held, buffers, version)
        return _Read(self, buffers)

    def _burst_read(self, held: dict, buffers: bool, version) -> "_Held":
        entry = held.get(self)
        if entry is not None:
            txn, held_version, held_buffers = entry
            if held_buffers != buffers:
                raise RuntimeError("one burst reads an environment with one buffers mode")
            if held_version == version:
                return _Held(txn)
            txn.abort()                  # a commit since: renew the snapshot, keep the guard
        else:
            self._enter()
        try:
            txn = self.env.begin(write=False, buffers=buffers)
        except lmdb.MapResizedError:
            # another process grew the map: adopting it waits for every reader, so it is done
            # outside the burst, where the request is served again
            held.pop(self, None)
            self._leave()
            raise BurstWouldBlock() from None
        except BaseException:
            held.pop(self, None)
            self._leave()
            raise
        held[self] = (txn, version, buffers)
        return _Held(txn)

    def write(self, body):
        """Run ``body(txn)`` in one write transaction and commit, growing the map when it is full.

        ``body`` may run more than once (after a MapFullError it is retried on a bigger map), so it
        must only write, never keep state of its own.
        """
        while True:
            self._enter()
            try:
                with self.env.begin(write=True) as txn:
                    result = body(txn)
                return result
            except lmdb.MapFullError:
                grown_here = True
            except lmdb.MapResizedError:
                grown_here = False
            except lmdb.Error as exc:
                raise self._explained(exc) from exc
            finally:
                self._leave()
            if grown_here:
                self._grow()
            else:
                self.adopt_grown_map()

    def _explained(self, exc: lmdb.Error) -> Exception:
        """LMDB reports a write cut short by a full file system as EIO ("Input/output error"),
        which reads as a broken disk: say it is full when the file system has no room left."""
        message = str(exc)
        if "No space left" in message or "Input/output error" in message:
            try:
                free = shutil.disk_usage(self.path).free
            except OSError:
                return exc
            if free < STORAGE_FREE_BYTES_LOW:
                return StorageFullError(
                    f"storage full: no space left on the device of {self.path} ({free} bytes "
                    f"free); nothing of this write was committed ({message})")
        return exc

    def _enter(self):
        with self._lock:                 # the guard's own lock: Condition.__enter__ is Python
            if not self._resizing and not self._closed:
                self._readers += 1
                return
        with self._guard:
            held = getattr(_burst, "txns", None)
            if self._resizing and held:
                if self not in held:
                    # Waiting while this burst holds other guards could close a cycle (a
                    # resize there waits for this burst); the caller reads without the burst.
                    raise BurstWouldBlock()
                # this burst already holds this guard: the resize waits for it, so go on
            while self._resizing and not (held and self in held):
                self._guard.wait()
            if self._closed:
                raise DatabaseClosedError()
            self._readers += 1

    def _leave(self):
        with self._lock:
            self._readers -= 1
            if self._readers == 0 and self._resizing:     # only a waiting resize needs waking
                self._guard.notify_all()

    def _grow(self):
        with self._alone():
            current = self.env.info()["map_size"]
            if current >= MAP_SIZE_BYTES_MAX:
                raise StorageFullError(
                    f"storage full: LMDB map of {self.path} reached {current} bytes "
                    f"(MAP_SIZE_BYTES_MAX)")
            self.env.set_mapsize(min(current * 2, MAP_SIZE_BYTES_MAX))

    @contextlib.contextmanager
    def _alone(self):
        """No transaction of this process open meanwhile (what ``set_mapsize`` needs): new
        ones wait, and this waits for the open ones to end."""
        with self._guard:
            while self._resizing:
                self._guard.wait()
            self._resizing = True
            try:
                while self._readers:
                    self._guard.wait()
                yield
            finally:
                self._resizing = False
                self._guard.notify_all()

    def adopt_grown_map(self):
        """Another process that shares this environment (the index worker, or the node for the
        worker) grew the map: LMDB then refuses new transactions here (MapResizedError) until
        this process takes the new size, which it may only do with none of its own open."""
        with self._alone():
            self.env.set_mapsize(0)

    def sync(self):
        self.env.sync(True)

    def close(self):
        """Close once every transaction under way has ended; later ones get DatabaseClosedError
        (closing under a reader would pull its memory away)."""
        with self._guard:
            while self._resizing:
                self._guard.wait()
            if self._closed:
                return
            self._resizing = True           # holds new transactions back while we wait
            try:
                while self._readers:
                    self._guard.wait()
                self._closed = True
                self.env.close()
            finally:
                self._resizing = False
                self._guard.notify_all()


def _existing_size(path: str) -> int:
    try:
        return os.path.getsize(os.path.join(path, "data.mdb"))
    except OSError:
        return 0


class _Read:
    """``LmdbEnv.read()``: the map guard held for the life of one read transaction."""
    __slots__ = ("_env", "_buffers", "_txn")

    def __init__(self, env: LmdbEnv, buffers: bool):
        self._env, self._buffers = env, buffers

    def __enter__(self):
        env = self._env
        while True:
            env._enter()
            try:
                self._txn = env.env.begin(write=False, buffers=self._buffers)
                return self._txn
            except lmdb.MapResizedError:
                env._leave()
                if holding_burst():
                    # adopting waits for every reader, this burst's guards among them: the
                    # request is served again outside the burst
                    raise BurstWouldBlock() from None
                env.adopt_grown_map()
            except BaseException:
                env._leave()
                raise

    def __exit__(self, *exc_info):
        try:
            self._txn.abort()        # a read transaction has nothing to commit
        finally:
            self._env._leave()


class BurstWouldBlock(Exception):
    """Raised instead of waiting (for a map resize, or for the index) on a thread whose
    ReadBurst holds guards: the request is served again outside the burst, where waiting is
    safe. Never seen by clients."""


def holding_burst() -> bool:
    """Whether this thread's ReadBurst holds any guard (then it must not block)."""
    return bool(getattr(_burst, "txns", None))


class _Held:
    """A burst's shared transaction: the burst, not this read, ends it."""
    __slots__ = ("_txn",)

    def __init__(self, txn):
        self._txn = txn

    def __enter__(self):
        return self._txn

    def __exit__(self, *exc_info):
        return None


_burst = threading.local()        # .txns: {LmdbEnv: (txn, version, buffers)} inside a ReadBurst


class ReadBurst:
    """The reads of one burst of requests on this thread (one ``data_received``'s pipelined
    gets) share one read transaction per environment instead of opening two each: opening
    and closing them was a fifth of a get. Each shared transaction is renewed when its
    reader's ``version`` changed (a commit), so a read still sees everything committed before
    it started; the guards are held only until the burst ends."""
    __slots__ = ("_outer",)

    def __enter__(self):
        self._outer = getattr(_burst, "txns", None)
        _burst.txns = {}
        return self

    def __exit__(self, *exc_info):
        held, _burst.txns = _burst.txns, self._outer
        for env, (txn, _, _) in held.items():
            try:
                txn.abort()
            except lmdb.Error:
                pass                     # the guard below must be left whatever happened
            finally:
                env._leave()
