"""Issue 5's security list against a real node: names that could reach the file system are
refused before they do, and tokens do not survive a restart."""
from __future__ import annotations

import os

import pytest

from immucore.client import Client
from immucore.errors import IllegalArgumentsError
from immucore.protocol.messages import RemoteError

from .nodes import running_node

BAD_NAMES = ["..", ".", "/x", "a/b", "a\\b", "a\x00b", "\x00", "", "x" * 129, "Upper", "DB",
             "a b", "a-b", "a.b", "~root", "é", "../systemdb", "defaultdb/../x"]


def _folders(data_dir) -> set:
    return set(os.listdir(data_dir))


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with running_node(tmp_path_factory.mktemp("security")) as node:
        yield node


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_a_bad_database_name_never_reaches_the_file_system(node, name):
    before = _folders(node.dir)
    with Client(node.host, node.port) as admin:
        admin.login("immudb", "immudb")
        for attempt in (lambda: admin.create_database(name),
                        lambda: admin.update_database(name, {"max_key_len": 10}),
                        lambda: admin.load_database(name),
                        lambda: admin.unload_database(name),
                        lambda: admin.delete_database(name),
                        lambda: admin.use_database(name)):
            with pytest.raises((IllegalArgumentsError, RemoteError)):
                attempt()
    assert _folders(node.dir) == before


def test_the_longest_good_name_works(node):
    with Client(node.host, node.port) as admin:
        admin.login("immudb", "immudb")
        admin.create_database("a" * 128)
        assert "a" * 128 in _folders(node.dir)


def test_tokens_do_not_survive_a_restart(tmp_path):
    with running_node(tmp_path) as node:
        with Client(node.host, node.port) as client:
            client.login("immudb", "immudb", detached=True)
            token = client.session_token
            client.set({b"a": b"1"})
        node.restart()
        with Client(node.host, node.port) as client:
            with pytest.raises(RemoteError) as refused:
                client.resume(token)
            assert refused.value.code == "session_not_found"
