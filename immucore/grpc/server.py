"""The node's gRPC server (grpc.aio) for immudb's ImmuService: on the node's own port by default
(the server then listens on an internal loopback endpoint, and the node splices gRPC connections
to it: server/shared_port.py), or on ``--grpc-port``.

It runs on the node's own event loop (uvloop or asyncio's): grpc.aio drives its completion
queue from the running loop, and the service's handlers then await the node's machinery (the
writer's commit bridge, sync-replication acks, waits for commits) on the loop that machinery is
bound to, with no thread hop per call. Blocking work goes to the node's read threads, as for
the native protocol.
"""
from __future__ import annotations

import logging

import grpc

from ..constants import (GRPC_CONCURRENT_RPCS_MAX, GRPC_CONNECTION_IDLE_SECONDS,
                         GRPC_REQUEST_BYTES_MAX, GRPC_RESPONSE_BYTES_MAX)
from ..errors import ImmucoreError
# where the gRPC server listens when it shares the node's port: loopback only, on a port the
# system picks; only the node's splices (and local processes, whose real peer is then loopback)
# reach it
from ..server.shared_port import INTERNAL_HOST
from . import schema
from .service import ImmuService

log = logging.getLogger("immucore.grpc")


# the handler gRPC builds for a method, by whether its client and its server stream
_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,      # exportTx, streamGet, ...
    (True, False): grpc.stream_unary_rpc_method_handler,      # replicateTx, streamSet, ...
    (True, True): grpc.stream_stream_rpc_method_handler,      # streamExportTx
}


def _handlers(service: ImmuService) -> grpc.GenericRpcHandler:
    """Every method of our ImmuService descriptor, served by the method of the same name: a
    coroutine for a unary answer, an async generator for a streamed one; a streamed request
    comes as an async iterator of messages (grpc.aio's shapes)."""
    methods = {}
    for method in schema.SERVICE.methods:
        request = schema.message_class(method.input_type.full_name)
        response = schema.message_class(method.output_type.full_name)
        kind = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        methods[method.name] = kind(
            getattr(service, method.name), request_deserializer=request.FromString,
            response_serializer=response.SerializeToString)
    return grpc.method_handlers_generic_handler(schema.SERVICE_NAME, methods)




async def start_grpc_server(node, address: str = INTERNAL_HOST, port: int = 0, *,
                            internal: bool = False):
    """Serve; ``(server, port listened on)``. ``internal``: the endpoint the shared port splices
    to (plain TCP on loopback: the node terminated TLS already). Otherwise ``address:port``, with
    TLS when the node has --certificate/--pkey. An address in use raises ImmucoreError naming it."""
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", GRPC_REQUEST_BYTES_MAX),
                 ("grpc.max_send_message_length", GRPC_RESPONSE_BYTES_MAX),
                 ("grpc.max_connection_idle_ms", GRPC_CONNECTION_IDLE_SECONDS * 1000),
                 # gRPC's default SO_REUSEPORT would let a second node bind the same port
                 # silently and take half of its connections
                 ("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=GRPC_CONCURRENT_RPCS_MAX)
    server.add_generic_rpc_handlers((_handlers(ImmuService(node)),))
    if internal:
        address, port = INTERNAL_HOST, 0
    target = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    flag = "the internal endpoint of the shared port" if internal else "--grpc-port"
    try:
        if not internal and (node.options.certificate or node.options.pkey):
            with open(node.options.pkey, "rb") as f:
                key = f.read()
            with open(node.options.certificate, "rb") as f:
                chain = f.read()
            bound = server.add_secure_port(target, grpc.ssl_server_credentials([(key, chain)]))
        else:
            bound = server.add_insecure_port(target)
    except RuntimeError as exc:
        raise ImmucoreError(f"cannot listen for gRPC on {target} ({flag}): {exc}") from None
    if not bound:
        raise ImmucoreError(f"cannot listen for gRPC on {target} ({flag})")
    await server.start()
    log.info("serving immudb's gRPC API on %s:%s%s", address, bound,
             " (internal: spliced from the node's port)" if internal else "")
    return server, bound


async def stop_grpc_server(server: grpc.aio.Server, grace_seconds: float = 5.0):
    """Stop accepting calls; calls in flight get ``grace_seconds`` to finish."""
    await server.stop(grace_seconds)
