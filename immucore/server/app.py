"""Running a node process: start, banner, signals, pidfile, metrics, graceful stop."""
from __future__ import annotations

import asyncio
import logging
import os
import signal

from ..errors import ImmucoreError
from .handlers import Dispatcher
from .node import Node, NodeOptions

log = logging.getLogger("immucore")
# descriptors beyond the connections: LMDB files, the metrics server, replicators, log files
FILES_RESERVED = 256


def _raise_open_files_limit(needed: int):
    """Raise the soft limit on open files towards ``needed`` (within the hard limit): many
    systems start processes at 1024, below --max-connections, and an accept failing on EMFILE
    would refuse connections with no answer at all."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < needed:
            target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    except (ImportError, ValueError, OSError) as exc:
        log.warning("could not raise the open files limit: %s", exc)
        return
    if soft < needed:
        log.warning("the open files limit is %d: fewer than --max-connections %d can be served; "
                    "raise it (ulimit -n) or lower --max-connections", soft,
                    needed - FILES_RESERVED)


GRPC_SHARED, GRPC_OWN_PORT, GRPC_OFF = "shared", "own port", "off"


def grpc_placement(grpc_port: int, port: int) -> str:
    """Where immudb's gRPC API is served: ``--grpc-port`` 0 (the default) or the node's own
    port: on that port, beside the native protocol (docs/grpc.md); -1: not at all; any other
    port: there, and the node's port speaks only the native protocol."""
    if grpc_port == -1:
        return GRPC_OFF
    if grpc_port < 0 or grpc_port > 65535:
        raise ImmucoreError(f"--grpc-port must be a port, 0 (on --port) or -1 (off), "
                            f"not {grpc_port}")
    return GRPC_SHARED if grpc_port in (0, port) else GRPC_OWN_PORT


async def run_node(options: dict, *, ready=None) -> int:
    """Run until SIGTERM/SIGINT; in-flight requests finish and every database closes cleanly."""
    node_options = NodeOptions(
        dir=options["dir"], address=options["address"], port=options["port"],
        grpc_port=options.get("grpc_port", 0),
        admin_password=options["admin_password"], synced=options["synced"],
        max_sessions=options["max_sessions"], max_connections=options["max_connections"],
        max_active_databases=options["max_active_databases"],
        metrics_server=options["metrics_server"],
        metrics_server_port=options["metrics_server_port"], pidfile=options["pidfile"],
        logfile=options["logfile"], signing_key=options["signing_key"],
        certificate=options["certificate"], pkey=options["pkey"],
        replication_tls_ca=options["replication_tls_ca"],
        replication_sync_timeout=options["replication_sync_timeout"],
        replication={k: v for k, v in options.items() if k not in _NODE_KEYS})
    _raise_open_files_limit(node_options.max_connections + FILES_RESERVED)
    try:
        grpc_where = grpc_placement(node_options.grpc_port, node_options.port)
        node = Node(node_options)
        node._server_tls()                  # a TLS misconfiguration stops the start, clearly
    except (ImmucoreError, OSError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Judged before serving (hashing the records this process did not write, off the loop), so
    # protected mode knows its users from the first connection; kept up to date after.
    exposed = await loop.run_in_executor(node.read_pool, node.users.users_with_well_known_password)
    if exposed:
        from .node import protected_mode_message
        log.warning("%s", protected_mode_message(exposed))
    grpc_server = None
    if grpc_where != GRPC_OFF:
        from ..grpc.server import start_grpc_server, stop_grpc_server
    if grpc_where == GRPC_SHARED:
        # first, so that the shared port never accepts a gRPC connection it cannot splice
        try:
            grpc_server, internal_port = await start_grpc_server(node, internal=True)
        except ImmucoreError as exc:
            log.error("cannot start: %s", exc)
            await node.close()
            return 1
        from .shared_port import INTERNAL_HOST
        node.grpc_internal_endpoint = (INTERNAL_HOST, internal_port)
    try:
        await node.serve(Dispatcher(node))
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", node_options.address, node_options.port, exc)
        if grpc_server is not None:
            await stop_grpc_server(grpc_server)
        await node.close()
        return 1
    if grpc_where == GRPC_OWN_PORT:
        try:
            grpc_server, _ = await start_grpc_server(node, node_options.address,
                                                     node_options.grpc_port)
        except ImmucoreError as exc:
            log.error("cannot start: %s", exc)
            await node.close()
            return 1
    if node_options.metrics_server:
        from .metrics import start_metrics_server
        start_metrics_server(node, node_options.address, node_options.metrics_server_port)
    if node_options.pidfile:
        with open(node_options.pidfile, "w") as f:
            f.write(f"{os.getpid()}\n")
    banner = node.banner() + {
        GRPC_SHARED: "; immudb gRPC API on the same port",
        GRPC_OWN_PORT: f"; immudb gRPC API on port {node_options.grpc_port}",
        GRPC_OFF: "; immudb gRPC API off"}[grpc_where]
    print(banner, flush=True)
    if node_options.logfile:         # the log then lives in a file: it starts with the banner too
        log.info("%s", banner)
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("stopping: finishing in-flight requests")
    if grpc_server is not None:
        await stop_grpc_server(grpc_server)
    await node.close()
    if node_options.pidfile:
        try:
            os.unlink(node_options.pidfile)
        except OSError:
            pass
    log.info("stopped")
    return 0


_NODE_KEYS = {"dir", "address", "port", "grpc_port", "admin_password", "synced", "max_sessions",
              "max_active_databases",
              "max_connections",
              "metrics_server", "metrics_server_port", "pidfile", "logfile", "signing_key",
              "certificate", "pkey", "replication_tls_ca",
              "replication_sync_timeout"}
