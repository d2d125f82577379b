"""immuadmin hot-backup and hot-restore as a user runs them: the real CLI as subprocesses against
a real node process, immudb's flags and messages, and hostile backup files (truncated, reordered,
duplicated, forked, flipped bits, oversized lengths, wrong magic or version), each refused with
its own error and never applied past the last verified tx; a restore killed with SIGKILL midway
continued by --append. The reader alone is fuzzed with hypothesis."""
from __future__ import annotations

import io
import os
import signal
import struct
import subprocess
import sys
import time
from concurrent.futures import wait

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from immucore.backup import (HEAD_BYTES, BackupFileError, BackupReader, encode_record,
                             verify_records)
from immucore.client import Client
from immucore.constants import BACKUP_CONTENT_BYTES_MAX, BACKUP_RESTORE_BATCH_TXS
from immucore.database import open_database

from .nodes import running_node

ADMIN_PASSWORD = "immudb"
CLI_SECONDS_MAX = 60
TXS = 2 * BACKUP_RESTORE_BATCH_TXS + 500      # three restore batches, three export chunks
MIDDLE = BACKUP_RESTORE_BATCH_TXS + 500        # a tx inside the second batch


def _build_defaultdb(base_dir, txs: int):
    """The source database's log, written with the embedded API before its node starts."""
    db = open_database(os.path.join(base_dir, "data", "defaultdb"), name="defaultdb")
    try:
        wait([db.set_async({f"k{n}-{e}".encode(): os.urandom(16) for e in range(3)})
              for n in range(txs)])
    finally:
        db.close()


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    base = tmp_path_factory.mktemp("node")
    _build_defaultdb(base, TXS)
    with running_node(base) as running:
        yield running


class Admin:
    """A user's shell running immuadmin, logged in as immudb."""

    def __init__(self, node, home):
        self.node, self.home = node, home
        os.makedirs(home, exist_ok=True)
        assert self.ok("login", "immudb", stdin=ADMIN_PASSWORD.encode() + b"\n") == b"logged in\n"

    def argv(self, *args):
        return [sys.executable, "-m", "immucore.cli.immuadmin", "-p", str(self.node.port), *args]

    @property
    def env(self):
        return dict(os.environ, IMMUCORE_CLI_HOME=str(self.home))

    def run(self, *args, stdin: bytes = b""):
        done = subprocess.run(self.argv(*args), input=stdin, capture_output=True,
                              timeout=CLI_SECONDS_MAX, env=self.env)
        done.text_out, done.text_err = done.stdout.decode(errors="replace"), done.stderr.decode()
        return done

    def ok(self, *args, **kwargs) -> bytes:
        done = self.run(*args, **kwargs)
        assert done.returncode == 0, f"immuadmin {args}: {done.stderr.decode()}"
        return done.stdout

    def fails(self, *args, **kwargs) -> str:
        """The one error line of a failed command (exit code 1)."""
        done = self.run(*args, **kwargs)
        assert done.returncode == 1, (args, done.stdout, done.text_err)
        lines = done.text_err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("immuadmin: "), done.text_err
        return lines[0][len("immuadmin: "):]


@pytest.fixture
def admin(node, tmp_path):
    return Admin(node, tmp_path / "home")


@pytest.fixture(scope="module")
def backup(node, tmp_path_factory):
    """The source's whole backup file, and its records."""
    home = tmp_path_factory.mktemp("backup-home")
    path = home / "full.bak"
    Admin(node, home).ok("hot-backup", "defaultdb", "-o", str(path))
    data = path.read_bytes()
    return path, data, list(BackupReader(io.BytesIO(data)))


def client_of(node, database: str = "defaultdb") -> Client:
    client = Client(node.host, node.port)
    client.login("immudb", ADMIN_PASSWORD, database)
    return client


def state_of(node, database: str):
    with client_of(node, database) as client:
        return client.current_state()


def source_alh(node, tx_id: int) -> bytes:
    with client_of(node) as client:
        return client.export_batch(tx_id, 1)["last_alh"]


