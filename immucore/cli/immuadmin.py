"""``immuadmin``: administer an immucore node with immudb's command shapes — login, databases
(create/update with every replication flag, list, load, unload, delete), users, and hot-backup /
hot-restore (cli/backup.py).

    immuadmin login immudb
    immuadmin database create --replication-enabled=true --replication-follower-username=immudb \\
        --replication-follower-password=immudb --replication-master-database=defaultdb replicadb
    immuadmin help database create
"""
from __future__ import annotations

import argparse
import sys

from .backup import add_backup_commands
from .common import (CliError, Session, add_connection_flags, add_help_command, cmd_login,
                     cmd_logout, cmd_status, common_parent, new_password, print_table,
                     read_secrets, run, size_text, time_text)
from .flags import add_bool, add_replication_flags, replication_settings
from .version import add_version_command, add_version_flag

PROG = "immuadmin"
DESCRIPTION = "Administer an immucore node: login, databases and users (immudb's commands)."
TOKENFILE_DEFAULT = ".immuadmin_token"
# Settings other than replication that create/update send when set: (flag, setting, help).
OTHER_SETTINGS = (
    ("--write-tx-header-version", "write_tx_header_version",
     "tx header version: 0 for compatibility with immudb 1.1, 1 for immudb 1.2+ (default 1)"),
    ("--max-key-len", "max_key_len", "maximum key length in bytes (fixed at creation)"),
    ("--max-value-len", "max_value_len", "maximum value length in bytes (fixed at creation)"),
    ("--max-tx-entries", "max_tx_entries", "maximum entries per transaction (fixed at creation)"),
)


# --- databases --------------------------------------------------------------------------------

def database_settings(args) -> dict:
    """Only the flags the user set (immudb's nullable settings)."""
    settings = replication_settings(args)
    if args.autoload is not None:
        settings["autoload"] = args.autoload
    for _, setting, _ in OTHER_SETTINGS:
        if getattr(args, setting) is not None:
            settings[setting] = getattr(args, setting)
    return settings


def cmd_database_create(args):
    with Session(args).resumed() as client:
        answer = client.create_database(args.name, database_settings(args))
    print(f"database '{args.name}' {answer['summary']} successfully created")


def cmd_database_update(args):
    with Session(args).resumed() as client:
        answer = client.update_database(args.name, database_settings(args))
    print(f"database '{args.name}' {answer['summary']} successfully updated")


def cmd_database_list(args):
    with Session(args).resumed() as client:
        databases = client.list_databases()
    rows = [(d["name"], time_text(d["created_at"]), d["created_by"] or "-",
             "LOADED" if d["loaded"] else "UNLOADED", "TRUE" if d["replica"] else "FALSE",
             size_text(d["disk_size_bytes"]), "-" if d["tx_count"] is None else d["tx_count"],
             _replication_text(d), _index_text(d))
            for d in databases]
    print_table(("Database Name", "Created At", "Created By", "Status", "Is Replica",
                 "Disk Size", "Transactions", "Replication", "Index"), rows)
    print(f"{len(rows)} database(s)")


def cmd_replication_push(args):
    import asyncio
    from .push import Progress, push_into_session
    session = Session(args)
    saved = session.saved_session()             # "please login first" before any prompt
    password = args.from_password
    if password is None:
        password = read_secrets(["Password of the primary user: "])[0]
    source = {"host": args.from_address, "port": args.from_port, "user": args.from_user,
              "password": password, "database": args.from_database}
    copied = asyncio.run(push_into_session(session, saved, args.database, source,
                                           follow=args.follow, progress=Progress()))
    print(f"{copied} transactions replicated")


def _replication_text(database: dict) -> str:
    """``following 127.0.0.1:3322/defaultdb lag 0 txs 0.0s``, ``retrying … lag 3 txs 1.2s as
    of 20s ago: <error>``, ``retrying … lag unknown: <error>`` (the primary never reached),
    ``diverged …: <why>``; ``-`` for a primary, ``external`` for a replica fed from outside."""
    status = database.get("replication")
    if status is None:
        return "external" if database["replica"] else "-"
    text = f"{status['state']} {status['primary']}"
    if status["lag_txs"] is not None:
        text += f" lag {status['lag_txs']} txs {status['lag_seconds']:.1f}s"
        since = status.get("seconds_since_last_contact")
        if status["state"] != "following" and since is not None:
            text += f" as of {since:.0f}s ago"
    elif status["state"] != "diverged":
        text += " lag unknown"
    if status["last_error"]:
        text += f": {status['last_error']}"
    return text


