"""``immucore-replicator``: keep a replica of every database of a main node on a replica node,
after immudb-tools' replicator (same flags, same environment variables).

Every ``-delay`` seconds: list the databases of both nodes; each database only the main node has
is created on the replica node as a follower of its counterpart (the main node's ``defaultdb``
goes to ``defaultdbbak``, since the replica node has its own ``defaultdb``), after making sure
the follower user exists on the main node with ``admin`` on that database. Databases only the
replica has are reported and left alone. The replica node's replicators then do the copying.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from ..client import Client
from ..errors import ImmucoreError
from .version import add_version_flag

log = logging.getLogger("immucore.replicator")


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="immucore-replicator", description=__doc__.split("\n")[0])
    p.add_argument("-master-addr", dest="master_addr", default=env("MASTER_ADDRESS"),
                   required=env("MASTER_ADDRESS") is None, help="main node host")
    p.add_argument("-master-port", dest="master_port", type=int, default=3322)
    p.add_argument("-master-user", dest="master_user", default="immudb",
                   help="sysadmin on the main node")
    p.add_argument("-master-pass", dest="master_pass", default=env("MASTER_PASSWORD", "immudb"))
    p.add_argument("-replica-addr", dest="replica_addr", default=env("REPLICA_ADDRESS"),
                   required=env("REPLICA_ADDRESS") is None, help="replica node host")
    p.add_argument("-replica-port", dest="replica_port", type=int, default=3322)
    p.add_argument("-replica-user", dest="replica_user", default="immudb")
    p.add_argument("-replica-pass", dest="replica_pass", default=env("REPLICA_PASSWORD", "immudb"))
    p.add_argument("-follower-user", dest="follower_user", default="follower",
                   help="user created on the main node for pulling")
    p.add_argument("-follower-pass", dest="follower_pass",
                   default=env("FOLLOWER_PASSWORD", "zyQQurat.0"))
    p.add_argument("-delay", dest="delay", type=float, default=3600,
                   help="seconds between two passes (the tool's README calls it the compaction "
                        "delay; it is the poll period)")
    p.add_argument("-replication-sync", dest="sync", choices=("auto", "async", "sync"),
                   default="auto")
    p.add_argument("-replication-prefetch-tx-buffer-size", dest="prefetch", type=int,
                   default=100)
    p.add_argument("-replication-commit-concurrency", dest="concurrency", type=int, default=10)
    p.add_argument("-replication-allow-tx-discarding", dest="discarding", action="store_true")
    p.add_argument("-once", dest="once", action="store_true", help="one pass, then exit")
    add_version_flag(p, p.prog)
    return p


def one_pass(args) -> list:
    """Compare the two nodes once and create what is missing; returns the databases created."""
    created = []
    with Client(args.master_addr, args.master_port) as main, \
            Client(args.replica_addr, args.replica_port) as replica:
        main.login(args.master_user, args.master_pass)
        replica.login(args.replica_user, args.replica_pass)
        on_main = {d["name"]: d for d in main.list_databases()}
        on_replica = {d["name"] for d in replica.list_databases()}
        wanted = {("defaultdbbak" if name == "defaultdb" else name): name for name in on_main}
        for orphan in sorted(on_replica - set(wanted) - {"defaultdb"}):
            log.info("Ignoring orphaned database %s", orphan)
        for target, source in sorted(wanted.items()):
            if target in on_replica:
                continue
            _ensure_follower(main, args, source)
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
    """The follower user, with admin on ``database`` (created on first need)."""
    users = {u["user"]: u for u in main.list_users()}
    if args.follower_user in users:
        if users[args.follower_user]["permissions"].get(database) != "admin":
            main.grant(args.follower_user, "admin", database)
    else:
        main.create_user(args.follower_user, args.follower_pass, "admin", database)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
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