def assert_verified_prefix(node, database: str, below: int):
    """``database`` holds the source's first txs only, and none from ``below`` on."""
    state = state_of(node, database)
    assert state.tx_id < below
    if state.tx_id:
        assert state.tx_hash == source_alh(node, state.tx_id)


def file_of(records) -> bytes:
    return b"".join(encode_record(*record) for record in records)


_names = iter(range(10**6))


def new_name(prefix: str = "restored") -> str:
    return f"{prefix}{next(_names)}"


# --- backup and restore --------------------------------------------------------------------------

def test_backup_restores_into_a_new_database_equal_to_the_source(node, admin, backup, tmp_path):
    path, data, records = backup
    assert [r[0] for r in records] == list(range(1, TXS + 1))
    # every record's checksum is the source's Alh of its tx
    for tx_id in (1, BACKUP_RESTORE_BATCH_TXS, TXS):
        assert records[tx_id - 1][1] == source_alh(node, tx_id)
    assert admin.ok("hot-restore", "--verify-only", "-i", str(path)) == \
        f"Backup file contains transactions from 1 to {TXS}\n".encode()

    name = new_name()
    done = admin.run("hot-restore", name, "-i", str(path))
    assert (done.returncode, done.text_out) == (0, f"Restored transactions from 1 to {TXS}\n")
    assert state_of(node, name).tx_hash == state_of(node, "defaultdb").tx_hash
    with client_of(node, name) as client:           # promoted: a primary that takes writes
        assert client.database_settings(name)["settings"]["replica"] is False
        assert client.set({b"after-restore": b"v"}).id == TXS + 1
        assert client.get(b"k7-1").value == client_of(node).get(b"k7-1").value

    # stdout and stdin: the same bytes, the same result
    done = admin.run("hot-backup", "defaultdb")
    assert done.returncode == 0 and done.stdout == data
    assert done.text_err == f"Backing up transactions from 1 to {TXS}\nDone\n"
    name = new_name()
    assert admin.ok("hot-restore", name, stdin=data) == \
        f"Restored transactions from 1 to {TXS}\n".encode()
    assert state_of(node, name).tx_hash == state_of(node, "defaultdb").tx_hash


def test_backup_flags_and_append_as_in_immudb(node, admin, backup, tmp_path):
    _, data, records = backup
    part = tmp_path / "part.bak"
    part.write_bytes(file_of(records[:100]))
    assert admin.fails("hot-backup", "defaultdb", "-o", str(part)) == \
        "file already exists, use --append option to append new data to file"
    assert admin.fails("hot-backup", "defaultdb", "--append") == \
        "--append option can be used only when outputting to the file"
    assert admin.fails("hot-backup", "defaultdb", "-o", str(part), "--append",
                       "--start-tx", "5") == "don't use --append and --start-tx options together"

    done = admin.run("hot-backup", "defaultdb", "-o", str(part), "--append")
    assert (done.returncode, done.text_err) == (
        0, f"Backing up transactions from 101 to {TXS}\nDone\n")
    assert part.read_bytes() == data
    done = admin.run("hot-backup", "defaultdb", "-o", str(part), "--append")
    assert (done.returncode, done.text_err) == (0, "All backed up, nothing to do\n")

    # a file cut inside its last record (a backup killed midway): refused, naming where
    cut = tmp_path / "cut.bak"
    cut.write_bytes(file_of(records[:100]) + encode_record(*records[100])[:50])
    at = _record_offset(records, 100)
    assert admin.fails("hot-backup", "defaultdb", "-o", str(cut), "--append") == \
        f"truncated backup file {cut}: the record at byte {at} ends after 50 of its " \
        f"{len(encode_record(*records[100]))} bytes"

    done = admin.run("hot-backup", "defaultdb", "--start-tx", str(TXS))
    assert done.text_err == f"Backing up transaction {TXS}\nDone\n"
    assert done.stdout == file_of(records[-1:])

    # a file of another database's history: refused, the file left as it was
    other = new_name("other")
    with client_of(node) as client:
        client.create_database(other)
    with client_of(node, other) as client:
        for n in range(3):
            client.set({f"x{n}".encode(): b"other"})
    foreign = tmp_path / "foreign.bak"
    foreign.write_bytes(file_of(records[:2]))
    assert admin.fails("hot-backup", other, "-o", str(foreign), "--append") == \
        "checksums for transaction 2 in backup file and database differ - probably file " \
        "was created from different database"
    assert foreign.read_bytes() == file_of(records[:2])


