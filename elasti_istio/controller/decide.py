"""When the routes go to the activator, and why: the rules of one reconcile, as pure functions.

:func:`decide` takes the world as read (:class:`~elasti_istio.controller.world.World`) and returns the
writes to make (:class:`~elasti_istio.controller.world.Plan`); :func:`report` takes what the writes
achieved and returns the status to write and the Events to post. No I/O here, and no clock but
``world.now``.

The routing mode, in the order the rules are tried (:func:`desired_mode`):

========================================  ==========  ===============================================
the world                                 routes      and
========================================  ==========  ===============================================
a port of the routes the activator        serve       a target at zero is woken (no scale-down of our
cannot carry (:mod:`protocols`)                       own either)
a route destination of the target         serve       nothing is scaled: the earlier ElastiService
claimed by an ElastiService created                   manages it (:func:`conflict_rules`)
earlier
our own scale-down under way              proxy       (the routes move before the target goes to 0)
the activator unavailable                 serve       a target at zero is woken (fail open, rate
                                                      limited)
the target at zero                        proxy
a ready replica, routes still proxied,    proxy       until the EndpointSlice lists it (bounded;
not yet in the Service's EndpointSlices               looked at again in ``ENDPOINTS_POLL``)
a ready replica                           serve
scaling up, no replica ready              unchanged   (proxied stays proxied, serving stays serving)
========================================  ==========  ===============================================
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from elasti_istio import duration, vsrewrite
from elasti_istio.controller import conditions as C
from elasti_istio.controller import protocols, schedule
from elasti_istio.controller import spec as es_spec
from elasti_istio.controller.indexes import Claim, Order
from elasti_istio.controller.workloads import WorkloadState
from elasti_istio.controller.world import (
    HOLD_UNTIL,
    PAUSED_BY_US,
    Memory,
    Outcome,
    Plan,
    Resolved,
    ScaleUp,
    VsKey,
    World,
    keda_owner_pause,
)
from elasti_istio.resources import ANN_BIND

ENDPOINTS_POLL = 0.05  # seconds between looks at a woken target's EndpointSlices
MISSING_VS_RETRY = 30.0  # a bound VirtualService not found is looked for again this often
PERIOD_RECHECK = 60.0  # with an enabledPeriod, the period is looked at again at least this often
PODS_LEFT_RECHECK = 1.0  # a target at zero with pods still terminating
HOLD_MARGIN = 0.5  # a KEDA wake hold is lifted this long after its deadline
# Conditions whose "bad" state is a Warning: the value of ``status`` that is bad.
BAD = {
    C.TARGET_FOUND: "False",
    "ServiceFound": "False",
    C.VS_BOUND: "False",
    C.CONFLICT: "True",
    C.PROTOCOL: "False",
    C.ACTIVATOR: "False",
    C.TIMEOUTS: "False",
    C.TRIGGERS: "False",
    C.WAKE_FAILED: "True",
}
NOT_A_WARNING = {(C.ALLOWED, "OutsideEnabledPeriod")}  # a schedule doing what it was asked to


@dataclasses.dataclass(frozen=True)
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str


def sooner(a: float | None, b: float | None) -> float | None:
    """The earlier of two requeue delays (None: no requeue)."""
    if a is None:
        return b
    return a if b is None else min(a, b)


# ---- the rules ---------------------------------------------------------------------------------


def decide(w: World) -> Plan:
    if w.blocked is not None:
        return _decide_blocked(w)
    r = w.r
    assert r is not None
    spec, state = r.spec, r.state
    via = f" via ScaledObject {spec.target.name}" if spec.target.kind == "ScaledObject" else ""
    found = f"{r.workload_kind} {state.name}{via}"
    conds = C.set_condition(ignored_condition(w), C.TARGET_FOUND, True, "TargetFound", found)
    conds = C.set_condition(
        conds, "ServiceFound", True, "ServiceFound", f"Service {spec.service}, port {r.origin_port}"
    )
    plan = Plan(ensure_origin=True, serve_stale=w.stale)
    routing, shared = classify(w)
    plan.routing = tuple(sorted(routing))
    conds, plan.requeue = bound_condition(w, conds, routing, shared)
    plan.claims = claims(w, routing)
    conds, plan.conflict_refused = conflict_rules(w, conds, plan.claims)
    carried, protocol_msg = protocol_rules(w, routing)
    reason = "Supported" if carried else "UnsupportedProtocol"
    conds = C.set_condition(conds, C.PROTOCOL, carried, reason, protocol_msg)
    plan.protocol_refused = not carried
    conds = timeouts_condition(w, conds, routing)
    act_ok, act_reason, act_msg = w.activator
    conds = C.set_condition(conds, C.ACTIVATOR, act_ok, act_reason, act_msg)
    conds, plan.scale_up, requeue = period_rules(w, conds)
    plan.requeue = sooner(plan.requeue, requeue)
    plan.lift_keda_hold, requeue = keda_hold_rules(r, w.now)
    plan.requeue = sooner(plan.requeue, requeue)
    conds = triggers_condition(w, conds)
    proxied_now = proxied(w, routing)
    refused = plan.protocol_refused or plan.conflict_refused is not None
    plan.desired, fail_open, requeue = desired_mode(w, state, proxied_now, refused)
    plan.requeue = sooner(plan.requeue, requeue)
    if plan.protocol_refused and state.at_zero and plan.scale_up is None:
        plan.scale_up = ScaleUp(
            "UnsupportedProtocol", "the activator cannot carry the routes' protocol, so the target is kept awake"
        )
    if fail_open:
        plan.scale_up = ScaleUp("FailOpen", "the activator is unavailable, so the target is woken", rate_limited=True)
    if plan.conflict_refused is not None:
        plan.scale_up = None  # the ElastiService created first manages the target
    plan.endpoints_wait_over = plan.desired == "serve"
    if state.routable != w.status.get("readyReplicas") and state.routable >= 1 and proxied_now:
        plan.release_ready = state.routable  # the activators release held requests on it: before the routes move
    plan.mode = plan.desired if routing else "serve"
    if state.at_zero and (w.pods_left or state.current):
        plan.requeue = sooner(plan.requeue, PODS_LEFT_RECHECK)
    plan.phase = C.phase_for(state, w.pods_left)
    if plan.phase == "Serving" and plan.desired == "proxy" and not state.at_zero and not w.endpoints_listed:
        plan.phase = "ScalingUp"  # ready, but the routes wait for the Service's EndpointSlice to list it
    plan.conditions = conds
    return plan


def desired_mode(
    w: World, state: WorkloadState, proxied_now: bool, refused: bool = False
) -> tuple[str, bool, float | None]:
    """(routing mode, whether to wake the target because the activator is gone, requeue): the table above.
    ``refused``: a protocol the activator cannot carry, or destinations an earlier ElastiService claims."""
    if refused:
        return "serve", False, None
    if w.memory.sleeping and w.activator[0]:
        return "proxy", False, None
    if not w.activator[0]:
        return "serve", state.at_zero, None
    if state.at_zero:
        return "proxy", False, None
    if state.ready >= 1:
        if proxied_now and not w.endpoints_listed:
            return "proxy", False, ENDPOINTS_POLL
        return "serve", False, None
    return ("proxy" if proxied_now else "serve"), False, None


def classify(w: World) -> tuple[set[VsKey], set[VsKey]]:
    """The bound VirtualServices that route to the target (or are proxied for it), and those that route
    to its Service only without a subset while the Service is shared with other workloads."""
    r = w.r
    assert r is not None
    routing = {
        k
        for k, v in w.vss.items()
        if vsrewrite.routes_to(v.get("spec") or {}, k[0], r.target_for(k[0]), w.cluster_domain)
        or vsrewrite.is_proxied(v.get("spec") or {}, r.target_for(k[0]), w.activator_ref)
    }
    shared = {
        k
        for k, v in w.vss.items()
        if k not in routing
        and vsrewrite.routes_to(
            v.get("spec") or {}, k[0], dataclasses.replace(r.target_for(k[0]), whole_service=True), w.cluster_domain
        )
    }
    return routing, shared


def proxied(w: World, routing: set[VsKey]) -> bool:
    """Whether any of the routes to the target goes to the activator now."""
    r = w.r
    assert r is not None
    return any(vsrewrite.is_proxied(w.vss[k].get("spec") or {}, r.target_for(k[0]), w.activator_ref) for k in routing)


def bound_condition(
    w: World, conds: list[dict[str, Any]], routing: set[VsKey], shared: set[VsKey]
) -> tuple[list[dict[str, Any]], float | None]:
    r = w.r
    assert r is not None
    spec = r.spec
    missing = sorted(f"{a}/{b}" for a, b in w.refs - set(w.vss))
    no_route = sorted(f"{a}/{b}" for a, b in set(w.vss) - routing - shared)
    if not (missing or no_route or not w.refs):
        names = ", ".join(f"{a}/{b}" for a, b in sorted(routing | shared))
        message = f"{len(routing) + len(shared)} VirtualService(s): {names}"
        if shared:
            message += (
                f"; Service {spec.service} is shared with other workloads: its destinations without a subset go "
                "to the activator only when none of them serves (then for the first target at zero, by kind and "
                "name)"
            )
        return C.set_condition(conds, C.VS_BOUND, True, "Bound", message), None
    parts = []
    if not w.refs:
        parts.append(
            f"no VirtualService is bound: list one in spec.virtualServices or annotate it {ANN_BIND}={spec.name}"
        )
    if missing:
        parts.append(f"VirtualService {', '.join(missing)} not found")
    if no_route:
        if r.target.subsets:
            subset = f" subset {', '.join(sorted(r.target.subsets))}"
        elif r.target.whole_service:
            subset = " (without a subset)"
        else:
            subset = (
                " (no DestinationRule subset selects the target's pods, and the Service also selects other workloads)"
            )
        parts.append(f"VirtualService {', '.join(no_route)} has no http route to Service {spec.service}{subset}")
    reason = "VirtualServiceNotFound" if missing else "NoRouteToTarget" if no_route else "NoVirtualService"
    return C.set_condition(conds, C.VS_BOUND, False, reason, "; ".join(parts)), (MISSING_VS_RETRY if missing else None)


def claims(w: World, routing: set[VsKey]) -> frozenset[Claim]:
    """The route destinations of the target in the VirtualServices that route to it."""
    r = w.r
    assert r is not None
    out: set[Claim] = set()
    for vns, vname in routing:
        spec = w.vss[(vns, vname)].get("spec") or {}
        for sns, svc, subset in vsrewrite.target_destinations(spec, vns, r.target_for(vns), w.cluster_domain):
            out.add((vns, vname, sns, svc, subset))
    return frozenset(out)


def order(w: World) -> Order:
    """Which of two ElastiServices claiming one destination keeps it: the one created first, then by
    namespace/name."""
    return (w.es["metadata"].get("creationTimestamp") or "", w.key)


def conflict_rules(
    w: World, conds: list[dict[str, Any]], claimed: frozenset[Claim]
) -> tuple[list[dict[str, Any]], tuple[str, str] | None]:
    """(conditions, the refusal when an earlier ElastiService claims one of ``claimed``).

    A route destination is claimed twice when two ElastiServices find it to be their target's: the same
    VirtualService, the same Service and the same subset, or both without a subset. That is the same
    target behind the same Service, or two targets whose pods one subset selects. Several workloads
    behind one Service routed without a subset are not a conflict: only one of them owns that
    destination at a time (:func:`classify`). Both get ``Conflict=True``; the one created first (then by
    namespace/name) switches the routes, the other does not, and its ``Ready`` is False."""
    mine = order(w)
    clash = {k: theirs & claimed for k, (_, theirs) in w.rivals.items() if theirs & claimed}
    if not clash:
        if C.get_condition(conds, C.CONFLICT) is None:
            return conds, None
        message = "no other ElastiService claims its route destinations"
        return C.set_condition(conds, C.CONFLICT, False, "NoConflict", message), None
    earlier = sorted(k for k in clash if w.rivals[k][0] < mine)
    later = sorted(k for k in clash if k not in earlier)
    parts = []
    if earlier:
        shared = frozenset().union(*(clash[k] for k in earlier))
        parts.append(
            f"ElastiService {', '.join(earlier)}, created first, also claims {describe(shared)}: this one does "
            "not switch its routes (remove one of them, or give their targets subsets of their own)"
        )
    if later:
        shared = frozenset().union(*(clash[k] for k in later))
        parts.append(
            f"ElastiService {', '.join(later)} also claims {describe(shared)}: this one, created first, switches "
            "the routes, the other does not"
        )
    message = "; ".join(parts)
    conds = C.set_condition(conds, C.CONFLICT, True, "DestinationClaimedTwice", message)
    return conds, (("DestinationClaimedTwice", message) if earlier else None)


def describe(claimed: frozenset[Claim]) -> str:
    return ", ".join(
        f"VirtualService {vns}/{vname} -> {svc}.{sns}" + (f" subset {subset}" if subset else " (no subset)")
        for vns, vname, sns, svc, subset in sorted(claimed)
    )


def ports_in_use(w: World, routing: set[VsKey]) -> list[dict[str, Any]]:
    """The Service ports the routes to the target use, by number: those their destinations name, and the
    ElastiService's port (``status.origin.port``, where the activator forwards) when a route names none
    or nothing routes yet. A request the activator forwards to the port it came in on needs no look: an
    http route only applies on ports Istio takes as HTTP or detects. A port the Service lacks is left
    out: there is no protocol to judge (and the activator refuses it)."""
    r = w.r
    assert r is not None
    named: set[int | None] = set()
    for vns, vname in routing:
        named |= vsrewrite.target_ports(w.vss[(vns, vname)].get("spec") or {}, vns, r.target_for(vns), w.cluster_domain)
    numbers = {r.origin_port if p is None else p for p in named or {None}}
    by_number = {p.get("port"): p for p in (r.service.get("spec") or {}).get("ports") or [] if isinstance(p, dict)}
    return [by_number[n] for n in sorted(numbers) if n in by_number]


def protocol_rules(w: World, routing: set[VsKey]) -> tuple[bool, str]:
    """(whether the activator can carry every port the routes use, why): one it cannot keeps every
    route of the ElastiService in serve mode (they switch together)."""
    r = w.r
    assert r is not None
    seen = [(p, protocols.classify(p)) for p in ports_in_use(w, routing)]
    refused = [(p, c) for p, c in seen if not c.carried]
    if refused:
        which = "; ".join(
            f"Service {r.spec.service} port {p['port']} ({protocols.basis(p)}) is {c.protocol}" for p, c in refused
        )
        return False, (
            f"{which}: the activator carries only {protocols.CARRIED_TEXT}, so the routes stay in serve mode "
            "(never moved to the activator) and the target is kept awake (woken when found at zero)"
        )
    ports = ", ".join(f"{p['port']} ({c.protocol})" for p, c in seen) or "none known"
    return True, f"the activator carries every Service port the routes use: {ports}"


def timeouts_condition(w: World, conds: list[dict[str, Any]], routing: set[VsKey]) -> list[dict[str, Any]]:
    """Route timeouts shorter than the hold time cut held requests."""
    r = w.r
    assert r is not None
    short = []
    for vns, vname in sorted(routing):
        spec = w.vss[(vns, vname)].get("spec") or {}
        for field, t in vsrewrite.route_timeouts(spec, vns, r.target_for(vns), w.cluster_domain):
            try:
                secs = duration.parse_go(t)
            except ValueError:
                continue
            if secs < r.spec.hold_timeout:
                short.append(f"{vns}/{vname} has a route {field} of {t}")
    if short:
        message = (
            f"{'; '.join(short)}, shorter than activator.holdTimeout ({r.spec.hold_timeout:g}s): held requests are "
            "cut by the mesh first"
        )
        return C.set_condition(conds, C.TIMEOUTS, False, "RouteTimeoutShorterThanHold", message)
    return C.set_condition(conds, C.TIMEOUTS, True, "Compatible", "no route timeout is shorter than the hold timeout")


def waking_refuses_sleep(
    waking: bool, state: WorkloadState, last_wake: str | None, hold_timeout: float, now: dt.datetime
) -> str | None:
    """Why a scale-down must wait (None: it may go ahead): the target was woken less than holdTimeout ago
    and has no ready replica yet, so requests may be held for it; their activator asked once and would
    not ask again, so they would wait out their holdTimeout."""
    woken = C.parse_time(last_wake or "")
    if not waking or state.ready or woken is None:
        return None
    age = (now - woken).total_seconds()
    if age >= hold_timeout:
        return None
    return (
        f"not scaling {state.kind} {state.name} to zero: it was woken {age:.0f}s ago and has no ready replica "
        f"yet, and requests may be held for it (holdTimeout {hold_timeout:g}s)"
    )


def period_allows(spec: es_spec.ElastiSpec, now: dt.datetime) -> bool | str | None:
    """None: no enabledPeriod; True/False: inside/outside it; a string: why the schedule is invalid."""
    if spec.enabled_period is None:
        return None
    try:
        cron = schedule.parse_cron(spec.enabled_period.schedule)
    except schedule.CronError as exc:
        return f"enabledPeriod.schedule {spec.enabled_period.schedule!r}: {exc}; nothing is scaled by schedule"
    return schedule.in_period(cron, spec.enabled_period.duration, now)


def period_rules(w: World, conds: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], ScaleUp | None, float | None]:
    """When scale to zero is allowed at all; outside the enabledPeriod a target at zero is woken."""
    r = w.r
    assert r is not None
    allowed = period_allows(r.spec, w.now)
    if allowed is None:
        conds = C.set_condition(conds, C.ALLOWED, True, "Always", "no enabledPeriod: scale to zero at any time")
    elif isinstance(allowed, str):
        conds = C.set_condition(conds, C.ALLOWED, False, "InvalidSchedule", allowed)
    elif allowed:
        conds = C.set_condition(conds, C.ALLOWED, True, "InEnabledPeriod", "inside enabledPeriod")
    else:
        conds = C.set_condition(
            conds, C.ALLOWED, False, "OutsideEnabledPeriod", "outside enabledPeriod: the target is kept awake"
        )
    requeue = PERIOD_RECHECK if r.spec.enabled_period is not None else None
    scale = None
    if allowed is False and r.state.at_zero and w.activator[0]:
        scale = ScaleUp("OutsideEnabledPeriod", "scale to zero is not allowed now (enabledPeriod)")
    return conds, scale, requeue


def keda_hold_rules(r: Resolved, now: dt.datetime) -> tuple[bool, float | None]:
    """(lift it, requeue): a wake hold on the ScaledObject whose time has come is lifted, so that KEDA
    decides again; one still running is looked at again when it ends."""
    ann = ((r.scaled_object or {}).get("metadata") or {}).get("annotations") or {}
    if ann.get(PAUSED_BY_US) != "wake-hold" or HOLD_UNTIL not in ann:
        return False, None
    until = C.parse_time(ann[HOLD_UNTIL])
    left = (until - now).total_seconds() if until else 0.0
    if left > 0:
        return False, left + HOLD_MARGIN
    return True, None


def triggers_condition(w: World, conds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Idle triggers, as last evaluated."""
    r = w.r
    assert r is not None
    if not r.spec.triggers:
        return [c for c in conds if c["type"] != C.TRIGGERS]
    ts = w.memory.triggers
    if ts is None:
        return C.set_condition(conds, C.TRIGGERS, True, "NotEvaluated", "triggers not evaluated yet")
    return C.set_condition(conds, C.TRIGGERS, ts[0], ts[1], ts[2])


