"""Users, permissions and sessions of a node (no network code).

Users live in systemdb, an immucore database like any other: key ``0x01 || username`` holds the
user's record as JSON. Every change is one transaction that writes a whole new version of the
record; the latest version is the truth, older ones stay in the key's history.

Permissions are immudb's (docs/immudb-format.md §12.1): ``read`` (1),
``readwrite`` (2) and ``admin`` (254) per database, and ``sysadmin`` (255) for the built-in user
``immudb``. Passwords are hashed with scrypt, salted per user; the scrypt parameters are stored
with each hash, so the cost can be raised later without breaking existing records.

Every call here may hash a password (~50 ms at the default cost) or write to systemdb (an fsync):
an asyncio caller runs them in an executor. Sessions die whenever their user changes: wire
``store.add_listener(sessions.user_changed)`` and a password change, a deactivation or a
permission change closes every session of that user, including one whose login was under way.
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import re
import secrets
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

from ..constants import SCAN_RESULTS_MAX, SESSION_INACTIVITY_SECONDS, SESSIONS_MAX_DEFAULT
from ..database import Database
from ..errors import (CorruptedDataError, IllegalArgumentsError, ImmucoreError,
                      KeyNotFoundError)

# --- permissions ---------------------------------------------------------------------------

PERMISSION_NONE = 0
PERMISSION_READ = 1
PERMISSION_READWRITE = 2
PERMISSION_ADMIN = 254
PERMISSION_SYSADMIN = 255

_PERMISSION_BY_NAME = {"read": PERMISSION_READ, "readwrite": PERMISSION_READWRITE,
                       "admin": PERMISSION_ADMIN, "sysadmin": PERMISSION_SYSADMIN}
_NAME_BY_PERMISSION = {v: k for k, v in _PERMISSION_BY_NAME.items()} | {PERMISSION_NONE: "none"}
# What may be granted on one database (sysadmin is global and belongs to ``immudb`` alone).
_GRANTABLE = (PERMISSION_READ, PERMISSION_READWRITE, PERMISSION_ADMIN)
# The least permission each action needs (immudb's method table reduced to three actions).
_ACTION_PERMISSION_MIN = {"read": PERMISSION_READ, "write": PERMISSION_READWRITE,
                          "admin": PERMISSION_ADMIN}

# --- names and limits ----------------------------------------------------------------------

SYSADMIN_USERNAME = "immudb"
SYSADMIN_DEFAULT_PASSWORD = "immudb"
SYSADMIN_DATABASE = "*"               # immudb records the sysadmin permission on database "*"
SYSTEMDB_NAME = "systemdb"
USER_KEY_PREFIX = b"\x01"
DEFAULT_PASSWORD_WARNING = ("immudb user has the default password: "
                            "please change it to ensure proper security")
# Passwords published as defaults, so anyone may try them: immudb's sysadmin password and
# immudb-tools' replicator follower password. A node holding any active user with one of them
# is in protected mode (loopback peers only), and immucore-replicator refuses them unless told.
# The one list of them: add a published default here and every check sees it.
WELL_KNOWN_PASSWORDS = (SYSADMIN_DEFAULT_PASSWORD, "zyQQurat.0")

USERNAME = re.compile(r"[a-zA-Z0-9_]+")      # used with fullmatch: '$' admits a final \n
USERNAME_SIZE_BYTES_MAX = 63
DATABASE_NAME = re.compile(r"[a-z0-9_]{1,128}")
PASSWORD_STRONG_SIZE_BYTES_MIN = 8    # immudb's strength rule: 8..32 bytes
PASSWORD_STRONG_SIZE_BYTES_MAX = 32
PASSWORD_SIZE_BYTES_MAX = 1024        # nothing longer is ever hashed, strength rule or not
PASSWORD_REQUIREMENTS = (
    f"password must have between {PASSWORD_STRONG_SIZE_BYTES_MIN} and "
    f"{PASSWORD_STRONG_SIZE_BYTES_MAX} letters, digits and special characters of which at least "
    "1 uppercase letter, 1 digit and 1 special character")

SCRYPT_N_DEFAULT = 1 << 14            # ~50 ms and 16 MiB per hash
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_DKLEN_BYTES = 32
SCRYPT_SALT_SIZE_BYTES = 16
# Bounds on parameters read back from a record: a forged or replicated record must not make a
# login cost seconds or gigabytes.
SCRYPT_MEMORY_BYTES_MAX = 64 << 20
SCRYPT_P_MAX = 16
SCRYPT_DKLEN_BYTES_MIN, SCRYPT_DKLEN_BYTES_MAX = 16, 64
SCRYPT_SALT_SIZE_BYTES_MIN, SCRYPT_SALT_SIZE_BYTES_MAX = 16, 64

PASSWORD_HASH_ALG = "scrypt-sha256"
# scrypt keys its first step, PBKDF2-HMAC-SHA256, with the password, and HMAC zero-pads short
# keys and hashes long ones: raw scrypt treats "pw" and "pw\x00", or a long password and its
# SHA-256, as the same password. scrypt therefore gets SHA-256(domain || password): always 32
# bytes, distinct for distinct passwords.
_PREHASH_DOMAIN = b"immucore password v1\x00"

_scrypt = hashlib.scrypt              # module-level so tests can count the hashes done


# --- errors (immudb's texts) ---------------------------------------------------------------

class AuthError(ImmucoreError):
    """Base of the errors below; ``str(error)`` is the text sent to clients."""

    default_message = "authentication error"

    def __init__(self, message: Optional[str] = None):
        super().__init__(message or self.default_message)


class InvalidCredentialsError(AuthError):
    """Unknown user or wrong password: one text and one cost for both."""

    default_message = "invalid user name or password"


class UserNotActiveError(AuthError):
    default_message = "user is not active"


class UserAlreadyExistsError(AuthError):
    default_message = "user already exists"


class UserNotFoundError(AuthError):
    default_message = "user not found"


class PermissionDeniedError(AuthError):
    default_message = "permission denied"


class NoDatabasePermissionError(PermissionDeniedError):
    default_message = "Logged in user does not have permission on this database"


class OldPasswordIncorrectError(PermissionDeniedError):
    default_message = "old password is incorrect"


class UnknownPermissionError(AuthError, ValueError):
    default_message = "unrecognized permission"


class InvalidUsernameError(AuthError, ValueError):
    default_message = "username can only contain letters, digits and underscores"


class WeakPasswordError(AuthError, ValueError):
    default_message = PASSWORD_REQUIREMENTS


class SessionNotFoundError(AuthError):
    # immudb's text: its replicator matches "no session found" to decide to log in again.
    default_message = "no session found"


class MaxSessionsReachedError(AuthError):
    default_message = "max sessions reached"


class UserChangedError(AuthError):
    """The user was changed (password, permissions, status) while logging in."""

    default_message = "user changed while logging in: please log in again"


# --- permission names ----------------------------------------------------------------------

def parse_permission(permission: Union[str, int]) -> int:
    """``read``/``readwrite``/``admin``/``sysadmin`` (any case) or a known value -> the value."""
    if isinstance(permission, int) and not isinstance(permission, bool):
        if permission in _NAME_BY_PERMISSION and permission != PERMISSION_NONE:
            return permission
        raise UnknownPermissionError()
    value = _PERMISSION_BY_NAME.get(permission.lower()) if isinstance(permission, str) else None
    if value is None:
        raise UnknownPermissionError(
            f"Permission {permission} not recognized: allowed permissions are "
            "read, readwrite, admin, sysadmin")
    return value


def permission_name(permission: int) -> str:
    """The CLI name of a permission value (``none`` for 0)."""
    try:
        return _NAME_BY_PERMISSION[permission]
    except (KeyError, TypeError):
        raise UnknownPermissionError() from None


# --- users ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class User:
    """A snapshot of one version of a user record (never holds the password hash)."""

    username: str
    active: bool
    sysadmin: bool
    permissions: Dict[str, int]          # database -> permission value
    created_by: str
    created_at: float                    # seconds since the epoch
    revision: int = 0                    # version of the record in systemdb (1 = first)

    def permission_on(self, database: str) -> int:
        if self.sysadmin:
            return PERMISSION_SYSADMIN
        return self.permissions.get(database, PERMISSION_NONE)

    def can(self, database: str, action: str) -> bool:
        """May this user do ``action`` (``read``, ``write`` or ``admin``) on ``database``?

        ``admin`` covers ExportTx, ReplicateTx, database settings and user management.
        systemdb is closed to everyone but the sysadmin, who may read it and export/replicate
        it (server-level replication) but never write it directly: its records change only
        through this module and the node's settings code.
        """
        try:
            needed = _ACTION_PERMISSION_MIN[action]
        except KeyError:
            raise IllegalArgumentsError(f"unknown action {action!r}") from None
        if not self.active:
            return False
        if database == SYSTEMDB_NAME:
            return self.sysadmin and action != "write"
        return self.permission_on(database) >= needed

    def is_admin_somewhere(self) -> bool:
        return self.sysadmin or any(p >= PERMISSION_ADMIN for p in self.permissions.values())


Listener = Callable[[User], None]


class UserStore:
    """Users kept in ``systemdb``; every change is one transaction writing the whole record.

    ``scrypt_n`` sets the cost of new hashes (tests lower it); a record keeps the parameters it
    was hashed with. Changes are serialized by a lock (read, modify, write); logins only read.
    """

    def __init__(self, systemdb: Database, *, scrypt_n: int = SCRYPT_N_DEFAULT,
                 clock: Callable[[], float] = time.time):
        _check_scrypt_params(scrypt_n, SCRYPT_R, SCRYPT_P, SCRYPT_DKLEN_BYTES)
        self.db = systemdb
        self._scrypt_n = scrypt_n
        self._clock = clock
        self._lock = threading.RLock()
        self._listeners: List[Listener] = []
        # Compared against when the user does not exist, so that case costs one hash too.
        self._dummy_hash = _hash_password(secrets.token_bytes(16), scrypt_n)
        self._default_password_cache: Tuple[int, bool] = (-1, False)
        # stored hash (hex) -> is its password well-known: filled for free when a password is
        # set here, by hashing the well-known ones otherwise (records written before, or
        # replicated); rebuilt from the current records only, so it never outgrows the users
        self._well_known_by_hash: Dict[str, bool] = {}
        # (systemdb tx id when computed, the active users holding a well-known password)
        self._well_known_users: Tuple[int, Tuple[str, ...]] = (-1, ())

    # --- reads ----------------------------------------------------------------------------

    def get_user(self, username: str) -> User:
        loaded = self._load(_username_or_error(username))
        if loaded is None:
            raise UserNotFoundError(f"user {username} not found")
        return loaded[0]

    def list_users(self) -> List[User]:
        """Every user (deactivated ones included), by username."""
        users: List[User] = []
        seek = b""
        while True:
            entries = self.db.scan(prefix=USER_KEY_PREFIX, seek_key=seek)
            for entry in entries:
                users.append(_decode_record(entry.value, entry.key[1:].decode("ascii", "replace"),
                                            entry.revision)[0])
            if len(entries) < SCAN_RESULTS_MAX:
                return users
            seek = entries[-1].key + b"\x00"      # seek is inclusive: start just after

    def authenticate(self, username: Union[str, bytes], password: Union[str, bytes]) -> User:
        """The user if the password is theirs, else ``InvalidCredentialsError``.

        Unknown users, malformed names and oversized passwords cost one hash like a real
        check and get the same error, so neither the text nor the time tells which it was.
        A correct password of a deactivated user gets ``UserNotActiveError``.
        """
        secret = _password_bytes_or_none(password)
        name = _username_or_none(username)
        loaded = self._load(name) if name is not None else None
        stored = loaded[1] if loaded is not None else self._dummy_hash
        candidate = (secret or b"")[:PASSWORD_SIZE_BYTES_MAX]
        matches = _verify_password(candidate, stored)
        if (loaded is None or not matches or secret is None
                or len(secret) > PASSWORD_SIZE_BYTES_MAX):
            raise InvalidCredentialsError()
        user = loaded[0]
        if not user.active:
            raise UserNotActiveError()
        return user

    # --- changes --------------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(new_user)`` after every committed change (e.g. to close sessions)."""
        with self._lock:
            self._listeners.append(listener)

    def create_user(self, username: str, password: Union[str, bytes],
                    permission: Union[str, int], database: str, created_by: Union[User, str], *,
                    check_strength: bool = True) -> User:
        """A new active user with ``permission`` on ``database``.

        ``sysadmin`` is only for the built-in ``immudb`` (its database is ``*``).
        ``check_strength=False`` skips immudb's password rule (the initial admin password).
        """
        name = _username_or_error(username)
        value = parse_permission(permission)
        if value == PERMISSION_SYSADMIN:
            if name != SYSADMIN_USERNAME:
                raise PermissionDeniedError("can not create another system admin")
            database = SYSADMIN_DATABASE
        elif name == SYSADMIN_USERNAME:
            raise PermissionDeniedError(f"{SYSADMIN_USERNAME} is reserved for the sysadmin")
        else:
            _check_grant_target(value, database)
        creator = created_by
        created_by = _actor_name(created_by)
        secret = _new_password(password, check_strength)
        hashed = self._hash_noted(secret)
        now = self._clock()
        with self._lock:
            if isinstance(creator, User):
                # the creator's current record, as every other user change reads it: one
                # deactivated or stripped of admin while the password was hashed creates nothing
                actor = self._actor(creator)
                if not (actor.sysadmin or actor.can(database, "admin")):
                    raise PermissionDeniedError()
            if self._load(name) is not None:
                raise UserAlreadyExistsError()
            record = {"username": name, "active": True,
                      "permissions": [{"database": database, "permission": value}],
                      "password": hashed, "createdBy": created_by, "createdAt": now,
                      "updatedBy": created_by, "updatedAt": now}
            return self._save(name, record)

    def change_password(self, username: str, old_password: Union[str, bytes, None],
                        new_password: Union[str, bytes], by_user: Union[User, str], *,
                        check_strength: bool = True) -> User:
        """Set a new password.

        Users change their own password only with the old one (the sysadmin too). The sysadmin
        changes anyone else's without it; an admin (immudb's rule) those of the users it
        created. Everyone else gets ``PermissionDeniedError``.
        """
        name = _username_or_error(username)
        secret = _new_password(new_password, check_strength)
        hashed = self._hash_noted(secret)
        with self._lock:
            actor = self._actor(by_user)
            record, target = self._record_or_error(name)
            if actor.username == name:
                old = _password_bytes_or_none(old_password)
                if old is None or len(old) > PASSWORD_SIZE_BYTES_MAX \
                        or not _verify_password(old, record["password"]):
                    raise OldPasswordIncorrectError()
            elif not actor.sysadmin and not (actor.is_admin_somewhere()
                                             and target.created_by == actor.username):
                raise PermissionDeniedError()
            record["password"] = hashed
            return self._save(name, self._touched(record, actor.username))

    def grant(self, username: str, permission: Union[str, int], database: str, *,
              by_user: Union[User, str, None] = None) -> User:
        """Give ``username`` ``permission`` on ``database`` (replacing what it had there).

        With ``by_user`` immudb's caller rules apply: not on yourself, and only as sysadmin or
        as an admin of that database. Without it the caller has checked already.
        """
        value = parse_permission(permission)
        _check_grant_target(value, database)
        with self._lock:
            record, target = self._record_for_permission_change(username, database, by_user)
            if target.permissions.get(database) == value:
                return target
            record["permissions"] = _permission_list(target.permissions | {database: value})
            return self._save(target.username, self._touched(record, _actor_name(by_user)))

    def revoke(self, username: str, permission: Union[str, int], database: str, *,
               by_user: Union[User, str, None] = None) -> User:
        """Remove what ``username`` holds on ``database`` (as immudb: whatever its level)."""
        parse_permission(permission)
        _check_database_name(database)
        with self._lock:
            record, target = self._record_for_permission_change(username, database, by_user)
            if database not in target.permissions:
                return target
            remaining = {db: p for db, p in target.permissions.items() if db != database}
            record["permissions"] = _permission_list(remaining)
            return self._save(target.username, self._touched(record, _actor_name(by_user)))

    def set_active(self, username: str, active: bool, *,
                   by_user: Union[User, str, None] = None) -> User:
        """Activate or deactivate a user (immudb's "delete" is a deactivation).

        The sysadmin can not be deactivated. With ``by_user``: not yourself, and only as
        sysadmin or as an admin who created that user.
        """
        name = _username_or_error(username)
        with self._lock:
            record, target = self._record_or_error(name)
            if target.sysadmin and not active:
                raise PermissionDeniedError("changing sysadmin status is not allowed")
            if by_user is not None:
                actor = self._actor(by_user)
                if actor.username == name:
                    raise PermissionDeniedError("changing your own status is not allowed")
                if not actor.sysadmin and not (actor.is_admin_somewhere()
                                               and target.created_by == actor.username):
                    raise PermissionDeniedError()
            if target.active == bool(active):
                return target
            record["active"] = bool(active)
            return self._save(name, self._touched(record, _actor_name(by_user)))

    def reset_password(self, username: str, new_password: Union[str, bytes], *,
                       check_strength: bool = True) -> User:
        """Operator reset (immudb's ``--force-admin-password``): no old password, no caller."""
        name = _username_or_error(username)
        hashed = self._hash_noted(_new_password(new_password, check_strength))
        with self._lock:
            record, _ = self._record_or_error(name)
            record["password"] = hashed
            return self._save(name, self._touched(record, ""))

    # --- well-known passwords -------------------------------------------------------------

    def users_with_well_known_password(self) -> Tuple[str, ...]:
        """The active users whose password is one of WELL_KNOWN_PASSWORDS, by name.

        Computed again only after systemdb changed; a password set on this node costs nothing,
        any other record (older, or replicated from a primary) two hashes once.
        """
        tx_id = self.db.current_state().tx_id
        computed_at, names = self._well_known_users
        if computed_at == tx_id:
            return names
        known, found = {}, []
        for user in self.list_users():
            loaded = self._load(user.username)
            if loaded is None:
                continue
            stored = loaded[1]
            well_known = self._well_known_by_hash.get(stored["hash"])
            if well_known is None:
                well_known = any(_verify_password(p.encode(), stored)
                                 for p in WELL_KNOWN_PASSWORDS)
            known[stored["hash"]] = well_known
            if well_known and loaded[0].active:
                found.append(user.username)
        with self._lock:
            # a hash noted meanwhile and not stored yet is dropped: hashed again if it comes
            self._well_known_by_hash = known
            self._well_known_users = (tx_id, tuple(found))
        return tuple(found)

    def well_known_users_judged(self) -> Tuple[Tuple[str, ...], bool]:
        """``(names, complete)`` without hashing anything, for the event loop: the active users
        known to hold a well-known password, plus — failing closed — every active user whose
        record this process has not judged yet (``complete`` False then: a thread should run
        ``users_with_well_known_password`` to judge them)."""
        tx_id = self.db.current_state().tx_id
        computed_at, names = self._well_known_users
        if computed_at == tx_id:
            return names, True
        found, complete = [], True
        for user in self.list_users():
            loaded = self._load(user.username)
            if loaded is None:
                continue
            well_known = self._well_known_by_hash.get(loaded[1]["hash"])
            if well_known is None:
                complete, well_known = False, True
            if well_known and loaded[0].active:
                found.append(user.username)
        if complete:
            with self._lock:
                self._well_known_users = (tx_id, tuple(found))
        return tuple(found), complete

    def _hash_noted(self, secret: bytes) -> dict:
        """A new hash of ``secret``, remembering whether it is a well-known password."""
        hashed = _hash_password(secret, self._scrypt_n)
        with self._lock:
            self._well_known_by_hash[hashed["hash"]] = is_well_known_password(secret)
        return hashed

    # --- internals ------------------------------------------------------------------------

    def _load(self, name: str) -> Optional[Tuple[User, dict, dict]]:
        """(user, stored hash, whole record) of the latest version, or None."""
        try:
            entry = self.db.get(USER_KEY_PREFIX + name.encode("ascii"))
        except KeyNotFoundError:
            return None
        return _decode_record(entry.value, name, entry.revision)

    def _record_or_error(self, name: str) -> Tuple[dict, User]:
        loaded = self._load(name)
        if loaded is None:
            raise UserNotFoundError(f"user {name} not found")
        return loaded[2], loaded[0]

    def _actor(self, by_user: Union[User, str]) -> User:
        """The caller's current record: a stale snapshot never grants anything."""
        loaded = self._load(_username_or_error(_actor_name(by_user)))
        if loaded is None:
            raise PermissionDeniedError()
        if not loaded[0].active:
            raise UserNotActiveError()
        return loaded[0]

    def _record_for_permission_change(self, username, database, by_user) -> Tuple[dict, User]:
        name = _username_or_error(username)
        actor = self._actor(by_user) if by_user is not None else None
        record, target = self._record_or_error(name)
        if actor is not None and actor.username == name:
            raise PermissionDeniedError("changing your own permissions is not allowed")
        if target.sysadmin:
            raise PermissionDeniedError("changing sysadmin permissions is not allowed")
        if not target.active:
            raise UserNotActiveError(f"user {name} is not active")
        if actor is not None and not actor.sysadmin \
                and actor.permission_on(database) < PERMISSION_ADMIN:
            raise PermissionDeniedError("you do not have permission on this database")
        return record, target

    def _touched(self, record: dict, by: str) -> dict:
        record["updatedBy"] = by
        record["updatedAt"] = self._clock()
        return record

    def _save(self, name: str, record: dict) -> User:
        """Write the record as one tx, read it back, tell the listeners. Caller holds the lock."""
        key = USER_KEY_PREFIX + name.encode("ascii")
        encoded = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
        header = self.db.set({key: encoded})
        entry = self.db.get(key, since_tx=header.id)
        if entry.tx != header.id or entry.value != encoded:
            raise CorruptedDataError(f"user record of {name} did not read back as written")
        user = _decode_record(entry.value, name, entry.revision)[0]
        for listener in self._listeners:
            listener(user)
        return user


