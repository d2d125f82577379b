"""Users, permissions and sessions (immucore/server/auth.py) on a real systemdb.

Hashes use scrypt n=16 here (the store's ``scrypt_n``) so a test costs microseconds per login;
``test_default_cost_*`` checks the real default once.
"""
import hashlib
import json
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from immucore.database import open_database
from immucore.errors import CorruptedDataError, IllegalArgumentsError
from immucore.server import auth
from immucore.server.auth import (PERMISSION_ADMIN, PERMISSION_READ, PERMISSION_READWRITE,
                                  PERMISSION_SYSADMIN, InvalidCredentialsError,
                                  InvalidUsernameError, MaxSessionsReachedError,
                                  NoDatabasePermissionError, OldPasswordIncorrectError,
                                  PermissionDeniedError, SessionManager, SessionNotFoundError,
                                  UnknownPermissionError, User, UserAlreadyExistsError,
                                  UserChangedError, UserNotActiveError, UserNotFoundError,
                                  UserStore, WeakPasswordError)

FAST_N = 16
ALICE_PASSWORD = "Alice1Pwd!"
ADMIN_PASSWORD = "Admin1Pwd!"


def open_systemdb(path):
    return open_database(str(path / "systemdb"), name="systemdb")


@pytest.fixture
def systemdb(tmp_path):
    database = open_systemdb(tmp_path)
    yield database
    database.close()


@pytest.fixture
def store(systemdb):
    users = UserStore(systemdb, scrypt_n=FAST_N)
    auth.ensure_sysadmin(users, "immudb")
    return users


@pytest.fixture(scope="module")
def login_store(tmp_path_factory):
    """A store with alice, for the property tests (hypothesis runs many examples on it)."""
    database = open_systemdb(tmp_path_factory.mktemp("login"))
    users = UserStore(database, scrypt_n=FAST_N)
    auth.ensure_sysadmin(users)
    users.create_user("alice", ALICE_PASSWORD, "readwrite", "defaultdb", "immudb")
    yield users
    database.close()


def sysadmin(store):
    return store.get_user("immudb")


class FakeClock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


# --- permission names ----------------------------------------------------------------------

def test_permission_values_and_names_are_immudbs():
    assert (auth.PERMISSION_NONE, PERMISSION_READ, PERMISSION_READWRITE, PERMISSION_ADMIN,
            PERMISSION_SYSADMIN) == (0, 1, 2, 254, 255)
    for name in ("read", "readwrite", "admin", "sysadmin"):
        assert auth.permission_name(auth.parse_permission(name)) == name
    assert auth.parse_permission("READWRITE") == PERMISSION_READWRITE
    assert auth.parse_permission(PERMISSION_ADMIN) == PERMISSION_ADMIN


def test_unknown_permission_name_gets_immudbs_message():
    with pytest.raises(UnknownPermissionError) as info:
        auth.parse_permission("write")
    assert str(info.value) == ("Permission write not recognized: allowed permissions are "
                               "read, readwrite, admin, sysadmin")
    for value in (0, 3, 253, 256, True):
        with pytest.raises(UnknownPermissionError):
            auth.parse_permission(value)


# --- authentication ------------------------------------------------------------------------

def test_right_password_authenticates(login_store):
    user = login_store.authenticate("alice", ALICE_PASSWORD)
    assert user.username == "alice" and user.active and not user.sysadmin
    assert login_store.authenticate(b"alice", ALICE_PASSWORD.encode()).username == "alice"


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(password=st.one_of(st.binary(max_size=64), st.text(max_size=40)))
def test_wrong_password_never_authenticates(login_store, password):
    if password in (ALICE_PASSWORD, ALICE_PASSWORD.encode()):
        return
    with pytest.raises(InvalidCredentialsError) as info:
        login_store.authenticate("alice", password)
    assert str(info.value) == "invalid user name or password"


@pytest.mark.parametrize("password", [
    ALICE_PASSWORD[:-1], ALICE_PASSWORD[1:], ALICE_PASSWORD + "x", "x" + ALICE_PASSWORD,
    ALICE_PASSWORD[:-1] + chr(ord(ALICE_PASSWORD[-1]) ^ 1), ALICE_PASSWORD.lower(), "", " ",
    ALICE_PASSWORD + "\x00", ALICE_PASSWORD * 200,
])
def test_near_misses_never_authenticate(login_store, password):
    with pytest.raises(InvalidCredentialsError):
        login_store.authenticate("alice", password)


