"""The rules of a reconcile, without a cluster: each row is a world as read, and what must follow from it
(the routing mode, the writes, the phase, the conditions, the Events)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import pytest

from elasti_istio import vsrewrite
from elasti_istio.controller import conditions as C
from elasti_istio.controller import decide
from elasti_istio.controller import spec as es_spec
from elasti_istio.controller.decide import ENDPOINTS_POLL, Event
from elasti_istio.controller.workloads import WorkloadState
from elasti_istio.controller.world import (
    HOLD_UNTIL,
    KEDA_PAUSED_REPLICAS,
    PAUSED_BY_US,
    Blocked,
    Memory,
    Outcome,
    Plan,
    Resolved,
    ScaleUp,
    World,
)

NS = "shop"
ACT = vsrewrite.ActivatorRef("elasti-activator.elasti-system.svc.cluster.local", 8012)
NOW = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.UTC)  # a Wednesday, noon UTC
TARGET = vsrewrite.Target(NS, "details", "details")
VS = (NS, "details")
NO_MEMORY = Memory()


def es(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"namespace": NS, "name": "details", "generation": 3},
        "spec": {
            "service": "details",
            "scaleTargetRef": {"kind": "Deployment", "name": "details-v1"},
            "virtualServices": ["details"],
            "activator": {"holdTimeout": "60s"},
            **spec,
        },
        "status": {},
    }


def route(timeout: str | None = None, subset: str | None = None, port: int | None = None) -> dict[str, Any]:
    dest: dict[str, Any] = {"host": "details"}
    if subset:
        dest["subset"] = subset
    if port is not None:
        dest["port"] = {"number": port}
    http: dict[str, Any] = {"route": [{"destination": dest}]}
    if timeout:
        http["timeout"] = timeout
    return {"metadata": {"namespace": NS, "name": "details"}, "spec": {"hosts": ["details"], "http": [http]}}


def proxied(vs: dict[str, Any], target: vsrewrite.Target = TARGET) -> dict[str, Any]:
    spec, _ = vsrewrite.to_proxy(vs["spec"], NS, target, ACT)
    return dict(vs, spec=spec)


def world(
    *,
    replicas: int = 1,
    ready: int = 1,
    current: int | None = None,
    stuck: tuple[str, str] | None = None,
    vss: dict[tuple[str, str], dict[str, Any]] | None = None,
    refs: frozenset[tuple[str, str]] = frozenset({VS}),
    activator: bool = True,
    memory: Memory = NO_MEMORY,
    endpoints_listed: bool = True,
    pods_left: int = 0,
    scaled_object: dict[str, Any] | None = None,
    status: dict[str, Any] | None = None,
    target: vsrewrite.Target = TARGET,
    now: dt.datetime = NOW,
    ports: list[dict[str, Any]] | None = None,
    origin_port: int = 9080,
    **spec: Any,
) -> World:
    obj = es(**spec)
    obj["status"] = status or {}
    state = WorkloadState(
        "Deployment",
        "details-v1",
        replicas,
        ready,
        replicas if current is None else current,
        {"app": "details"},
        {"app": "details"},
        False,
        stuck,
    )
    r = Resolved(
        spec=es_spec.parse(obj),
        workload_kind="Deployment",
        workload={},
        state=state,
        scaled_object=scaled_object,
        service={"spec": {"selector": {"app": "details"}, "ports": ports or [{"port": 9080}]}},
        origin_name="details-elasti-origin",
        origin_port=origin_port,
        target=target,
        subset_labels={},
    )
    return World(
        key=f"{NS}/details",
        es=obj,
        now=now,
        activator=(True, "Available", "the activator is ready") if activator else (False, "Unavailable", "gone"),
        memory=memory,
        activator_ref=ACT,
        cluster_domain="cluster.local",
        r=r,
        refs=refs,
        vss={VS: route()} if vss is None else vss,
        endpoints_listed=endpoints_listed,
        pods_left=pods_left,
    )


def run(w: World, memory: Memory | None = None) -> tuple[Plan, dict[str, Any], list[Event]]:
    """decide, then report as if every write succeeded (``memory``: as the writes left it)."""
    plan = decide.decide(w)
    status, _memory, events = decide.report(w, plan, Outcome(memory=memory or w.memory, changed=False))
    return plan, status, events


def cond(status: dict[str, Any], ctype: str) -> tuple[str, str]:
    c = C.get_condition(status["conditions"], ctype)
    assert c is not None, ctype
    return c["status"], c["reason"]


# ---- the routing mode: one row per rule of decide.desired_mode ----------------------------------------

MODE_ROWS = [
    # (what, world, desired routes, phase, wake, requeue)
    ("serving", world(), "serve", "Serving", None, None),
    ("at zero", world(replicas=0, ready=0), "proxy", "ScaledToZero", None, None),
    ("pods still terminating", world(replicas=0, ready=0, pods_left=1), "proxy", "ScalingToZero", None, 1.0),
    ("our own scale-down", world(memory=Memory(sleeping=True)), "proxy", "Serving", None, None),
    ("activator gone, at zero: fail open", world(replicas=0, ready=0, activator=False), "serve", "ScaledToZero",
     "FailOpen", None),
    ("activator gone, serving", world(activator=False), "serve", "Serving", None, None),
    ("activator gone during our scale-down", world(memory=Memory(sleeping=True), activator=False), "serve",
     "Serving", None, None),
    ("woken, not yet in the EndpointSlice", world(vss={VS: proxied(route())}, endpoints_listed=False), "proxy",
     "ScalingUp", None, ENDPOINTS_POLL),
    ("woken, listed", world(vss={VS: proxied(route())}), "serve", "Serving", None, None),
    ("scaling up, proxied", world(ready=0, vss={VS: proxied(route())}), "proxy", "ScalingUp", None, None),
    ("scaling up, serving", world(ready=0), "serve", "ScalingUp", None, None),
]  # fmt: skip


@pytest.mark.parametrize(("what", "w", "desired", "phase", "wake", "requeue"), MODE_ROWS, ids=[r[0] for r in MODE_ROWS])
def test_routing_mode(what: str, w: World, desired: str, phase: str, wake: str | None, requeue: float | None) -> None:
    plan, status, _ = run(w)
    assert (plan.desired, plan.phase, plan.requeue) == (desired, phase, requeue), what
    assert (plan.scale_up.reason if plan.scale_up else None) == wake
    assert plan.routing == (VS,) and status["mode"] == desired and status["phase"] == phase
    assert plan.endpoints_wait_over == (desired == "serve")


def test_fail_open_is_rate_limited_and_says_why() -> None:
    plan, status, events = run(world(replicas=0, ready=0, activator=False))
    assert plan.scale_up == ScaleUp("FailOpen", "the activator is unavailable, so the target is woken", True)
    assert cond(status, C.ACTIVATOR) == ("False", "Unavailable")
    assert cond(status, C.READY) == ("False", "Unavailable")
    assert Event("Warning", "Unavailable", "gone") in events


def test_ready_replicas_are_written_before_the_routes_move() -> None:
    plan, status, _ = run(world(vss={VS: proxied(route())}, status={"readyReplicas": 0}))
    assert plan.release_ready == 1 and status["readyReplicas"] == 1
    plan, _, _ = run(world(vss={VS: proxied(route())}, status={"readyReplicas": 1}))
    assert plan.release_ready is None  # already there
    plan, _, _ = run(world(status={"readyReplicas": 0}))
    assert plan.release_ready is None  # not proxied: nothing is held


def test_a_target_going_to_zero_has_no_ready_replica_for_the_activators() -> None:
    """Scaled to 0 while its Deployment still counts the stopping pod as ready: the activators must not
    forward to a pod about to close its connections (a request crossing that close may have reached it
    and cannot be sent again), so neither the early write nor the status says it is ready."""
    stopping = world(replicas=0, ready=1, current=1, vss={VS: proxied(route())}, status={"readyReplicas": 0})
    plan, status, _ = run(stopping)
    assert plan.release_ready is None
    assert status["readyReplicas"] == 0
    assert status["phase"] == "ScalingToZero"


# ---- enabledPeriod ------------------------------------------------------------------------------------

PERIOD_ROWS = [
    # schedule (UTC), duration, at zero, allowed condition, wake
    ("0 11 * * *", "2h", True, ("True", "InEnabledPeriod"), None),
    ("0 20 * * *", "2h", True, ("False", "OutsideEnabledPeriod"), "OutsideEnabledPeriod"),
    ("0 20 * * *", "2h", False, ("False", "OutsideEnabledPeriod"), None),
    ("not a cron", "2h", True, ("False", "InvalidSchedule"), None),
]


@pytest.mark.parametrize(("cron", "length", "at_zero", "allowed", "wake"), PERIOD_ROWS)
def test_enabled_period(cron: str, length: str, at_zero: bool, allowed: tuple[str, str], wake: str | None) -> None:
    w = world(
        replicas=0 if at_zero else 1, ready=0 if at_zero else 1, enabledPeriod={"schedule": cron, "duration": length}
    )
    plan, status, events = run(w)
    assert cond(status, C.ALLOWED) == allowed
    assert (plan.scale_up.reason if plan.scale_up else None) == wake
    assert plan.requeue is not None and plan.requeue <= decide.PERIOD_RECHECK
    warned = [e.reason for e in events if e.type == "Warning"]
    assert warned == (["InvalidSchedule"] if allowed[1] == "InvalidSchedule" else [])  # outside is no warning


def test_no_wake_outside_the_period_while_the_activator_is_gone() -> None:
    """The fail-open rule wakes it instead (rate limited)."""
    w = world(replicas=0, ready=0, activator=False, enabledPeriod={"schedule": "0 20 * * *", "duration": "2h"})
    plan, _, _ = run(w)
    assert plan.scale_up is not None and plan.scale_up.reason == "FailOpen"


# ---- KEDA ---------------------------------------------------------------------------------------------


def scaled_object(until: dt.datetime, by_us: str = "wake-hold") -> dict[str, Any]:
    ann = {KEDA_PAUSED_REPLICAS: "1", PAUSED_BY_US: by_us, HOLD_UNTIL: until.strftime("%Y-%m-%dT%H:%M:%SZ")}
    return {"metadata": {"name": "details", "annotations": ann}, "spec": {"minReplicaCount": 0}}


@pytest.mark.parametrize(
    ("until", "lift", "requeue"),
    [(NOW - dt.timedelta(seconds=1), True, None), (NOW + dt.timedelta(seconds=10), False, 10 + decide.HOLD_MARGIN)],
)
def test_keda_wake_hold(until: dt.datetime, lift: bool, requeue: float | None) -> None:
    plan, _, _ = run(world(scaled_object=scaled_object(until)))
    assert (plan.lift_keda_hold, plan.requeue) == (lift, requeue)


def test_a_pause_by_the_owner_is_not_a_hold_of_ours() -> None:
    so = scaled_object(NOW - dt.timedelta(seconds=1))
    del so["metadata"]["annotations"][PAUSED_BY_US]
    plan, _, _ = run(world(scaled_object=so))
    assert not plan.lift_keda_hold


# ---- wakes --------------------------------------------------------------------------------------------

WAKE_ROWS = [
    # (what, world, memory after the writes, WakeFailed, memory's wake failure after)
    ("refused", world(ready=0, memory=Memory(wake_failure=("ScaleRefused", "no"))), None,
     ("True", "ScaleRefused"), ("ScaleRefused", "no")),
    ("paused by the owner", world(replicas=0, ready=0, memory=Memory(wake_failure=("PausedByOwner", "p")),
     scaled_object={"metadata": {"annotations": {KEDA_PAUSED_REPLICAS: "0"}}}), None, ("True", "PausedByOwner"),
     ("PausedByOwner", "p")),
    ("the owner lifted the pause", world(replicas=0, ready=0, memory=Memory(wake_failure=("PausedByOwner", "p")),
     scaled_object={"metadata": {"annotations": {}}}), None, None, None),
    ("rollout stuck", world(ready=0, stuck=("ProgressDeadlineExceeded", "stuck")), None,
     ("True", "ProgressDeadlineExceeded"), None),
    ("waking", world(ready=0), Memory(waking=True), ("False", "Waking"), None),
    ("woken", world(), Memory(waking=True), ("False", "Woken"), None),
]  # fmt: skip


@pytest.mark.parametrize(("what", "w", "after", "wake_failed", "failure"), WAKE_ROWS, ids=[r[0] for r in WAKE_ROWS])
def test_wake_outcome(
    what: str, w: World, after: Memory | None, wake_failed: tuple[str, str] | None, failure: tuple[str, str] | None
) -> None:
    plan = decide.decide(w)
    status, memory, _ = decide.report(w, plan, Outcome(memory=after or w.memory))
    got = C.get_condition(status["conditions"], C.WAKE_FAILED)
    assert (None if got is None else (got["status"], got["reason"])) == wake_failed, what
    if wake_failed and wake_failed[0] == "True":  # cold requests would fail: not Ready, and why
        assert cond(status, C.READY) == ("False", wake_failed[1])
    else:
        assert cond(status, C.READY)[0] == "True"
    assert memory.wake_failure == failure
    if wake_failed == ("False", "Woken"):
        assert not memory.waking  # done: forgotten


def test_a_wake_is_recorded_in_the_status() -> None:
    _, status, _ = run(world(), Memory(last_wake="2026-12-02T11:59:00Z"))
    assert status["lastWakeTime"] == "2026-12-02T11:59:00Z"


# ---- VirtualServices ----------------------------------------------------------------------------------


def test_a_missing_virtualservice_is_looked_for_again() -> None:
    plan, status, events = run(world(vss={}))
    assert cond(status, C.VS_BOUND) == ("False", "VirtualServiceNotFound")
    assert cond(status, C.READY) == ("False", "VirtualServiceNotFound")
    assert plan.requeue == decide.MISSING_VS_RETRY and plan.routing == () and plan.mode == "serve"
    assert [e.reason for e in events if e.type == "Warning"] == ["VirtualServiceNotFound"]


def test_no_virtualservice_bound() -> None:
    _, status, _ = run(world(vss={}, refs=frozenset()))
    assert cond(status, C.VS_BOUND) == ("False", "NoVirtualService")


def test_a_route_to_another_subset_is_no_route() -> None:
    target = dataclasses.replace(TARGET, subsets=frozenset({"v1"}), whole_service=False)
    _, status, _ = run(world(vss={VS: route(subset="v2")}, target=target))
    assert cond(status, C.VS_BOUND) == ("False", "NoRouteToTarget")


def test_a_shared_service_routed_without_a_subset_is_bound_but_not_switched() -> None:
    target = dataclasses.replace(TARGET, whole_service=False)
    plan, status, _ = run(world(vss={VS: route()}, target=target, replicas=0, ready=0))
    assert cond(status, C.VS_BOUND) == ("True", "Bound")
    assert "shared with other workloads" in C.get_condition(status["conditions"], C.VS_BOUND)["message"]
    assert plan.routing == () and plan.mode == "serve"


def test_a_virtualservice_edited_while_proxied_is_still_its_own() -> None:
    """Someone changed the host of the proxied route: it no longer routes to the target, but it carries
    the target's activator destination, so it stays bound and is switched (the rewrite keeps the edit)."""
    edited = proxied(route())
    edited["spec"]["hosts"] = ["details.example.com"]
    plan, status, _ = run(world(vss={VS: edited}, replicas=0, ready=0))
    assert plan.routing == (VS,) and plan.desired == "proxy" and status["mode"] == "proxy"


