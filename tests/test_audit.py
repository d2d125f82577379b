"""``immuclient audit-mode`` as an operator runs it: the real command in a subprocess, auditing a
real node process whose history is rewritten underneath it (a database folder replaced by
another node's log of the same length, or by an earlier copy of itself: a cut log), with its
Prometheus metrics read over HTTP."""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from immucore.client import Client
from immucore.constants import AUDIT_CALL_TIMEOUT_SECONDS

from .nodes import NodeProcess, free_port, running_node

ADMIN = ("immudb", "immudb")
ROUND_SECONDS_MAX = 60        # a bound, not a wait: rounds come every 0.2 s
STATE_FILE = ".immuclient_audit_state.json"


def write(node, database: str, values, create: bool = False):
    with Client(node.host, node.port) as client:
        client.login(*ADMIN)
        if create:
            client.create_database(database)
        client.use_database(database)
        for value in values:
            client.set({b"key": value})
        return client.current_state()


def audit_argv(node, *args):
    return [sys.executable, "-m", "immucore.cli.immuclient", "audit-mode",
            "-p", str(node.port), "--audit-username", ADMIN[0], "--audit-password", ADMIN[1],
            "--audit-monitoring-host", "127.0.0.1", *args]


def audit_once(node, home, *args):
    """One round (``--audit-rounds 1``): the finished process."""
    done = subprocess.run(audit_argv(node, "--audit-rounds", "1", "--audit-monitoring-port",
                                     str(free_port()), *args),
                          capture_output=True, text=True, timeout=ROUND_SECONDS_MAX,
                          env=dict(os.environ, IMMUCORE_CLI_HOME=str(home)))
    return done


def trusted(home) -> dict:
    with open(os.path.join(home, STATE_FILE)) as f:
        return json.load(f)


class RunningAuditor:
    """A continuous audit-mode process and its metrics endpoint."""

    def __init__(self, node, home, *args):
        self.port = free_port()
        self.log_path = os.path.join(home, "audit.log")
        os.makedirs(home, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                audit_argv(node, "--audit-interval", "200ms", "--audit-monitoring-port",
                           str(self.port), *args),
                stdout=log, stderr=subprocess.STDOUT,
                env=dict(os.environ, IMMUCORE_CLI_HOME=str(home)))

    def get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as answer:
            return answer.status, answer.headers.get("Content-Type"), answer.read().decode()

    def metrics(self) -> dict:
        """{(name, database or None): value} of the immuclient_audit_* series."""
        _, _, text = self.get("/metrics")
        out = {}
        for line in text.splitlines():
            match = re.match(r'(immuclient_audit_\w+)\{([^}]*)\} (\S+)$', line)
            if match:
                db = re.search(r'database="([^"]*)"', match.group(2))
                out[match.group(1), db and db.group(1)] = float(match.group(3))
        return out

    def next_round(self) -> dict:
        """The metrics after a round that started after this call."""
        deadline = time.monotonic() + ROUND_SECONDS_MAX
        start = None
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log()
            try:
                metrics = self.metrics()
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.05)              # the server is not listening yet
                continue
            rounds = metrics["immuclient_audit_rounds_total", None]
            if start is None:
                start = rounds
            elif rounds >= start + 2:         # the round under way at the call has ended too
                return metrics
            time.sleep(0.05)
        raise AssertionError(f"no audit round in {ROUND_SECONDS_MAX} s:\n{self.log()}")

    def stop(self, sig=signal.SIGTERM) -> int:
        self.process.send_signal(sig)
        return self.process.wait(ROUND_SECONDS_MAX)

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()


def replace_folder(node, database: str, source: str):
    """Stop the node, put ``source`` where its database folder is, start it on the same port."""
    node.stop()
    target = os.path.join(node.dir, database)
    shutil.rmtree(target)
    shutil.copytree(source, target)
    node.start()


