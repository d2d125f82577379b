"""TLS (off by default): a node with --certificate/--pkey talks TLS only; clients verify it; a
replica verifies its primary with --replication-tls-ca."""
import datetime as dt
import ipaddress
import ssl
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from immucore.client import Client

from .nodes import running_node


def _self_signed(tmp_path):
    """A certificate for 127.0.0.1 (its own CA) and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "immucore test")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_tls_node_serves_verified_clients_and_refuses_plain_ones(tmp_path):
    cert, key = _self_signed(tmp_path)
    with running_node(tmp_path / "n", "--certificate", cert, "--pkey", key) as node:
        context = ssl.create_default_context(cafile=cert)
        with Client(node.host, node.port, ssl=context) as client:
            client.login("immudb", "immudb")
            assert client.set({b"k": b"v"}).id == 1
        with pytest.raises(Exception):
            with Client(node.host, node.port, timeout=3) as plain:
                plain.login("immudb", "immudb")
        untrusting = ssl.create_default_context()        # the system CAs do not know this cert
        with pytest.raises(ssl.SSLError):
            Client(node.host, node.port, ssl=untrusting)


def test_replica_follows_a_tls_primary(tmp_path):
    cert, key = _self_signed(tmp_path)
    with running_node(tmp_path / "p", "--certificate", cert, "--pkey", key) as primary, \
            running_node(tmp_path / "r", "--replication-tls-ca", cert) as replica:
        with Client(primary.host, primary.port,
                    ssl=ssl.create_default_context(cafile=cert)) as p:
            p.login("immudb", "immudb")
            p.set({b"over": b"tls"})
        with Client(replica.host, replica.port) as r:
            r.login("immudb", "immudb")
            r.create_database("replicadb", {
                "replica": True, "primary_database": "defaultdb", "primary_host": primary.host,
                "primary_port": primary.port, "primary_username": "immudb",
                "primary_password": "immudb"})
            r.use_database("replicadb")
            deadline = time.monotonic() + 20
            while r.current_state().tx_id < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert r.get(b"over").value == b"tls"
