"""immuadmin and immuclient as a user runs them: real subprocesses against a real node process.

The seed guide's replica creation is checked to the byte; the other outputs are checked on the
parts scripts rely on (exit codes, the first line, the JSON objects)."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import stat
import subprocess
import sys
import time

import pytest

from immucore.cli.flags import REPLICATION_FLAGS
from immucore.client import Client

from .nodes import free_port, running_node

ADMIN_PASSWORD = "immudb"
CLI_SECONDS_MAX = 30


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with running_node(tmp_path_factory.mktemp("node")) as running:
        yield running


class Shell:
    """A user's shell: its own home (token and state files), the CLIs run as subprocesses."""

    def __init__(self, node, home):
        self.node, self.home = node, home
        os.makedirs(home, exist_ok=True)

    def run(self, tool: str, *args, stdin: str = "", port: bool = True):
        argv = [sys.executable, "-m", f"immucore.cli.{tool}"]
        if port:
            argv += ["-p", str(self.node.port)]
        done = subprocess.run(argv + list(args), input=stdin.encode(), capture_output=True,
                              timeout=CLI_SECONDS_MAX,
                              env=dict(os.environ, IMMUCORE_CLI_HOME=str(self.home)))
        done.stdout, done.stderr = done.stdout.decode(), done.stderr.decode()
        return done

    def admin(self, *args, **kwargs):
        return self.run("immuadmin", *args, **kwargs)

    def client(self, *args, **kwargs):
        return self.run("immuclient", *args, **kwargs)

    def ok(self, tool: str, *args, **kwargs) -> str:
        done = self.run(tool, *args, **kwargs)
        assert done.returncode == 0, f"{tool} {args}: {done.stderr}"
        return done.stdout

    def json_lines(self, *args) -> list:
        return [json.loads(line) for line in self.ok("immuclient", "--json", *args).splitlines()]

    def login(self, tool: str, user: str, password: str, *args):
        assert self.ok(tool, "login", user, *args, stdin=password + "\n") == "logged in\n"


@pytest.fixture
def admin(node, tmp_path):
    shell = Shell(node, tmp_path / "admin")
    shell.login("immuadmin", "immudb", ADMIN_PASSWORD)
    return shell


def settings_of(node, name: str) -> dict:
    with Client(node.host, node.port) as client:
        client.login("immudb", ADMIN_PASSWORD)
        return client.database_settings(name)["settings"]


def table_row(output: str, first_cell: str) -> list:
    rows = [line.split() for line in output.splitlines() if line.split()[:1] == [first_cell]]
    assert len(rows) == 1, output
    return rows[0]


def value_hash(value: bytes) -> str:
    return hashlib.sha256(b"\x00" + value).hexdigest()


# --- the seed guide ---------------------------------------------------------------------------

def test_seed_guide_creates_a_replica_that_refuses_writes(node, tmp_path):
    shell = Shell(node, tmp_path)
    login = shell.admin("login", "immudb", stdin="immudb\n")
    assert (login.returncode, login.stdout) == (0, "logged in\n")
    assert "immudb user has the default password" in login.stderr
    token_path = tmp_path / ".immuadmin_token"
    assert stat.S_IMODE(os.stat(token_path).st_mode) == 0o600
    saved = json.loads(token_path.read_text())
    assert (saved["address"], saved["port"]) == (node.host, node.port)

    created = shell.admin("database", "create", "--replication-enabled=true",
                          "--replication-follower-username=immudb",
                          "--replication-follower-password=immudb",
                          "--replication-master-database=defaultdb", "replicadb")
    assert (created.returncode, created.stdout, created.stderr) == (
        0, "database 'replicadb' {replica: true} successfully created\n", "")

    settings = settings_of(node, "replicadb")
    assert settings["replica"] is True
    assert (settings["primary_database"], settings["primary_username"]) == ("defaultdb", "immudb")
    assert settings["primary_password"] == "********"           # sent, never echoed back
    row = table_row(shell.ok("immuadmin", "database", "list"), "replicadb")
    assert "LOADED" in row and "TRUE" in row

    shell.login("immuclient", "immudb", ADMIN_PASSWORD)
    assert shell.ok("immuclient", "use", "replicadb") == "now using database 'replicadb'\n"
    for command in ("set", "verifiedset"):
        refused = shell.client(command, "k", "v")
        assert (refused.returncode, refused.stdout, refused.stderr) == (
            1, "", "immuclient: database is read-only because it's a replica\n")