def _index_text(database: dict) -> str:
    """``ok``, or ``ERROR: <why>`` when the index worker kept dying and was not restarted
    (``database load`` starts it again); ``-`` for an unloaded database."""
    status = database.get("index")
    if status is None:
        return "-"
    return f"ERROR: {status['error']}" if status["error"] else "ok"


def cmd_database_load(args):
    with Session(args).resumed() as client:
        client.load_database(args.name)
    print(f"database '{args.name}' successfully loaded")


def cmd_database_unload(args):
    with Session(args).resumed() as client:
        client.unload_database(args.name)
    print(f"database '{args.name}' successfully unloaded")


def cmd_database_delete(args):
    if not args.yes_i_know_what_i_am_doing:
        # immudb's text, then the flag it means
        print(f"database '{args.name}' was not deleted. Safety flag not set "
              f"(--yes-i-know-what-i-am-doing)")
        return 1
    with Session(args).resumed() as client:
        client.delete_database(args.name)
    print(f"database '{args.name}' successfully deleted")


# --- users ------------------------------------------------------------------------------------

def cmd_user_create(args):
    if args.permission.lower() != "sysadmin" and not args.database:
        raise CliError(f"permission {args.permission} needs a database: "
                       f"user create {args.user} {args.permission} <database>")
    session = Session(args)
    session.saved_session()                     # "please login first" before any prompt
    password = new_password(args.password)      # asked before connecting: no idle connection
    with session.resumed() as client:
        client.create_user(args.user, password, args.permission, args.database)
    print(f"Created user {args.user}")


def cmd_user_list(args):
    with Session(args).resumed() as client:
        users = client.list_users()
    rows = [(u["user"], "TRUE" if u["active"] else "FALSE",
             ", ".join(f"{db}: {perm}" for db, perm in sorted(u["permissions"].items())) or "-",
             u["created_by"] or "-", time_text(u["created_at"])) for u in users]
    print_table(("User", "Active", "Permissions", "Created By", "Created At"), rows)
    print(f"{len(rows)} user(s)")


def cmd_user_changepassword(args):
    session = Session(args)
    saved = session.saved_session()
    # Your own password needs the old one; a sysadmin (or the admin who created the user)
    # changes another user's without it.
    own = saved.get("user") == args.user
    old = ""
    if own:
        old = args.old_password if args.old_password is not None else \
            read_secrets(("Old password:",))[0]
    password = new_password(args.password, ("New password:", "Confirm new password:"))
    with session.resumed() as client:
        client.change_password(args.user, old, password)
    print(f"password of {args.user} changed successfully")
    if own:         # the node ends every session of a user whose password changed
        session.ended()
        print(f"{PROG}: your session ended with the password change: please login again",
              file=sys.stderr)


def cmd_user_permission(args):
    with Session(args).resumed() as client:
        change = client.grant if args.action == "grant" else client.revoke
        change(args.user, args.permission, args.database)
    print("permission changed successfully")


def cmd_user_activate(args):
    with Session(args).resumed() as client:
        client.set_user_active(args.user, args.active)
    print("user status changed successfully")


# --- the parser -------------------------------------------------------------------------------