def test_password_differing_in_last_byte_only(login_store):
    right = ALICE_PASSWORD.encode()
    for flip in (1, 0x80, 0xFF):
        with pytest.raises(InvalidCredentialsError):
            login_store.authenticate("alice", right[:-1] + bytes([right[-1] ^ flip]))


def test_hmac_key_padding_does_not_make_passwords_equivalent(store):
    """Raw scrypt (PBKDF2-HMAC inside) takes "pw" == "pw\\x00" and a long pw == SHA-256(pw)."""
    raw = dict(salt=b"s" * 16, n=FAST_N, r=8, p=1, dklen=32)
    assert hashlib.scrypt(b"Pw1!", **raw) == hashlib.scrypt(b"Pw1!\x00", **raw)
    long_password = b"L0ng!" * 20
    assert hashlib.scrypt(long_password, **raw) == \
        hashlib.scrypt(hashlib.sha256(long_password).digest(), **raw)
    store.create_user("long", long_password, "read", "defaultdb", "immudb", check_strength=False)
    assert store.authenticate("long", long_password).username == "long"
    for other in (hashlib.sha256(long_password).digest(), long_password + b"\x00",
                  long_password[:64], long_password[:-1]):
        with pytest.raises(InvalidCredentialsError):
            store.authenticate("long", other)


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(suffix=st.binary(min_size=1, max_size=80))
def test_right_password_plus_anything_never_authenticates(login_store, suffix):
    with pytest.raises(InvalidCredentialsError):
        login_store.authenticate("alice", ALICE_PASSWORD.encode() + suffix)


@pytest.mark.parametrize("username", ["bob", "Alice", "alice ", "", "a" * 64, "al!ce",
                                      b"\xff\xfe", None, 12])
def test_unknown_user_same_text_and_same_cost(login_store, monkeypatch, username):
    calls = []
    real = auth._scrypt
    monkeypatch.setattr(auth, "_scrypt", lambda *a, **k: calls.append(k["n"]) or real(*a, **k))
    with pytest.raises(InvalidCredentialsError) as unknown:
        login_store.authenticate(username, ALICE_PASSWORD)
    unknown_calls = list(calls)
    calls.clear()
    with pytest.raises(InvalidCredentialsError) as wrong:
        login_store.authenticate("alice", "Wrong1Pwd!")
    assert str(unknown.value) == str(wrong.value) == "invalid user name or password"
    assert unknown_calls == calls == [FAST_N]      # one hash, at the same cost, either way


def test_inactive_user_is_refused(store):
    store.create_user("bob", "Bob1Pwd!x", "read", "defaultdb", "immudb")
    store.set_active("bob", False)
    with pytest.raises(UserNotActiveError) as info:
        store.authenticate("bob", "Bob1Pwd!x")
    assert str(info.value) == "user is not active"
    # a wrong password does not reveal that the account exists but is inactive
    with pytest.raises(InvalidCredentialsError):
        store.authenticate("bob", "Bob1Pwd!y")
    store.set_active("bob", True)
    assert store.authenticate("bob", "Bob1Pwd!x").active


# --- username and password rules -----------------------------------------------------------

@pytest.mark.parametrize("username", ["", "a b", "al-ice", "bob!", "é", "a" * 64, "x\n", "\nx"])
def test_bad_usernames_are_refused(store, username):
    with pytest.raises(InvalidUsernameError):
        store.create_user(username, "Good1Pwd!", "read", "defaultdb", "immudb")


def test_good_usernames(store):
    for name in ("a", "Bob_2", "_", "a" * 63):
        assert store.create_user(name, "Good1Pwd!", "read", "defaultdb", "immudb").username == name


@pytest.mark.parametrize("password", [
    "Short1!", "alllower1!", "NoDigits!!", "NoSymbol11", "Has Space1!", "A1!" + "a" * 30,
    "Tab\t1Pwd!", b"Bad1Pwd!\xff", "Ünïcodé1",
])
def test_weak_passwords_are_refused(store, password):
    with pytest.raises(WeakPasswordError) as info:
        store.create_user("bob", password, "read", "defaultdb", "immudb")
    assert "at least 1 uppercase letter, 1 digit and 1 special character" in str(info.value)