# --- databases --------------------------------------------------------------------------------

def test_current_flag_names_send_every_replication_setting(node, admin):
    created = admin.ok(
        "immuadmin", "database", "create", "--replication-is-replica=true",
        "--replication-primary-database=defaultdb", f"--replication-primary-host={node.host}",
        f"--replication-primary-port={node.port}", "--replication-primary-username=immudb",
        "--replication-primary-password=immudb", "--replication-prefetch-tx-buffer-size=7",
        "--replication-commit-concurrency=3", "--replication-allow-tx-discarding=true",
        "--replication-skip-integrity-check=true", "--replication-wait-for-indexing=false",
        "newnames")
    assert created == "database 'newnames' {replica: true} successfully created\n"
    settings = settings_of(node, "newnames")
    assert {k: settings[k] for k in (
        "replica", "primary_database", "primary_host", "primary_port", "primary_username",
        "prefetch_tx_buffer_size", "replication_commit_concurrency", "allow_tx_discarding",
        "skip_integrity_check", "wait_for_indexing", "sync_acks")} == {
        "replica": True, "primary_database": "defaultdb", "primary_host": node.host,
        "primary_port": node.port, "primary_username": "immudb",
        "prefetch_tx_buffer_size": 7, "replication_commit_concurrency": 3,
        "allow_tx_discarding": True, "skip_integrity_check": True, "wait_for_indexing": False,
        "sync_acks": 0}


def test_create_and_update_send_only_the_flags_given(node, admin):
    assert admin.ok("immuadmin", "database", "create", "plaindb") == \
        "database 'plaindb' {replica: false} successfully created\n"
    assert settings_of(node, "plaindb")["prefetch_tx_buffer_size"] == 0   # not sent: primary
    assert admin.ok("immuadmin", "database", "create", "v0db", "--write-tx-header-version=0",
                    "--autoload=false", "--max-key-len=64", "--max-value-len=1000",
                    "--max-tx-entries=10") == \
        "database 'v0db' {replica: false, autoload: false, write-tx-header-version: 0} " \
        "successfully created\n"
    settings = settings_of(node, "v0db")
    assert (settings["write_tx_header_version"], settings["autoload"], settings["max_key_len"],
            settings["max_value_len"], settings["max_tx_entries"]) == (0, False, 64, 1000, 10)

    assert admin.ok("immuadmin", "database", "update", "plaindb",
                    "--replication-is-replica=true") == \
        "database 'plaindb' {replica: true} successfully updated\n"
    assert settings_of(node, "plaindb")["prefetch_tx_buffer_size"] == 100  # the node's default
    assert admin.ok("immuadmin", "database", "update", "plaindb",
                    "--replication-enabled=false") == \
        "database 'plaindb' {replica: false} successfully updated\n"
    assert settings_of(node, "plaindb")["replica"] is False

    fixed = admin.admin("database", "update", "v0db", "--max-key-len=65")
    assert (fixed.returncode, fixed.stderr) == (1, "immuadmin: illegal arguments: max_key_len "
                                                   "can not be changed after database creation\n")
    invalid = admin.admin("database", "create", "badprimary", "--replication-primary-host=x")
    assert (invalid.returncode, invalid.stderr) == (
        1, "immuadmin: illegal arguments: invalid value for replication option PrimaryHost on "
           "primary database 'badprimary'\n")


