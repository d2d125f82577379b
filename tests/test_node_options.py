"""The node's options: flags, IMMUCORE_* environment, TOML config, signed states, metrics."""
import time
import urllib.request

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from immucore.cli import node as node_cli
from immucore.client import Client
from immucore.errors import VerificationError
from immucore.protocol.messages import RemoteError

from .nodes import NodeProcess, free_port, running_node


def test_precedence_is_flag_then_environment_then_file_then_default(tmp_path):
    config = tmp_path / "immucore.toml"
    config.write_text('port = 4000\nmax-sessions = 7\nadmin-password = "fromfile"\n'
                      'replication-is-replica = true\n')
    args = node_cli.build_parser().parse_args(["--config", str(config), "--port", "5000"])
    options = node_cli.resolve(args, environ={"IMMUCORE_MAX_SESSIONS": "9"})
    assert options["port"] == 5000                   # flag beats file
    assert options["max_sessions"] == 9              # environment beats file
    assert options["admin_password"] == "fromfile"   # file beats default
    assert options["replica"] is True
    assert options["dir"] == "./data" and options["synced"] is True


@pytest.mark.parametrize("environ, file_text", [
    ({"IMMUCORE_SIGNINGKEY": "/k.pem"}, ""),
    ({"IMMUCORE_SIGNING_KEY": "/k.pem"}, ""),
    ({}, 'signingKey = "/k.pem"\n'),
    ({}, 'signing_key = "/k.pem"\n'),
], ids=["env flag name", "env snake case", "file flag name", "file snake case"])
def test_the_signing_key_is_read_under_every_spelling(tmp_path, environ, file_text):
    """A node configured with --signingKey's name in the environment or the file must sign:
    an option silently dropped there would leave it unsigned without a word."""
    config = tmp_path / "immucore.toml"
    config.write_text(file_text)
    args = node_cli.build_parser().parse_args(["--config", str(config)])
    assert node_cli.resolve(args, environ=environ)["signing_key"] == "/k.pem"


@pytest.mark.parametrize("environ, file_text", [
    ({"IMMUCORE_REPLICATION_ENABLED": "true", "IMMUCORE_REPLICATION_MASTER_PORT": "4000"}, ""),
    ({}, 'replication-enabled = true\nreplication-master-port = 4000\n'),
    ({"IMMUCORE_REPLICATION_IS_REPLICA": "true", "IMMUCORE_REPLICATION_PRIMARY_PORT": "4000"}, ""),
    ({}, 'replication-is-replica = true\nreplication_primary_port = 4000\n'),
], ids=["env seed names", "file seed names", "env immudb names", "file immudb names"])
def test_replication_flags_are_read_under_both_names_everywhere(tmp_path, environ, file_text):
    config = tmp_path / "immucore.toml"
    config.write_text(file_text)
    args = node_cli.build_parser().parse_args(["--config", str(config)])
    options = node_cli.resolve(args, environ=environ)
    assert options["replica"] is True and options["primary_port"] == 4000


def test_keys_of_the_file_that_are_no_flag_are_named_and_ignored(tmp_path):
    config = tmp_path / "immucore.toml"
    config.write_text('port = 4000\nweb-server = true\nmax_sesions = 3\n')
    warnings = []
    args = node_cli.build_parser().parse_args(["--config", str(config)])
    options = node_cli.resolve(args, environ={}, warn=warnings.append)
    assert options["port"] == 4000 and options["max_sessions"] == 100
    assert len(warnings) == 1 and "max_sesions, web-server" in warnings[0], warnings


@pytest.mark.parametrize("argv, expected", [
    (["--synced"], True), (["--synced=false"], False), (["--synced", "false"], False),
    (["--synced=true"], True),
])
def test_boolean_flags_take_immudb_forms(argv, expected):
    args = node_cli.build_parser().parse_args(argv)
    assert node_cli.resolve(args, environ={})["synced"] is expected


def test_admin_password_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("IMMUCORE_ADMIN_PASSWORD", "Secret1!pw")
    with running_node(tmp_path) as node:
        with Client(node.host, node.port) as client:
            with pytest.raises(RemoteError, match="invalid user name or password"):
                client.login("immudb", "immudb")
        with Client(node.host, node.port) as client:
            answer = client.login("immudb", "Secret1!pw")
            assert answer["warning"] == ""       # not the default password any more