@pytest.mark.parametrize("password", ["Good1Pwd!", "A1!aaaaa", "A1!" + "a" * 29, "Pässwörd1€",
                                      "ALLUPPER1$", "replicator1Pwd!"])
def test_strong_passwords_are_accepted(store, password):
    assert auth.is_strong_password(password)
    store.create_user("bob", password, "read", "defaultdb", "immudb")
    assert store.authenticate("bob", password).username == "bob"


def test_strength_check_can_be_skipped_but_length_is_capped(store):
    store.create_user("weak", "weak", "read", "defaultdb", "immudb", check_strength=False)
    assert store.authenticate("weak", "weak").username == "weak"
    with pytest.raises(WeakPasswordError):
        store.create_user("huge", "x" * 1025, "read", "defaultdb", "immudb", check_strength=False)
    with pytest.raises(WeakPasswordError):
        store.create_user("empty", "", "read", "defaultdb", "immudb", check_strength=False)


def test_create_user_rules(store):
    store.create_user("bob", "Good1Pwd!", "read", "defaultdb", "immudb")
    with pytest.raises(UserAlreadyExistsError) as info:
        store.create_user("bob", "Good1Pwd!", "admin", "defaultdb", "immudb")
    assert str(info.value) == "user already exists"
    with pytest.raises(PermissionDeniedError):
        store.create_user("root", "Good1Pwd!", "sysadmin", "defaultdb", "immudb")
    with pytest.raises(PermissionDeniedError):
        store.create_user("spy", "Good1Pwd!", "read", "systemdb", "immudb")
    with pytest.raises(IllegalArgumentsError):
        store.create_user("bob2", "Good1Pwd!", "read", "../etc", "immudb")
    with pytest.raises(UnknownPermissionError):
        store.create_user("bob3", "Good1Pwd!", "write", "defaultdb", "immudb")


def test_a_creator_changed_since_its_snapshot_creates_nobody(store):
    """USER_CREATE carries the creator as of its session; the store reads the creator's current
    record under its lock (as every other user change does), so a creator stripped of admin or
    deactivated meanwhile creates nobody."""
    store.create_user("dba", "Good1Pwd!", "admin", "defaultdb", sysadmin(store))
    stale = store.get_user("dba")
    store.create_user("first", "Good1Pwd!", "read", "defaultdb", stale)      # still allowed
    store.revoke("dba", "admin", "defaultdb", by_user=sysadmin(store))
    with pytest.raises(PermissionDeniedError):
        store.create_user("second", "Good1Pwd!", "read", "defaultdb", stale)
    store.grant("dba", "admin", "defaultdb", by_user=sysadmin(store))
    store.set_active("dba", False, by_user=sysadmin(store))
    with pytest.raises(UserNotActiveError):
        store.create_user("third", "Good1Pwd!", "read", "defaultdb", stale)
    assert {u.username for u in store.list_users()} == {"immudb", "dba", "first"}


def test_protected_modes_loop_side_judges_without_hashing_and_fails_closed(tmp_path,
                                                                          monkeypatch):
    """After a restart no stored hash has been judged yet: the event loop's check
    (``well_known_users_judged``) hashes nothing and counts every unjudged active user as
    exposed, until a thread's ``users_with_well_known_password`` has judged them."""
    database = open_systemdb(tmp_path)
    users = UserStore(database, scrypt_n=FAST_N)
    auth.ensure_sysadmin(users, "immudb")
    users.create_user("follower", "zyQQurat.0", "admin", "defaultdb", "immudb",
                      check_strength=False)
    users.create_user("alice", "Good1Pwd!", "read", "defaultdb", "immudb")
    exposed, judged = users.well_known_users_judged()      # set here: judged as they were set
    assert judged and set(exposed) == {"follower", "immudb"}
    restarted = UserStore(database, scrypt_n=FAST_N)             # nothing judged in memory

    def no_hashing(*args):
        raise AssertionError("hashed on the event loop's path")
    with monkeypatch.context() as patched:
        patched.setattr(auth, "_verify_password", no_hashing)
        exposed, judged = restarted.well_known_users_judged()
    assert not judged and set(exposed) == {"immudb", "follower", "alice"}
    assert set(restarted.users_with_well_known_password()) == {"immudb", "follower"}
    exposed, judged = restarted.well_known_users_judged()
    assert judged and set(exposed) == {"immudb", "follower"}
    database.close()


