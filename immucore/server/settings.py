"""Database settings: what ``immuadmin database create|update`` sends, merged and validated as
immudb does (docs/immudb-format.md §12.2), and stored in systemdb as JSON.

The wire/CLI form uses immudb's current names in snake_case (``replica``, ``primary_host`` …);
the stored JSON keeps immudb's legacy field names (``masterAddress``, ``followerUsername`` …).
"""
from __future__ import annotations

import re
from typing import Optional

from ..constants import KEY_SIZE_BYTES_MAX, TX_ENTRIES_MAX, VALUE_SIZE_BYTES_MAX
from ..errors import IllegalArgumentsError

DATABASE_NAME = re.compile(r"^[a-z0-9_]{1,128}$")
RESERVED_DATABASES = frozenset({"systemdb", "defaultdb"})
PREFETCH_DEFAULT = 100
COMMIT_CONCURRENCY_DEFAULT = 10

# wire name -> (stored JSON name, type)
REPLICATION_FIELDS = {
    "replica": ("replica", bool),
    "sync_replication": ("syncReplication", bool),
    "primary_database": ("masterDatabase", str),
    "primary_host": ("masterAddress", str),
    "primary_port": ("masterPort", int),
    "primary_username": ("followerUsername", str),
    "primary_password": ("followerPassword", str),
    "sync_acks": ("syncAcks", int),
    "prefetch_tx_buffer_size": ("prefetchTxBufferSize", int),
    "replication_commit_concurrency": ("replicationCommitConcurrency", int),
    "allow_tx_discarding": ("allowTxDiscarding", bool),
    "skip_integrity_check": ("skipIntegrityCheck", bool),
    "wait_for_indexing": ("waitForIndexing", bool),
    # immucore's own: how a replica talks to its primary, native (the default, also "") or
    # grpc (immudb's replication protocol: replication/grpc_source.py)
    "primary_protocol": ("primaryProtocol", str),
}
PRIMARY_PROTOCOLS = ("", "native", "grpc")
OTHER_FIELDS = {
    "autoload": ("autoload", bool),
    "write_tx_header_version": ("writeTxHeaderVersion", int),
    "max_tx_entries": ("maxTxEntries", int),
    "max_key_len": ("maxKeyLen", int),
    "max_value_len": ("maxValueLen", int),
}
FIXED_AT_CREATION = ("write_tx_header_version", "max_tx_entries", "max_key_len", "max_value_len")
_PRIMARY_ONLY_CLEARED = ("primary_database", "primary_host", "primary_port", "primary_username",
                         "primary_password", "primary_protocol")


def check_database_name(name) -> str:
    """Refuse anything but immudb's names before a path is ever built from it."""
    if not isinstance(name, str) or not DATABASE_NAME.fullmatch(name):
        raise IllegalArgumentsError(
            "invalid database name provided: use 1 to 128 lowercase letters, digits or '_'")
    return name


def defaults() -> dict:
    out = {name: False if kind is bool else ("" if kind is str else 0)
           for name, (_, kind) in REPLICATION_FIELDS.items()}
    out.update(autoload=True, write_tx_header_version=1, max_tx_entries=TX_ENTRIES_MAX,
               max_key_len=KEY_SIZE_BYTES_MAX, max_value_len=VALUE_SIZE_BYTES_MAX)
    return out


def merge(current: Optional[dict], requested: dict, *, creating: bool) -> dict:
    """Apply the fields a caller set to ``current`` (or the defaults), immudb's way."""
    if not isinstance(requested, dict):
        raise IllegalArgumentsError("settings must be a map")
    fields = {**REPLICATION_FIELDS, **OTHER_FIELDS}
    for name, value in requested.items():
        if name not in fields:
            raise IllegalArgumentsError(f"unknown database setting {name!r}")
        kind = fields[name][1]
        if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise IllegalArgumentsError(f"setting {name} must be a non-negative integer")
        if kind is not int and not isinstance(value, kind):
            raise IllegalArgumentsError(f"setting {name} must be a {kind.__name__}")
    if not creating:
        for name in FIXED_AT_CREATION:
            if name in requested and current is not None and requested[name] != current[name]:
                raise IllegalArgumentsError(f"{name} can not be changed after database creation")
    merged = dict(current or defaults())
    merged.update(requested)
    if merged["replica"]:
        merged.setdefault("sync_acks", 0)
        if "sync_acks" not in requested:
            merged["sync_acks"] = 0
        for name, default in (("prefetch_tx_buffer_size", PREFETCH_DEFAULT),
                              ("replication_commit_concurrency", COMMIT_CONCURRENCY_DEFAULT)):
            if not requested.get(name) and not (current or {}).get(name):
                merged[name] = default
    else:
        for name in _PRIMARY_ONLY_CLEARED:
            if name not in requested:
                merged[name] = 0 if name == "primary_port" else ""
        for name in ("prefetch_tx_buffer_size", "replication_commit_concurrency"):
            if name not in requested:
                merged[name] = 0
    return merged