def ignored_condition(w: World) -> list[dict[str, Any]]:
    """IgnoredFields True (``NotUsed``) while the spec has fields the controller keeps but does not
    use (KubeElasti's extra trigger metadata); present only once some were seen, then False (``AllUsed``)."""
    conds = w.conditions
    fields = es_spec.ignored_fields(w.es)
    if fields:
        message = f"kept but not used by elasti-istio: {', '.join(fields)}"
        return C.set_condition(conds, C.IGNORED, True, "NotUsed", message)
    if C.get_condition(conds, C.IGNORED) is not None:
        return C.set_condition(conds, C.IGNORED, False, "AllUsed", "every spec field is used")
    return conds


def _decide_blocked(w: World) -> Plan:
    """Nothing can be woken or proxied: no route may point at the activator."""
    blk = w.blocked
    assert blk is not None
    conds = C.set_condition(ignored_condition(w), blk.ctype, False, blk.reason, blk.message)
    if blk.ctype == "ServiceFound":
        conds = C.set_condition(conds, C.TARGET_FOUND, True, "TargetFound", "scale target found")
    if C.get_condition(conds, C.CONFLICT) is not None:
        conds = C.set_condition(conds, C.CONFLICT, False, "NoConflict", "it claims no route destination")
    conds = C.set_condition(conds, C.READY, False, blk.reason, blk.message)
    return Plan(restore_all=True, conditions=conds)