# --- the sysadmin --------------------------------------------------------------------------

def test_ensure_sysadmin_creates_once(store):
    admin = sysadmin(store)
    assert admin.sysadmin and admin.permissions == {"*": PERMISSION_SYSADMIN}
    assert auth.using_default_password(store)
    # a later start with another password keeps the stored one
    assert auth.ensure_sysadmin(store, "Other1Pwd!").revision == admin.revision
    assert store.authenticate("immudb", "immudb").sysadmin
    auth.ensure_sysadmin(store, "Forced1Pwd!", force=True)
    assert not auth.using_default_password(store)
    assert store.authenticate("immudb", "Forced1Pwd!").sysadmin


def test_initial_admin_password_is_not_strength_checked(systemdb):
    store = UserStore(systemdb, scrypt_n=FAST_N)
    auth.ensure_sysadmin(store, "weak")
    assert store.authenticate("immudb", "weak").sysadmin
    assert not auth.using_default_password(store)


def test_sysadmin_can_not_be_deactivated_or_demoted(store):
    with pytest.raises(PermissionDeniedError):
        store.set_active("immudb", False)
    with pytest.raises(PermissionDeniedError):
        store.grant("immudb", "read", "defaultdb")
    with pytest.raises(PermissionDeniedError):
        store.create_user("immudb", "Good1Pwd!", "read", "defaultdb", "immudb")


def test_default_cost_hash_parameters(tmp_path):
    """The real cost, once: scrypt n=2**14, r=8, p=1, 32-byte digest, stored with the hash."""
    database = open_systemdb(tmp_path)
    try:
        store = UserStore(database)
        auth.ensure_sysadmin(store)
        assert auth.using_default_password(store)
        record = json.loads(database.get(b"\x01immudb").value)
        stored = record["password"]
        assert (stored["alg"], stored["n"], stored["r"], stored["p"], stored["dklen"]) == \
            ("scrypt-sha256", 1 << 14, 8, 1, 32)
        assert len(bytes.fromhex(stored["salt"])) == 16 and len(stored["hash"]) == 64
        assert "immudb" not in json.dumps(stored)
        store.change_password("immudb", "immudb", "New1Pwd!x", "immudb")
        assert not auth.using_default_password(store)
        # a store with another cost still checks records hashed at the old one
        cheaper = UserStore(database, scrypt_n=FAST_N)
        assert cheaper.authenticate("immudb", "New1Pwd!x").sysadmin
    finally:
        database.close()


def test_salts_differ_per_user(store):
    store.create_user("a1", "Same1Pwd!", "read", "defaultdb", "immudb")
    store.create_user("a2", "Same1Pwd!", "read", "defaultdb", "immudb")
    one, two = (json.loads(store.db.get(b"\x01" + n).value)["password"] for n in (b"a1", b"a2"))
    assert one["salt"] != two["salt"] and one["hash"] != two["hash"]


# --- password changes ----------------------------------------------------------------------

def test_own_password_change_needs_the_old_one(store):
    store.create_user("alice", ALICE_PASSWORD, "read", "defaultdb", "immudb")
    with pytest.raises(OldPasswordIncorrectError) as info:
        store.change_password("alice", "Wrong1Pwd!", "Next1Pwd!", "alice")
    assert str(info.value) == "old password is incorrect"
    with pytest.raises(OldPasswordIncorrectError):
        store.change_password("alice", None, "Next1Pwd!", "alice")
    store.change_password("alice", ALICE_PASSWORD, "Next1Pwd!", store.get_user("alice"))
    assert store.authenticate("alice", "Next1Pwd!").username == "alice"
    with pytest.raises(InvalidCredentialsError):
        store.authenticate("alice", ALICE_PASSWORD)
    with pytest.raises(WeakPasswordError):
        store.change_password("alice", "Next1Pwd!", "weak", "alice")


def test_sysadmin_changes_others_without_old_password(store):
    store.create_user("alice", ALICE_PASSWORD, "read", "defaultdb", "immudb")
    store.change_password("alice", None, "Reset1Pwd!", sysadmin(store))
    assert store.authenticate("alice", "Reset1Pwd!")
    with pytest.raises(OldPasswordIncorrectError):     # its own needs the old one, too
        store.change_password("immudb", None, "Admin2Pwd!", "immudb")