def ensure_sysadmin(store: UserStore, password: Union[str, bytes] = SYSADMIN_DEFAULT_PASSWORD,
                    *, force: bool = False) -> Optional[User]:
    """Create ``immudb`` (sysadmin) with ``password`` on first start; later starts keep the
    stored password unless ``force`` (immudb's ``--force-admin-password``).

    The initial password is not held to the strength rule (immudb does the same). A replica
    systemdb receives ``immudb`` from its primary: nothing is written and None is returned
    until it has arrived.
    """
    try:
        user = store.get_user(SYSADMIN_USERNAME)
    except UserNotFoundError:
        if store.db.is_replica:
            return None
        return store.create_user(SYSADMIN_USERNAME, password, PERMISSION_SYSADMIN,
                                 SYSADMIN_DATABASE, "", check_strength=False)
    if force and not store.db.is_replica:
        return store.reset_password(SYSADMIN_USERNAME, password, check_strength=False)
    return user


def is_well_known_password(password: Union[str, bytes]) -> bool:
    """Is ``password`` one of WELL_KNOWN_PASSWORDS (published defaults anyone may try)?"""
    secret = _password_bytes_or_none(password)
    return secret is not None and any(hmac.compare_digest(secret, p.encode())
                                      for p in WELL_KNOWN_PASSWORDS)


