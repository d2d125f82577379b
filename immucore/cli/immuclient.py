"""``immuclient``: read and write an immucore node from the shell, with immudb's command names.

    immuclient login immudb
    immuclient set mykey myvalue
    immuclient verifiedget mykey           # proven against the locally kept trusted state
    immuclient get mykey@1                 # its first value; mykey@-1: the one before the current
    immuclient restore mykey@-1            # write that value again, as a new revision
    immuclient --json history mykey        # one JSON object per line
    immuclient audit-mode --audit-username immudb --audit-password immudb   # docs/audit.md

Revisions are immudb's: N > 0 is the key's N-th value (1 = the first), 0 the current one, a
negative N counts back from the current one. ``--revision-separator`` (default ``@``; ``""``
for none) is what separates the key from its revision.

Verified calls keep the last trusted state per server and database in
``~/.immuclient_state.json``. With ``--json``, byte strings are UTF-8 text when they decode,
else hex under the key name with a ``_hex`` suffix; hashes are always hex.
"""
from __future__ import annotations

import argparse
import json
import sys

from .. import codec
from ..client import StateStore
from ..errors import KeyNotFoundError
from .audit import add_audit_flags, cmd_audit_mode
from .common import (CliError, Session, add_connection_flags, add_help_command, cmd_login,
                     cmd_logout, cmd_status, common_parent, home_path, run)
from .version import add_version_command, add_version_flag

PROG = "immuclient"
DESCRIPTION = "Read and write an immucore node from the shell (immudb's command names)."
TOKENFILE_DEFAULT = ".immuclient_token"
STATE_FILE = ".immuclient_state.json"
REVISION_SEPARATOR_DEFAULT = "@"          # immudb's


def _arg_bytes(text: str) -> bytes:
    """A command-line argument as the bytes the user typed (any bytes survive the round trip)."""
    return text.encode("utf-8", "surrogateescape")


def key_and_revision(args, text: str):
    """``KEY@REV`` as (key bytes, revision), or (key bytes, None) without a revision: the last
    separator splits, as in immudb; an empty separator turns revisions off."""
    separator = args.revision_separator
    if not separator or separator not in text:
        return _arg_bytes(text), None
    key, _, revision = text.rpartition(separator)
    try:
        return _arg_bytes(key), int(revision)
    except ValueError:
        raise CliError(f"invalid revision number {revision!r} in {text!r} (to read a key with "
                       f"{separator!r} in its name, set --revision-separator to another text, "
                       f"or to \"\" for none)") from None


# --- output -----------------------------------------------------------------------------------

def _jsonable(value):
    if isinstance(value, dict):
        out = {}
        for name, item in value.items():
            if isinstance(item, bytes):
                try:
                    out[name] = item.decode("utf-8")
                except UnicodeDecodeError:
                    out[f"{name}_hex"] = item.hex()
            else:
                out[name] = _jsonable(item)
        return out
    if isinstance(value, list):
        return [_jsonable(item) for item in value]
    return value


def _text(value) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return "0x" + value.hex()
    if value is None:
        return "-"
    return str(value).lower() if isinstance(value, bool) else str(value)


def emit(args, records):
    """Each record (a dict, hashes already hex) as a JSON line, or as aligned ``name: value``
    lines with a blank line between records (a list of dicts: one indented line per item)."""
    for index, record in enumerate(records):
        if args.json:
            print(json.dumps(_jsonable(record), separators=(",", ":")))
            continue
        if index:
            print()
        width = max(len(name) for name in record) + 2
        for name, value in record.items():
            if isinstance(value, list):
                print(f"{name}:")
                for item in value:
                    print("  " + "  ".join(f"{k}: {_text(v)}" for k, v in item.items()))
            else:
                print(f"{name + ':':<{width}}{_text(value)}")


def entry_record(entry) -> dict:
    """An ``Entry``: the value's hash is the one its tx entry holds (sha256(0x00 || value))."""
    record = {"tx": entry.tx, "rev": entry.revision, "key": entry.key, "value": entry.value,
              "hash": codec.sha256(b"\x00" + entry.value).hex()}
    if entry.metadata is not None:
        record.update(deleted=entry.metadata.deleted, expires_at=entry.metadata.expires_at,
                      non_indexable=entry.metadata.non_indexable)
    return record