def test_others_can_not_change_a_password(store):
    store.create_user("alice", ALICE_PASSWORD, "readwrite", "defaultdb", "immudb")
    store.create_user("bob", "Bob1Pwd!x", "admin", "defaultdb", "immudb")
    with pytest.raises(PermissionDeniedError):
        store.change_password("bob", "Bob1Pwd!x", "Evil1Pwd!", "alice")
    with pytest.raises(PermissionDeniedError):           # an admin, but not alice's creator
        store.change_password("alice", None, "Evil1Pwd!", "bob")
    with pytest.raises(PermissionDeniedError):
        store.change_password("immudb", "immudb", "Evil1Pwd!", "bob")
    # immudb's rule: an admin may reset the users it created
    store.create_user("carol", "Carol1Pwd!", "read", "defaultdb", "bob")
    store.change_password("carol", None, "Carol2Pwd!", "bob")
    assert store.authenticate("carol", "Carol2Pwd!")
    # a stale snapshot grants nothing: the actor is re-read
    bob = store.get_user("bob")
    store.revoke("bob", "admin", "defaultdb")
    with pytest.raises(PermissionDeniedError):
        store.change_password("carol", None, "Carol3Pwd!", bob)


def test_password_change_kills_sessions(store):
    sessions = SessionManager(10)
    store.add_listener(sessions.user_changed)
    store.create_user("alice", ALICE_PASSWORD, "readwrite", "defaultdb", "immudb")
    alice = store.authenticate("alice", ALICE_PASSWORD)
    first = sessions.open(alice, "defaultdb")
    second = sessions.open(alice, "defaultdb")
    other = sessions.open(store.authenticate("immudb", "immudb"), "defaultdb")
    store.change_password("alice", ALICE_PASSWORD, "Next1Pwd!", "alice")
    for dead in (first, second):
        with pytest.raises(SessionNotFoundError) as info:
            sessions.get(dead.id)
        assert str(info.value) == "no session found"
    assert sessions.get(other.id).username == "immudb"
    # a login that read the old record before the change can not open a session after it
    with pytest.raises(UserChangedError):
        sessions.open(alice, "defaultdb")
    assert sessions.open(store.authenticate("alice", "Next1Pwd!"), "defaultdb")


@pytest.mark.parametrize("change", [
    lambda s: s.set_active("alice", False),
    lambda s: s.grant("alice", "admin", "defaultdb"),
    lambda s: s.revoke("alice", "readwrite", "defaultdb"),
    lambda s: s.change_password("alice", None, "Reset1Pwd!", "immudb"),
])
def test_every_user_change_kills_sessions(store, change):
    sessions = SessionManager(10)
    store.add_listener(sessions.user_changed)
    store.create_user("alice", ALICE_PASSWORD, "readwrite", "defaultdb", "immudb")
    session = sessions.open(store.authenticate("alice", ALICE_PASSWORD), "defaultdb")
    change(store)
    with pytest.raises(SessionNotFoundError):
        sessions.get(session.id)
    assert len(sessions) == 0


def test_close_user_by_hand():
    sessions = SessionManager(10)
    alice = make_user("alice", {"db": PERMISSION_READ})
    ids = [sessions.open(alice, "db").id for _ in range(3)]
    bob = sessions.open(make_user("bob", {"db": PERMISSION_READ}), "db")
    assert sessions.close_user("alice") == 3
    for sid in ids:
        with pytest.raises(SessionNotFoundError):
            sessions.get(sid)
    assert sessions.get(bob.id).username == "bob"


# --- grants and the permission matrix ------------------------------------------------------

def make_user(name, permissions, *, sysadmin=False, active=True):
    return User(name, active, sysadmin, permissions, "immudb", 0.0, 1)


MATRIX = {  # permission -> (read, write, admin) on its database
    PERMISSION_READ: (True, False, False),
    PERMISSION_READWRITE: (True, True, False),
    PERMISSION_ADMIN: (True, True, True),
}


@pytest.mark.parametrize("permission", list(MATRIX))
def test_permission_matrix(permission):
    user = make_user("u", {"db1": permission})
    for action, allowed in zip(("read", "write", "admin"), MATRIX[permission]):
        assert user.can("db1", action) is allowed, (permission, action)
        assert user.can("db2", action) is False            # nothing on other databases
        assert user.can("systemdb", action) is False       # systemdb never
    assert user.permission_on("db1") == permission and user.permission_on("db2") == 0


