"""Which destinations a held request goes to: Services shared by several workloads, multi-port Services
and DestinationRules of other namespaces, through the real mesh.

Clients never retry: each request is sent once and must succeed by itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from elasti_istio.playground import mesh as meshview
from elasti_istio.playground.bookinfo import proxied
from elasti_istio.playground.procs import ControllerProc
from tests.e2e.conftest import System
from tests.e2e.support import (
    GROUP,
    VERSION,
    envoys_route,
    es_status,
    mesh_serves,
    phase,
    replicas,
    scale,
    until,
    url,
    vs_spec,
    web_app,
)

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]


def shared_service(names: tuple[str, ...]) -> list[dict[str, Any]]:
    """Workloads ``names``, each with its ElastiService, behind one Service ``web`` (selector ``app: web``,
    no DestinationRule) and its VirtualService."""
    docs = [doc for name in names for doc in behind_web(name, {"track": name}, "web")]
    service, vs = web_app("web")[1:3]
    return [*docs, service, vs]


def behind_web(name: str, labels: dict[str, str], virtual_service: str) -> list[dict[str, Any]]:
    """Workload ``name`` with pods labelled ``app: web`` and ``labels``, and its ElastiService for the
    Service ``web`` bound to ``virtual_service``."""
    app = web_app(name)
    deployment, es = app[0], app[3]
    pod_labels = {"app": "web", **labels}
    deployment["spec"]["selector"] = {"matchLabels": pod_labels}
    deployment["spec"]["template"]["metadata"]["labels"] = pod_labels
    es["spec"]["service"] = "web"
    es["spec"]["virtualServices"] = [virtual_service]
    return [deployment, es]


def test_a_service_shared_by_workloads_all_at_zero_is_held_and_wakes_one(
    e2e: System, namespace: str, controller: ControllerProc
) -> None:
    api, ns = e2e.api, namespace
    api.apply_all(shared_service(("web-a", "web-b")), ns)
    until(lambda: phase(api, ns, "web-a") == "Serving" and phase(api, ns, "web-b") == "Serving", "both Serving")
    until(lambda: mesh_serves(api, ns), "the mesh to route to both workloads")
    original = vs_spec(api, ns, "web")
    scale(api, ns, "web-a", 0)
    scale(api, ns, "web-b", 0)
    # Exactly one ElastiService (web-a: the first by kind and name) switches the shared destination.
    until(lambda: proxied(vs_spec(api, ns, "web")), "the shared destination routed to the activator")
    until(lambda: envoys_route(api, ns, "web", True), "the mesh to route web to the activator")
    headers = [
        h
        for route in vs_spec(api, ns, "web")["http"]
        for d in route["route"]
        for h in [((d.get("headers") or {}).get("request") or {}).get("set", {}).get("elasti-service")]
        if h
    ]
    assert headers == [f"{ns}/web-a"], vs_spec(api, ns, "web")
    until(lambda: phase(api, ns, "web-a") == "ScaledToZero", "web-a ScaledToZero")
    assert not any(c.get("reason") == "NoRouteToTarget" for c in es_status(api, ns, "web-b").get("conditions") or [])

    ans = e2e.sidecar.get(url(ns, "/who"))
    assert ans.status == 200 and ans.cold, ans
    assert ans.headers.get("x-pod-name", "").startswith("web-a-"), ans.headers
    until(lambda: vs_spec(api, ns, "web") == original, "the original routes back")
    assert replicas(api, ns, "web-a") == (1, 1) and replicas(api, ns, "web-b") == (0, 0)

    # A workload retired at zero (its ElastiService deleted, which wakes it, then scaled to 0 by hand) does
    # not keep web-a's ElastiService from switching the shared destination.
    api.custom.delete_namespaced_custom_object(GROUP, VERSION, ns, "elastiservices", "web-b")
    until(lambda: api.get(f"{GROUP}/{VERSION}", "ElastiService", "web-b", ns) is None, "web-b's ElastiService gone")
    scale(api, ns, "web-b", 0)
    until(lambda: replicas(api, ns, "web-b") == (0, 0), "web-b retired at zero")
    until(lambda: mesh_serves(api, ns), "the mesh to route to web-a")
    scale(api, ns, "web-a", 0)
    until(lambda: proxied(vs_spec(api, ns, "web")), "the destination routed to the activator past a retired workload")
    until(lambda: envoys_route(api, ns, "web", True), "the mesh to route web to the activator again")
    ans = e2e.sidecar.get(url(ns, "/who-again"))
    assert ans.status == 200 and ans.cold, ans
    until(lambda: vs_spec(api, ns, "web") == original, "the original routes back again")


def condition(api: Any, ns: str, name: str, ctype: str) -> dict[str, Any]:
    return next((c for c in es_status(api, ns, name).get("conditions") or [] if c.get("type") == ctype), {})


def test_a_per_try_timeout_shorter_than_the_hold_is_reported_and_cuts_held_requests_on_envoy(
    e2e: System, namespace: str, controller: ControllerProc
) -> None:
    api, ns = e2e.api, namespace
    docs = web_app(startup_seconds=4, hold_timeout="30s")
    docs[2]["spec"]["http"][0]["retries"] = {"attempts": 1, "perTryTimeout": "1s", "retryOn": "connect-failure"}
    api.apply_all(docs, ns)
    until(lambda: phase(api, ns, "web") == "Serving", "Serving")
    until(
        lambda: condition(api, ns, "web", "RouteTimeoutsCompatible").get("reason") == "RouteTimeoutShorterThanHold",
        "RouteTimeoutsCompatible to name the per-try timeout",
    )
    assert "retries.perTryTimeout of 1s" in condition(api, ns, "web", "RouteTimeoutsCompatible")["message"]
    until(lambda: mesh_serves(api, ns), "the mesh to route to the workload")
    scale(api, ns, "web", 0)
    until(lambda: proxied(vs_spec(api, ns, "web")), "routed to the activator")
    until(lambda: envoys_route(api, ns, "web", True), "the mesh to route web to the activator")
    # What the condition warns of, on Envoy: the held request is cut at the per-try timeout (Envoy's
    # 504), and the activator, seeing its client gone, never sends it to the workload.
    ans = e2e.sidecar.get(url(ns, "/cut"))
    assert (ans.status, ans.body) == (504, b"upstream request timeout"), ans
    until(lambda: replicas(api, ns, "web") == (1, 1), "the target woken all the same")
    until(lambda: mesh_serves(api, ns), "the mesh to route to the woken workload")
    seen = e2e.sidecar.get(url(ns, "/seen?path=/cut"))
    assert seen.status == 200 and json.loads(seen.body)["count"] == 0, seen


def two_ports() -> list[dict[str, Any]]:
    """``web`` with containers listening on 8080 and 9090, a Service with both ports, and routes that pick
    the port by the one the request came to."""
    docs = web_app(ports=(8080, 9090))
    docs[1]["spec"]["ports"] = [
        {"name": "http-a", "port": 8080, "targetPort": 8080},
        {"name": "http-b", "port": 9090, "targetPort": 9090},
    ]
    docs[2]["spec"]["http"] = [
        {"match": [{"port": 9090}], "route": [{"destination": {"host": "web", "port": {"number": 9090}}}]},
        {"route": [{"destination": {"host": "web", "port": {"number": 8080}}}]},
    ]
    return docs


def test_a_held_request_goes_to_the_service_port_its_route_chose(
    e2e: System, namespace: str, controller: ControllerProc
) -> None:
    api, ns = e2e.api, namespace
    api.apply_all(two_ports(), ns)
    until(lambda: phase(api, ns, "web") == "Serving", "Serving")
    until(lambda: mesh_serves(api, ns), "the mesh to route to the workload")
    warm = {p: json.loads(e2e.sidecar.get(url(ns, "/warm", port=p)).body)["port"] for p in (8080, 9090)}
    assert warm == {8080: 8080, 9090: 9090}
    scale(api, ns, "web", 0)
    until(lambda: proxied(vs_spec(api, ns, "web")), "routed to the activator")
    until(lambda: envoys_route(api, ns, "web", True), "the mesh to route web to the activator")
    ans = e2e.sidecar.get(url(ns, "/cold", port=9090))
    assert ans.status == 200 and ans.cold, ans
    assert json.loads(ans.body)["port"] == 9090, ans.body
    until(lambda: mesh_serves(api, ns), "the mesh to route to the woken workload")
    scale(api, ns, "web", 0)
    until(lambda: proxied(vs_spec(api, ns, "web")), "routed to the activator again")
    until(lambda: envoys_route(api, ns, "web", True), "the mesh to route web to the activator again")
    ans = e2e.sidecar.get(url(ns, "/cold", port=8080))
    assert ans.status == 200 and ans.cold, ans
    assert json.loads(ans.body)["port"] == 8080, ans.body


def test_a_destinationrule_in_the_clients_namespace_names_the_subsets(
    e2e: System, namespace: str, start_controller: Callable[..., ControllerProc]
) -> None:
    """Istio takes a route's subsets from the DestinationRule in the client's namespace first (here the
    mesh client's, where the VirtualService is too), then the Service's, then the root namespace: so does
    the controller."""
    api, ns, front = e2e.api, namespace, meshview.CLIENT_NAMESPACE
    fqdn = f"web.{ns}.svc.cluster.local"
    docs = [doc for v in ("v1", "v2") for doc in behind_web(f"web-{v}", {"version": v}, f"{front}/{ns}")]
    api.apply_all([*docs, web_app("web")[1]], ns)
    subsets = [{"name": v, "labels": {"version": v}} for v in ("v1", "v2")]
    istio = [
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": {"name": ns},
            "spec": {"host": fqdn, "subsets": subsets, "exportTo": ["."]},
        },
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": ns},
            "spec": {"hosts": [fqdn], "http": [{"route": [{"destination": {"host": fqdn, "subset": "v2"}}]}]},
        },
    ]
    api.apply_all(istio, front)
    try:
        start_controller(ns, front)
        until(lambda: phase(api, ns, "web-v2") == "Serving", "web-v2 Serving")
        until(
            lambda: condition(api, ns, "web-v2", "VirtualServicesBound").get("reason") == "Bound",
            "web-v2 bound to the route of its subset",
        )
        until(lambda: mesh_serves(api, front, ns), "the mesh to route to web-v2")
        scale(api, ns, "web-v2", 0)
        until(lambda: proxied(vs_spec(api, front, ns)), "routed to the activator")
        until(lambda: envoys_route(api, front, ns, True), "the mesh to route web to the activator")
        ans = e2e.sidecar.get(url(ns, "/cold"))
        assert ans.status == 200 and ans.cold, ans
        assert ans.headers.get("x-pod-name", "").startswith("web-v2-"), ans.headers
        assert replicas(api, ns, "web-v1") == (1, 1)
    finally:
        for doc in istio:
            api.delete(doc["apiVersion"], doc["kind"], ns, front)