def test_database_list_load_unload_delete(admin):
    admin.ok("immuadmin", "database", "create", "lifedb")
    row = table_row(admin.ok("immuadmin", "database", "list"), "lifedb")
    # ... Transactions, Replication ("-" for a primary), Index ("ok": its worker runs)
    assert "immudb" in row and "LOADED" in row and "FALSE" in row and row[-3:] == ["0", "-", "ok"]

    assert admin.ok("immuadmin", "database", "unload", "lifedb") == \
        "database 'lifedb' successfully unloaded\n"
    row = table_row(admin.ok("immuadmin", "database", "list"), "lifedb")
    assert "UNLOADED" in row and row[-3:] == ["-", "-", "-"]

    unsafe = admin.admin("database", "delete", "lifedb")
    assert unsafe.returncode != 0
    assert unsafe.stdout == ("database 'lifedb' was not deleted. Safety flag not set "
                             "(--yes-i-know-what-i-am-doing)\n")
    assert admin.ok("immuadmin", "database", "load", "lifedb") == \
        "database 'lifedb' successfully loaded\n"
    loaded = admin.admin("database", "delete", "--yes-i-know-what-i-am-doing", "lifedb")
    assert (loaded.returncode, loaded.stderr) == (
        1, "immuadmin: database lifedb must be unloaded before it is deleted\n")
    admin.ok("immuadmin", "database", "unload", "lifedb")
    assert admin.ok("immuadmin", "database", "delete", "lifedb",
                    "--yes-i-know-what-i-am-doing") == "database 'lifedb' successfully deleted\n"
    assert "lifedb" not in admin.ok("immuadmin", "database", "list")
    gone = admin.admin("database", "load", "lifedb")
    assert (gone.returncode, gone.stderr) == (1, "immuadmin: database lifedb does not exist\n")
    reserved = admin.admin("database", "unload", "defaultdb")
    assert (reserved.returncode, reserved.stderr) == (1, "immuadmin: database is reserved\n")
    for action in ("unload", "load"):
        missing = admin.admin("database", action, "nosuchdb")
        assert (missing.returncode, missing.stderr) == (
            1, "immuadmin: database nosuchdb does not exist\n")


def test_updates_promotions_and_deletions_leave_a_line_in_the_nodes_log(node, admin):
    admin.ok("immuadmin", "database", "create", "--replication-enabled=true", "loggeddb")
    admin.ok("immuadmin", "database", "update", "--autoload=false", "loggeddb")
    admin.ok("immuadmin", "database", "update", "--replication-enabled=false", "loggeddb")
    admin.ok("immuadmin", "database", "update", "--replication-enabled=true",
             "--replication-primary-host=127.0.0.1", f"--replication-primary-port={node.port}",
             "--replication-primary-database=defaultdb", "--replication-primary-username=immudb",
             "--replication-primary-password=immudb", "loggeddb")
    admin.ok("immuadmin", "database", "unload", "loggeddb")
    admin.ok("immuadmin", "database", "delete", "--yes-i-know-what-i-am-doing", "loggeddb")
    lines = [line.split(": ", 1)[1] for line in node.log().splitlines()
             if "immucore.node: database loggeddb" in line]
    assert lines[0] == "database loggeddb created by immudb (replica: True)"
    assert lines[1] == "database loggeddb updated by immudb (autoload=False)"
    assert lines[2].startswith("database loggeddb promoted to primary by immudb (") \
        and "replica=False" in lines[2]
    assert lines[3].startswith(f"database loggeddb demoted to a replica of 127.0.0.1:"
                               f"{node.port}/defaultdb by immudb (")
    assert "primary_password='********'" in lines[3]            # never the password itself
    assert lines[4:] == ["database loggeddb unloaded", "database loggeddb deleted by immudb"]


# --- users ------------------------------------------------------------------------------------