def validate(name: str, s: dict) -> None:
    def bad(option, role=""):
        where = f"{role} database" if role else "database"
        return IllegalArgumentsError(
            f"invalid value for replication option {option} on {where} '{name}'")

    if s["primary_protocol"] not in PRIMARY_PROTOCOLS:
        raise IllegalArgumentsError(
            f"invalid value for replication option PrimaryProtocol on database '{name}': "
            f"{s['primary_protocol']!r} is neither native nor grpc")
    if s["write_tx_header_version"] not in (0, 1):
        raise IllegalArgumentsError("write_tx_header_version must be 0 or 1")
    # the same ranges Database() enforces: a setting it would refuse must never be stored
    for option, low, high in (("max_tx_entries", 1, TX_ENTRIES_MAX),
                              ("max_key_len", 1, KEY_SIZE_BYTES_MAX),
                              ("max_value_len", 0, VALUE_SIZE_BYTES_MAX)):
        if not low <= s[option] <= high:
            raise IllegalArgumentsError(f"{option} must be in {low}..{high}")
    if s["replica"]:
        if s["prefetch_tx_buffer_size"] <= 0:
            raise bad("PrefetchTxBufferSize", "replica")
        if s["replication_commit_concurrency"] <= 0:
            raise bad("ReplicationCommitConcurrency", "replica")
        if s["sync_acks"] != 0:
            raise bad("SyncAcks")
        if s["primary_port"] > 65535:
            raise bad("PrimaryPort", "replica")
        if s["primary_database"] and not DATABASE_NAME.fullmatch(s["primary_database"]):
            raise IllegalArgumentsError(
                f"invalid value for replication option PrimaryDatabase on replica database "
                f"'{name}': {s['primary_database']!r} is not a database name (1 to 128 "
                "lowercase letters, digits or '_')")
        if replicator_required(s):
            missing = [option for option in ("primary_username", "primary_password")
                       if not s[option]]
            if missing:
                raise IllegalArgumentsError(
                    f"replica database '{name}' follows {s['primary_host']}:{s['primary_port']}/"
                    f"{s['primary_database']} but has no {' and no '.join(missing)}: the "
                    "replicator logs in there as a user with admin on that database")
    else:
        for option in ("primary_database", "primary_host", "primary_username",
                       "primary_password", "primary_protocol"):
            if s[option]:
                raise bad(_go_name(option), "primary")
        if s["primary_port"]:
            raise bad("PrimaryPort", "primary")
        if s["prefetch_tx_buffer_size"] or s["replication_commit_concurrency"]:
            raise bad("PrefetchTxBufferSize", "primary")
        for option in ("allow_tx_discarding", "skip_integrity_check", "wait_for_indexing"):
            if s[option]:
                raise bad(_go_name(option), "primary")
        if s["sync_replication"] and s["sync_acks"] == 0:
            raise IllegalArgumentsError(
                f"invalid value for replication option SyncAcks on primary database '{name}'. "
                "It is necessary to have at least one sync replica")
        if not s["sync_replication"] and s["sync_acks"]:
            raise IllegalArgumentsError(
                f"invalid value for replication option SyncAcks on primary database '{name}'. "
                "SyncAcks should be set to 0")


def replicator_required(s: dict) -> bool:
    """immudb's rule: a replica with a primary to follow gets a replicator; a replica without
    one is fed from outside (REPLICATE_TX, the external replicator)."""
    return bool(s["replica"] and s["primary_database"] and s["primary_host"]
                and s["primary_port"] > 0)


def to_stored(s: dict) -> dict:
    fields = {**REPLICATION_FIELDS, **OTHER_FIELDS}
    return {fields[name][0]: value for name, value in s.items() if name in fields}


def from_stored(raw: dict) -> dict:
    fields = {**REPLICATION_FIELDS, **OTHER_FIELDS}
    by_stored = {stored: name for name, (stored, _) in fields.items()}
    out = defaults()
    out.update({by_stored[k]: v for k, v in raw.items() if k in by_stored})
    return out


def public(s: dict) -> dict:
    """Settings as returned to callers: the replication password is never echoed."""
    out = dict(s)
    if out.get("primary_password"):
        out["primary_password"] = "********"
    return out


def summary(s: dict, requested: dict) -> str:
    """immuadmin's ``{replica: true, …}`` list: replica first, then the fields a caller set."""
    parts = [f"replica: {'true' if s['replica'] else 'false'}"]
    for name in ("autoload", "write_tx_header_version"):
        if name in requested:
            value = s[name]
            parts.append(f"{name.replace('_', '-')}: "
                         f"{str(value).lower() if isinstance(value, bool) else value}")
    return "{" + ", ".join(parts) + "}"


def _go_name(option: str) -> str:
    return "".join(part.capitalize() for part in option.split("_"))
