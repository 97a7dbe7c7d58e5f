"""Bookinfo with elasti-istio, from ``examples/bookinfo/``: what is applied and how to tell it is up."""

from __future__ import annotations

import http.client
from pathlib import Path
from typing import Any

from elasti_istio.playground.manifests import Api, load, repo_path
from elasti_istio.playground.procs import ACTIVATOR_HOST

FILES = (
    "bookinfo.yaml",
    "destination-rule-all.yaml",
    "bookinfo-gateway.yaml",
    "virtual-services.yaml",
    "elastiservices.yaml",
)
ELASTISERVICES = ("details", "reviews-v1", "reviews-v2", "reviews-v3")
GROUP, VERSION = "elasti.truefoundry.com", "v1alpha1"
DETAILS_MARK = "Book Details"
INJECTION = {"istio-injection": "enabled"}
DETAILS_ERROR = "product details are currently unavailable"


def examples_dir() -> Path:
    return repo_path("examples", "bookinfo")


def apply(api: Api, namespace: str, directory: Path | None = None) -> None:
    directory = directory or examples_dir()
    api.ensure_namespace(namespace)
    # As Istio's Bookinfo guide does: every pod of the namespace gets a sidecar.
    api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "labels": INJECTION}})
    for name in FILES:
        api.apply_all(load(directory / name), namespace)


def deployments_ready(api: Api, namespace: str) -> tuple[int, int]:
    """(ready, total) Deployments of the namespace."""
    items = api.apps.list_namespaced_deployment(namespace).items
    ready = sum(1 for d in items if (d.status.ready_replicas or 0) >= (d.spec.replicas or 0))
    return ready, len(items)


def elastiservice(api: Api, namespace: str, name: str) -> dict[str, Any]:
    return dict(api.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "elastiservices", name))


def phase(api: Api, namespace: str, name: str) -> str:
    return str((elastiservice(api, namespace, name).get("status") or {}).get("phase") or "")


def virtualservice(api: Api, namespace: str, name: str) -> dict[str, Any]:
    vs = api.custom.get_namespaced_custom_object("networking.istio.io", "v1", namespace, "virtualservices", name)
    return dict(vs)


def proxied(spec: dict[str, Any]) -> bool:
    """True when some route of the spec sends traffic to the activator."""
    return any(
        d["destination"].get("host") == ACTIVATOR_HOST and (d.get("weight") or 0) > 0
        for r in spec.get("http") or []
        for d in r.get("route") or []
    )


def describe_routes(spec: dict[str, Any]) -> list[str]:
    """One line per destination: where its weight goes and what header it sets."""
    lines = []
    for i, r in enumerate(spec.get("http") or []):
        route = r.get("route") or []
        for d in route:
            dest = d["destination"]
            where = dest.get("host", "?")
            if dest.get("port", {}).get("number"):
                where += f":{dest['port']['number']}"
            if dest.get("subset"):
                where += f" subset {dest['subset']}"
            weight = d.get("weight", 100 if len(route) == 1 else 0)
            line = f"http[{i}] -> {where:60} weight {weight}"
            sets = ((d.get("headers") or {}).get("request") or {}).get("set") or {}
            if sets:
                line += "  sets " + ", ".join(f"{k}: {v}" for k, v in sets.items())
            lines.append(line)
    return lines


def weighted_destinations(virtualservices: list[dict[str, Any]], namespace: str) -> set[tuple[str, str]]:
    """``(service, subset)`` of every destination in the namespace that a route gives traffic to."""
    out = set()
    for vs in virtualservices:
        for route in (vs.get("spec") or {}).get("http") or []:
            dests = route.get("route") or []
            for d in dests:
                weight = d.get("weight", 100 if len(dests) == 1 else 0)
                host = d["destination"].get("host", "")
                name = host.split(".")[0]
                if weight and (host == name or host.split(".")[1:2] == [namespace]):
                    out.add((name, d["destination"].get("subset") or ""))
    return out


def destinations_without_endpoints(wanted: set[tuple[str, str]], namespace: str, clusters: dict[str, int]) -> list[str]:
    """The wanted destinations for which an Envoy (its ``/clusters``: name → healthy hosts) has no healthy
    endpoint yet. Kubernetes' EndpointSlice controller can trail pod readiness and istiod debounces its
    pushes, so a Deployment being ready does not mean routable."""
    missing = []
    for name, subset in sorted(wanted):
        suffix = f"|{subset}|{name}.{namespace}.svc.cluster.local"
        if not any(c.startswith("outbound|") and c.endswith(suffix) and n > 0 for c, n in clusters.items()):
            missing.append(name + (f" subset {subset}" if subset else ""))
    return missing


def unrouted(api: Api, gateway_admin: str, namespace: str) -> list[str]:
    """:func:`destinations_without_endpoints` as the gateway and every Ready sidecar of the namespace see it."""
    from elasti_istio.playground.mesh import healthy_hosts, sidecar_admins

    items = api.custom.list_namespaced_custom_object("networking.istio.io", "v1", namespace, "virtualservices")
    wanted = weighted_destinations(items["items"], namespace)
    missing: set[str] = set()
    for admin in [gateway_admin, *sidecar_admins(api, namespace)]:
        missing.update(destinations_without_endpoints(wanted, namespace, healthy_hosts(admin)))
    return sorted(missing)


def get_page(base_url: str, path: str = "/productpage", timeout: float = 90) -> tuple[int, dict[str, str], str]:
    """One GET on a fresh connection, never retried."""
    conn = http.client.HTTPConnection(base_url.removeprefix("http://"), timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read().decode(errors="replace")
    finally:
        conn.close()


def page_problem(status: int, headers: dict[str, str], body: str) -> str | None:
    """Why a productpage answer is not the complete page, or None."""
    if status != 200:
        return f"status {status}: {body[:200]!r}"
    if headers.get("x-bookinfo-degraded"):
        why = headers.get("x-bookinfo-degraded-why")
        return f"the page was rendered without {headers['x-bookinfo-degraded']}" + (f" ({why})" if why else "")
    if DETAILS_ERROR in body or DETAILS_MARK not in body:
        return "the page has no book details"
    return None