def test_second_user_permissions_password_and_deactivation(node, admin, tmp_path):
    admin.ok("immuadmin", "database", "create", "teamdb")
    assert admin.ok("immuadmin", "user", "create", "alice", "readwrite", "teamdb",
                    stdin="Alice@123\nAlice@123\n") == "Created user alice\n"
    mismatch = admin.admin("user", "create", "bob", "read", "teamdb",
                           stdin="Bob@12345\nBob@54321\n")
    assert (mismatch.returncode, mismatch.stderr) == (1, "immuadmin: passwords don't match\n")
    unknown = admin.admin("user", "create", "bob", "owner", "teamdb", "--password=Bob@12345")
    assert unknown.stderr == ("immuadmin: Permission owner not recognized: allowed permissions "
                              "are read, readwrite, admin, sysadmin\n")
    row = table_row(admin.ok("immuadmin", "user", "list"), "alice")
    assert row[1:4] == ["TRUE", "teamdb:", "readwrite"]

    alice = Shell(node, tmp_path / "alice")
    alice.login("immuclient", "alice", "Alice@123", "--database=teamdb")
    assert alice.json_lines("set", "k", "v1")[0]["tx"] == 1

    assert admin.ok("immuadmin", "user", "permission", "revoke", "alice", "readwrite",
                    "teamdb") == "permission changed successfully\n"
    admin.ok("immuadmin", "user", "permission", "grant", "alice", "read", "teamdb")
    ended = alice.client("get", "k")            # a change of the user ends its sessions
    assert (ended.returncode, ended.stderr) == (
        1, f"immuclient: no session found: please login again (node {node.address})\n")
    alice.login("immuclient", "alice", "Alice@123", "--database=teamdb")
    denied = alice.client("set", "k", "v2")
    assert (denied.returncode, denied.stderr) == (1, "immuclient: permission denied\n")
    assert alice.json_lines("get", "k")[0]["value"] == "v1"           # reading still works

    # the sysadmin sets another user's password without the old one
    assert admin.ok("immuadmin", "user", "changepassword", "alice",
                    stdin="Alice@456\nAlice@456\n") == "password of alice changed successfully\n"
    stale = alice.client("login", "alice", stdin="Alice@123\n")
    assert (stale.returncode, stale.stderr) == (1, "immuclient: invalid user name or password\n")
    alice.login("immuclient", "alice", "Alice@456", "--database=teamdb")

    # her own password: the old one is asked first, and a wrong one is refused
    alice.login("immuadmin", "alice", "Alice@456", "--database=teamdb")
    wrong = alice.admin("user", "changepassword", "alice", stdin="nope\nAlice@789\nAlice@789\n")
    assert (wrong.returncode, wrong.stderr) == (1, "immuadmin: old password is incorrect\n")
    assert alice.ok("immuadmin", "user", "changepassword", "alice",
                    stdin="Alice@456\nAlice@789\nAlice@789\n") == \
        "password of alice changed successfully\n"
    # that session ended: the token is gone, the node's address is kept
    assert json.loads((tmp_path / "alice" / ".immuadmin_token").read_text()) == {
        "address": node.host, "port": node.port}
    alice.login("immuadmin", "alice", "Alice@789", "--database=teamdb")
    create = alice.admin("database", "create", "alicedb")
    assert create.stderr == \
        "immuadmin: loggedin user does not have permissions for this operation\n"

    assert admin.ok("immuadmin", "user", "deactivate", "alice") == \
        "user status changed successfully\n"
    inactive = alice.client("login", "alice", stdin="Alice@789\n")
    assert (inactive.returncode, inactive.stderr) == (1, "immuclient: user is not active\n")
    assert "FALSE" in table_row(admin.ok("immuadmin", "user", "list"), "alice")
    admin.ok("immuadmin", "user", "activate", "alice")
    alice.login("immuclient", "alice", "Alice@789", "--database=teamdb")


# --- immuclient -------------------------------------------------------------------------------

def test_immuclient_commands_with_json(node, admin, tmp_path):
    admin.ok("immuadmin", "database", "create", "clientdb")
    shell = Shell(node, tmp_path / "client")
    shell.login("immuclient", "immudb", ADMIN_PASSWORD)
    assert shell.ok("immuclient", "use", "clientdb") == "now using database 'clientdb'\n"

    assert shell.json_lines("set", "k1", "v1") == [
        {"tx": 1, "key": "k1", "value": "v1", "hash": value_hash(b"v1")}]
    assert shell.json_lines("set", "k1", "v2")[0]["tx"] == 2
    assert shell.json_lines("verifiedset", "k2", "v3") == [
        {"tx": 3, "key": "k2", "value": "v3", "hash": value_hash(b"v3"), "verified": True}]
    state_path = tmp_path / "client" / ".immuclient_state.json"
    assert stat.S_IMODE(os.stat(state_path).st_mode) == 0o600
    assert json.loads(state_path.read_text())[f"{node.address}/clientdb"]["tx_id"] == 3

    assert shell.json_lines("verifiedget", "k1") == [
        {"tx": 2, "rev": 2, "key": "k1", "value": "v2", "hash": value_hash(b"v2"),
         "verified": True}]
    assert [(e["rev"], e["value"]) for e in shell.json_lines("history", "k1")] == \
        [(1, "v1"), (2, "v2")]
    assert [e["key"] for e in shell.json_lines("scan", "k")] == ["k1", "k2"]

    tx1, = shell.json_lines("tx", "1")
    assert tx1["entries"] == [{"key": "k1", "vlen": 3, "hash": value_hash(b"v1")}]
    tx2, = shell.json_lines("verifiedtx", "2")
    assert (tx2["verified"], tx2["prev_alh"], tx2["bl_tx_id"]) == (True, tx1["alh"], 1)
    tx3, = shell.json_lines("tx", "3")
    assert shell.json_lines("current") == [{"database": "clientdb", "tx": 3, "hash": tx3["alh"]}]

    # bytes that are not UTF-8 come back as hex under a _hex key
    binary = subprocess.run([sys.executable, "-m", "immucore.cli.immuclient", "--json", "set",
                             "bin", b"\xff\xfe"], capture_output=True, timeout=CLI_SECONDS_MAX,
                            env=dict(os.environ, IMMUCORE_CLI_HOME=str(shell.home)))
    assert json.loads(binary.stdout)["value_hex"] == "fffe", binary.stderr
    got, = shell.json_lines("get", "bin")
    assert (got["value_hex"], got["key"]) == ("fffe", "bin") and "value" not in got

    readable = shell.ok("immuclient", "get", "k1").splitlines()
    assert readable[:4] == ["tx:    2", "rev:   2", "key:   k1", "value: v2"]
    missing = shell.client("get", "nope")
    assert (missing.returncode, missing.stderr) == (1, "immuclient: key not found\n")


