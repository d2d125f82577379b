"""``immuadmin hot-backup`` and ``immuadmin hot-restore``: immudb's commands, immudb's file.

hot-backup streams a running database's txs (EXPORT_TXS_STREAM: chunks of export blobs, each
written out as it arrives, never the whole log in memory) into a file or stdout, one record
per tx (immucore/backup.py, docs/backup.md). hot-restore reads such a file and applies it in
batches through the replicate path, which verifies every tx (entry hashes, Eh, blRoot, prevAlh
against the database's own chain) before anything is written; each batch also carries the
file's checksum of its last tx, and the reader has checked every other checksum against the
next tx's prevAlh. Each batch is one LMDB transaction: a restore killed midway leaves the
database at the end of a verified batch, and ``--append`` continues from there.

A database that does not exist is created as a replica fed from outside and promoted to a
primary when the restore ends, as immudb does; ``--force-replica`` does the same for an existing
database. Both commands run on the saved session, moved to the database for their duration and
back to its own database afterwards.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import sys

from ..backup import BackupFileError, BackupReader, BackupWriter, verify_records
from ..client import AsyncClient
from ..constants import (BACKUP_FILE_BUFFER_BYTES, BACKUP_RESTORE_BATCH_BYTES_MAX,
                         BACKUP_RESTORE_BATCH_TXS, BACKUP_RESTORE_BATCHES_IN_FLIGHT)
from ..errors import CorruptedDataError, ImmucoreError
from ..protocol.messages import Msg
from .common import CliError, Session, session_client
from .push import Progress

STDIO = "-"


# --- the session, on the command's database ----------------------------------------------------

def _on_database(args, database: str = None, *, created=None):
    """The saved session's client on ``database``, and back (common.session_client)."""
    session = Session(args)
    return session_client(session, session.saved_session(), database, created=created)


class _Interrupt:
    """Ctrl-C stops the command between txs (immudb's "Terminated by signal"), not inside a
    write: what is already in the file or the database stays whole."""

    def __init__(self):
        self.stopped = False

    def __enter__(self):
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGINT, self._stop)
        return self

    def _stop(self):
        self.stopped = True

    def __exit__(self, *exc):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)


async def _alh_in_database(client: AsyncClient, tx_id: int) -> bytes:
    """The database's Alh of tx ``tx_id`` (the export of one tx carries it)."""
    stream = client.export_stream(tx_id, 1)
    try:
        async for chunk in stream:
            if chunk["blobs"]:
                return chunk["last_alh"]
    finally:
        await stream.aclose()
    raise ImmucoreError(f"tx {tx_id} not found")


# --- hot-backup --------------------------------------------------------------------------------

def cmd_hot_backup(args):
    if args.start_tx > 1 and args.append:
        raise CliError("don't use --append and --start-tx options together")
    if args.output == STDIO and args.append:
        raise CliError("--append option can be used only when outputting to the file")
    if args.start_tx < 1:
        raise CliError("--start-tx must be at least 1")
    return asyncio.run(_hot_backup(args))


async def _hot_backup(args):
    async with _on_database(args, args.database) as client:
        start, prev_alh = args.start_tx, None
        if args.output == STDIO:
            out = sys.stdout.buffer
        elif os.path.exists(args.output):
            if not args.append:
                raise CliError("file already exists, use --append option to append new data "
                               "to file")
            start, prev_alh = await _backup_continues(client, args.output)
            out = open(args.output, "ab", buffering=BACKUP_FILE_BUFFER_BYTES)
        else:
            out = open(args.output, "xb", buffering=BACKUP_FILE_BUFFER_BYTES)
        try:
            await _stream_backup(client, out, start, prev_alh, args.progress_bar)
        except OSError as exc:        # a full disk, a closed pipe: named, not a traceback
            where = "stdout" if out is sys.stdout.buffer else args.output
            raise CliError(f"cannot write the backup to {where}: {exc.strerror or exc}") \
                from None
        finally:
            if out is not sys.stdout.buffer:
                out.close()


async def _backup_continues(client: AsyncClient, path: str):
    """The tx an --append backup continues from: the one after the file's last, whose
    checksum must be the database's Alh of that tx (the file is of this database)."""
    with open(path, "rb", buffering=BACKUP_FILE_BUFFER_BYTES) as f:
        reader = BackupReader(f, f"backup file {path}")
        for _ in reader:
            pass
    last, checksum = reader.last_tx_id, reader.last_alh
    if not last:
        return 1, None
    try:
        alh = await _alh_in_database(client, last)
    except ImmucoreError as exc:
        raise CliError(f"cannot find file's last transaction {last} in database: {exc}") \
            from None
    if alh != checksum:
        raise CliError(f"checksums for transaction {last} in backup file and database differ "
                       "- probably file was created from different database")
    return last + 1, checksum


