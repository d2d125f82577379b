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