# --- help and errors --------------------------------------------------------------------------

def test_help_database_create_lists_every_flag(node, tmp_path):
    shell = Shell(node, tmp_path)
    by_help = shell.ok("immuadmin", "help", "database", "create")
    assert by_help == shell.ok("immuadmin", "database", "create", "--help")
    names = [name for _, flags, *_ in REPLICATION_FLAGS for name in flags] + [
        "--autoload", "--write-tx-header-version", "--max-key-len", "--max-value-len",
        "--max-tx-entries", "--immudb-address", "--immudb-port", "--tokenfile"]
    assert [name for name in names if name not in by_help] == []
    assert "--yes-i-know-what-i-am-doing" in shell.ok("immuadmin", "help", "database", "delete")
    assert "--json" in shell.ok("immuclient", "help", "verifiedget")


def test_errors_are_one_line_with_exit_code_1(node, admin, tmp_path):
    shell = Shell(node, tmp_path / "fresh")
    wrong = shell.admin("login", "immudb", stdin="not-the-password\n")
    assert (wrong.returncode, wrong.stdout, wrong.stderr) == (
        1, "", "immuadmin: invalid user name or password\n")
    assert not (tmp_path / "fresh" / ".immuadmin_token").exists()
    for tool, command in (("immuadmin", ("database", "list")), ("immuclient", ("get", "k"))):
        done = shell.run(tool, *command)
        assert (done.returncode, done.stderr) == (
            1, f"{tool}: please login first (node {node.address})\n")

    closed_port = free_port()
    refused = shell.run("immuadmin", "-p", str(closed_port), "login", "immudb",
                        stdin="immudb\n", port=False)
    assert refused.returncode == 1
    assert refused.stderr == (f"immuadmin: could not connect to 127.0.0.1:{closed_port}: "
                              "connection refused (is the node running?)\n")

    assert admin.ok("immuadmin", "logout") == "logged out\n"
    after = admin.admin("user", "list")
    assert (after.returncode, after.stderr) == (
        1, f"immuadmin: please login first (node {node.address})\n")


def test_saved_session_names_its_node_and_ends_with_a_restart(tmp_path):
    with running_node(tmp_path / "node") as own:
        shell = Shell(own, tmp_path / "home")
        shell.login("immuadmin", "immudb", ADMIN_PASSWORD)
        shell.ok("immuadmin", "database", "create", "keptdb", port=False)   # address from file
        shell.login("immuclient", "immudb", ADMIN_PASSWORD, "--database=keptdb")
        shell.ok("immuclient", "set", "k", "kept", port=False)
        status = shell.ok("immuadmin", "status", port=False).splitlines()
        assert status[0] == f"OK - {own.address} is reachable and responding to queries"
        assert "database: defaultdb" in status

        own.restart()
        ended = shell.admin("database", "list", port=False)
        assert (ended.returncode, ended.stderr) == (
            1, f"immuadmin: no session found: please login again (node {own.address})\n")
        # the token is gone, the node's address stays until a login replaces it
        token_path = tmp_path / "home" / ".immuadmin_token"
        assert json.loads(token_path.read_text()) == {"address": own.host, "port": own.port}
        again = shell.admin("user", "list", port=False)
        assert (again.returncode, again.stderr) == (
            1, f"immuadmin: the session ended: please login again (node {own.address})\n")
        # a login without -p goes to that node, not to 127.0.0.1:3322
        assert shell.ok("immuadmin", "login", "immudb", stdin=ADMIN_PASSWORD + "\n",
                        port=False) == "logged in\n"
        assert json.loads(token_path.read_text())["port"] == own.port
        assert "keptdb" in shell.ok("immuadmin", "database", "list")
        shell.login("immuclient", "immudb", ADMIN_PASSWORD, "--database=keptdb")
        assert shell.json_lines("get", "k")[0]["value"] == "kept"