def test_stale_virtualservices_go_back_to_serve() -> None:
    w = dataclasses.replace(world(), stale=((NS, "old"),))
    assert decide.decide(w).serve_stale == ((NS, "old"),)


def test_a_route_timeout_shorter_than_the_hold() -> None:
    _, status, events = run(world(vss={VS: route(timeout="5s")}))
    assert cond(status, C.TIMEOUTS) == ("False", "RouteTimeoutShorterThanHold")
    assert [e.reason for e in events if e.type == "Warning"] == ["RouteTimeoutShorterThanHold"]
    _, status, _ = run(world(vss={VS: route(timeout="90s")}))
    assert cond(status, C.TIMEOUTS) == ("True", "Compatible")


# ---- protocols ----------------------------------------------------------------------------------------

TCP_DB = [{"name": "tcp-db", "port": 9080}]
HTTP_THEN_DB = [{"name": "http", "port": 9080}, {"name": "tcp-db", "port": 5432}]
DB_THEN_HTTP = [{"name": "tcp-db", "port": 5432}, {"name": "http", "port": 9080}]

PROTOCOL_ROWS = [
    # (what, world, ProtocolSupported reason, desired routes, wake)
    ("an http port", world(ports=[{"name": "http", "port": 9080}]), "Supported", "serve", None),
    ("a grpc port at zero", world(replicas=0, ready=0, ports=[{"name": "grpc", "port": 9080}]), "Supported",
     "proxy", None),
    ("an h2c appProtocol at zero",
     world(replicas=0, ready=0, ports=[{"port": 9080, "appProtocol": "kubernetes.io/h2c"}]), "Supported", "proxy",
     None),
    ("a tcp port, serving", world(ports=TCP_DB), "UnsupportedProtocol", "serve", None),
    ("a tcp port at zero: woken", world(replicas=0, ready=0, ports=TCP_DB), "UnsupportedProtocol", "serve",
     "UnsupportedProtocol"),
    ("an https port at zero: woken", world(replicas=0, ready=0, ports=[{"name": "https", "port": 9080}]),
     "UnsupportedProtocol", "serve", "UnsupportedProtocol"),
    ("a wss appProtocol", world(ports=[{"name": "http", "port": 9080, "appProtocol": "kubernetes.io/wss"}]),
     "UnsupportedProtocol", "serve", None),
    ("a UDP port", world(ports=[{"name": "http", "port": 9080, "protocol": "UDP"}]), "UnsupportedProtocol", "serve",
     None),
    ("proxied when the port changed: back to serve, woken",
     world(replicas=0, ready=0, ports=TCP_DB, vss={VS: proxied(route())}), "UnsupportedProtocol", "serve",
     "UnsupportedProtocol"),
    ("during our own scale-down", world(memory=Memory(sleeping=True), ports=TCP_DB), "UnsupportedProtocol", "serve",
     None),
    ("the activator gone too: woken, not failed open",
     world(replicas=0, ready=0, activator=False, ports=TCP_DB), "UnsupportedProtocol", "serve", "UnsupportedProtocol"),
    ("a route naming the tcp port", world(replicas=0, ready=0, ports=HTTP_THEN_DB, vss={VS: route(port=5432)}),
     "UnsupportedProtocol", "serve", "UnsupportedProtocol"),
    ("no port named, the ElastiService's port is tcp",
     world(replicas=0, ready=0, ports=DB_THEN_HTTP, origin_port=5432), "UnsupportedProtocol", "serve",
     "UnsupportedProtocol"),
    ("every route names the http port: the ElastiService's port is not used",
     world(replicas=0, ready=0, ports=DB_THEN_HTTP, origin_port=5432, vss={VS: route(port=9080)}), "Supported",
     "proxy", None),
    ("another Service port is tcp", world(replicas=0, ready=0, ports=HTTP_THEN_DB), "Supported", "proxy", None),
    ("a port the Service lacks is not judged", world(replicas=0, ready=0, vss={VS: route(port=1234)}), "Supported",
     "proxy", None),
]  # fmt: skip


