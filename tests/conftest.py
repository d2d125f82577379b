import json

import pytest

from immucore.database import open_database

from .codec_vectors import VECTORS_DIR


def load_vectors(name: str) -> dict:
    return json.loads((VECTORS_DIR / name).read_text())


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