# --- replication push -------------------------------------------------------------------------

def session_database(node, home) -> str:
    """The database the node keeps the saved immuadmin session of ``home`` on."""
    token = json.loads((home / ".immuadmin_token").read_text())["token"]
    with Client(node.host, node.port) as client:
        return client.resume(token)["database"]


def test_replication_push_reports_an_unreachable_primary_and_keeps_the_session(node, admin):
    admin.ok("immuadmin", "database", "create", "--replication-enabled=true", "pushdb")
    with Client(node.host, node.port) as client:
        client.login("immudb", ADMIN_PASSWORD)
        written = [client.set({f"push{n}".encode(): b"v"}).id for n in range(3)]
    closed_port = free_port()
    unreachable = admin.admin("replication", "push", "--from-address", "127.0.0.1",
                              "--from-port", str(closed_port), "--from-password",
                              ADMIN_PASSWORD, "--database", "pushdb")
    assert (unreachable.returncode, unreachable.stderr) == (
        1, f"immuadmin: could not connect to the primary 127.0.0.1:{closed_port}: connection "
           "refused (is the node running?)\n")
    assert session_database(node, admin.home) == "defaultdb"

    pushed = admin.admin("replication", "push", "--from-address", node.host, "--from-port",
                         str(node.port), "--from-password", ADMIN_PASSWORD, "--database",
                         "pushdb")
    assert (pushed.returncode, pushed.stdout) == (0, f"{written[-1]} transactions replicated\n")
    assert session_database(node, admin.home) == "defaultdb"      # not moved to pushdb
    help_text = " ".join(admin.ok("immuadmin", "replication", "push", "--help").split())
    from_user = help_text.split("--from-user FROM_USER user on the primary", 1)[1]
    from_user = from_user.split("--from-password FROM_PASSWORD", 1)[0]
    assert "with admin permission" in from_user and from_user.endswith("(default immudb) ")


# --- versions ---------------------------------------------------------------------------------

def test_every_command_prints_the_package_version(node, tmp_path):
    """One version everywhere: the package metadata's (pyproject.toml), with or without a node."""
    version = importlib.metadata.version("immucore")
    shell = Shell(node, tmp_path)
    for tool, args in (("immuadmin", ("version",)), ("immuadmin", ("--version",)),
                       ("immuclient", ("version",)), ("immuclient", ("--version",))):
        assert shell.ok(tool, *args, port=False) == f"{tool} {version}\n"
    for module, prog in (("immucore", "immucore"),
                         ("immucore.cli.replicator", "immucore-replicator")):
        done = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True,
                              text=True, timeout=CLI_SECONDS_MAX)
        assert (done.returncode, done.stdout) == (0, f"{prog} {version}\n"), done.stderr
    with Client(node.host, node.port) as client:
        assert client.health()["version"] == client.server_info()["version"] == version


def test_status_shows_the_node_version_and_uptime(node, tmp_path):
    version = importlib.metadata.version("immucore")
    shell = Shell(node, tmp_path)
    shell.login("immuclient", "immudb", ADMIN_PASSWORD)
    with Client(node.host, node.port) as client:
        started = client.server_info()["started_at"]
    for tool in ("immuadmin", "immuclient"):
        lines = shell.ok(tool, "status").splitlines()
        assert f"version:  {version}" in lines, lines
        uptime = next(line for line in lines if line.startswith("uptime:"))
        match = re.fullmatch(r"uptime:   (?:(\d+)h)?(?:(\d+)m)?(\d+)s", uptime)
        assert match, uptime
        hours, minutes, seconds = (int(part or 0) for part in match.groups())
        shown = hours * 3600 + minutes * 60 + seconds
        assert abs(shown - (time.time() - started)) < 5, (uptime, started)