async def _stream_backup(client: AsyncClient, out, start: int, prev_alh, progress: bool):
    latest = (await client.current_state()).tx_id
    if latest < start:
        print("All backed up, nothing to do", file=sys.stderr)
        return
    if start == latest:
        print(f"Backing up transaction {start}", file=sys.stderr)
    else:
        print(f"Backing up transactions from {start} to {latest}", file=sys.stderr)
    bar = Progress() if progress else None
    writer = BackupWriter(out, prev_alh)
    done = start - 1
    with _Interrupt() as interrupt:
        stream = client.export_stream(start, latest - start + 1)
        try:
            async for chunk in stream:
                done = writer.write_chunk(chunk["blobs"], chunk["last_alh"])
                if bar:
                    bar.show(done - start + 1, latest - start + 1)
                if interrupt.stopped:
                    break
        finally:
            await stream.aclose()
        out.flush()
        if out is not sys.stdout.buffer:
            os.fsync(out.fileno())          # "Done" means the backup is on disk
        if interrupt.stopped and done < latest:
            print(f"Terminated by signal - stopped after tx {done}", file=sys.stderr)
            return
    if done < latest:
        raise CliError(f"the export ended at tx {done}, before tx {latest}")
    if bar:
        bar.show(done - start + 1, latest - start + 1, final=True)
    print("Done", file=sys.stderr)


# --- hot-restore -------------------------------------------------------------------------------

def cmd_hot_restore(args):
    expected = 0 if args.verify_only else 1
    given = 0 if args.database is None else 1
    if given != expected:
        raise CliError(f"accepts {expected} arg(s), received {given}")
    if args.input == STDIO:
        return _restore_from(args, sys.stdin.buffer, "backup stream (stdin)")
    try:
        f = open(args.input, "rb", buffering=BACKUP_FILE_BUFFER_BYTES)
    except OSError as exc:
        raise CliError(f"cannot open backup file {args.input}: {exc.strerror}") from None
    with f:
        return _restore_from(args, f, f"backup file {args.input}")


def _restore_from(args, f, name: str):
    reader = BackupReader(f, name)
    if args.verify_only:
        first, last = verify_records(reader)
        if not first:
            raise CliError(f"{name} holds no transaction")
        if first == last:
            print(f"Backup file contains transaction {first}")
        else:
            print(f"Backup file contains transactions from {first} to {last}")
        return 0
    return asyncio.run(_hot_restore(args, reader))


async def _hot_restore(args, reader: BackupReader):
    name = args.database
    async with _on_database(args) as admin:
        exists = any(d["name"] == name for d in await admin.list_databases())
        if not exists:
            # immudb's way: a replica (here one fed from outside), promoted when done
            await admin.create_database(name, {"replica": True})
    promote = args.force_replica or not exists
    async with _on_database(args, name) as client:
        try:
            if exists and args.force_replica:
                try:
                    await client.update_database(name, {"replica": True})
                except ImmucoreError as exc:
                    raise CliError(f"cannot switch on replica mode for db: {exc}") from None
            state = await client.current_state()
            if state.tx_id and not args.append:
                raise CliError("cannot restore to non-empty database without --append flag")
            # an empty batch: a database that takes no pushes (no replica, or one following a
            # primary of its own) says so before the file is read
            await client.replicate_txs([])
            first = await _restore_start(reader, state, args) if state.tx_id else []
            await _apply(client, reader, first, args.progress_bar)
        finally:
            if promote:
                try:
                    await client.update_database(name, {"replica": False})
                except ImmucoreError as exc:
                    print(f"Error switching off replica mode for db: {exc}", file=sys.stderr)


async def _restore_start(reader: BackupReader, state, args) -> list:
    """Where a restore into a non-empty database starts: positions ``reader`` after the
    database's last tx, whose checksum in the file must be the database's Alh; returns the
    records already read that are to be applied first."""
    last = state.tx_id
    for record in reader:
        tx_id, checksum, _ = record
        if tx_id < last:
            continue
        gap = tx_id - last
        if gap > 1:
            raise CliError(f"there is a gap of {gap - 1} transaction(s) between database and "
                           "file - restore not possible")
        if gap == 1:
            if not args.force:
                raise CliError("not possible to validate last transaction in DB - use --force "
                               "to override")
            return [record]
        if checksum != state.tx_hash:
            raise CliError(f"checksums for tx {last} in backup file and database differ - "
                           "cannot append data to the database")
        return []
    if reader.last_tx_id == 0:
        raise CliError(f"{reader.name} holds no transaction")
    raise CliError(f"last known transaction not in file: the database is at tx {last}, "
                   f"{reader.name} ends at tx {reader.last_tx_id}")