def _key_pair(tmp_path, name="signing"):
    """A fresh P-256 key: its PEM file path and its public point."""
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / f"{name}.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.X962,
                                           serialization.PublicFormat.UncompressedPoint)
    return str(path), public


def test_states_are_signed_with_the_signing_key(tmp_path):
    key_path, public = _key_pair(tmp_path)
    _, other_public = _key_pair(tmp_path, "other")
    with running_node(tmp_path / "node", "--signingKey", key_path) as node:
        with Client(node.host, node.port, server_public_key=public) as client:
            client.login("immudb", "immudb")
            client.set({b"k": b"v"})
            assert client.current_state().tx_id == 1
            assert client.verified_set({b"k2": b"v2"}).id == 2
            assert client.verified_get(b"k").value == b"v"
        with Client(node.host, node.port, server_public_key=other_public) as client:
            client.login("immudb", "immudb")
            with pytest.raises(VerificationError, match="signature does not verify"):
                client.current_state()


def test_unsigned_node_is_refused_by_a_client_that_expects_signatures(tmp_path):
    _, public = _key_pair(tmp_path)
    with running_node(tmp_path / "node") as node:
        with Client(node.host, node.port, server_public_key=public) as client:
            client.login("immudb", "immudb")
            with pytest.raises(VerificationError, match="did not sign"):
                client.current_state()


def test_metrics_endpoint_reports_committed_tx_per_database(tmp_path):
    port = free_port()
    node = NodeProcess(tmp_path, ["--metrics-server=true", "--metrics-server-port", str(port)])
    node.start()
    try:
        with Client(node.host, node.port) as client:
            client.login("immudb", "immudb")
            client.set({b"a": b"1"})
            client.set({b"b": b"2"})
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        assert b'immudb_last_committed_trx_id{db="defaultdb"} 2.0' in text
        assert b'immucore_requests_total{db="defaultdb",kind="write"} 2.0' in text
        assert b"immucore_sessions" in text
    finally:
        assert node.stop() == 0


def test_refused_database_settings_are_not_stored_and_the_node_restarts(tmp_path):
    with running_node(tmp_path) as node:
        with Client(node.host, node.port) as client:
            client.login("immudb", "immudb")
            with pytest.raises(Exception, match="max_value_len must be in"):
                client.create_database("toobig", {"max_value_len": 64 << 20})
            client.create_database("fine", {"max_value_len": 1000})
        node.restart()
        with Client(node.host, node.port) as client:
            client.login("immudb", "immudb")
            names = [d["name"] for d in client.list_databases()]
            assert "fine" in names and "toobig" not in names


def test_the_banner_names_roles_and_goes_to_the_log_file_too(tmp_path):
    logfile = tmp_path / "immucore.log"
    with running_node(tmp_path, "--replication-sync-enabled=true", "--replication-sync-acks=1",
                      f"--logfile={logfile}") as node:
        banner = next(line for line in node.log().splitlines() if "listening on" in line)
        assert "defaultdb (sync primary, 1 ack)" in banner, banner
        assert banner in logfile.read_text()


# --- immudb's IMMUDB_* variables ----------------------------------------------------------------

def test_immudb_variables_set_flags_and_immucore_ones_win():
    """A Compose or Helm file written for immudb configures the node; where a flag is set under
    both prefixes ours wins and the other is named as ignored (names only: values may be
    passwords); an IMMUDB_ variable that is no flag is named too; an empty one is unset."""
    warnings = []
    environ = {"IMMUDB_REPLICATION_IS_REPLICA": "true", "IMMUDB_REPLICATION_PRIMARY_HOST": "db1",
               "IMMUDB_REPLICATION_MASTER_PORT": "4000", "IMMUDB_SIGNINGKEY": "/k.pem",
               "IMMUDB_ADMIN_PASSWORD": "theirs", "IMMUCORE_ADMIN_PASSWORD": "ours",
               "IMMUDB_PGSQL_SERVER": "true", "IMMUDB_PIDFILE": "", "IMMUDB_PORT": ""}
    args = node_cli.build_parser().parse_args([])
    options = node_cli.resolve(args, environ=environ, warn=warnings.append)
    assert options["replica"] is True and options["primary_host"] == "db1"
    assert options["primary_port"] == 4000 and options["signing_key"] == "/k.pem"
    assert options["admin_password"] == "ours"
    assert options["port"] == 3322 and options["pidfile"] == ""
    assert "ignoring IMMUDB_ADMIN_PASSWORD: IMMUCORE_ADMIN_PASSWORD is set too and wins" \
        in warnings, warnings
    assert not any("theirs" in text or "ours" in text for text in warnings), warnings
    assert "ignoring environment variables that are no immucore flag: IMMUDB_PGSQL_SERVER" \
        in warnings, warnings
    assert len(warnings) == 2, warnings
    # the command line still beats both
    args = node_cli.build_parser().parse_args(["--admin-password", "flag"])
    assert node_cli.resolve(args, environ=environ, warn=warnings.append)["admin_password"] \
        == "flag"


