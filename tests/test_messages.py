"""Result types on the wire (immucore/protocol/messages.py): the SET and GET answers' fast paths
give exactly what the generic ``to_wire`` / ``from_wire`` give."""
import pytest

from immucore.errors import IllegalArgumentsError
from immucore.protocol.messages import (entry_from_wire, from_wire, header_from_wire,
                                        header_to_wire, pack, to_wire, unpack)
from immucore.types import Entry, KVMetadata, TxHeader

HEADER = (12345, bytes(range(32)), 1_700_000_000, 1, b"", 3, bytes(32), 12344, b"\x07" * 32)


def test_a_header_tuple_goes_on_the_wire_as_its_dataclass_does():
    assert header_to_wire(HEADER) == to_wire(TxHeader(*HEADER))
    assert pack(header_to_wire(HEADER)) == pack(to_wire(TxHeader(*HEADER)))   # same key order


def test_a_header_comes_off_the_wire_as_from_wire_reads_it():
    wire = unpack(pack(header_to_wire(HEADER)))
    assert header_from_wire(wire) == from_wire(wire) == TxHeader(*HEADER)


@pytest.mark.parametrize("change", [
    lambda w: w.update(eh=[1, 2]),              # a list field: from_wire makes it a tuple
    lambda w: w.pop("ts"),                      # a missing field: from_wire gives None
    lambda w: w.update(extra=1),                # an unknown field: from_wire ignores it
])
def test_an_unusual_header_map_is_read_by_from_wire(change):
    wire = header_to_wire(HEADER)
    change(wire)
    assert header_from_wire(wire) == from_wire(wire)


def test_a_map_that_is_not_a_header_is_refused_or_passed_as_from_wire_does():
    assert header_from_wire(b"raw") == b"raw"
    with pytest.raises(IllegalArgumentsError, match="unknown result type"):
        header_from_wire({"_t": "NoSuchType"})


ENTRY = Entry(7, b"key", b"value", None, 2)


def test_an_entry_comes_off_the_wire_as_from_wire_reads_it():
    for entry in (ENTRY, Entry(7, b"key", b"value", KVMetadata(expires_at=2_000_000_000), 2)):
        wire = unpack(pack({"entry": to_wire(entry)}))["entry"]
        assert entry_from_wire(wire) == from_wire(wire) == entry


@pytest.mark.parametrize("change", [
    lambda w: w.update(value=[1, 2]),           # a list field: from_wire makes it a tuple
    lambda w: w.pop("revision"),                # a missing field: from_wire gives None
    lambda w: w.update(extra=1),                # an unknown field: from_wire ignores it
    lambda w: w.update(metadata={"_t": "KVMetadata", "deleted": True, "expires_at": None,
                                 "non_indexable": False}),
])
def test_an_unusual_entry_map_is_read_by_from_wire(change):
    wire = to_wire(ENTRY)
    change(wire)
    assert entry_from_wire(wire) == from_wire(wire)


def test_a_map_that_is_not_an_entry_is_refused_or_passed_as_from_wire_does():
    assert entry_from_wire(b"raw") == b"raw"
    assert entry_from_wire(to_wire(TxHeader(*HEADER))) == TxHeader(*HEADER)
    with pytest.raises(IllegalArgumentsError, match="unknown result type"):
        entry_from_wire({"_t": "NoSuchType"})