def test_auditor_reports_a_log_replaced_by_one_of_the_same_length(tmp_path):
    """The node is restarted with another node's log of appdb, as long as the one the auditor
    trusts: the metrics say tampered (0), the trusted state stays, and it stays so while the
    forged log grows: the auditor never trusts anew by itself."""
    other = NodeProcess(tmp_path / "other")
    other.start()
    try:
        write(other, "appdb", [b"forged-%d" % i for i in range(5)], create=True)
    finally:
        other.stop()
    home = tmp_path / "home"
    with running_node(tmp_path / "node") as node:
        write(node, "appdb", [b"real-%d" % i for i in range(3)], create=True)
        write(node, "zdb", [b"untouched"], create=True)     # audited after appdb, stays ok
        auditor = RunningAuditor(node, home)
        try:
            metrics = auditor.next_round()
            assert metrics["immuclient_audit_result_per_database", "appdb"] == 1
            assert metrics["immuclient_audit_curr_root_per_database", "appdb"] == 3
            assert metrics["immuclient_audit_result_per_server", None] == 1

            real = write(node, "appdb", [b"real-3", b"real-4"])     # it follows new commits
            metrics = auditor.next_round()
            assert metrics["immuclient_audit_result_per_database", "appdb"] == 1
            assert metrics["immuclient_audit_prev_root_per_database", "appdb"] in (3, 5)
            assert metrics["immuclient_audit_curr_root_per_database", "appdb"] == 5
            key = f"{node.address}/appdb"
            assert trusted(home)[key] == {"tx_id": 5, "tx_hash": real.tx_hash.hex()}

            replace_folder(node, "appdb", os.path.join(other.dir, "appdb"))
            forged = write(node, "appdb", [])
            assert forged.tx_id == 5 and forged.tx_hash != real.tx_hash
            metrics = auditor.next_round()
            assert metrics["immuclient_audit_result_per_database", "appdb"] == 0
            assert metrics["immuclient_audit_result_per_database", "zdb"] == 1
            assert metrics["immuclient_audit_result_per_server", None] == 0   # the worst
            assert metrics["immuclient_audit_prev_root_per_database", "appdb"] == 5
            assert trusted(home)[key] == {"tx_id": 5, "tx_hash": real.tx_hash.hex()}
            assert "detected possible tampering of db appdb" in auditor.log()
            assert "the log was replaced" in auditor.log()

            write(node, "appdb", [b"forged-5", b"forged-6"])       # the forged log moves on
            metrics = auditor.next_round()
            assert metrics["immuclient_audit_result_per_database", "appdb"] == 0
            assert metrics["immuclient_audit_curr_root_per_database", "appdb"] == 7
            assert trusted(home)[key] == {"tx_id": 5, "tx_hash": real.tx_hash.hex()}

            status, content_type, _ = auditor.get("/metrics")
            assert (status, content_type.split(";")[0]) == (200, "text/plain")
            assert auditor.get("/livez")[2] == '{"immudb": "OK"}'
            assert json.loads(auditor.get("/version")[2])["component"] == "immuclient"
        finally:
            code = auditor.stop()
        assert code == 2, auditor.log()                  # tampering was seen during the run
        assert auditor.log().rstrip().endswith("auditor stopped")


