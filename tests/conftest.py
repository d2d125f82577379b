import json
import os

import pytest

from immucore.database import open_database

VECTORS_DIR = os.environ.get(
    "IMMUCORE_VECTORS",
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "vectors"))


def load_vectors(name: str) -> dict:
    with open(os.path.join(VECTORS_DIR, name)) as f:
        return json.load(f)


@pytest.fixture
def db(tmp_path):
    database = open_database(str(tmp_path / "db"), name="defaultdb")
    yield database
    database.close()


@pytest.fixture
def replica(tmp_path):
    database = open_database(str(tmp_path / "replica"), name="replicadb", replica=True)
    yield database
    database.close()


@pytest.fixture(autouse=True)
def _own_client_state_file(tmp_path, monkeypatch):
    """Clients keep their trusted states in ~/.immucore by default; each test gets a file of
    its own, so that no test trusts the node of another (nodes come and go on reused ports)."""
    monkeypatch.setenv("IMMUCORE_STATE_FILE", str(tmp_path / "client_state.json"))