def using_default_password(store: UserStore) -> bool:
    """Does ``immudb`` still have the password ``immudb``? (False if it does not exist.)

    Costs one index read; the hash is checked once per version of the record.
    """
    loaded = store._load(SYSADMIN_USERNAME)
    if loaded is None:
        return False
    user, stored, _ = loaded
    revision, answer = store._default_password_cache
    if revision != user.revision:
        answer = _verify_password(SYSADMIN_DEFAULT_PASSWORD.encode(), stored)
        store._default_password_cache = (user.revision, answer)
    return answer


# --- sessions ------------------------------------------------------------------------------

@dataclass
class Session:
    id: str
    username: str
    database: Optional[str]
    created: float                       # the manager's clock (monotonic by default)
    last_seen: float
    user: User = field(repr=False)       # the user as of login; any change of it ends the session


class SessionManager:
    """Live sessions, in memory (a restart ends them all, as in immudb).

    A session ends when closed, after ``inactivity_timeout_seconds`` without use, after
    ``max_age_seconds`` (if set), or when its user changes (``close_user``/``user_changed``).
    ``get`` and friends return copies; every method is safe to call from any thread.
    """

    def __init__(self, max_sessions: int = SESSIONS_MAX_DEFAULT,
                 inactivity_timeout_seconds: float = SESSION_INACTIVITY_SECONDS,
                 max_age_seconds: Optional[float] = None,
                 clock: Callable[[], float] = time.monotonic,
                 per_user_max: Optional[int] = None):
        """``per_user_max``: a user's sessions here; one more ends the user's oldest."""
        if max_sessions < 1:
            raise IllegalArgumentsError("max_sessions must be at least 1")
        if inactivity_timeout_seconds <= 0:
            raise IllegalArgumentsError("inactivity_timeout_seconds must be positive")
        if max_age_seconds is not None and max_age_seconds <= 0:
            raise IllegalArgumentsError("max_age_seconds must be positive")
        self.max_sessions = max_sessions
        self.inactivity_timeout_seconds = inactivity_timeout_seconds
        self.max_age_seconds = max_age_seconds
        self.per_user_max = per_user_max
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: Dict[str, Session] = {}
        # username -> the first record revision still valid (older snapshots may not log in)
        self._revision_floor: Dict[str, int] = {}
        # the managers whose sessions count against max_sessions together (share_limit), and
        # the lock every open() of them takes: only open() adds sessions, so under it the sum
        # can only fall meanwhile
        self._limit_group = [self]
        self._open_lock = threading.Lock()

    def share_limit(self, other: "SessionManager") -> None:
        """Count ``other``'s sessions with these against ``max_sessions`` (the node's
        connection sessions and CLI tokens: ``--max-sessions`` bounds them together)."""
        group = self._limit_group + [m for m in other._limit_group if m not in self._limit_group]
        lock = threading.Lock()
        for manager in group:
            manager._limit_group, manager._open_lock = group, lock

    def open(self, user: User, database: Optional[str] = None) -> Session:
        """A new session for an authenticated ``user``, on ``database`` if given."""
        if not user.active:
            raise UserNotActiveError()
        if database is not None:
            _check_session_database(user, database)
        with self._open_lock:
            for manager in self._limit_group:
                if manager is not self:
                    manager.expire()             # their expired sessions make room too
            return self._open_locked(user, database)

    def _open_locked(self, user: User, database: Optional[str]) -> Session:
        with self._lock:
            if user.revision < self._revision_floor.get(user.username, 0):
                raise UserChangedError()
            now = self._clock()
            self._expire_locked(now)
            if self.per_user_max is not None:
                own = sorted((s.created, sid) for sid, s in self._sessions.items()
                             if s.username == user.username)
                for _, sid in own[:max(0, len(own) - self.per_user_max + 1)]:
                    del self._sessions[sid]          # the user's oldest make room
            if sum(len(m._sessions) for m in self._limit_group) >= self.max_sessions:
                raise MaxSessionsReachedError()
            session = Session(secrets.token_hex(16), user.username, database, now, now, user)
            self._sessions[session.id] = session
            return dataclasses.replace(session)

    def get(self, session_id: str) -> Session:
        """The live session (its last use is now), else ``SessionNotFoundError``."""
        with self._lock:
            session = self._live_locked(session_id, self._clock())
            return dataclasses.replace(session)

    def touch(self, session_id: str) -> tuple:
        """``(database, user)`` of the live session (its last use is now), else
        ``SessionNotFoundError``: what every request checks, without ``get``'s copy."""
        with self._lock:
            session = self._live_locked(session_id, self._clock())
            return session.database, session.user

    def use_database(self, session_id: str, database: str) -> Session:
        with self._lock:
            session = self._live_locked(session_id, self._clock())
            _check_session_database(session.user, database)
            session.database = database
            return dataclasses.replace(session)

    def close(self, session_id: str) -> None:
        with self._lock:
            if not isinstance(session_id, str) or self._sessions.pop(session_id, None) is None:
                raise SessionNotFoundError()

    def close_user(self, username: str, *, revision: Optional[int] = None) -> int:
        """End every session of ``username``; returns how many.

        With ``revision`` (of the user's new record), logins that read an older version and
        have not opened their session yet are refused too.
        """
        with self._lock:
            if revision is not None:
                self._revision_floor[username] = max(revision,
                                                     self._revision_floor.get(username, 0))
            doomed = [sid for sid, s in self._sessions.items() if s.username == username]
            for sid in doomed:
                del self._sessions[sid]
            return len(doomed)

    def user_changed(self, user: User) -> int:
        """A ``UserStore`` listener: the user's sessions end, older snapshots can not log in."""
        return self.close_user(user.username, revision=user.revision)

    def expire(self) -> int:
        """Drop expired sessions; returns how many."""
        with self._lock:
            return self._expire_locked(self._clock())

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def _expired(self, session: Session, now: float) -> bool:
        if now - session.last_seen > self.inactivity_timeout_seconds:
            return True
        return self.max_age_seconds is not None and now - session.created > self.max_age_seconds

    def _expire_locked(self, now: float) -> int:
        doomed = [sid for sid, s in self._sessions.items() if self._expired(s, now)]
        for sid in doomed:
            del self._sessions[sid]
        return len(doomed)

    def _live_locked(self, session_id: str, now: float) -> Session:
        session = self._sessions.get(session_id) if isinstance(session_id, str) else None
        if session is None:
            raise SessionNotFoundError()
        if self._expired(session, now):
            del self._sessions[session_id]
            raise SessionNotFoundError()
        session.last_seen = now
        return session


