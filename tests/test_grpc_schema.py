"""immucore's immudb_schema.proto against immudb's own: the same names, numbers and types for
everything it declares, and the shipped generated module is what the .proto compiles to."""
from google.protobuf import descriptor_pb2

from immucore.grpc import generate, schema
from immucore.grpc.immudb_schema_descriptor import FILE_DESCRIPTOR

# immudb's SDK, unmodified (a test dependency): its generated schema is immudb's schema.proto
from immudb.grpc import schema_pb2 as immudb_schema


def test_shipped_descriptor_is_what_the_proto_compiles_to():
    shipped = descriptor_pb2.FileDescriptorProto.FromString(FILE_DESCRIPTOR)
    fresh = descriptor_pb2.FileDescriptorProto.FromString(generate.compile_descriptor())
    assert shipped == fresh, ("immucore/grpc/immudb_schema.proto changed: run "
                              "`python -m immucore.grpc.generate`")


def _fields(message):
    return {f.name: (f.number, f.type, f.is_repeated,
                     f.message_type.full_name if f.message_type else None,
                     f.enum_type.full_name if f.enum_type else None,
                     f.containing_oneof.name if f.containing_oneof else None)
            for f in message.fields}


def _messages(file):
    out = {}

    def walk(message):
        out[message.full_name] = message
        for nested in message.nested_types:
            walk(nested)
    for message in file.message_types_by_name.values():
        walk(message)
    return out


def test_every_message_has_immudbs_fields():
    theirs = _messages(immudb_schema.DESCRIPTOR)
    ours = _messages(schema.FILE)
    assert ours, "no message loaded"
    for name, message in ours.items():
        assert name in theirs, f"{name} is no message of immudb's schema"
        mine, reference = _fields(message), _fields(theirs[name])
        assert set(reference) <= set(mine), \
            f"{name} lacks immudb's fields {sorted(set(reference) - set(mine))}"
        for field, shape in mine.items():
            if field in reference:     # immudb's SDK may predate a field immudb added since
                assert shape == reference[field], f"{name}.{field}: {shape} != {reference[field]}"


def test_every_enum_has_immudbs_values():
    for name, enum in schema.FILE.enum_types_by_name.items():
        reference = immudb_schema.DESCRIPTOR.enum_types_by_name[name]
        assert {v.name: v.number for v in enum.values} == \
            {v.name: v.number for v in reference.values}


def test_every_method_is_immudbs():
    reference = immudb_schema.DESCRIPTOR.services_by_name["ImmuService"]
    assert schema.SERVICE.full_name == "immudb.schema.ImmuService"
    for method in schema.SERVICE.methods:
        theirs = reference.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name) == \
            (theirs.input_type.full_name, theirs.output_type.full_name), method.name
        assert (method.client_streaming, method.server_streaming) == \
            (theirs.client_streaming, theirs.server_streaming), method.name


def test_messages_cross_between_the_two_schemas():
    """Both sets of classes live in one process (ours in a private pool) and read each other."""
    ours = schema.VerifiableGetRequest(keyRequest=schema.KeyRequest(key=b"k", atRevision=-2),
                                       proveSinceTx=7)
    theirs = immudb_schema.VerifiableGetRequest.FromString(ours.SerializeToString())
    assert theirs.keyRequest.key == b"k" and theirs.keyRequest.atRevision == -2
    assert theirs.proveSinceTx == 7
