"""immudb's nullable database settings (``DatabaseNullableSettings``) and immucore's (the
names of server/settings.py), both ways.

immudb has many settings immucore does not implement (file sizes, caches, B-tree and AHT
tuning, truncation: immucore's storage is LMDB, docs/storage.md). They are reported with
immudb's default values, and a request may set them to exactly those values: immudb's tools
copy a primary's whole settings onto a replica. Any other value is refused by name
(docs/grpc.md lists them). The defaults are immudb 1.11.1's (``defaultDBOptions`` in
pkg/server/db_options.go and the store, tbtree and ahtree defaults it reads).
"""
from __future__ import annotations

from ..server import settings as dbsettings
from . import schema
from .errors import NotSupportedError

# immudb's nullable replication settings -> immucore's setting names
REPLICATION_SETTINGS = {
    "replica": "replica", "primaryDatabase": "primary_database", "primaryHost": "primary_host",
    "primaryPort": "primary_port", "primaryUsername": "primary_username",
    "primaryPassword": "primary_password", "syncReplication": "sync_replication",
    "syncAcks": "sync_acks", "prefetchTxBufferSize": "prefetch_tx_buffer_size",
    "replicationCommitConcurrency": "replication_commit_concurrency",
    "allowTxDiscarding": "allow_tx_discarding", "skipIntegrityCheck": "skip_integrity_check",
    "waitForIndexing": "wait_for_indexing",
}
# immudb's other settings immucore implements -> immucore's names
DATABASE_SETTINGS = {
    "maxKeyLen": "max_key_len", "maxValueLen": "max_value_len",
    "maxTxEntries": "max_tx_entries", "writeTxHeaderVersion": "write_tx_header_version",
    "autoload": "autoload",
}
# immudb's settings immucore does not implement, by their path in DatabaseNullableSettings,
# with immudb's default value (durations in milliseconds, as immudb's messages carry them)
UNIMPLEMENTED_DEFAULTS = {
    "fileSize": 1 << 29,                  # the server's DefaultStoreFileSize, 512 MiB
    "excludeCommitTime": False,
    "maxConcurrency": 30,
    "maxIOConcurrency": 1,
    "txLogCacheSize": 1000,
    "vLogMaxOpenedFiles": 10,
    "txLogMaxOpenedFiles": 10,
    "commitLogMaxOpenedFiles": 10,
    "readTxPoolSize": 128,
    "syncFrequency": 20,
    "writeBufferSize": 1 << 22,
    "maxActiveTransactions": 1000,
    "mvccReadSetLimit": 100_000,
    "vLogCacheSize": 0,
    "embeddedValues": False,
    "preallocFiles": False,
    "indexSettings.flushThreshold": 100_000,
    "indexSettings.syncThreshold": 1_000_000,
    "indexSettings.cacheSize": 1 << 27,
    "indexSettings.maxNodeSize": 4096,
    "indexSettings.maxActiveSnapshots": 100,
    "indexSettings.renewSnapRootAfter": 1000,
    "indexSettings.compactionThld": 2,
    "indexSettings.delayDuringCompaction": 10,
    "indexSettings.nodesLogMaxOpenedFiles": 10,
    "indexSettings.historyLogMaxOpenedFiles": 1,
    "indexSettings.commitLogMaxOpenedFiles": 1,
    "indexSettings.flushBufferSize": 4096,
    "indexSettings.cleanupPercentage": 0.0,
    "indexSettings.maxBulkSize": 1,
    "indexSettings.bulkPreparationTimeout": 20,
    "ahtSettings.syncThreshold": 100_000,
    "ahtSettings.writeBufferSize": 1 << 24,
    "truncationSettings.retentionPeriod": 0,
    "truncationSettings.truncationFrequency": 24 * 3600 * 1000,
}
_GROUPS = ("indexSettings", "ahtSettings", "truncationSettings")


def settings_from(message) -> dict:
    """The settings a request set (immudb's nullable fields: only those given), by immucore's
    names. An unimplemented setting is accepted at immudb's default and refused otherwise."""
    requested = {}
    for field, value in message.ListFields():
        if field.name == "replicationSettings":
            for inner, inner_value in value.ListFields():
                requested[REPLICATION_SETTINGS[inner.name]] = inner_value.value
        elif field.name in DATABASE_SETTINGS:
            requested[DATABASE_SETTINGS[field.name]] = value.value
        elif field.name in _GROUPS:
            for inner, inner_value in value.ListFields():
                _check_default(f"{field.name}.{inner.name}", inner_value.value)
        else:
            _check_default(field.name, value.value)
    return requested


def _check_default(path: str, value) -> None:
    default = UNIMPLEMENTED_DEFAULTS[path]
    if value != default:
        shown = str(default).lower() if isinstance(default, bool) else default
        raise NotSupportedError(
            f"database setting {path} is not supported by immucore: only immudb's default "
            f"({shown}) is accepted, not {str(value).lower() if isinstance(value, bool) else value}"
            " (docs/grpc.md)")


def settings(s: dict) -> "schema.DatabaseNullableSettings":
    """A database's settings, every field filled: immucore's own (the replication settings
    always, the password masked as on the native protocol) and immudb's defaults for the rest."""
    s = dbsettings.public({**dbsettings.defaults(), **s})
    out = schema.DatabaseNullableSettings()
    for proto_name, name in REPLICATION_SETTINGS.items():
        getattr(out.replicationSettings, proto_name).value = s[name]
    for proto_name, name in DATABASE_SETTINGS.items():
        getattr(out, proto_name).value = s[name]
    for path, default in UNIMPLEMENTED_DEFAULTS.items():
        target = out
        *groups, leaf = path.split(".")
        for group in groups:
            target = getattr(target, group)
        getattr(target, leaf).value = default
    return out


def legacy_settings(message) -> "schema.DatabaseNullableSettings":
    """immudb's old ``DatabaseSettings`` (CreateDatabaseWith, UpdateDatabase) as the nullable
    settings immudb turns it into: the replication fields always, the sizes only when set."""
    out = schema.DatabaseNullableSettings()
    rep = out.replicationSettings
    rep.replica.value = message.replica
    rep.primaryDatabase.value = message.primaryDatabase
    rep.primaryHost.value = message.primaryHost
    rep.primaryPort.value = message.primaryPort
    rep.primaryUsername.value = message.primaryUsername
    rep.primaryPassword.value = message.primaryPassword
    if not message.replica:
        rep.syncAcks.value = 0
        rep.prefetchTxBufferSize.value = 0
        rep.replicationCommitConcurrency.value = 0
    for name in ("fileSize", "maxKeyLen", "maxValueLen", "maxTxEntries"):
        if getattr(message, name):
            getattr(out, name).value = getattr(message, name)
    return out


def legacy_from(name: str, s: dict) -> "schema.DatabaseSettings":
    """A database's settings in immudb's old ``DatabaseSettings`` (GetDatabaseSettings)."""
    full = settings(s)
    rep = full.replicationSettings
    return schema.DatabaseSettings(
        databaseName=name, replica=rep.replica.value, primaryDatabase=rep.primaryDatabase.value,
        primaryHost=rep.primaryHost.value, primaryPort=rep.primaryPort.value,
        primaryUsername=rep.primaryUsername.value, primaryPassword=rep.primaryPassword.value,
        fileSize=full.fileSize.value, maxKeyLen=full.maxKeyLen.value,
        maxValueLen=full.maxValueLen.value, maxTxEntries=full.maxTxEntries.value,
        excludeCommitTime=full.excludeCommitTime.value)
