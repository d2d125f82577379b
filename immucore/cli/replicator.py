"""``immucore-replicator``: keep a replica of every database of a main node on a replica node,
after immudb-tools' replicator (same flags, same environment variables).

Every ``-delay`` seconds: list the databases of both nodes; each database only the main node has
is created on the replica node as a follower of its counterpart (the main node's ``defaultdb``
goes to ``defaultdbbak``, since the replica node has its own ``defaultdb``), after making sure
the follower user exists on the main node with ``admin`` on that database and that it can log
in there with the given password. Databases only the replica has are reported and left alone.
The replica node's replicators then do the copying.

Unlike immudb-tools, the follower password has no default (its published default would give
anyone ``admin`` on every database): give it with ``-follower-pass`` or FOLLOWER_PASSWORD.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from ..client import Client
from ..errors import ImmucoreError
from ..server.auth import is_well_known_password
from .version import add_version_flag

log = logging.getLogger("immucore.replicator")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The whole description as written, and every flag's default (a password flag says where
    its default comes from instead: its value may be a secret from the environment)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default:" in text or action.default is None or action.default is argparse.SUPPRESS:
            return text
        return text + " (default: %(default)s)"


def _secret_help(text: str, variable: str, default) -> str:
    """A password flag's help: where its value comes from, never the value itself (it may come
    from the environment; ``%(default)s`` would print it)."""
    fallback = f", else {default}" if default else "; required when it is not set"
    return f"{text} (default: ${variable}{fallback})".replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="immucore-replicator", description=__doc__.replace("``", ""),
                                formatter_class=_HelpFormatter)
    p.add_argument("-master-addr", dest="master_addr", default=env("MASTER_ADDRESS"),
                   required=env("MASTER_ADDRESS") is None,
                   help="main node host (required unless $MASTER_ADDRESS is set)")
    p.add_argument("-master-port", dest="master_port", type=int, default=3322,
                   help="main node port")
    p.add_argument("-master-user", dest="master_user", default="immudb",
                   help="sysadmin on the main node")
    p.add_argument("-master-pass", dest="master_pass", default=env("MASTER_PASSWORD", "immudb"),
                   help=_secret_help("password of -master-user", "MASTER_PASSWORD", "immudb"))
    p.add_argument("-replica-addr", dest="replica_addr", default=env("REPLICA_ADDRESS"),
                   required=env("REPLICA_ADDRESS") is None,
                   help="replica node host (required unless $REPLICA_ADDRESS is set)")
    p.add_argument("-replica-port", dest="replica_port", type=int, default=3322,
                   help="replica node port")
    p.add_argument("-replica-user", dest="replica_user", default="immudb",
                   help="sysadmin on the replica node")
    p.add_argument("-replica-pass", dest="replica_pass",
                   default=env("REPLICA_PASSWORD", "immudb"),
                   help=_secret_help("password of -replica-user", "REPLICA_PASSWORD", "immudb"))
    p.add_argument("-follower-user", dest="follower_user", default="follower",
                   help="user created on the main node (admin on each replicated database) "
                        "that the replicas log in as")
    p.add_argument("-follower-pass", dest="follower_pass", default=env("FOLLOWER_PASSWORD"),
                   help=_secret_help("password of -follower-user, stored in the replicas' "
                                     "settings", "FOLLOWER_PASSWORD", None))
    p.add_argument("-allow-well-known-follower-pass", dest="allow_well_known",
                   action="store_true",
                   help="accept a published default as -follower-pass (immudb-tools' "
                        "zyQQurat.0): anyone reaching the main node could then log in as "
                        "the follower, with admin on every database")
    p.add_argument("-delay", dest="delay", type=float, default=3600,
                   help="seconds between two passes (the tool's README calls it the compaction "
                        "delay; it is the poll period)")
    p.add_argument("-replication-sync", dest="sync", choices=("auto", "async", "sync"),
                   default="auto",
                   help="sync replicas: always, never, or where the main database has sync acks")
    p.add_argument("-replication-prefetch-tx-buffer-size", dest="prefetch", type=int,
                   default=100, help="prefetch_tx_buffer_size of each replica")
    p.add_argument("-replication-commit-concurrency", dest="concurrency", type=int, default=10,
                   help="replication_commit_concurrency of each replica")
    p.add_argument("-replication-allow-tx-discarding", dest="discarding", action="store_true",
                   help="allow_tx_discarding on sync replicas")
    p.add_argument("-once", dest="once", action="store_true", help="one pass, then exit")
    add_version_flag(p, p.prog)
    return p


def check_follower_password(parser: argparse.ArgumentParser, args) -> None:
    """No usable default, and no published one unless explicitly accepted."""
    if not args.follower_pass:
        parser.error("-follower-pass (or FOLLOWER_PASSWORD) is required: the password the "
                     f"replicas use to log in to the main node as {args.follower_user}")
    if is_well_known_password(args.follower_pass) and not args.allow_well_known:
        parser.error("-follower-pass is a published default password: anyone who can reach the "
                     f"main node could log in as {args.follower_user}, admin on every "
                     "database; choose another, or add -allow-well-known-follower-pass")


class LoginRefusedError(ImmucoreError):
    """A node refused one of our logins; the message names the node, the user and why."""


def _connect(role: str, host: str, port: int) -> Client:
    try:
        return Client(host, port)
    except (ImmucoreError, OSError, TimeoutError) as exc:
        raise LoginRefusedError(f"{role} node {host}:{port} can not be reached: {exc}") from exc


def _login(client: Client, role: str, user: str, password: str, database: str = "defaultdb"):
    try:
        client.login(user, password, database)
    except (ImmucoreError, OSError) as exc:
        raise LoginRefusedError(f"{role} node {client.host}:{client.port} refused the login of "
                                f"{user} on database {database}: {exc}") from exc


def one_pass(args) -> list:
    """Compare the two nodes once and create what is missing; returns the databases created."""
    created = []
    with _connect("main", args.master_addr, args.master_port) as main, \
            _connect("replica", args.replica_addr, args.replica_port) as replica:
        _login(main, "main", args.master_user, args.master_pass)
        _login(replica, "replica", args.replica_user, args.replica_pass)
        on_main = {d["name"]: d for d in main.list_databases()}
        on_replica = {d["name"] for d in replica.list_databases()}
        wanted = {("defaultdbbak" if name == "defaultdb" else name): name for name in on_main}
        for orphan in sorted(on_replica - set(wanted) - {"defaultdb"}):
            log.info("Ignoring orphaned database %s", orphan)
        for target, source in sorted(wanted.items()):
            if target in on_replica:
                continue
            _ensure_follower(main, args, source)
            _check_follower(args, source)
            settings = {"replica": True, "primary_database": source,
                        "primary_host": args.master_addr, "primary_port": args.master_port,
                        "primary_username": args.follower_user,
                        "primary_password": args.follower_pass,
                        "prefetch_tx_buffer_size": args.prefetch,
                        "replication_commit_concurrency": args.concurrency}
            primary_settings = main.database_settings(source)["settings"]
            if args.sync == "sync" or (args.sync == "auto" and primary_settings["sync_acks"]):
                settings.update(sync_replication=True, allow_tx_discarding=args.discarding)
            replica.create_database(target, settings)
            log.info("database %s created on the replica, following %s", target, source)
            created.append(target)
    return created


def _ensure_follower(main: Client, args, database: str):
    """The follower user, with admin on ``database`` (created on first need). An existing
    follower is granted nothing until its password is shown to be ours: admin is never handed
    to an account the tool (and so its replicas) cannot log in as."""
    users = {u["user"]: u for u in main.list_users()}
    if args.follower_user in users:
        if users[args.follower_user]["permissions"].get(database) != "admin":
            _check_follower_password(args)
            main.grant(args.follower_user, "admin", database)
    else:
        main.create_user(args.follower_user, args.follower_pass, "admin", database)


def _check_follower_password(args):
    """The follower's password, checked by logging in to the main node: a login refused only
    for want of a permission on the database (the follower has none yet) proves it."""
    with _connect("main", args.master_addr, args.master_port) as follower:
        try:
            follower.login(args.follower_user, args.follower_pass, "defaultdb")
        except (ImmucoreError, OSError) as exc:
            if getattr(exc, "code", None) != "no_database_permission":
                raise LoginRefusedError(
                    f"main node {args.master_addr}:{args.master_port} refused the login of "
                    f"{args.follower_user} on database defaultdb: {exc} (an existing "
                    f"{args.follower_user} is given admin only once -follower-pass is its "
                    "password)") from exc


def _check_follower(args, database: str):
    """Log in to the main node as the follower and export from ``database``, as a replica will:
    a follower that exists with another password (or lacks admin) is reported now, before a
    replica is created that would retry for ever."""
    with _connect("main", args.master_addr, args.master_port) as follower:
        _login(follower, "main", args.follower_user, args.follower_pass, database)
        try:
            follower.export_batch(1, 1)
        except ImmucoreError as exc:
            raise LoginRefusedError(
                f"main node {args.master_addr}:{args.master_port}: {args.follower_user} can not "
                f"export database {database} (a replica needs admin on it): {exc}") from exc


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_follower_password(parser, args)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    while True:
        started = time.monotonic()
        try:
            created = one_pass(args)
            log.info("pass done: %d database(s) created", len(created))
        except (ImmucoreError, OSError, TimeoutError) as exc:
            log.error("pass failed: %s", exc)
            if args.once:
                return 1
        if args.once:
            return 0
        time.sleep(max(args.delay - (time.monotonic() - started), 0))


if __name__ == "__main__":
    sys.exit(main())
