"""Small files replaced whole and durably: a client's trusted states, the CLI's session token and
the node's id (everything else immucore keeps is in LMDB, which has its own fsync discipline).

``replace_durably(path, data)`` writes a temporary file beside ``path``, fsyncs it, renames it
over ``path`` and fsyncs the directory. After a power loss at any moment, ``path`` holds its old
content or the new one, whole:
  * without the file's fsync, a file system may make the rename durable before the data (ext4's
    delayed allocation did): a zero-length or torn file after the crash;
  * without the directory's fsync, the rename itself may be lost after the call returned: the old
    content comes back although the caller went on as if the new one were kept.
``tests/test_durable_file.py`` checks both against a model file system that drops or keeps each
unsynced operation at a crash, and that the same steps without the fsyncs do lose data there.

Only ``os`` functions are used, so that model can stand in for them.
"""
from __future__ import annotations

import os

TMP_SUFFIX = ".tmp"


def replace_durably(path: str, data: bytes, mode: int = 0o600) -> None:
    tmp = path + TMP_SUFFIX
    try:
        os.unlink(tmp)              # a leftover of a crash: O_EXCL below needs it gone, and
    except FileNotFoundError:       # O_CREAT's mode applies only to a new file
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_directory(os.path.dirname(os.path.abspath(path)))


def fsync_directory(path: str) -> None:
    """Make the directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
