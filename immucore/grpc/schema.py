"""immudb's message classes, built from immucore's own immudb_schema.proto in a private
descriptor pool.

immudb's SDK (immudb-py) registers its schema.proto, package ``immudb.schema``, in protobuf's
default pool; messages of the same full names registered there twice fail with duplicate
symbols. Built in a pool of their own, immucore's classes and immudb's live in one process
(our tests drive a node with immudb's SDK), and on the wire they are the same messages.

``schema.Entry`` etc. are the classes; ``SERVICE`` is the ImmuService descriptor.
"""
from __future__ import annotations

from google.protobuf import descriptor_pool, empty_pb2, message_factory

from .immudb_schema_descriptor import FILE_DESCRIPTOR

PACKAGE = "immudb.schema"
SERVICE_NAME = f"{PACKAGE}.ImmuService"

POOL = descriptor_pool.DescriptorPool()
POOL.AddSerializedFile(empty_pb2.DESCRIPTOR.serialized_pb)   # google/protobuf/empty.proto
FILE = POOL.AddSerializedFile(FILE_DESCRIPTOR)
SERVICE = FILE.services_by_name["ImmuService"]
Empty = message_factory.GetMessageClass(POOL.FindMessageTypeByName("google.protobuf.Empty"))


def message_class(full_name: str):
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(full_name))


for _name in FILE.message_types_by_name:
    globals()[_name] = message_class(f"{PACKAGE}.{_name}")
for _name, _enum in FILE.enum_types_by_name.items():
    globals()[_name] = _enum