def tx_record(tx) -> dict:
    header = tx.header
    return {"tx": header.id, "ts": header.ts, "version": header.version,
            "nentries": header.nentries, "alh": header.alh().hex(),
            "prev_alh": header.prev_alh.hex(), "eh": header.eh.hex(),
            "bl_tx_id": header.bl_tx_id, "bl_root": header.bl_root.hex(),
            "entries": [{"key": e.key[1:], "vlen": e.vlen, "hash": e.hvalue.hex()}
                        for e in tx.entries]}


def header_record(header, key: bytes, value: bytes) -> dict:
    return {"tx": header.id, "key": key, "value": value,
            "hash": codec.sha256(b"\x00" + value).hex()}


# --- commands ---------------------------------------------------------------------------------

def resumed(args):
    """A client on the saved session; verified calls trust the state file's states."""
    return Session(args).resumed(state_store=StateStore(home_path(STATE_FILE)))


def cmd_use(args):
    with resumed(args) as client:
        client.use_database(args.database)
    print(f"now using database '{args.database}'")


def cmd_set(args):
    key, value = _arg_bytes(args.key), _arg_bytes(args.value)
    with resumed(args) as client:
        header = client.set({key: value})
    emit(args, [header_record(header, key, value)])


def cmd_verifiedset(args):
    key, value = _arg_bytes(args.key), _arg_bytes(args.value)
    with resumed(args) as client:
        header = client.verified_set({key: value})
    emit(args, [{**header_record(header, key, value), "verified": True}])


def cmd_get(args):
    key, revision = key_and_revision(args, args.key)
    with resumed(args) as client:
        entry = client.get(key, at_revision=revision or 0)
    emit(args, [entry_record(entry)])


def cmd_verifiedget(args):
    key, revision = key_and_revision(args, args.key)
    with resumed(args) as client:
        entry = client.verified_get(key, at_revision=revision or 0)
    emit(args, [{**entry_record(entry), "verified": True}])


def cmd_delete(args):
    """immudb's delete: a key with no live value is ``key not found`` (not a second
    tombstone)."""
    key = _arg_bytes(args.key)
    with resumed(args) as client:
        client.get(key)                     # raises KeyNotFoundError: missing, deleted, expired
        header = client.delete([key])
    emit(args, [{"tx": header.id, "key": key, "deleted": True}])


def cmd_restore(args):
    """Write the value ``KEY@REV`` had as the key's new revision (a deleted key comes back).

    Two requests, a read then a write: a write by someone else in between is not refused (immudb
    guards it with a precondition, which immucore has not), but it is told on stderr, with the
    revision the restored value got."""
    key, revision = key_and_revision(args, args.key)
    if revision is None:
        if not args.revision_separator:
            raise CliError("restore needs a revision, and --revision-separator is empty")
        raise CliError(f"restore needs a revision: {args.key}{args.revision_separator}REV "
                       "(-1 is the value before the current one)")
    with resumed(args) as client:
        old = client.get(key, at_revision=revision)
        newest = client.history(key, limit=1, desc=True)      # counts a deleted newest too
        header = client.set({key: old.value})
        try:
            restored = client.get(key, at_tx=header.id)
        except KeyNotFoundError:        # deleted again, or expired, right after the write
            restored = None
    if restored is None or restored.revision != newest[0].revision + 1:
        print(f"{PROG}: {args.key}: written by another client too while restoring "
              f"(the restored value is tx {header.id})", file=sys.stderr)
    record = entry_record(restored) if restored is not None else \
        header_record(header, key, old.value)
    emit(args, [{**record, "restored_from": old.revision}])


def cmd_history(args):
    with resumed(args) as client:
        entries = client.history(_arg_bytes(args.key), limit=args.limit, desc=args.desc)
    emit(args, [entry_record(e) for e in entries])


def cmd_scan(args):
    with resumed(args) as client:
        entries = client.scan(prefix=_arg_bytes(args.prefix), limit=args.limit, desc=args.desc)
    emit(args, [entry_record(e) for e in entries])


def cmd_tx(args):
    with resumed(args) as client:
        tx = client.tx_by_id(args.tx_id)
    emit(args, [tx_record(tx)])