def test_auditor_reports_a_cut_log_and_passes_again_on_the_real_one(tmp_path):
    """An earlier copy of the database (a log cut to 3 txs) put back under the node: reported,
    the state trusted at tx 6 kept; the real log put back passes against that same state."""
    home = tmp_path / "home"
    with running_node(tmp_path / "node") as node:
        write(node, "appdb", [b"v0", b"v1", b"v2"], create=True)
        node.stop()
        early = str(tmp_path / "appdb-at-3")
        shutil.copytree(os.path.join(node.dir, "appdb"), early)
        node.start()
        state = write(node, "appdb", [b"v3", b"v4", b"v5"])
        done = audit_once(node, home)
        assert done.returncode == 0, done.stdout + done.stderr
        key = f"{node.address}/appdb"
        assert trusted(home)[key] == {"tx_id": 6, "tx_hash": state.tx_hash.hex()}

        node.stop()
        real = str(tmp_path / "appdb-at-6")
        shutil.copytree(os.path.join(node.dir, "appdb"), real)
        node.start()
        replace_folder(node, "appdb", early)
        done = audit_once(node, home)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "behind the trusted state at tx 6: its log was cut or replaced" in done.stdout
        assert trusted(home)[key] == {"tx_id": 6, "tx_hash": state.tx_hash.hex()}

        # a cut log that grows back to the trusted length, with other txs: still refused
        write(node, "appdb", [b"w3", b"w4", b"w5", b"w6"])
        done = audit_once(node, home)
        assert done.returncode == 2, done.stdout + done.stderr
        assert trusted(home)[key] == {"tx_id": 6, "tx_hash": state.tx_hash.hex()}

        replace_folder(node, "appdb", real)
        done = audit_once(node, home)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "db: appdb, consistent: true" in done.stdout


def _key_files(tmp_path, name):
    key = ec.generate_private_key(ec.SECP256R1())
    private_pem, public_pem = tmp_path / f"{name}.pem", tmp_path / f"{name}.pub.pem"
    private_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    public_pem.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_pem, public_pem


def test_auditor_checks_the_signature_with_the_given_public_key(tmp_path):
    signing, public = _key_files(tmp_path, "node")
    _, stranger = _key_files(tmp_path, "stranger")
    with running_node(tmp_path / "node", "--signingKey", str(signing)) as node:
        write(node, "appdb", [b"v0"], create=True)
        refused = audit_once(node, tmp_path / "refused", "--server-signing-pub-key",
                             str(stranger), "--audit-databases", "app")
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "state of db appdb from" in refused.stdout and "rejected" in refused.stdout
        assert not (tmp_path / "refused" / STATE_FILE).exists()      # nothing trusted

        signed = audit_once(node, tmp_path / "signed", "--server-signing-pub-key", str(public),
                            "--audit-databases", "app")
        assert signed.returncode == 0, signed.stdout + signed.stderr
        assert list(trusted(tmp_path / "signed")) == [f"{node.address}/appdb"]
    with running_node(tmp_path / "unsigned") as node:               # no --signingKey
        write(node, "appdb", [b"v0"], create=True)
        unsigned = audit_once(node, tmp_path / "unsigned-home", "--server-signing-pub-key",
                              str(public))
        assert unsigned.returncode == 1, unsigned.stdout + unsigned.stderr
        assert "the node did not sign its state" in unsigned.stdout


def test_auditor_refuses_bad_flags_and_an_unreadable_state_file(tmp_path):
    with running_node(tmp_path / "node") as node:
        write(node, "appdb", [b"v0"], create=True)
        home = tmp_path / "home"
        os.makedirs(home)
        (home / STATE_FILE).write_text("{not json")
        done = audit_once(node, home)
        assert done.returncode == 1
        assert "is unreadable" in done.stderr and "not reset silently" in done.stderr
        assert (home / STATE_FILE).read_text() == "{not json"           # left as it was
        done = audit_once(node, tmp_path / "h2", "--audit-interval", "soon")
        assert (done.returncode, done.stderr) == (
            1, "immuclient: invalid --audit-interval 'soon': expected a duration such as 60s, "
               "5m or 500ms\n")
        done = audit_once(node, tmp_path / "h2", "--audit-interval", "1ms")
        assert (done.returncode, done.stderr) == (
            1, "immuclient: --audit-interval 1ms is shorter than 100ms\n")
        busy = free_port()
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", busy))
            taken.listen()
            done = subprocess.run(audit_argv(node, "--audit-rounds", "1",
                                             "--audit-monitoring-port", str(busy)),
                                  capture_output=True, text=True, timeout=ROUND_SECONDS_MAX,
                                  env=dict(os.environ, IMMUCORE_CLI_HOME=str(tmp_path / "h3")))
        assert done.returncode == 1
        assert f"cannot start the monitoring HTTP server on 127.0.0.1:{busy}" in done.stderr