def _check_session_database(user: User, database: str) -> None:
    if not isinstance(database, str) or user.permission_on(database) == PERMISSION_NONE \
            or (database == SYSTEMDB_NAME and not user.sysadmin):
        raise NoDatabasePermissionError()


# --- validation and hashing ----------------------------------------------------------------

def _username_or_none(username) -> Optional[str]:
    if isinstance(username, (bytes, bytearray, memoryview)):
        try:
            username = bytes(username).decode("ascii")
        except UnicodeDecodeError:
            return None
    if not isinstance(username, str) or len(username) > USERNAME_SIZE_BYTES_MAX \
            or not USERNAME.fullmatch(username):
        return None
    return username


def _username_or_error(username) -> str:
    name = _username_or_none(username)
    if name is not None:
        return name
    if username in ("", b""):
        raise InvalidUsernameError("username can not be empty")
    if isinstance(username, (str, bytes)) and len(username) > USERNAME_SIZE_BYTES_MAX:
        raise InvalidUsernameError(
            f"username can not be longer than {USERNAME_SIZE_BYTES_MAX} characters")
    raise InvalidUsernameError()


def _actor_name(by_user) -> str:
    if by_user is None:
        return ""
    return by_user.username if isinstance(by_user, User) else by_user


def _check_database_name(database) -> None:
    if not isinstance(database, str) or not DATABASE_NAME.fullmatch(database):
        raise IllegalArgumentsError(
            "invalid database name provided: use 1 to 128 lowercase letters, digits or '_'")