@pytest.mark.parametrize(("what", "w", "reason", "desired", "wake"), PROTOCOL_ROWS, ids=[r[0] for r in PROTOCOL_ROWS])
def test_protocol(what: str, w: World, reason: str, desired: str, wake: str | None) -> None:
    plan, status, _ = run(w)
    supported = reason == "Supported"
    assert cond(status, C.PROTOCOL) == (str(supported), reason), what
    assert (plan.desired, status["mode"], plan.protocol_refused) == (desired, desired, not supported)
    assert (plan.scale_up.reason if plan.scale_up else None) == wake
    if wake:
        assert not plan.scale_up.rate_limited  # type: ignore[union-attr]
    if not supported:  # requests to the target at zero would fail
        assert cond(status, C.READY) == ("False", "UnsupportedProtocol")


def test_an_unsupported_port_is_named_with_what_it_was_read_from() -> None:
    _, status, events = run(world(replicas=0, ready=0, ports=HTTP_THEN_DB, vss={VS: route(port=5432)}))
    message = C.get_condition(status["conditions"], C.PROTOCOL)["message"]
    assert message.startswith("Service details port 5432 (name tcp-db) is TCP: the activator carries only ")
    assert "stay in serve mode" in message
    assert Event("Warning", "UnsupportedProtocol", message) in events
    assert C.get_condition(status["conditions"], C.READY)["message"] == message