# ---- deletion ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DeletionStep:
    """One look at a deleted ElastiService whose routes are on the activator."""

    wake: bool = False  # the target is at zero: wake it
    release_ready: int | None = None  # write status.readyReplicas (the activators release on it)
    look_at_endpoints: bool = False  # read the Service's EndpointSlices, then ask again
    wait: float | None = None  # look again in this many seconds; None: restore the routes now
    unready_restore: bool = False  # restoring without a ready replica (holdTimeout is over): a Warning


def deletion_rules(state: WorkloadState, status_ready: Any, left: float, listed: bool | None) -> DeletionStep:
    """The routes of a deleted ElastiService stay on the activator until the woken target has a ready
    replica its Service's EndpointSlices list (``listed``; None: not read yet), for at most ``left``
    more seconds of its holdTimeout since the deletion. readyReplicas is written before the
    EndpointSlices are read: the activators release held requests on it."""
    if state.at_zero and left > 0:
        return DeletionStep(wake=True, wait=min(0.5, left))
    release = state.ready if state.ready >= 1 and status_ready != state.ready else None
    if left > 0 and state.ready == 0:
        return DeletionStep(wait=min(0.5, left))  # held requests wait; pod events come sooner
    if left > 0 and listed is None:
        return DeletionStep(release_ready=release, look_at_endpoints=True)
    if left > 0 and not listed:
        return DeletionStep(release_ready=release, wait=min(ENDPOINTS_POLL, left))
    return DeletionStep(release_ready=release, unready_restore=state.ready == 0)


