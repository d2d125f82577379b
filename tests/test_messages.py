"""Result types on the wire (immucore/protocol/messages.py): the SET answer's fast paths give
exactly what the generic ``to_wire`` / ``from_wire`` give."""
import pytest

from immucore.errors import IllegalArgumentsError
from immucore.protocol.messages import (from_wire, header_from_wire, header_to_wire, pack,
                                        to_wire, unpack)
from immucore.types import TxHeader

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