def test_restore_appends_only_what_continues_the_database(node, admin, backup, tmp_path):
    path, _, records = backup
    name = new_name()
    head = tmp_path / "head.bak"
    head.write_bytes(file_of(records[:700]))
    assert admin.ok("hot-restore", name, "-i", str(head)) == \
        b"Restored transactions from 1 to 700\n"
    # promoted after the first restore: appending needs it to be a replica again
    assert admin.fails("hot-restore", name, "-i", str(path)) == \
        "cannot restore to non-empty database without --append flag"
    assert admin.fails("hot-restore", name, "-i", str(path), "--append") == \
        "database is NOT a replica"
    assert admin.ok("hot-restore", name, "-i", str(path), "--append", "--force-replica") == \
        f"Restored transactions from 701 to {TXS}\n".encode()
    assert state_of(node, name).tx_hash == state_of(node, "defaultdb").tx_hash
    assert admin.ok("hot-restore", name, "-i", str(path), "--append", "--force-replica") == \
        b"Target database is up-to-date, nothing restored\n"

    # a file starting after the database's last tx: a gap, or one tx that cannot be checked
    name = new_name()
    admin.ok("hot-restore", name, "-i", str(head))
    gap = tmp_path / "gap.bak"
    gap.write_bytes(file_of(records[710:800]))
    assert admin.fails("hot-restore", name, "-i", str(gap), "--append", "--force-replica") == \
        "there is a gap of 10 transaction(s) between database and file - restore not possible"
    adjacent = tmp_path / "adjacent.bak"
    adjacent.write_bytes(file_of(records[700:800]))
    assert admin.fails("hot-restore", name, "-i", str(adjacent), "--append",
                       "--force-replica") == \
        "not possible to validate last transaction in DB - use --force to override"
    assert state_of(node, name).tx_id == 700
    assert admin.ok("hot-restore", name, "-i", str(adjacent), "--append", "--force-replica",
                    "--force") == b"Restored transactions from 701 to 800\n"
    assert state_of(node, name).tx_hash == source_alh(node, 800)

    # a database whose history differs: the checksum of its last tx in the file does not match
    other = new_name("other")
    with client_of(node) as client:
        client.create_database(other)
    with client_of(node, other) as client:
        for n in range(3):
            client.set({f"y{n}".encode(): b"other"})
    assert admin.fails("hot-restore", other, "-i", str(path), "--append",
                       "--force-replica") == \
        "checksums for tx 3 in backup file and database differ - cannot append data to the " \
        "database"
    assert state_of(node, other).tx_id == 3


# --- hostile files -------------------------------------------------------------------------------

def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def _record_offset(records, index: int) -> int:
    return sum(len(encode_record(*r)) for r in records[:index])


def _restore_refused(admin, node, data: bytes, tmp_path, below: int) -> str:
    """Restore ``data`` into a new database: it fails with one error line, and the database
    holds a verified prefix of the source with no tx from ``below`` on."""
    path = tmp_path / f"hostile{next(_names)}.bak"
    path.write_bytes(data)
    name = new_name("hostile")
    error = admin.fails("hot-restore", name, "-i", str(path))
    assert_verified_prefix(node, name, below)
    return error