# --- revisions, delete, restore -----------------------------------------------------------------

def test_immuclient_reads_restores_and_deletes_at_revisions(node, admin, tmp_path):
    """immudb's revisions: N > 0 the N-th value, 0 the current, -N counted back from it; its
    messages for a key that has no value and for a revision it does not have."""
    admin.ok("immuadmin", "database", "create", "revisiondb")
    shell = Shell(node, tmp_path / "client")
    shell.login("immuclient", "immudb", ADMIN_PASSWORD, "--database", "revisiondb")
    for value in ("v1", "v2", "v3"):
        shell.ok("immuclient", "set", "k", value)

    def value_at(text):
        got, = shell.json_lines("get", text)
        return got["rev"], got["value"]

    assert [value_at(f"k@{n}") for n in (1, 2, 3, 0, -1, -2)] == [
        (1, "v1"), (2, "v2"), (3, "v3"), (3, "v3"), (2, "v2"), (1, "v1")]
    readable = shell.ok("immuclient", "get", "k@1").splitlines()
    assert readable[:4] == ["tx:    1", "rev:   1", "key:   k", "value: v1"]
    verified, = shell.json_lines("verifiedget", "k@-1")
    assert (verified["rev"], verified["value"], verified["verified"]) == (2, "v2", True)
    for text in ("k@4", "k@-3", "k@-10"):
        done = shell.client("get", text)
        assert (done.returncode, done.stderr) == (
            1, "immuclient: invalid key revision number\n"), text
    missing = shell.client("get", "nothing@1")
    assert (missing.returncode, missing.stderr) == (1, "immuclient: key not found\n")
    bad = shell.client("get", "k@first")
    assert bad.returncode == 1 and "invalid revision number 'first'" in bad.stderr
    assert "--revision-separator" in bad.stderr

    # a key with the separator in its name: another separator, or none
    shell.ok("immuclient", "set", "user@example", "mail")
    assert shell.json_lines("--revision-separator", "", "get", "user@example")[0]["value"] \
        == "mail"
    assert shell.json_lines("get", "--revision-separator", "#", "user@example#1")[0]["value"] \
        == "mail"

    # delete: readable and JSON; the history stays; a key without a live value is refused
    deleted = shell.ok("immuclient", "delete", "k").splitlines()
    assert deleted[1:] == ["key:     k", "deleted: true"] and deleted[0].startswith("tx:")
    gone = shell.client("get", "k")
    assert (gone.returncode, gone.stderr) == (1, "immuclient: key not found\n")
    again = shell.client("--json", "delete", "k")
    assert (again.returncode, again.stderr) == (1, "immuclient: key not found\n")
    assert shell.client("delete", "nothing").stderr == "immuclient: key not found\n"
    assert value_at("k@-1") == (3, "v3")            # the value before the deletion

    # restore: the value of a revision written again as the newest one, a deleted key included
    restored, = shell.json_lines("restore", "k@1")
    assert (restored["rev"], restored["value"], restored["restored_from"]) == (5, "v1", 1)
    assert restored["hash"] == value_hash(b"v1")
    assert value_at("k") == (5, "v1")
    readable = shell.ok("immuclient", "restore", "k@-2").splitlines()     # rev 3: v3
    assert readable[1:4] == ["rev:           6", "key:           k", "value:         v3"]
    assert readable[-1] == "restored_from: 3"
    history = [(e["rev"], e["value"], e.get("deleted", False))
               for e in shell.json_lines("history", "k")]
    assert history == [(1, "v1", False), (2, "v2", False), (3, "v3", False), (4, "", True),
                       (5, "v1", False), (6, "v3", False)]
    for text, message in (("k", "restore needs a revision: k@REV"),
                          ("k@9", "invalid key revision number"),
                          ("k@4", "key not found"),            # revision 4 is the deletion
                          ("k@-2", "key not found"),           # and so is 6 - 2
                          ("nothing@1", "key not found")):
        done = shell.client("restore", text)
        assert done.returncode == 1 and done.stderr.startswith(f"immuclient: {message}"), \
            (text, done.stderr)
    assert value_at("k") == (6, "v3")                # the refused restores wrote nothing
