"""Prometheus metrics on ``--metrics-server-port``: per database committed and indexed tx id, its
index worker's restarts and error state, and requests served (read/write/admin; rates come from Prometheus), sessions, connections; per
replica its lag, state, its primary's committed tx id, its retries, immudb's replicator gauges
and the time each batch took to commit; per sync primary the quorum and each replica's
acknowledged tx. Values are read when Prometheus scrapes (a custom
collector), so the hot path pays nothing for them."""
from __future__ import annotations

import logging

from prometheus_client import start_http_server
from prometheus_client.core import (REGISTRY, CounterMetricFamily, GaugeMetricFamily,
                                   HistogramMetricFamily)

from ..constants import METRICS_ERROR_LABEL_CHARS_MAX

log = logging.getLogger("immucore.metrics")


class NodeCollector:
    def __init__(self, node):
        self.node = node

    def collect(self):
        committed = GaugeMetricFamily("immudb_last_committed_trx_id",
                                      "last committed tx id", labels=["db"])
        indexed = GaugeMetricFamily("immudb_last_indexed_trx_id", "last indexed tx id",
                                    labels=["db"])
        databases = dict(self.node.databases)
        databases["systemdb"] = self.node.systemdb
        for name, database in databases.items():
            try:
                committed.add_metric([name], database.current_state().tx_id)
                indexed.add_metric([name], database.indexed_tx_id)
            except Exception:  # noqa: BLE001 - a closing database is skipped, not an error
                continue
        yield committed
        yield indexed
        yield from self._index_workers(databases)
        requests = CounterMetricFamily("immucore_requests", "requests served per database and "
                                       "kind (read, write, admin, replica_ack)",
                                       labels=["db", "kind"])
        for (name, kind), count in list(self.node.request_counts.items()):
            requests.add_metric([name, kind], count)
        yield requests
        # no sample while unknown (the primary never reached, or a diverged replica): an
        # alert on the lag must not read a 0 there; seconds_since_last_contact alerts instead
        lag = GaugeMetricFamily("immudb_replication_lag", "primary committed tx id (as last "
                                "heard) minus the replica's; absent while unknown",
                                labels=["db"])
        primary = GaugeMetricFamily("immudb_replication_primary_committed_tx_id",
                                    "the primary's committed tx id as last heard; absent "
                                    "until it was", labels=["db"])
        retries = CounterMetricFamily("immudb_replication_replicators_retries",
                                      "replication failures retried", labels=["db"])
        state = GaugeMetricFamily("immucore_replication_state", "1 for the replicator's current "
                                  "state (following, checking, retrying, discarding, diverged, loop)",
                                  labels=["db", "state"])
        lag_seconds = GaugeMetricFamily("immucore_replication_lag_seconds", "0 when caught up, "
                                        "else seconds since the replica last was (as of the "
                                        "last contact); absent while unknown", labels=["db"])
        since_contact = GaugeMetricFamily("immucore_replication_seconds_since_last_contact",
                                          "seconds since the primary last answered the "
                                          "replica; absent until it did", labels=["db"])
        since_apply = GaugeMetricFamily("immucore_replication_seconds_since_last_apply",
                                        "seconds since the replica last applied a batch",
                                        labels=["db"])
        # immudb's gauges of its replicator workers: a replica here has one replicator, which
        # applies one batch at a time
        replicators = GaugeMetricFamily("immudb_replication_replicators",
                                        "replicators of the database", labels=["db"])
        active = GaugeMetricFamily("immudb_replication_replicators_active",
                                   "replicators following their primary (not retrying, not "
                                   "stopped)", labels=["db"])
        retry_delay = GaugeMetricFamily("immudb_replication_replicators_retry_delay",
                                        "the backoff under way, in seconds, before the "
                                        "replicator's next retry (0 when not retrying)",
                                        labels=["db"])
        commit_time = HistogramMetricFamily("immudb_replication_commit_time",
                                            "seconds to verify and commit one replicated batch",
                                            labels=["db"])
        for name, replicator in list(self.node.replicators.items()):
            status = replicator.status()
            replicators.add_metric([name], 1)
            active.add_metric([name], 1 if status["state"] == "following" else 0)
            retry_delay.add_metric([name], status["retry_delay_seconds"])
            durations = replicator.apply_seconds
            commit_time.add_metric([name], durations.buckets(), durations.total_seconds)
            for family, value in ((lag, status["lag_txs"]),
                                  (primary, status["primary_committed_tx_id"]),
                                  (lag_seconds, status["lag_seconds"]),
                                  (since_contact, status["seconds_since_last_contact"])):
                if value is not None:
                    family.add_metric([name], value)
            retries.add_metric([name], status["retries"])
            state.add_metric([name, status["state"]], 1)
            if status["seconds_since_last_apply"] is not None:
                since_apply.add_metric([name], status["seconds_since_last_apply"])
        yield lag
        yield primary
        yield retries
        yield state
        yield lag_seconds
        yield since_contact
        yield since_apply
        yield replicators
        yield active
        yield retry_delay
        yield commit_time
        quorum = GaugeMetricFamily("immucore_replication_sync_quorum_tx_id", "on a sync primary: "
                                   "the highest tx held by enough replicas", labels=["db"])
        acked = GaugeMetricFamily("immucore_replication_replica_acked_tx_id", "the last tx each "
                                  "replica acknowledged holding", labels=["db", "replica"])
        for name, acks in list(self.node.sync_acks.items()):
            if self.node.required_acks(name):
                quorum.add_metric([name], acks.held_by_quorum())
            for replica, tx_id in acks.replicas().items():
                acked.add_metric([name, replica], tx_id)
        yield quorum
        yield acked
        sessions = GaugeMetricFamily("immucore_sessions", "open sessions")
        sessions.add_metric([], len(self.node.sessions) + len(self.node.token_sessions))
        yield sessions
        connections = GaugeMetricFamily("immucore_connections", "open connections")
        connections.add_metric([], len(self.node.connections) + len(self.node.spliced))
        yield connections


    @staticmethod
    def _index_workers(databases: dict):
        """Per database: its index worker's restarts, and 1 with the error as a label once the
        worker kept dying and is not restarted (0 and an empty error while it runs)."""
        restarts = CounterMetricFamily("immucore_index_worker_restarts", "index worker processes "
                                       "started again after one exited", labels=["db"])
        failed = GaugeMetricFamily("immucore_index_worker_failed", "1 when the index worker kept "
                                   "dying and is not restarted (reads fail; the error label holds "
                                   "the start of its error)", labels=["db", "error"])
        for name, database in databases.items():
            try:
                status = database.index_status()
            except Exception:  # noqa: BLE001 - a closing database is skipped, not an error
                continue
            restarts.add_metric([name], status["restarts"])
            error = (status["error"] or "")[:METRICS_ERROR_LABEL_CHARS_MAX]
            failed.add_metric([name, error], 1 if error else 0)
        yield restarts
        yield failed


def start_metrics_server(node, address: str, port: int):
    try:
        REGISTRY.register(NodeCollector(node))
        start_http_server(port, addr=address)
        log.info("metrics on http://%s:%d/metrics", address, port)
    except (OSError, ValueError) as exc:
        log.error("metrics server not started on port %d: %s", port, exc)