def test_hostile_files_are_refused_and_nothing_unverified_is_applied(node, admin, backup,
                                                                     tmp_path):
    _, data, records = backup
    at = _record_offset(records, MIDDLE - 1)        # the record of tx MIDDLE
    size = len(encode_record(*records[MIDDLE - 1]))

    cut = data[:at + size // 2]
    assert _restore_refused(admin, node, cut, tmp_path, MIDDLE).startswith(
        f"truncated backup file {tmp_path}")
    swapped = records[:MIDDLE - 1] + [records[MIDDLE], records[MIDDLE - 1]] + records[MIDDLE + 1:]
    assert f"incorrect transaction order in file: tx {MIDDLE + 1} follows tx {MIDDLE - 1}" in \
        _restore_refused(admin, node, file_of(swapped), tmp_path, MIDDLE)
    doubled = records[:MIDDLE] + records[MIDDLE - 1:]
    assert f"incorrect transaction order in file: tx {MIDDLE} follows tx {MIDDLE}" in \
        _restore_refused(admin, node, file_of(doubled), tmp_path, MIDDLE + 1)

    bad_magic = data[:at] + b"IMMUBACKUQ" + data[at + 10:]
    assert "does not start with 'IMMUBACKUP'" in \
        _restore_refused(admin, node, bad_magic, tmp_path, MIDDLE)
    bad_version = data[:at + 10] + struct.pack(">I", 2) + data[at + 14:]
    assert "format version 2, this immuadmin reads version 1" in \
        _restore_refused(admin, node, bad_version, tmp_path, MIDDLE)
    huge = data[:at + 26] + struct.pack(">I", 0xFFFFFFFF) + data[at + 30:]
    assert f"content of 4294967295 bytes exceeds the limit of {BACKUP_CONTENT_BYTES_MAX}" in \
        _restore_refused(admin, node, huge, tmp_path, MIDDLE)
    long_checksum = data[:at + 22] + struct.pack(">I", 1 << 30) + data[at + 26:]
    assert "checksum is 1073741824 bytes, an Alh is 32" in \
        _restore_refused(admin, node, long_checksum, tmp_path, MIDDLE)


@pytest.mark.parametrize("where", [
    "tx id", "checksum", "blob length", "blob header length", "blob tx id", "blob prevAlh",
    "blob timestamp", "blob Eh", "blob blRoot", "blob last byte", "last checksum of a batch",
    "last checksum of the file", "last byte of the file"])
def test_a_flipped_bit_anywhere_in_a_record_is_refused(node, admin, backup, tmp_path, where):
    _, data, records = backup
    index = {"last checksum of a batch": BACKUP_RESTORE_BATCH_TXS - 1,
             "last checksum of the file": TXS - 1, "last byte of the file": TXS - 1}.get(
        where, MIDDLE - 1)
    at = _record_offset(records, index)
    blob = at + HEAD_BYTES + 32 + 8
    offset = {"tx id": at + 21, "checksum": at + HEAD_BYTES + 5, "blob length": at + 69,
              "blob header length": blob + 3, "blob tx id": blob + 11, "blob prevAlh": blob + 20,
              "blob timestamp": blob + 4 + 47, "blob Eh": blob + 4 + 60,
              "blob blRoot": blob + 4 + 100,
              "blob last byte": at + len(encode_record(*records[index])) - 1,
              "last checksum of a batch": at + HEAD_BYTES + 31,
              "last checksum of the file": at + HEAD_BYTES,
              "last byte of the file": len(data) - 1}[where]
    error = _restore_refused(admin, node, _flip(data, offset), tmp_path, index + 1)
    assert error and "Traceback" not in error


def test_a_valid_fork_of_an_earlier_tx_is_refused(node, admin, backup, tmp_path):
    """A tx that is itself valid (right prevAlh, its own Alh as checksum) but not the source's:
    refused inside the file by the next tx's prevAlh, and at its end by the database's Alh."""
    _, data, records = backup
    fork_db = new_name("fork")
    head = tmp_path / "head.bak"
    head.write_bytes(file_of(records[:5]))
    admin.ok("hot-restore", fork_db, "-i", str(head))
    with client_of(node, fork_db) as client:
        client.set({b"forked": b"history"})        # tx 6, a different one
    forked = tmp_path / "forked.bak"
    admin.ok("hot-backup", fork_db, "-o", str(forked))
    fork_record = list(BackupReader(io.BytesIO(forked.read_bytes())))[5]
    assert fork_record[0] == 6 and fork_record[1] != records[5][1]

    spliced = records[:5] + [fork_record] + records[6:]
    assert "tx 7's prevAlh is not the checksum of tx 6 in the file" in \
        _restore_refused(admin, node, file_of(spliced), tmp_path, 6)
    # the fork as the file's last tx, appended to a database that holds the source's tx 6
    name = new_name()
    six = tmp_path / "six.bak"
    six.write_bytes(file_of(records[:6]))
    admin.ok("hot-restore", name, "-i", str(six))
    fork_file = tmp_path / "fork-last.bak"
    fork_file.write_bytes(file_of(records[:5] + [fork_record]))
    assert admin.fails("hot-restore", name, "-i", str(fork_file), "--append",
                       "--force-replica") == \
        "checksums for tx 6 in backup file and database differ - cannot append data to the " \
        "database"
    assert state_of(node, name).tx_hash == records[5][1]


def test_verify_only_checks_every_tx_offline(admin, backup, tmp_path):
    path, data, records = backup
    at = _record_offset(records, MIDDLE - 1)
    path2 = tmp_path / "altered.bak"
    entry_byte = at + len(encode_record(*records[MIDDLE - 1])) - 1
    path2.write_bytes(_flip(data, entry_byte))
    assert admin.fails("hot-restore", "--verify-only", "-i", str(path2)).startswith(
        f"tx {MIDDLE} in backup file {path2} is corrupted")
    assert admin.fails("hot-restore", "--verify-only", "-i", str(path), "somedb") == \
        "accepts 0 arg(s), received 1"
    assert admin.fails("hot-restore", "-i", str(path)) == "accepts 1 arg(s), received 0"
    empty = tmp_path / "empty.bak"
    empty.write_bytes(b"")
    assert admin.fails("hot-restore", "--verify-only", "-i", str(empty)) == \
        f"backup file {empty} holds no transaction"


# --- a restore killed midway ---------------------------------------------------------------------

def test_a_restore_killed_midway_leaves_a_verified_prefix_that_append_continues(
        node, admin, backup, tmp_path):
    path, data, _ = backup
    # the file through a pipe fed only half of it: the restore applies what it has and waits
    # for the rest, and is killed there
    name = new_name("killed")
    restore = subprocess.Popen(admin.argv("hot-restore", name), stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=admin.env)
    try:
        restore.stdin.write(data[:len(data) // 2])
        restore.stdin.flush()
        deadline = time.monotonic() + CLI_SECONDS_MAX
        while time.monotonic() < deadline:
            try:
                if state_of(node, name).tx_id > 0:
                    break
            except Exception:                       # noqa: BLE001 - not created yet
                pass
            time.sleep(0.05)
        restore.send_signal(signal.SIGKILL)
        restore.wait(CLI_SECONDS_MAX)
    finally:
        if restore.poll() is None:
            restore.kill()
    assert restore.returncode == -signal.SIGKILL
    held = state_of(node, name).tx_id
    assert 0 < held < TXS
    assert_verified_prefix(node, name, TXS)
    # killed before its promotion: still a replica, which --append continues
    assert admin.ok("hot-restore", name, "-i", str(path), "--append") == \
        f"Restored transactions from {held + 1} to {TXS}\n".encode()
    assert state_of(node, name).tx_hash == state_of(node, "defaultdb").tx_hash


# --- the reader, fuzzed --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_file(backup):
    return file_of(backup[2][:4])


def _read_all(data: bytes):
    """Every record the reader returns from ``data``, or the BackupFileError it raises."""
    try:
        return list(BackupReader(io.BytesIO(data)))
    except BackupFileError as exc:
        return exc


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_the_reader_refuses_any_damage_with_its_own_error(small_file, data):
    good = list(BackupReader(io.BytesIO(small_file)))
    kind = data.draw(st.sampled_from(["flip", "cut", "insert", "random"]))
    if kind == "flip":
        at = data.draw(st.integers(0, len(small_file) - 1))
        bit = data.draw(st.integers(0, 7))
        damaged = small_file[:at] + bytes([small_file[at] ^ (1 << bit)]) + small_file[at + 1:]
    elif kind == "cut":
        damaged = small_file[:data.draw(st.integers(0, len(small_file) - 1))]
    elif kind == "insert":
        at = data.draw(st.integers(0, len(small_file)))
        damaged = small_file[:at] + data.draw(st.binary(min_size=1, max_size=64)) + \
            small_file[at:]
    else:
        damaged = data.draw(st.binary(max_size=512))
    result = _read_all(damaged)
    if isinstance(result, list):
        # whatever the reader accepts is a prefix of the real records, or records whose
        # damage only a database (or --verify-only) can see: then verify_records refuses it
        if result != good[:len(result)]:
            with pytest.raises(BackupFileError):
                verify_records(BackupReader(io.BytesIO(damaged)))


# --- progress and Ctrl-C -------------------------------------------------------------------------

def test_progress_bar_and_ctrl_c_as_in_immudb(node, admin, backup, tmp_path):
    path, data, records = backup
    out = tmp_path / "progress.bak"
    done = admin.run("hot-backup", "defaultdb", "-o", str(out), "--progress-bar")
    assert done.returncode == 0 and out.read_bytes() == data
    assert f"{TXS:,}/{TXS:,} txs" in done.text_err and done.text_err.endswith("Done\n")
    name = new_name()
    done = admin.run("hot-restore", name, "-i", str(path), "--progress-bar")
    assert done.returncode == 0 and f"{TXS:,}/{TXS:,} txs" in done.text_err

    # Ctrl-C while the restore waits for more of its stdin: it stops between batches, says so,
    # reports what it restored, and the database holds exactly that
    name = new_name("interrupted")
    restore = subprocess.Popen(admin.argv("hot-restore", name), stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=admin.env)
    try:
        restore.stdin.write(file_of(records[:BACKUP_RESTORE_BATCH_TXS + 10]))
        restore.stdin.flush()
        deadline = time.monotonic() + CLI_SECONDS_MAX
        while time.monotonic() < deadline:
            try:
                if state_of(node, name).tx_id >= BACKUP_RESTORE_BATCH_TXS:
                    break
            except Exception:                       # noqa: BLE001 - not created yet
                pass
            time.sleep(0.05)
        restore.send_signal(signal.SIGINT)
        time.sleep(0.5)
        restore.stdin.close()
        restore.wait(CLI_SECONDS_MAX)
        stdout, stderr = restore.stdout.read(), restore.stderr.read()
    finally:
        if restore.poll() is None:
            restore.kill()
    assert (restore.returncode, stdout.decode(), stderr.decode()) == (
        0, f"Restored transactions from 1 to {BACKUP_RESTORE_BATCH_TXS}\n",
        "Terminated by signal\n")
    assert state_of(node, name).tx_hash == records[BACKUP_RESTORE_BATCH_TXS - 1][1]
    with client_of(node, name) as client:          # promoted, as when it ends on its own
        assert client.database_settings(name)["settings"]["replica"] is False


# --- the layout, field by field ------------------------------------------------------------------

def test_a_record_is_laid_out_as_immudbs_hot_backup_writes_it(backup):
    """immudb's offsets: prefix 0, version 10, tx id 14, checksum size 22, content size 26,
    then the checksum and the content (the ExportTx stream's bytes: u64 length, blob)."""
    _, data, records = backup
    tx_id, alh, blob = records[0]
    record = data[:HEAD_BYTES + 32 + 8 + len(blob)]
    assert HEAD_BYTES == 30
    assert record[0:10] == b"IMMUBACKUP"
    assert struct.unpack(">I", record[10:14])[0] == 1
    assert struct.unpack(">Q", record[14:22])[0] == tx_id == 1
    assert struct.unpack(">I", record[22:26])[0] == 32
    assert struct.unpack(">I", record[26:30])[0] == 8 + len(blob)
    assert record[30:62] == alh
    assert struct.unpack(">Q", record[62:70])[0] == len(blob) and record[70:] == blob
    assert record == encode_record(tx_id, alh, blob)
    assert verify_records(BackupReader(io.BytesIO(data))) == (1, TXS)