def test_a_bad_immudb_variable_names_itself(tmp_path):
    args = node_cli.build_parser().parse_args([])
    with pytest.raises(ValueError, match="IMMUDB_MAX_SESSIONS"):
        node_cli.resolve(args, environ={"IMMUDB_MAX_SESSIONS": "many"})
    with pytest.raises(ValueError, match="IMMUDB_SYNCED"):
        node_cli.resolve(args, environ={"IMMUDB_SYNCED": "perhaps"})


def test_immudb_config_variable_names_the_file(tmp_path):
    config = tmp_path / "immudb.toml"
    config.write_text("max-sessions = 7\n")
    args = node_cli.build_parser().parse_args([])
    assert node_cli.resolve(args, environ={"IMMUDB_CONFIG": str(config)})["max_sessions"] == 7


def test_a_node_takes_immudb_variables_and_logs_the_ignored_one(tmp_path, monkeypatch):
    monkeypatch.setenv("IMMUDB_ADMIN_PASSWORD", "Theirs1!pw")
    monkeypatch.setenv("IMMUDB_MAX_SESSIONS", "1")
    with running_node(tmp_path / "immudb-only") as node:
        with Client(node.host, node.port) as client:
            assert client.login("immudb", "Theirs1!pw")["warning"] == ""
            with Client(node.host, node.port) as second:       # --max-sessions 1 took effect
                with pytest.raises(RemoteError) as refused:
                    second.login("immudb", "Theirs1!pw")
                assert refused.value.code == "max_sessions_reached"
    monkeypatch.setenv("IMMUCORE_ADMIN_PASSWORD", "Ours1!pw")
    logfile = tmp_path / "both.log"
    with running_node(tmp_path / "both", f"--logfile={logfile}") as node:
        with Client(node.host, node.port) as client:
            with pytest.raises(RemoteError, match="invalid user name or password"):
                client.login("immudb", "Theirs1!pw")
        with Client(node.host, node.port) as client:
            client.login("immudb", "Ours1!pw")
        expected = "ignoring IMMUDB_ADMIN_PASSWORD: IMMUCORE_ADMIN_PASSWORD is set too and wins"
        assert expected in logfile.read_text()


def test_a_replica_configured_only_by_immudb_variables_follows_its_primary(tmp_path,
                                                                          monkeypatch):
    """The issue's Compose example: IMMUDB_REPLICATION_* make systemdb and defaultdb replicas."""
    with running_node(tmp_path / "primary") as primary:
        with Client(primary.host, primary.port) as p:
            p.login("immudb", "immudb")
            header = p.set({b"from": b"the primary"})
        for name, value in (("IS_REPLICA", "true"), ("PRIMARY_HOST", primary.host),
                            ("PRIMARY_PORT", str(primary.port)), ("PRIMARY_USERNAME", "immudb"),
                            ("PRIMARY_PASSWORD", "immudb")):
            monkeypatch.setenv(f"IMMUDB_REPLICATION_{name}", value)
        with running_node(tmp_path / "replica") as replica:
            assert f"replica of {primary.host}:{primary.port}" in replica.log()
            deadline = time.monotonic() + 30
            while True:        # users come from the primary: no login before systemdb arrives
                with Client(replica.host, replica.port) as r:
                    try:
                        r.login("immudb", "immudb")
                        if r.current_state().tx_id >= header.id:
                            assert r.get(b"from").value == b"the primary"
                            break
                    except RemoteError:
                        pass
                assert time.monotonic() < deadline, replica.log()
                time.sleep(0.1)