def cmd_verifiedtx(args):
    with resumed(args) as client:
        tx = client.verified_tx_by_id(args.tx_id)
    emit(args, [{**tx_record(tx), "verified": True}])


def cmd_current(args):
    with resumed(args) as client:
        state = client.current_state()
    emit(args, [{"database": state.db, "tx": state.tx_id, "hash": state.tx_hash.hex()}])


# --- the parser -------------------------------------------------------------------------------

def _add_output_flags(parser, *, subcommand=False):
    parser.add_argument("--json", action="store_true",
                        default=argparse.SUPPRESS if subcommand else False,
                        help="one JSON object per result, for scripts")
    parser.add_argument("--revision-separator", dest="revision_separator",
                        default=argparse.SUPPRESS if subcommand else REVISION_SEPARATOR_DEFAULT,
                        help="separates a key from its revision in KEY@REV (default "
                             f"{REVISION_SEPARATOR_DEFAULT!r}; \"\" reads the whole argument as "
                             "the key)")


def build_parser() -> argparse.ArgumentParser:
    parent = common_parent(TOKENFILE_DEFAULT, _add_output_flags)
    parser = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION,
        epilog="'immuclient help <command>' shows the flags of a command")
    add_connection_flags(parser, TOKENFILE_DEFAULT)
    add_version_flag(parser, PROG)
    _add_output_flags(parser)
    commands = parser.add_subparsers(metavar="command")
    add_help_command(commands, parser, parent)
    add_version_command(commands, PROG)

    def command(name, run_fn, help_text, *positionals, aliases=()):
        sub = commands.add_parser(name, parents=[parent], help=help_text,
                                  description=help_text, aliases=list(aliases))
        for positional in positionals:
            sub.add_argument(*positional[:1], **positional[1])
        sub.set_defaults(run=run_fn)
        return sub

    key = ("key", {})
    value = ("value", {})
    tx_id = ("tx_id", {"type": int, "metavar": "id"})
    sub = command("login", cmd_login,
                  "log in (the password is asked, or read as one line from stdin)",
                  ("user", {}))
    sub.add_argument("--database", default="defaultdb", help="database of the session")
    command("logout", cmd_logout, "log out and forget the saved session")
    command("status", cmd_status, "is the node up; the session's database and state")
    command("use", cmd_use, "select the session's database", ("database", {}))
    command("set", cmd_set, "set a value", key, value)
    command("verifiedset", cmd_verifiedset, "set a value and verify the tx's proofs",
            key, value, aliases=("safeset",))
    key_at = ("key", {"metavar": "key[@revision]"})
    command("get", cmd_get, "get a key's current value, or its value at a revision "
            "(key@1: the first; key@-1: the one before the current)", key_at)
    command("verifiedget", cmd_verifiedget, "get a value (at a revision: key@N) and verify its "
            "proofs", key_at, aliases=("safeget",))
    command("delete", cmd_delete, "delete a key (it reads as missing; its history stays)", key)
    command("restore", cmd_restore, "write the value a key had at a revision as its new "
            "revision (key@-1: undo the last change)", ("key", {"metavar": "key@revision"}))
    for name, run_fn, help_text, positional in (
            ("history", cmd_history, "every value a key had", key),
            ("scan", cmd_scan, "keys with a prefix, in key order",
             ("prefix", {"nargs": "?", "default": ""}))):
        sub = command(name, run_fn, help_text, positional)
        sub.add_argument("--limit", type=int, default=0, help="at most this many (0: no limit)")
        sub.add_argument("--desc", action="store_true", help="newest (last) first")
    command("tx", cmd_tx, "a transaction's header and keys", tx_id)
    command("verifiedtx", cmd_verifiedtx, "a transaction, verified against the trusted state",
            tx_id, aliases=("safetx",))
    command("current", cmd_current, "the current state (tx id and hash) of the database",
            aliases=("state",))
    sub = command("audit-mode", cmd_audit_mode, "audit the node continuously: every interval, "
                  "check each database's consistency from its last trusted state "
                  "(docs/audit.md)")
    add_audit_flags(sub)
    return parser


def main(argv=None) -> int:
    return run(PROG, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