# ---- what the writes achieved: status and Events -----------------------------------------------


def wake_rules(w: World, memory: Memory, conds: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Memory]:
    """The ``WakeFailed`` condition: a wake that failed (a refusal, a pause by the KEDA owner, the target's
    own rollout stuck), or one under way, or done."""
    r = w.r
    assert r is not None
    state = r.state
    failure = memory.wake_failure
    if failure and failure[0] == "PausedByOwner" and keda_owner_pause(r.scaled_object) is None:
        memory = dataclasses.replace(memory, wake_failure=None)  # the owner lifted the pause
        failure = None
    if failure is None and state.stuck and state.replicas > 0 and state.ready == 0:
        failure = state.stuck
    if failure is not None:
        return C.set_condition(conds, C.WAKE_FAILED, True, failure[0], failure[1]), memory
    if memory.waking or C.get_condition(conds, C.WAKE_FAILED):
        if state.ready >= 1:
            memory = dataclasses.replace(memory, waking=False)
            msg = f"{state.kind} {state.name} has {state.ready} ready replica(s)"
            return C.set_condition(conds, C.WAKE_FAILED, False, "Woken", msg), memory
        msg = f"waiting for {state.kind} {state.name} to report a ready replica"
        return C.set_condition(conds, C.WAKE_FAILED, False, "Waking", msg), memory
    return conds, memory


