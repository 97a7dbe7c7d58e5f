"""Controller metrics. Labels are the ElastiService's namespace and name plus small fixed sets."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

TRANSITIONS = Counter(
    "elasti_controller_phase_transitions_total",
    "ElastiService phase transitions, by the phase entered.",
    ["namespace", "name", "phase"],
    registry=REGISTRY,
)
SWITCH_SECONDS = Histogram(
    "elasti_controller_switch_seconds",
    "From the target event that called for a switch to the last VirtualService patched.",
    ["namespace", "name", "mode"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
WAKES = Counter(
    "elasti_controller_wakes_total",
    "Wake requests, by outcome: scaled, already_awake, failed, not_found.",
    ["namespace", "name", "outcome"],
    registry=REGISTRY,
)
RECONCILE_ERRORS = Counter(
    "elasti_controller_reconcile_errors_total",
    "Reconciles that failed and were retried.",
    ["namespace", "name"],
    registry=REGISTRY,
)
IDLE_CHECKS = Counter(
    "elasti_controller_idle_checks_total",
    "Idle-trigger evaluations, by result: idle, busy, error (metrics unavailable: never scaled down).",
    ["namespace", "name", "result"],
    registry=REGISTRY,
)
FAIL_OPEN_DEFERRED = Counter(
    "elasti_controller_fail_open_deferred_total",
    "Fail-open wakes put off by the rate limit (--fail-open-wakes-per-second).",
    ["namespace", "name"],
    registry=REGISTRY,
)
LEADER = Gauge(
    "elasti_controller_leader",
    "1 while this replica acts: it holds the leader Lease, or leader election is off.",
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge("elasti_controller_queue_depth", "ElastiServices waiting to be reconciled.", registry=REGISTRY)
READY = Gauge(
    "elasti_controller_elastiservice_ready",
    "1 while the ElastiService's Ready condition is True (as last written by this replica).",
    ["namespace", "name"],
    registry=REGISTRY,
)
PHASE = Gauge(
    "elasti_controller_elastiservice_phase",
    "1 for the ElastiService's current phase, 0 for the others.",
    ["namespace", "name", "phase"],
    registry=REGISTRY,
)
MODE = Gauge(
    "elasti_controller_elastiservice_mode",
    "1 for the ElastiService's current routing mode (serve or proxy), 0 for the other.",
    ["namespace", "name", "mode"],
    registry=REGISTRY,
)
PHASES = ("Serving", "ScalingToZero", "ScaledToZero", "ScalingUp")
MODES = ("serve", "proxy")


def observe_status(namespace: str, name: str, status: dict[str, Any]) -> None:
    """The state gauges from the status just written: alerts on "not Ready" or "stuck waking" need them."""
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    READY.labels(namespace, name).set(1 if ready.get("status") == "True" else 0)
    for phase in PHASES:
        PHASE.labels(namespace, name, phase).set(1 if status.get("phase") == phase else 0)
    for mode in MODES:
        MODE.labels(namespace, name, mode).set(1 if status.get("mode") == mode else 0)


def clear_state() -> None:
    """A replica that stops acting (lost the Lease) stops reporting states it no longer follows."""
    for metric in (READY, PHASE, MODE):
        metric.clear()


def forget(namespace: str, name: str) -> None:
    """Drops the series of a deleted ElastiService so that label sets stay bounded by what exists."""
    for metric in (
        TRANSITIONS,
        SWITCH_SECONDS,
        WAKES,
        RECONCILE_ERRORS,
        IDLE_CHECKS,
        FAIL_OPEN_DEFERRED,
        READY,
        PHASE,
        MODE,
    ):
        for labels in list(metric._metrics):
            if labels[0] == namespace and labels[1] == name:
                metric.remove(*labels)