def test_a_supported_port_is_named_too() -> None:
    _, status, events = run(world(ports=[{"name": "grpc", "port": 9080}]))
    message = C.get_condition(status["conditions"], C.PROTOCOL)["message"]
    assert message == "the activator carries every Service port the routes use: 9080 (GRPC)"
    assert [e for e in events if e.type == "Warning"] == []


def test_the_unsupported_protocol_warning_is_not_repeated() -> None:
    _, first, _ = run(world(ports=TCP_DB))
    _, second, events = run(world(ports=TCP_DB, status=first))
    assert [e for e in events if e.type == "Warning"] == []
    # Fixed: the condition turns True and Ready with it.
    _, third, events = run(world(ports=[{"name": "http", "port": 9080}], status=second))
    assert cond(third, C.PROTOCOL) == ("True", "Supported") and cond(third, C.READY) == ("True", "Serving")


# ---- triggers -----------------------------------------------------------------------------------------

TRIGGER = {"type": "prometheus", "metadata": {"serverAddress": "http://p:9090", "query": "q", "threshold": "1"}}


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (None, ("True", "NotEvaluated")),
        ((True, "Idle", "below"), ("True", "Idle")),
        ((False, "MetricsUnavailable", "down"), ("False", "MetricsUnavailable")),
    ],
)
def test_triggers(state: tuple[bool, str, str] | None, expected: tuple[str, str]) -> None:
    _, status, _ = run(world(memory=Memory(triggers=state), triggers=[TRIGGER]))
    assert cond(status, C.TRIGGERS) == expected


