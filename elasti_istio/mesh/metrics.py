"""Istio-style request metrics: ``istio_requests_total`` and ``istio_request_duration_milliseconds``.

Every label value comes from cluster objects (Services, Pods, the proxy's own role) or from a fixed
set (response code, flags), never from the request itself, so a client cannot inflate the series
count by sending made-up hosts or paths.
"""

from __future__ import annotations

import dataclasses

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_workload",
    "destination_workload_namespace",
    "destination_version",
    "request_protocol",
    "response_code",
    "response_flags",
)

UNKNOWN = "unknown"


@dataclasses.dataclass
class RequestRecord:
    """Labels of one request, filled in as routing learns them."""

    reporter: str = "source"
    source_workload: str = UNKNOWN
    source_workload_namespace: str = UNKNOWN
    destination_service: str = UNKNOWN
    destination_service_name: str = UNKNOWN
    destination_service_namespace: str = UNKNOWN
    destination_workload: str = UNKNOWN
    destination_workload_namespace: str = UNKNOWN
    destination_version: str = UNKNOWN
    request_protocol: str = "http"
    response_code: int = 0
    response_flags: str = "-"

    def labels(self) -> tuple[str, ...]:
        return tuple(str(getattr(self, name)) for name in LABELS)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "istio_requests", "Requests handled by the mesh stand-in", LABELS, registry=self.registry
        )
        self.duration = Histogram(
            "istio_request_duration_milliseconds",
            "Time from request start to the end of the response, in milliseconds",
            LABELS,
            buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000),
            registry=self.registry,
        )

    def record(self, rec: RequestRecord, duration_ms: float) -> None:
        labels = rec.labels()
        self.requests.labels(*labels).inc()
        self.duration.labels(*labels).observe(duration_ms)

    def render(self) -> bytes:
        return generate_latest(self.registry)