def test_permission_matrix_sysadmin():
    root = make_user("immudb", {"*": PERMISSION_SYSADMIN}, sysadmin=True)
    for database in ("db1", "defaultdb", "anything"):
        assert all(root.can(database, a) for a in ("read", "write", "admin"))
        assert root.permission_on(database) == PERMISSION_SYSADMIN
    # systemdb: readable and exportable/replicable (server-level replication), never written
    assert root.can("systemdb", "read") and root.can("systemdb", "admin")
    assert not root.can("systemdb", "write")


def test_inactive_user_can_nothing_and_unknown_action_is_an_error():
    user = make_user("u", {"db1": PERMISSION_ADMIN}, active=False)
    assert not any(user.can("db1", a) for a in ("read", "write", "admin"))
    with pytest.raises(IllegalArgumentsError):
        make_user("u", {"db1": PERMISSION_ADMIN}).can("db1", "delete")


def test_grant_and_revoke(store):
    store.create_user("alice", ALICE_PASSWORD, "read", "defaultdb", "immudb")
    alice = store.grant("alice", "readwrite", "db1")
    assert alice.permissions == {"defaultdb": PERMISSION_READ, "db1": PERMISSION_READWRITE}
    assert store.grant("alice", PERMISSION_ADMIN, "db1").can("db1", "admin")
    alice = store.revoke("alice", "read", "db1")      # as immudb: whatever level it had
    assert alice.permissions == {"defaultdb": PERMISSION_READ}
    assert store.revoke("alice", "read", "db1").revision == alice.revision   # no-op, no write
    with pytest.raises(PermissionDeniedError):
        store.grant("alice", "sysadmin", "db1")
    with pytest.raises(PermissionDeniedError):
        store.grant("alice", "read", "systemdb")
    with pytest.raises(UserNotFoundError):
        store.grant("nobody", "read", "db1")
    with pytest.raises(UnknownPermissionError):
        store.grant("alice", 7, "db1")


def test_grant_caller_rules(store):
    store.create_user("alice", ALICE_PASSWORD, "read", "defaultdb", "immudb")
    store.create_user("bob", "Bob1Pwd!x", "admin", "db1", "immudb")
    store.grant("alice", "readwrite", "db1", by_user="bob")          # bob is admin on db1
    with pytest.raises(PermissionDeniedError):
        store.grant("alice", "readwrite", "db2", by_user="bob")      # ... but not on db2
    with pytest.raises(PermissionDeniedError):
        store.grant("bob", "admin", "db2", by_user="bob")            # not on yourself
    with pytest.raises(PermissionDeniedError):
        store.grant("bob", "admin", "db2", by_user="alice")
    store.grant("bob", "admin", "db2", by_user=sysadmin(store))
    store.set_active("alice", False)
    with pytest.raises(UserNotActiveError):
        store.grant("alice", "read", "db2")


def test_set_active_caller_rules(store):
    store.create_user("bob", "Bob1Pwd!x", "admin", "db1", "immudb")
    store.create_user("carol", "Carol1Pwd!", "read", "db1", "bob")
    store.create_user("dave", "Dave1Pwd!", "read", "db1", "immudb")
    with pytest.raises(PermissionDeniedError):
        store.set_active("bob", False, by_user="bob")
    with pytest.raises(PermissionDeniedError):
        store.set_active("dave", False, by_user="bob")    # not created by bob
    assert not store.set_active("carol", False, by_user="bob").active
    with pytest.raises(PermissionDeniedError):
        store.set_active("bob", False, by_user="dave")     # not an admin


# --- persistence ---------------------------------------------------------------------------