def _check_grant_target(value: int, database) -> None:
    if value == PERMISSION_SYSADMIN:
        raise PermissionDeniedError("can not create another system admin")
    if value not in _GRANTABLE:
        raise UnknownPermissionError()
    _check_database_name(database)
    if database == SYSTEMDB_NAME:
        raise PermissionDeniedError()


def _permission_list(permissions: Dict[str, int]) -> list:
    return [{"database": db, "permission": p} for db, p in sorted(permissions.items())]


def _password_bytes_or_none(password) -> Optional[bytes]:
    if isinstance(password, str):
        try:
            return password.encode("utf-8")
        except UnicodeEncodeError:                # lone surrogates
            return None
    if isinstance(password, (bytes, bytearray, memoryview)):
        return bytes(password)
    return None


def _new_password(password, check_strength: bool) -> bytes:
    secret = _password_bytes_or_none(password)
    if secret is None:
        raise WeakPasswordError("password must be text or bytes")
    if check_strength:
        if not is_strong_password(secret):
            raise WeakPasswordError()
    elif not 0 < len(secret) <= PASSWORD_SIZE_BYTES_MAX:
        raise WeakPasswordError(
            f"password must have between 1 and {PASSWORD_SIZE_BYTES_MAX} bytes")
    return secret


def is_strong_password(password: Union[str, bytes]) -> bool:
    """immudb's rule: 8..32 bytes of letters, digits and punctuation/symbols, with at least one
    uppercase letter, one digit and one punctuation/symbol (Unicode categories, as Go's)."""
    secret = _password_bytes_or_none(password)
    if secret is None or not (PASSWORD_STRONG_SIZE_BYTES_MIN <= len(secret)
                              <= PASSWORD_STRONG_SIZE_BYTES_MAX):
        return False
    try:
        text = secret.decode("utf-8")
    except UnicodeDecodeError:
        return False
    upper = digit = special = False
    for ch in text:
        category = unicodedata.category(ch)
        if category == "Lu":
            upper = True
        elif category == "Ll":
            pass
        elif category == "Nd":
            digit = True
        elif category[0] in "PS":
            special = True
        else:
            return False
    return upper and digit and special


