"""Status conditions and phase: pure functions."""

from __future__ import annotations

import datetime as dt
from typing import Any

from elasti_istio.controller.workloads import WorkloadState

TARGET_FOUND = "TargetFound"
VS_BOUND = "VirtualServicesBound"
CONFLICT = "Conflict"
PROTOCOL = "ProtocolSupported"
ACTIVATOR = "ActivatorAvailable"
WAKE_FAILED = "WakeFailed"
TIMEOUTS = "RouteTimeoutsCompatible"
ALLOWED = "ScaleToZeroAllowed"
TRIGGERS = "TriggersHealthy"
IGNORED = "IgnoredFields"
READY = "Ready"
ORDER = (
    TARGET_FOUND, "ServiceFound", VS_BOUND, CONFLICT, PROTOCOL, ACTIVATOR, TIMEOUTS, ALLOWED, TRIGGERS, WAKE_FAILED,
    IGNORED, READY,
)  # fmt: skip


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conds: list[dict[str, Any]], ctype: str, ok: bool, reason: str, message: str, now: str | None = None
) -> list[dict[str, Any]]:
    """Returns conditions with ``ctype`` set; ``lastTransitionTime`` moves only when the status flips."""
    status = "True" if ok else "False"
    out = [dict(c) for c in conds if c.get("type") != ctype]
    prev = next((c for c in conds if c.get("type") == ctype), None)
    when = (
        prev["lastTransitionTime"]
        if prev and prev.get("status") == status and prev.get("lastTransitionTime")
        else (now or now_iso())
    )
    out.append({"type": ctype, "status": status, "reason": reason, "message": message, "lastTransitionTime": when})
    rank = {t: i for i, t in enumerate(ORDER)}
    out.sort(key=lambda c: rank.get(c["type"], len(ORDER)))
    return out


def parse_time(text: str) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def get_condition(conds: list[dict[str, Any]] | None, ctype: str) -> dict[str, Any] | None:
    return next((c for c in conds or [] if c.get("type") == ctype), None)


def phase_for(state: WorkloadState, pods_left: int) -> str:
    if state.replicas == 0:
        return "ScaledToZero" if pods_left == 0 and state.current == 0 else "ScalingToZero"
    if state.ready == 0:
        return "ScalingUp"
    return "Serving"