async def _apply(client: AsyncClient, reader: BackupReader, records: list, progress: bool):
    """Apply the file in batches, up to BACKUP_RESTORE_BATCHES_IN_FLIGHT sent at once: the next
    batch is read and checked (in a thread) while those before are verified and applied by the
    node, one after the other in the order sent. ``records``: already read, applied first."""
    bar = Progress() if progress else None
    first_tx = last_tx = 0
    in_flight: collections.deque = collections.deque()

    async def settle(keep: int):
        nonlocal last_tx
        while len(in_flight) > keep:
            last_tx = await in_flight.popleft()
            if bar:
                bar.show(last_tx - first_tx + 1, last_tx - first_tx + 1)

    with _Interrupt() as interrupt:
        try:
            while not interrupt.stopped:
                # a stdin waiting for its writer blocks no answer meanwhile
                try:
                    records += await asyncio.to_thread(reader.batch,
                                                       BACKUP_RESTORE_BATCH_TXS - len(records),
                                                       BACKUP_RESTORE_BATCH_BYTES_MAX)
                except BackupFileError:
                    if interrupt.stopped:       # a writer stopped with us: not the file's fault
                        break
                    raise
                if not records or interrupt.stopped:
                    break
                first_tx = first_tx or records[0][0]
                await settle(BACKUP_RESTORE_BATCHES_IN_FLIGHT - 1)
                in_flight.append(asyncio.ensure_future(_apply_batch(client, records)))
                records = []
        finally:
            # what was sent is awaited (each batch stands or falls whole, in order): the
            # database then holds exactly the txs reported, even after an error
            error = None
            while in_flight:
                try:
                    await settle(0)
                except (ImmucoreError, CliError) as exc:
                    error = error or exc
            if error is not None:
                raise error
        if interrupt.stopped:
            print("Terminated by signal", file=sys.stderr)
    if bar and last_tx:
        bar.show(last_tx - first_tx + 1, last_tx - first_tx + 1, final=True)
    if not last_tx:
        print("Target database is up-to-date, nothing restored")
    elif first_tx == last_tx:
        print(f"Restored transaction {first_tx}")
    else:
        print(f"Restored transactions from {first_tx} to {last_tx}")


async def _apply_batch(client: AsyncClient, records: list) -> int:
    """One REPLICATE_TX (its answer's headers are not decoded: the node verified every tx, and
    refuses the batch whole if the last one does not hash to the file's checksum)."""
    last_tx, last_alh, _ = records[-1]
    try:
        await client.call(Msg.REPLICATE_TX, {"blobs": [blob for _, _, blob in records],
                                             "last_alh": last_alh})
    except CorruptedDataError as exc:
        if "Alh its primary announced" not in str(exc):
            raise
        raise CliError(f"transaction checksums don't match: tx {last_tx} of the backup file "
                       "does not hash to its checksum") from None
    return last_tx


# --- the parser --------------------------------------------------------------------------------

def add_backup_commands(command, commands):
    """Register hot-backup and hot-restore; ``command(group, name, run, help)`` makes one."""
    sub = command(commands, "hot-backup", cmd_hot_backup,
                  "Make a copy of the database without stopping: its transactions, from the "
                  "first or --start-tx, to a file or stdout")
    sub.add_argument("database", metavar="db_name")
    sub.add_argument("-o", "--output", default=STDIO, help='output file, "-" for stdout')
    sub.add_argument("--start-tx", type=int, default=1, help="Transaction ID to start from")
    sub.add_argument("--progress-bar", action="store_true", help="show progress indicator")
    sub.add_argument("--append", action="store_true",
                     help="append to file, if it already exists (for file output only)")

    sub = command(commands, "hot-restore", cmd_hot_restore,
                  "Restore data from backup file without stopping the node: into a new "
                  "database, or append what an existing one lacks")
    sub.add_argument("database", metavar="db_name", nargs="?", default=None)
    sub.add_argument("-i", "--input", default=STDIO, help='input file, "-" for stdin')
    sub.add_argument("--verify-only", action="store_true",
                     help="do not restore data, only verify backup")
    sub.add_argument("--append", action="store_true", help="appending to DB, if it already "
                                                           "exists")
    sub.add_argument("--progress-bar", action="store_true", help="show progress indicator")
    sub.add_argument("--force", action="store_true", help="don't check transaction sequence")
    sub.add_argument("--force-replica", action="store_true",
                     help="switch database to replica mode for the duration of restore")