def _check_scrypt_params(n, r, p, dklen) -> None:
    if not all(type(x) is int for x in (n, r, p, dklen)):
        raise IllegalArgumentsError("scrypt parameters must be integers")
    if n < 2 or n & (n - 1) or r < 1 or not 1 <= p <= SCRYPT_P_MAX \
            or 128 * r * n > SCRYPT_MEMORY_BYTES_MAX \
            or not SCRYPT_DKLEN_BYTES_MIN <= dklen <= SCRYPT_DKLEN_BYTES_MAX:
        raise IllegalArgumentsError(
            f"scrypt parameters out of bounds (n={n}, r={r}, p={p}, dklen={dklen})")


def _hash_password(secret: bytes, n: int) -> dict:
    salt = secrets.token_bytes(SCRYPT_SALT_SIZE_BYTES)
    digest = _scrypt(_prehash(secret), salt=salt, n=n, r=SCRYPT_R, p=SCRYPT_P,
                     dklen=SCRYPT_DKLEN_BYTES, maxmem=_scrypt_maxmem(n, SCRYPT_R, SCRYPT_P))
    return {"alg": PASSWORD_HASH_ALG, "n": n, "r": SCRYPT_R, "p": SCRYPT_P,
            "dklen": SCRYPT_DKLEN_BYTES, "salt": salt.hex(), "hash": digest.hex()}