def test_no_triggers_no_condition() -> None:
    old = [{"type": C.TRIGGERS, "status": "True", "reason": "Idle", "message": "", "lastTransitionTime": "x"}]
    _, status, _ = run(world(status={"conditions": old}))
    assert C.get_condition(status["conditions"], C.TRIGGERS) is None


# ---- two ElastiServices, one destination ----------------------------------------------------------------

CREATED = "2026-12-01T10:00:00Z"
WHOLE = (NS, "details", NS, "details", "")  # VirtualService details -> Service details, no subset
V1 = (NS, "details", NS, "details", "v1")
V2 = (NS, "details", NS, "details", "v2")


def rival(created: str, *claims: tuple[str, str, str, str, str], key: str = f"{NS}/details-copy") -> dict[str, Any]:
    return {key: ((created, key), frozenset(claims))}


def in_conflict(w: World, rivals: dict[str, Any], created: str = CREATED) -> World:
    w.es["metadata"]["creationTimestamp"] = created
    return dataclasses.replace(w, rivals=rivals)


SUBSETS = dataclasses.replace(TARGET, subsets=frozenset({"v1"}), whole_service=False)
CONFLICT_ROWS = [
    # (what, world, Conflict (status, reason) or None, routing mode, Ready reason, wake)
    ("no other ElastiService", world(replicas=0, ready=0), None, "proxy", "Proxying", None),
    ("the same target and Service, this one first: it switches the routes",
     in_conflict(world(replicas=0, ready=0), rival("2026-12-01T11:00:00Z", WHOLE)),
     ("True", "DestinationClaimedTwice"), "proxy", "Proxying", None),
    ("the same target and Service, the other first: this one leaves the routes alone",
     in_conflict(world(replicas=0, ready=0), rival("2026-12-01T09:00:00Z", WHOLE)),
     ("True", "DestinationClaimedTwice"), "serve", "DestinationClaimedTwice", None),
    ("created at the same second: by namespace/name (details-copy after details)",
     in_conflict(world(replicas=0, ready=0), rival(CREATED, WHOLE)),
     ("True", "DestinationClaimedTwice"), "proxy", "Proxying", None),
    ("the other first, and this one proxied: its routes go back, it wakes nothing",
     in_conflict(world(replicas=0, ready=0, vss={VS: proxied(route())}), rival("2026-12-01T09:00:00Z", WHOLE)),
     ("True", "DestinationClaimedTwice"), "serve", "DestinationClaimedTwice", None),
    ("the other first, outside the enabledPeriod at zero: not woken by this one",
     in_conflict(world(replicas=0, ready=0, enabledPeriod={"schedule": "0 20 * * *", "duration": "2h"}),
                 rival("2026-12-01T09:00:00Z", WHOLE)),
     ("True", "DestinationClaimedTwice"), "serve", "DestinationClaimedTwice", None),
    ("one subset selecting both targets' pods",
     in_conflict(world(replicas=0, ready=0, target=SUBSETS, vss={VS: route(subset="v1")}),
                 rival("2026-12-01T09:00:00Z", V1)),
     ("True", "DestinationClaimedTwice"), "serve", "DestinationClaimedTwice", None),
    ("another subset of the same VirtualService",
     in_conflict(world(replicas=0, ready=0, target=SUBSETS, vss={VS: route(subset="v1")}),
                 rival("2026-12-01T09:00:00Z", V2)),
     None, "proxy", "Proxying", None),
    ("a shared Service without a subset: owned by the other target, no claim of this one",
     in_conflict(world(replicas=0, ready=0, target=dataclasses.replace(TARGET, whole_service=False)),
                 rival("2026-12-01T09:00:00Z", WHOLE)),
     None, "serve", "Serving", None),
    ("the same destination in another VirtualService",
     in_conflict(world(replicas=0, ready=0), rival("2026-12-01T09:00:00Z", (NS, "other", NS, "details", ""))),
     None, "proxy", "Proxying", None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("what", "w", "conflict", "desired", "ready", "wake"), CONFLICT_ROWS, ids=[r[0] for r in CONFLICT_ROWS]
)
def test_conflict(
    what: str, w: World, conflict: tuple[str, str] | None, desired: str, ready: str, wake: str | None
) -> None:
    plan, status, events = run(w)
    got = C.get_condition(status["conditions"], C.CONFLICT)
    assert ((got["status"], got["reason"]) if got else None) == conflict
    assert status["mode"] == desired
    if ready == "DestinationClaimedTwice":  # refused: not even the routes it had proxied stay so
        assert plan.desired == "serve"
    assert C.get_condition(status["conditions"], C.READY)["reason"] == ready
    assert (plan.scale_up.reason if plan.scale_up else None) == wake
    assert any(e.type == "Warning" and e.reason == "DestinationClaimedTwice" for e in events) == bool(conflict)


def test_a_conflict_names_the_other_and_the_destination() -> None:
    _, status, _ = run(in_conflict(world(), rival("2026-12-01T09:00:00Z", WHOLE)))
    assert C.get_condition(status["conditions"], C.CONFLICT)["message"] == (
        f"ElastiService {NS}/details-copy, created first, also claims VirtualService {NS}/details -> "
        f"details.{NS} (no subset): this one does not switch its routes (remove one of them, or give their "
        "targets subsets of their own)"
    )
    assert C.get_condition(status["conditions"], C.READY)["status"] == "False"
    _, status, _ = run(in_conflict(world(), rival("2026-12-01T11:00:00Z", WHOLE)))
    message = C.get_condition(status["conditions"], C.CONFLICT)["message"]
    assert message.startswith(f"ElastiService {NS}/details-copy also claims VirtualService {NS}/details")
    assert message.endswith("this one, created first, switches the routes, the other does not")
    assert C.get_condition(status["conditions"], C.READY)["status"] == "True"


def test_what_is_claimed_is_what_the_target_routes_to() -> None:
    plan = decide.decide(world(vss={VS: route(subset="v1")}, target=SUBSETS))
    assert plan.claims == frozenset({V1})
    plan = decide.decide(world(vss={VS: route(subset="v2")}, target=SUBSETS))
    assert plan.claims == frozenset()


def test_a_conflict_is_warned_once_and_its_end_is_said() -> None:
    w = in_conflict(world(), rival("2026-12-01T09:00:00Z", WHOLE))
    _, first, events = run(w)
    assert [e.reason for e in events if e.type == "Warning"] == ["DestinationClaimedTwice"]
    _, second, events = run(in_conflict(world(status=first), w.rivals))
    assert [e for e in events if e.type == "Warning"] == []
    _, over, _ = run(in_conflict(world(status=second), {}))
    assert cond(over, C.CONFLICT) == ("False", "NoConflict") and cond(over, C.READY) == ("True", "Serving")


# ---- blocked, status times, Events ---------------------------------------------------------------------


def test_blocked_restores_every_route_and_says_why() -> None:
    base = world()
    w = dataclasses.replace(
        base, r=None, blocked=Blocked(C.TARGET_FOUND, "TargetNotFound", "gone"), touched=frozenset({VS})
    )
    w.es["status"] = {"origin": {"service": "x"}, "mode": "proxy"}
    plan, status, events = run(w)
    assert plan.restore_all and status["mode"] == "serve" and "origin" not in status
    assert status["boundVirtualServices"] == [f"{NS}/details"]
    assert cond(status, C.READY) == ("False", "TargetNotFound")
    assert events == [Event("Warning", "TargetNotFound", "gone")]


def test_a_missing_service_still_says_the_target_was_found() -> None:
    w = dataclasses.replace(world(), r=None, blocked=Blocked("ServiceFound", "ServiceNotFound", "no svc"))
    _, status, _ = run(w)
    assert cond(status, C.TARGET_FOUND) == ("True", "TargetFound")
    assert cond(status, "ServiceFound") == ("False", "ServiceNotFound")


def test_phase_times_come_from_the_worlds_clock() -> None:
    _, status, events = run(world(replicas=0, ready=0, status={"phase": "Serving"}))
    assert status["lastScaledToZeroTime"] == "2026-12-02T12:00:00Z"
    assert Event("Normal", "ScaledToZero", "Deployment details-v1 has no replica left") in events
    _, status, _ = run(world(status={"phase": "ScalingUp"}))
    assert status["awakeSince"] == "2026-12-02T12:00:00Z"


def test_warnings_come_from_condition_transitions_so_a_restart_does_not_repeat_them() -> None:
    _, first, events = run(world(vss={}))
    assert [e.reason for e in events] == ["VirtualServiceNotFound", "Serving"]
    # The next reconcile (or a restarted controller) reads the status the first one wrote.
    _, second, events = run(world(vss={}, status=first))
    assert events == [] and second["conditions"] == first["conditions"]
    # A new message for the same problem is worth a new Warning.
    _, _, events = run(world(vss={}, refs=frozenset({VS, (NS, "other")}), status=first))
    assert [e.reason for e in events] == ["VirtualServiceNotFound"]


def test_a_switch_is_an_event() -> None:
    w = world(replicas=0, ready=0)
    plan = decide.decide(w)
    _, _, events = decide.report(w, plan, Outcome(memory=w.memory, changed=True))
    msg = "Deployment details-v1 is at 0 replicas: 1 VirtualService(s) route to the activator"
    assert Event("Normal", "SwitchedToProxy", msg) in events


# ---- deletion -----------------------------------------------------------------------------------------


def workload(replicas: int, ready: int) -> WorkloadState:
    return WorkloadState("Deployment", "details-v1", replicas, ready, replicas, {}, {}, False, None)


DELETION_ROWS = [
    # (what, state, status.readyReplicas, seconds of holdTimeout left, listed, step)
    ("at zero: woken, routes stay", workload(0, 0), 0, 30.0, None, decide.DeletionStep(wake=True, wait=0.5)),
    ("scaling up: routes stay", workload(1, 0), 0, 30.0, None, decide.DeletionStep(wait=0.5)),
    ("ready: released, then the EndpointSlices", workload(1, 1), 0, 30.0, None,
     decide.DeletionStep(release_ready=1, look_at_endpoints=True)),
    ("ready, not listed yet", workload(1, 1), 1, 30.0, False, decide.DeletionStep(wait=ENDPOINTS_POLL)),
    ("ready and listed: restore", workload(1, 1), 1, 30.0, True, decide.DeletionStep()),
    ("holdTimeout over, never ready: restore with a warning", workload(1, 0), 0, -1.0, None,
     decide.DeletionStep(unready_restore=True)),
    ("holdTimeout over, ready, not listed: restore", workload(1, 1), 0, -1.0, None,
     decide.DeletionStep(release_ready=1)),
    ("at zero, holdTimeout over: restore (the finalizer wakes it after)", workload(0, 0), 0, -1.0, None,
     decide.DeletionStep(unready_restore=True)),
    ("waits no longer than holdTimeout", workload(1, 0), 0, 0.2, None, decide.DeletionStep(wait=0.2)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("what", "state", "status_ready", "left", "listed", "step"), DELETION_ROWS, ids=[r[0] for r in DELETION_ROWS]
)
def test_deletion(
    what: str, state: WorkloadState, status_ready: int, left: float, listed: bool | None, step: decide.DeletionStep
) -> None:
    assert decide.deletion_rules(state, status_ready, left, listed) == step, what


def test_fields_kept_but_not_used_are_reported_not_dropped() -> None:
    md = {"serverAddress": "http://p:9090", "query": "q", "threshold": "0.01", "uptimeFilter": 'container="x"'}
    w = world(triggers=[{"type": "prometheus", "metadata": md}])
    plan, status, events = run(w)
    ignored = C.get_condition(plan.conditions, C.IGNORED)
    assert ignored is not None and (ignored["status"], ignored["reason"]) == ("True", "NotUsed")
    assert "spec.triggers[0].metadata.uptimeFilter" in ignored["message"]
    assert C.get_condition(status["conditions"], C.READY)["status"] == "True"  # type: ignore[index]
    assert not any(e.reason == "NotUsed" for e in events)
    blocked = dataclasses.replace(w, r=None, blocked=Blocked(C.TARGET_FOUND, "TargetNotFound", "gone"))
    assert C.get_condition(decide.decide(blocked).conditions, C.IGNORED)["reason"] == "NotUsed"  # type: ignore[index]
    later = world(status={"conditions": status["conditions"]})
    assert C.get_condition(decide.decide(later).conditions, C.IGNORED)["reason"] == "AllUsed"  # type: ignore[index]
    assert C.get_condition(decide.decide(world()).conditions, C.IGNORED) is None  # never seen: absent


# ---- a scale-down while a wake is under way ------------------------------------------------------------

WAKING_ROWS = [
    # waking, ready replicas, woken seconds ago, refused
    (True, 0, 5, True),  # woken, no ready replica yet: requests may be held for it
    (True, 0, 60, False),  # past holdTimeout: nothing can still be held for this wake
    (True, 1, 5, False),  # ready: the activators release on it
    (False, 0, 5, False),  # not woken by this controller (starting, or crash-looping)
    (True, 0, None, False),
]


@pytest.mark.parametrize(("waking", "ready", "ago", "refused"), WAKING_ROWS)
def test_a_scale_down_waits_for_a_wake_under_way(waking: bool, ready: int, ago: float | None, refused: bool) -> None:
    state = WorkloadState("Deployment", "details-v1", 1, ready, 1, {}, {}, False, None)
    woken = None if ago is None else (NOW - dt.timedelta(seconds=ago)).isoformat()
    why = decide.waking_refuses_sleep(waking, state, woken, 60.0, NOW)
    assert (why is not None) == refused, why
    if refused:
        assert why == (
            "not scaling Deployment details-v1 to zero: it was woken 5s ago and has no ready replica yet, and "
            "requests may be held for it (holdTimeout 60s)"
        )