def test_auditor_keeps_auditing_while_the_node_is_down_and_stops_on_sigint(tmp_path):
    home = tmp_path / "home"
    with running_node(tmp_path / "node") as node:
        write(node, "appdb", [b"v0"], create=True)
        auditor = RunningAuditor(node, home)
        try:
            assert auditor.next_round()["immuclient_audit_result_per_server", None] == 1
            node.stop()
            metrics = auditor.next_round()
            assert metrics["immuclient_audit_result_per_server", None] == -2
            assert metrics["immuclient_audit_result_per_database", "appdb"] == -2
            try:
                auditor.get("/livez")
                raise AssertionError("/livez answered 200 with the node down")
            except urllib.error.HTTPError as exc:
                assert exc.code == 503
            node.start()
            assert auditor.next_round()["immuclient_audit_result_per_database", "appdb"] == 1
        finally:
            code = auditor.stop(signal.SIGINT)
        assert code == 1, auditor.log()            # errors were seen, no tampering
        assert "could not connect to" in auditor.log()
        assert auditor.log().rstrip().endswith("auditor stopped")


def test_auditor_runs_as_a_user_who_may_read_only_the_audited_database(tmp_path):
    """immudb's Login needs no database; here a login is on one, so an auditor user without
    defaultdb logs in on its --audit-databases; the password as immudb's enc:<base64>."""
    with running_node(tmp_path / "node") as node:
        write(node, "appdb", [b"v0", b"v1"], create=True)
        write(node, "otherdb", [b"v0"], create=True)
        with Client(node.host, node.port) as client:
            client.login(*ADMIN)
            client.create_user("auditor", "Auditor@123", "read", "appdb")
        argv = audit_argv(node, "--audit-rounds", "1", "--audit-monitoring-port",
                          str(free_port()), "--audit-databases", "appdb")
        argv[argv.index("--audit-username") + 1] = "auditor"
        argv[argv.index("--audit-password") + 1] = "enc:" + base64.b64encode(
            b"Auditor@123").decode()
        done = subprocess.run(argv, capture_output=True, text=True, timeout=ROUND_SECONDS_MAX,
                              env=dict(os.environ, IMMUCORE_CLI_HOME=str(tmp_path / "home")))
        assert done.returncode == 0, done.stdout + done.stderr
        assert list(trusted(tmp_path / "home")) == [f"{node.address}/appdb"]
        assert "otherdb" not in done.stdout


def test_a_node_that_stops_answering_fails_the_round_within_the_call_timeout(tmp_path):
    """SIGSTOP: the node's kernel still accepts connections, nothing answers. The round ends as
    an error after AUDIT_CALL_TIMEOUT_SECONDS instead of waiting for ever; SIGCONT: ok again."""
    with running_node(tmp_path / "node") as node:
        write(node, "appdb", [b"v0"], create=True)
        auditor = RunningAuditor(node, tmp_path / "home")
        try:
            assert auditor.next_round()["immuclient_audit_result_per_server", None] == 1
            node.process.send_signal(signal.SIGSTOP)
            try:
                metrics = auditor.next_round()
            finally:
                node.process.send_signal(signal.SIGCONT)
            assert metrics["immuclient_audit_result_per_server", None] == -2
            seconds = metrics["immuclient_audit_duration_seconds", None]
            assert AUDIT_CALL_TIMEOUT_SECONDS <= seconds < 3 * AUDIT_CALL_TIMEOUT_SECONDS
            assert auditor.next_round()["immuclient_audit_result_per_server", None] == 1
        finally:
            auditor.stop()