READY_BLOCKERS = {  # and a blocked spec
    C.VS_BOUND: "False",
    C.PROTOCOL: "False",
    C.ACTIVATOR: "False",
    C.WAKE_FAILED: "True",
}


def ready_condition(
    conds: list[dict[str, Any]], mode: str, refused: tuple[str, str] | None = None
) -> list[dict[str, Any]]:
    """Ready is False with the first of: no bound route to the target, a port the activator cannot
    carry, the activator unavailable, a failed wake (cold requests would fail), its destinations kept
    by an earlier ElastiService (``refused``). Warnings that leave it working (a short route timeout,
    an invalid schedule, triggers that cannot be evaluated, a conflict it wins) do not make it
    unready."""
    problem = next((c for c in conds if READY_BLOCKERS.get(c["type"]) == c["status"]), None)
    if problem:
        return C.set_condition(conds, C.READY, False, problem["reason"], problem["message"])
    if refused is not None:
        return C.set_condition(conds, C.READY, False, *refused)
    if mode == "proxy":
        return C.set_condition(
            conds, C.READY, True, "Proxying", "requests are held by the activator while the target wakes"
        )
    return C.set_condition(conds, C.READY, True, "Serving", "routes go straight to the target")


def report(w: World, plan: Plan, outcome: Outcome) -> tuple[dict[str, Any], Memory, list[Event]]:
    """(the status to write, the memory to keep, the Events to post) after acting on ``plan``."""
    old = w.status
    now = w.now.strftime("%Y-%m-%dT%H:%M:%SZ")
    generation = w.es["metadata"].get("generation")
    if w.blocked is not None:
        new = dict(old, mode="serve", conditions=plan.conditions, observedGeneration=generation)
        new["boundVirtualServices"] = sorted(f"{a}/{b}" for a, b in w.touched)
        new.pop("origin", None)
        return new, outcome.memory, warnings(w.conditions, plan.conditions)
    r = w.r
    assert r is not None and plan.phase is not None
    conds, memory = wake_rules(w, outcome.memory, plan.conditions)
    conds = ready_condition(conds, plan.mode, plan.conflict_refused)
    ports = sorted({int(p["port"]) for p in (r.service.get("spec") or {}).get("ports") or []})
    new = dict(old)
    new.update(
        phase=plan.phase,
        mode=plan.mode,
        readyReplicas=r.state.routable,
        origin={"service": r.origin_name, "port": r.origin_port, "ports": ports},
        boundVirtualServices=sorted(f"{a}/{b}" for a, b in plan.routing),
        observedGeneration=generation,
        conditions=conds,
    )
    if memory.last_wake is not None:
        new["lastWakeTime"] = memory.last_wake
    old_phase = w.status.get("phase")
    asleep = ("ScalingToZero", "ScaledToZero")
    if plan.phase != old_phase:
        if plan.phase in asleep and old_phase not in asleep:
            new["lastScaledToZeroTime"] = now
        if plan.phase == "Serving":
            new["awakeSince"] = now
    elif plan.phase == "Serving" and not old.get("awakeSince"):
        new["awakeSince"] = now
    events = warnings(w.conditions, conds)
    if outcome.changed:
        events.append(switch_event(r, plan))
    if plan.phase != old_phase:
        events.append(Event("Normal", plan.phase, phase_message(plan.phase, r.state, w.pods_left)))
    return new, memory, events