def _verify_password(secret: bytes, stored: dict) -> bool:
    """Recompute with the stored parameters; compare the whole digest in constant time."""
    expected = bytes.fromhex(stored["hash"])
    digest = _scrypt(_prehash(secret), salt=bytes.fromhex(stored["salt"]), n=stored["n"],
                     r=stored["r"], p=stored["p"], dklen=stored["dklen"],
                     maxmem=_scrypt_maxmem(stored["n"], stored["r"], stored["p"]))
    return hmac.compare_digest(digest, expected)


def _prehash(secret: bytes) -> bytes:
    return hashlib.sha256(_PREHASH_DOMAIN + secret).digest()


def _scrypt_maxmem(n: int, r: int, p: int) -> int:
    # OpenSSL needs 128*r*(n+2) for V plus 128*r*p for B; a little slack on top.
    return 128 * r * (n + 2 + p) + (1 << 20)


def _decode_record(raw: bytes, name: str, revision: int) -> Tuple[User, dict, dict]:
    """Parse and check one stored record; anything unexpected is corruption, not a user."""
    try:
        record = json.loads(raw)
        stored = record["password"]
        if record["username"] != name or type(record["active"]) is not bool \
                or stored["alg"] != PASSWORD_HASH_ALG:
            raise ValueError("bad fields")
        _check_scrypt_params(stored["n"], stored["r"], stored["p"], stored["dklen"])
        salt, digest = bytes.fromhex(stored["salt"]), bytes.fromhex(stored["hash"])
        if not SCRYPT_SALT_SIZE_BYTES_MIN <= len(salt) <= SCRYPT_SALT_SIZE_BYTES_MAX \
                or len(digest) != stored["dklen"]:
            raise ValueError("bad salt or hash size")
        permissions: Dict[str, int] = {}
        for item in record["permissions"]:
            database, value = item["database"], item["permission"]
            if not isinstance(database, str) or type(value) is not int \
                    or value not in (*_GRANTABLE, PERMISSION_SYSADMIN):
                raise ValueError("bad permission")
            permissions[database] = value
        created_at = record.get("createdAt", 0)
        user = User(username=name, active=record["active"],
                    sysadmin=PERMISSION_SYSADMIN in permissions.values(),
                    permissions=permissions, created_by=str(record.get("createdBy", "")),
                    created_at=float(created_at), revision=revision)
    except (ValueError, KeyError, TypeError, AttributeError, IllegalArgumentsError) as exc:
        raise CorruptedDataError(f"user record of {name} is malformed ({exc})") from None
    return user, stored, record
