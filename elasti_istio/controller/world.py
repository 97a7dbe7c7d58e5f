"""What one reconcile works with: the world as read (:class:`World`), what it decides to do
(:class:`Plan`) and what doing it achieved (:class:`Outcome`). Plain data; the rules that turn one into
the next are in :mod:`elasti_istio.controller.decide`."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from elasti_istio import vsrewrite
from elasti_istio.controller import spec as es_spec
from elasti_istio.controller.indexes import Claim, ObjKey, Order
from elasti_istio.controller.workloads import WorkloadState
from elasti_istio.resources import GROUP

VsKey = ObjKey  # (namespace, name) of a VirtualService

KEDA_PAUSED_REPLICAS = "autoscaling.keda.sh/paused-replicas"
KEDA_PAUSED = "autoscaling.keda.sh/paused"
PAUSED_BY_US = f"{GROUP}/paused-keda"
HOLD_UNTIL = f"{GROUP}/wake-hold-until"


def keda_owner_pause(so: dict[str, Any] | None) -> str | None:
    """The pause annotations of a ScaledObject its owner set (not this controller), as ``k=v`` text; None
    when it is not paused, or paused by this controller."""
    ann = ((so or {}).get("metadata") or {}).get("annotations") or {}
    if PAUSED_BY_US in ann:
        return None
    found = [f"{k}={ann[k]}" for k in (KEDA_PAUSED_REPLICAS, KEDA_PAUSED) if k in ann]
    if KEDA_PAUSED in ann and KEDA_PAUSED_REPLICAS not in ann and str(ann[KEDA_PAUSED]).lower() != "true":
        return None  # "paused: false" is KEDA's way to unpause
    return ", ".join(found) or None


class Blocked(Exception):
    """The ElastiService cannot be acted on as it stands; a condition says why."""

    def __init__(self, ctype: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.ctype, self.reason, self.message = ctype, reason, message


@dataclasses.dataclass
class Resolved:
    """What a reconcile found out about an ElastiService's target, Service and destinations."""

    spec: es_spec.ElastiSpec
    workload_kind: str
    workload: dict[str, Any]
    state: WorkloadState
    scaled_object: dict[str, Any] | None
    service: dict[str, Any]
    origin_name: str
    origin_port: int
    target: vsrewrite.Target  # as a VirtualService in the ElastiService's namespace sees it
    subset_labels: dict[str, dict[str, str]]
    targets: dict[str, vsrewrite.Target] = dataclasses.field(default_factory=dict)  # by VirtualService namespace

    def target_for(self, vs_namespace: str) -> vsrewrite.Target:
        """The target as routes in ``vs_namespace`` see it: their subsets come from the DestinationRules
        Istio applies for a client there."""
        return self.targets.get(vs_namespace, self.target)


@dataclasses.dataclass(frozen=True)
class Memory:
    """What the controller remembers of one ElastiService between reconciles, as the reconcile saw it."""

    sleeping: bool = False  # its own scale-down is under way: routes go to the activator first
    waking: bool = False  # it scaled the target up and waits for a ready replica
    wake_failure: tuple[str, str] | None = None  # (reason, message) of the last wake that failed
    last_wake: str | None = None  # when it last woke the target (RFC 3339)
    triggers: tuple[bool, str, str] | None = None  # (healthy, reason, message) of the last idle check


@dataclasses.dataclass(frozen=True)
class World:
    """Everything one reconcile read, and nothing it wrote."""

    key: str
    es: dict[str, Any]
    now: dt.datetime
    activator: tuple[bool, str, str]  # (available, reason, message)
    memory: Memory
    activator_ref: vsrewrite.ActivatorRef  # where proxy-mode routes send the target's share
    cluster_domain: str
    blocked: Blocked | None = None
    r: Resolved | None = None
    refs: frozenset[VsKey] = frozenset()  # VirtualServices bound to it
    vss: dict[VsKey, dict[str, Any]] = dataclasses.field(default_factory=dict)  # the bound ones that exist
    stale: tuple[VsKey, ...] = ()  # holding its restore data, no longer bound
    touched: frozenset[VsKey] = frozenset()  # every VirtualService it may have rewritten
    endpoints_listed: bool = True  # the Service's EndpointSlices list a ready pod of the target
    pods_left: int = 0  # pods of a target at zero still there
    # Other ElastiServices claiming destinations in its VirtualServices (as their last reconcile found them)
    rivals: dict[str, tuple[Order, frozenset[Claim]]] = dataclasses.field(default_factory=dict)

    @property
    def status(self) -> dict[str, Any]:
        return dict(self.es.get("status") or {})

    @property
    def conditions(self) -> list[dict[str, Any]]:
        return list(self.status.get("conditions") or [])


@dataclasses.dataclass(frozen=True)
class ScaleUp:
    reason: str  # the Event's reason
    why: str
    rate_limited: bool = False  # fail-open wakes share a token bucket


@dataclasses.dataclass
class Plan:
    """What to write, in this order, and the status as far as it does not depend on how the writes went."""

    restore_all: bool = False  # blocked: every route it touched back to serve mode
    ensure_origin: bool = False
    serve_stale: tuple[VsKey, ...] = ()
    scale_up: ScaleUp | None = None
    lift_keda_hold: bool = False
    release_ready: int | None = None  # status.readyReplicas, written before the routes move
    routing: tuple[VsKey, ...] = ()  # the bound VirtualServices that route to the target
    desired: str = "serve"
    protocol_refused: bool = False  # a port the activator cannot carry: the routes stay in serve mode
    claims: frozenset[Claim] = frozenset()  # the route destinations that are the target's
    conflict_refused: tuple[str, str] | None = None  # (reason, message): an earlier ElastiService claims them
    endpoints_wait_over: bool = False  # routes may go back: the wait for the EndpointSlice ends
    conditions: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    requeue: float | None = None
    mode: str = "serve"
    phase: str | None = None


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What acting on a plan achieved, as far as the status tells it."""

    memory: Memory  # as it stands after the writes (a wake recorded, a failure cleared)
    changed: bool = False  # a VirtualService was rewritten
    requeue: float | None = None