def test_records_persist_across_reopen(tmp_path):
    database = open_systemdb(tmp_path)
    store = UserStore(database, scrypt_n=FAST_N)
    auth.ensure_sysadmin(store, "Admin1Pwd!")
    store.create_user("alice", ALICE_PASSWORD, "readwrite", "defaultdb", "immudb")
    store.grant("alice", "admin", "db1")
    store.create_user("bob", "Bob1Pwd!x", "read", "defaultdb", "immudb")
    store.set_active("bob", False)
    store.change_password("alice", ALICE_PASSWORD, "Next1Pwd!", "alice")
    before = {u.username: u for u in store.list_users()}
    database.close()

    database = open_systemdb(tmp_path)
    try:
        store = UserStore(database, scrypt_n=FAST_N)
        assert auth.ensure_sysadmin(store, "ignored").revision == before["immudb"].revision
        after = {u.username: u for u in store.list_users()}
        assert after == before
        assert sorted(after) == ["alice", "bob", "immudb"]
        assert store.authenticate("alice", "Next1Pwd!").permissions == {
            "defaultdb": PERMISSION_READWRITE, "db1": PERMISSION_ADMIN}
        assert store.authenticate("immudb", "Admin1Pwd!").sysadmin
        with pytest.raises(UserNotActiveError):
            store.authenticate("bob", "Bob1Pwd!x")
        # every change was a new version of the record, one tx each; the latest is the truth
        history = database.history(b"\x01alice")
        assert [json.loads(e.value)["permissions"] for e in history][-1] == [
            {"database": "db1", "permission": 254}, {"database": "defaultdb", "permission": 2}]
        assert len(history) == 3 == after["alice"].revision
        assert len({e.tx for e in history}) == 3
    finally:
        database.close()


def test_list_users_pages_past_one_scan(store, monkeypatch):
    monkeypatch.setattr(auth, "SCAN_RESULTS_MAX", 2)
    real_scan = store.db.scan
    monkeypatch.setattr(store.db, "scan", lambda **kw: real_scan(limit=2, **kw))
    for i in range(5):
        store.create_user(f"user{i}", "Good1Pwd!", "read", "defaultdb", "immudb")
    assert [u.username for u in store.list_users()] == \
        ["immudb"] + [f"user{i}" for i in range(5)]


def test_forged_record_with_huge_cost_is_refused(store):
    store.create_user("alice", ALICE_PASSWORD, "read", "defaultdb", "immudb")
    record = json.loads(store.db.get(b"\x01alice").value)
    record["password"]["n"] = 1 << 30
    store.db.set({b"\x01alice": json.dumps(record).encode()})
    with pytest.raises(CorruptedDataError):
        store.authenticate("alice", ALICE_PASSWORD)
    store.db.set({b"\x01alice": b"not json"})
    with pytest.raises(CorruptedDataError):
        store.get_user("alice")


