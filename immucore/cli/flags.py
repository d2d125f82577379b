"""Flag helpers shared by the CLIs: immudb's boolean style (``--flag``, ``--flag=true``,
``--flag=false``) and aliases (a flag's seed-guide name and immudb's current name)."""
from __future__ import annotations

import argparse

_TRUE = {"true", "1", "yes", "on", "t"}
_FALSE = {"false", "0", "no", "off", "f"}


def parse_bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


BOOL_FLAGS = set()     # every option string registered by add_bool (see normalize_bool_flags)


def add_bool(parser, *names, dest, help, default=False):
    """``--name`` alone means true; ``--name=false`` and ``--name false`` are accepted too."""
    BOOL_FLAGS.update(names)
    parser.add_argument(*names, dest=dest, nargs="?", const=True, default=default,
                        type=parse_bool, metavar="true|false", help=help)


def normalize_bool_flags(argv):
    """Rewrite a bare boolean flag followed by a word that is not true/false into ``--flag=true``,
    so ``create --replication-is-replica replicadb`` reads as immudb's Go flags read it (argparse
    would otherwise take ``replicadb`` as the flag's value)."""
    out = list(argv)
    for i, token in enumerate(out[:-1]):
        following = out[i + 1].strip().lower()
        if token in BOOL_FLAGS and following not in _TRUE | _FALSE:
            out[i] = token + "=true"
    return out


# Replication settings of a database, under both names (seed guide / immudb ≥ 1.4).
# (wire setting, flag names, kind, help)
REPLICATION_FLAGS = (
    ("replica", ("--replication-is-replica", "--replication-enabled"), bool,
     "set database as a replica"),
    ("sync_replication", ("--replication-sync-enabled",), bool,
     "enable synchronous replication"),
    ("sync_acks", ("--replication-sync-acks",), int,
     "number of synchronous replicas that must acknowledge a commit (primary only)"),
    ("primary_database", ("--replication-primary-database", "--replication-master-database"), str,
     "primary database name (replica only)"),
    ("primary_host", ("--replication-primary-host", "--replication-master-address"), str,
     "primary host (replica only)"),
    ("primary_port", ("--replication-primary-port", "--replication-master-port"), int,
     "primary port (replica only)"),
    ("primary_username", ("--replication-primary-username", "--replication-follower-username"),
     str, "user on the primary used by the replicator"),
    ("primary_password", ("--replication-primary-password", "--replication-follower-password"),
     str, "password of that user"),
    ("primary_protocol", ("--replication-primary-protocol",), str,
     "how the replica talks to its primary: native (default) or grpc, immudb's gRPC "
     "replication (to follow an immudb primary; docs/replication.md)"),
    ("prefetch_tx_buffer_size", ("--replication-prefetch-tx-buffer-size",), int,
     "immudb's prefetch size (default 100 on replicas); stored, not used: replicas here "
     "prefetch whole batches (docs/replication.md)"),
    ("replication_commit_concurrency", ("--replication-commit-concurrency",), int,
     "immudb's concurrent replications (default 10 on replicas); stored, not used: each "
     "batch is applied in order in one transaction"),
    ("allow_tx_discarding", ("--replication-allow-tx-discarding",), bool,
     "allow precommitted transactions to be discarded if the replica diverges"),
    ("skip_integrity_check", ("--replication-skip-integrity-check",), bool,
     "immudb's skip of integrity checks; stored, not used: a replica here always verifies "
     "every tx before writing it"),
    ("wait_for_indexing", ("--replication-wait-for-indexing",), bool,
     "immudb's wait for indexing; stored, not needed: reads on a replica wait for its index"),
)


def add_replication_flags(parser, *, unset_default=True):
    """Add every replication flag; with ``unset_default`` a flag not given stays None, so only
    the flags a user actually set are sent (immudb's nullable settings)."""
    for setting, names, kind, help_text in REPLICATION_FLAGS:
        dest = f"repl_{setting}"
        if kind is bool:
            add_bool(parser, *names, dest=dest, help=help_text,
                     default=None if unset_default else False)
        else:
            parser.add_argument(*names, dest=dest, type=kind, default=None, help=help_text)


def replication_settings(args) -> dict:
    return {setting: getattr(args, f"repl_{setting}") for setting, *_ in REPLICATION_FLAGS
            if getattr(args, f"repl_{setting}") is not None}