def warnings(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[Event]:
    """A Warning Event for each condition that turned bad, or is bad for a new reason or message: they
    come from the conditions as read, so a restarted controller does not repeat them."""
    old = {c.get("type"): c for c in before}
    out = []
    for c in after:
        ctype = c["type"]
        if BAD.get(ctype, "False" if ctype == C.ALLOWED else None) != c["status"]:
            continue
        if (ctype, c["reason"]) in NOT_A_WARNING:
            continue
        prev = old.get(ctype) or {}
        if (prev.get("status"), prev.get("reason"), prev.get("message")) != (c["status"], c["reason"], c["message"]):
            out.append(Event("Warning", c["reason"], c["message"]))
    return out


def switch_event(r: Resolved, plan: Plan) -> Event:
    n, state = len(plan.routing), r.state
    if plan.desired == "proxy":
        msg = f"{state.kind} {state.name} is at 0 replicas: {n} VirtualService(s) route to the activator"
        return Event("Normal", "SwitchedToProxy", msg)
    msg = f"{n} VirtualService(s) route to Service {r.spec.service} again ({state.ready} ready replica(s))"
    return Event("Normal", "SwitchedToServe", msg)


def phase_message(phase: str, state: WorkloadState, pods_left: int) -> str:
    target = f"{state.kind} {state.name}"
    return {
        "Serving": f"{target} has {state.ready} ready replica(s)",
        "ScalingUp": f"{target} is scaling up to {state.replicas} replica(s)",
        "ScalingToZero": f"{target} scaled to 0; {max(pods_left, state.current)} pod(s) still terminating",
        "ScaledToZero": f"{target} has no replica left",
    }[phase]