def test_concurrent_grants_lose_nothing(store):
    store.create_user("alice", ALICE_PASSWORD, "read", "defaultdb", "immudb")
    threads = [threading.Thread(target=store.grant, args=("alice", "read", f"db{i}"))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(store.get_user("alice").permissions) == {"defaultdb"} | {f"db{i}" for i in range(8)}


# --- sessions ------------------------------------------------------------------------------

def test_session_open_get_close():
    sessions = SessionManager(10)
    alice = make_user("alice", {"db1": PERMISSION_READ})
    session = sessions.open(alice, "db1")
    assert len(session.id) == 32 and session.username == "alice" and session.database == "db1"
    assert sessions.get(session.id).user == alice
    sessions.close(session.id)
    with pytest.raises(SessionNotFoundError):
        sessions.get(session.id)
    with pytest.raises(SessionNotFoundError):
        sessions.close(session.id)
    for bogus in ("", "0" * 32, None, b"x"):
        with pytest.raises(SessionNotFoundError):
            sessions.get(bogus)


def test_session_needs_permission_on_its_database():
    sessions = SessionManager(10)
    alice = make_user("alice", {"db1": PERMISSION_READ})
    with pytest.raises(NoDatabasePermissionError) as info:
        sessions.open(alice, "db2")
    assert str(info.value) == "Logged in user does not have permission on this database"
    with pytest.raises(NoDatabasePermissionError):
        sessions.open(make_user("x", {"systemdb": PERMISSION_ADMIN}), "systemdb")
    session = sessions.open(alice)
    assert session.database is None
    with pytest.raises(NoDatabasePermissionError):
        sessions.use_database(session.id, "db2")
    assert sessions.use_database(session.id, "db1").database == "db1"
    assert sessions.get(session.id).database == "db1"
    root = make_user("immudb", {"*": PERMISSION_SYSADMIN}, sysadmin=True)
    assert sessions.open(root, "systemdb").database == "systemdb"
    with pytest.raises(UserNotActiveError):
        sessions.open(make_user("gone", {"db1": PERMISSION_READ}, active=False), "db1")


def test_session_inactivity_expiry_with_fake_clock():
    clock = FakeClock()
    sessions = SessionManager(10, inactivity_timeout_seconds=180, clock=clock)
    alice = make_user("alice", {"db1": PERMISSION_READ})
    kept, idle = sessions.open(alice, "db1"), sessions.open(alice, "db1")
    for _ in range(5):                    # use keeps a session alive well past the timeout
        clock.now += 100
        sessions.get(kept.id)
    assert sessions.expire() == 1 and len(sessions) == 1
    with pytest.raises(SessionNotFoundError):
        sessions.get(idle.id)
    clock.now += 180                      # exactly the timeout: still alive
    assert sessions.get(kept.id).last_seen == clock.now
    clock.now += 180.001
    with pytest.raises(SessionNotFoundError):
        sessions.get(kept.id)             # expired at lookup even before a sweep
    assert len(sessions) == 0


def test_session_max_age_with_fake_clock():
    clock = FakeClock()
    sessions = SessionManager(10, inactivity_timeout_seconds=60, max_age_seconds=300,
                              clock=clock)
    session = sessions.open(make_user("alice", {"db1": PERMISSION_READ}), "db1")
    for _ in range(6):
        clock.now += 50
        sessions.get(session.id)
    clock.now += 50.5                     # active all along, but older than 300 s
    with pytest.raises(SessionNotFoundError):
        sessions.get(session.id)


def test_max_sessions():
    clock = FakeClock()
    sessions = SessionManager(3, inactivity_timeout_seconds=10, clock=clock)
    alice = make_user("alice", {"db1": PERMISSION_READ})
    opened = [sessions.open(alice, "db1") for _ in range(3)]
    with pytest.raises(MaxSessionsReachedError) as info:
        sessions.open(alice, "db1")
    assert str(info.value) == "max sessions reached"
    sessions.close(opened[0].id)
    opened[0] = sessions.open(alice, "db1")
    clock.now += 11                        # expired sessions make room without a sweep
    assert sessions.open(alice, "db1") and len(sessions) == 1
    assert len({s.id for s in opened}) == 3


def test_managers_that_share_a_limit_count_their_sessions_together():
    """The node's connection sessions and CLI tokens: --max-sessions bounds both together."""
    clock = FakeClock()
    connections = SessionManager(3, inactivity_timeout_seconds=10, clock=clock)
    tokens = SessionManager(3, inactivity_timeout_seconds=100, clock=clock)
    connections.share_limit(tokens)
    alice = make_user("alice", {"db1": PERMISSION_READ})
    connections.open(alice, "db1")
    kept = tokens.open(alice, "db1")
    tokens.open(alice, "db1")
    for manager in (connections, tokens):
        with pytest.raises(MaxSessionsReachedError):
            manager.open(alice, "db1")
    tokens.close(kept.id)
    assert tokens.open(alice, "db1")
    clock.now += 11                          # the connection session expired: room in tokens
    assert tokens.open(alice, "db1") and len(tokens) == 3 and len(connections) == 0


def test_a_users_login_past_its_per_user_cap_ends_its_oldest_session():
    """CLI tokens count against --max-sessions and last a day: one user may hold only
    TOKEN_SESSIONS_PER_USER_MAX of them, so it cannot lock everyone else out."""
    clock = FakeClock()
    tokens = SessionManager(10, inactivity_timeout_seconds=100, clock=clock, per_user_max=2)
    alice, bob = (make_user(n, {"db1": PERMISSION_READ}) for n in ("alice", "bob"))
    first = tokens.open(alice, "db1")
    clock.now += 1
    second = tokens.open(alice, "db1")
    clock.now += 1
    third = tokens.open(alice, "db1")
    with pytest.raises(SessionNotFoundError):
        tokens.get(first.id)
    assert tokens.get(second.id) and tokens.get(third.id)
    assert tokens.open(bob, "db1") and len(tokens) == 3


def test_sessions_are_thread_safe():
    sessions = SessionManager(10_000)
    alice = make_user("alice", {"db1": PERMISSION_READ})

    def churn():
        for _ in range(300):
            sid = sessions.open(alice, "db1").id
            sessions.get(sid)
            sessions.close(sid)

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(sessions) == 0


def test_session_manager_limits_are_checked():
    for kwargs in ({"max_sessions": 0}, {"max_sessions": 1, "inactivity_timeout_seconds": 0},
                   {"max_sessions": 1, "max_age_seconds": -1}):
        with pytest.raises(IllegalArgumentsError):
            SessionManager(**kwargs)
