"""Prometheus metrics. Labels are the ElastiService's namespace and name and a fixed outcome/result only;
a request whose header names no known ElastiService is counted with empty namespace and name, so
nothing a client sends can create a series.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from activator.routing import Key

OUTCOMES = ("forwarded", "timeout", "overflow", "rejected", "client_gone", "upstream_error", "wake_failed", "static")
WAKE_RESULTS = ("accepted", "not_found", "refused", "error")
HOLD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120, 300)


class TargetMetrics:
    """Label children of one ElastiService, looked up once rather than per request."""

    __slots__ = ("held", "hold_seconds", "mesh_not_ready", "outcomes", "queue_limit")

    def __init__(self, m: Metrics, ns: str, name: str) -> None:
        self.held = m.held.labels(ns, name)
        self.queue_limit = m.queue_limit.labels(ns, name)
        self.hold_seconds = m.hold_seconds.labels(ns, name)
        self.mesh_not_ready = m.mesh_not_ready.labels(ns, name)
        self.outcomes = {o: m.requests.labels(ns, name, o) for o in OUTCOMES}

    def outcome(self, outcome: str) -> None:
        self.outcomes[outcome].inc()


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.held = Gauge(
            "elasti_activator_held_requests",
            "Requests held now, waiting for their target",
            ["namespace", "name"],
            registry=r,
        )
        self.queue_limit = Gauge(
            "elasti_activator_queue_limit",
            "How many requests this replica holds at most for the ElastiService (spec.activator.queueLimit), "
            "as of its last held request",
            ["namespace", "name"],
            registry=r,
        )
        self.max_held = Gauge(
            "elasti_activator_max_held",
            "How many requests this replica holds at most over all ElastiServices (--max-held)",
            registry=r,
        )
        self.requests = Counter(
            "elasti_activator_requests", "Requests by how they ended", ["namespace", "name", "outcome"], registry=r
        )
        self.hold_seconds = Histogram(
            "elasti_activator_hold_duration_seconds",
            "Time requests spent held",
            ["namespace", "name"],
            buckets=HOLD_BUCKETS,
            registry=r,
        )
        self.wakes = Counter(
            "elasti_activator_wake_notifications",
            "Wake requests to the controller by result (error: one failed attempt, retried)",
            ["namespace", "name", "result"],
            registry=r,
        )
        self.mesh_not_ready = Counter(
            "elasti_activator_mesh_not_ready",
            'Forwards the mesh answered itself ("no healthy upstream"): sent again, never reached the workload',
            ["namespace", "name"],
            registry=r,
        )
        self.connections_refused = Counter(
            "elasti_activator_connections_refused",
            "Client connections refused past --max-connections, or closed because their headers were late",
            ["reason"],
            registry=r,
        )
        by_protocol = Counter(
            "elasti_activator_requests_by_protocol",
            "Requests that reached the proxy port, by the protocol they came in (http1: HTTP/1.1, h2: HTTP/2 "
            "cleartext, gRPC included)",
            ["protocol"],
            registry=r,
        )
        self.http1_request = by_protocol.labels("http1").inc
        self.h2_request = by_protocol.labels("h2").inc
        self._targets: dict[Key, TargetMetrics] = {}
        self._unrouted = self.requests.labels("", "", "rejected")

    def target(self, key: Key) -> TargetMetrics:
        tm = self._targets.get(key)
        if tm is None:
            tm = self._targets[key] = TargetMetrics(self, *key)
        return tm

    def rejected_unrouted(self) -> None:
        """A request without a usable header or for an unknown ElastiService."""
        self._unrouted.inc()

    def connection_refused(self, reason: str) -> None:
        """``too_many`` (past --max-connections) or ``header_timeout`` (headers not in time)."""
        self.connections_refused.labels(reason).inc()

    def wake(self, ns: str, name: str, result: str) -> None:
        self.wakes.labels(ns, name, result).inc()

    def forget(self, key: Key) -> None:
        """The ElastiService was deleted: drop its series so that churn does not grow the output."""
        if self._targets.pop(key, None) is None:
            return
        for metric in (self.held, self.queue_limit, self.hold_seconds, self.mesh_not_ready):
            try:
                metric.remove(*key)
            except KeyError:
                pass
        for o in OUTCOMES:
            try:
                self.requests.remove(*key, o)
            except KeyError:
                pass
        for res in WAKE_RESULTS:
            try:
                self.wakes.remove(*key, res)
            except KeyError:
                pass

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