def add_database_settings_flags(parser):
    add_replication_flags(parser)
    add_bool(parser, "--autoload", dest="autoload", default=None,
             help="load the database when the node starts (default true)")
    for flag, setting, help_text in OTHER_SETTINGS:
        parser.add_argument(flag, dest=setting, type=int, default=None, metavar="N",
                            help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parent = common_parent(TOKENFILE_DEFAULT)
    parser = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION,
        epilog="'immuadmin help <command> [<subcommand>]' shows the flags of a command")
    add_connection_flags(parser, TOKENFILE_DEFAULT)
    add_version_flag(parser, PROG)
    commands = parser.add_subparsers(metavar="command")
    add_help_command(commands, parser, parent)
    add_version_command(commands, PROG)

    def command(group, name, run_fn, help_text, **kwargs):
        sub = group.add_parser(name, parents=[parent], help=help_text, description=help_text,
                               **kwargs)
        sub.set_defaults(run=run_fn)
        return sub

    sub = command(commands, "login", cmd_login,
                  "log in (the password is asked, or read as one line from stdin)")
    sub.add_argument("user")
    sub.add_argument("--database", default="defaultdb", help="database of the session")
    command(commands, "logout", cmd_logout, "log out and forget the saved session")
    command(commands, "status", cmd_status, "is the node up; the session's database and state")

    database = commands.add_parser("database", aliases=["d"], parents=[parent],
                                   help="create, update, list, load, unload, delete databases")
    databases = database.add_subparsers(metavar="action")
    sub = command(databases, "create", cmd_database_create,
                  "create a database (only the flags given are sent; the node applies defaults)")
    sub.add_argument("name")
    add_database_settings_flags(sub)
    sub = command(databases, "update", cmd_database_update,
                  "update a database's settings (only the flags given are changed)")
    sub.add_argument("name")
    add_database_settings_flags(sub)
    command(databases, "list", cmd_database_list, "list databases", aliases=["l"])
    for name, run_fn in (("load", cmd_database_load), ("unload", cmd_database_unload)):
        command(databases, name, run_fn, f"{name} a database").add_argument("name")
    sub = command(databases, "delete", cmd_database_delete,
                  "delete an unloaded database (unrecoverable)")
    sub.add_argument("name")
    sub.add_argument("--yes-i-know-what-i-am-doing", action="store_true",
                     help="safety flag to confirm the deletion")

    user = commands.add_parser("user", aliases=["u"], parents=[parent],
                               help="create, list, change password, permissions, (de)activate")
    users = user.add_subparsers(metavar="action")
    sub = command(users, "create", cmd_user_create,
                  "create a user: <user> read|readwrite|admin <database>, or <user> sysadmin")
    sub.add_argument("user")
    sub.add_argument("permission", help="read, readwrite, admin or sysadmin")
    sub.add_argument("database", nargs="?", default="")
    sub.add_argument("--password", help="the new user's password (else asked twice, or read "
                                        "as two lines from stdin)")
    command(users, "list", cmd_user_list, "list users", aliases=["l"])
    sub = command(users, "changepassword", cmd_user_changepassword,
                  "change a password (the old one is asked when it is your own)",
                  aliases=["change-password"])
    sub.add_argument("user")
    sub.add_argument("--old-password", help="your current password (else asked or read "
                                            "from stdin)")
    sub.add_argument("--password", help="the new password (else asked twice or read as two "
                                        "lines from stdin)")
    sub = command(users, "permission", cmd_user_permission,
                  "grant or revoke a permission on a database")
    sub.add_argument("action", choices=("grant", "revoke"))
    sub.add_argument("user")
    sub.add_argument("permission", help="read, readwrite or admin")
    sub.add_argument("database")
    for name, active in (("activate", True), ("deactivate", False)):
        sub = command(users, name, cmd_user_activate, f"{name} a user")
        sub.add_argument("user")
        sub.set_defaults(active=active)

    replication = commands.add_parser("replication", parents=[parent],
                                      help="external replication (push into a replica)")
    replications = replication.add_subparsers(metavar="action")
    sub = command(replications, "push", cmd_replication_push,
                  "copy the txs a replica database (the session's, or --database) lacks from a "
                  "primary database; the replica must have no replicator of its own")
    sub.add_argument("--from-address", required=True, help="primary host")
    sub.add_argument("--from-port", type=int, default=3322, help="primary port (3322)")
    sub.add_argument("--from-user", default="immudb",
                     help="user on the primary, with admin permission on --from-database "
                          "(default immudb)")
    sub.add_argument("--from-password", default=None,
                     help="its password (asked, or read from stdin, when not given)")
    sub.add_argument("--from-database", default="defaultdb", help="primary database")
    sub.add_argument("--database", default=None, help="replica database (default: session's)")
    sub.add_argument("--follow", action="store_true",
                     help="keep copying new commits as they happen (Ctrl-C to stop)")
    add_backup_commands(command, commands)
    return parser


def main(argv=None) -> int:
    return run(PROG, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
