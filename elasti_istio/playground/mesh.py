"""Reading the real mesh of the local cluster: istiod's sync status, what an Envoy knows, and sidecars.

istiod's ``/debug/syncz`` says whether each proxy acked every configuration it was sent; an Envoy's
admin ``/clusters`` says which endpoints it has and whether they are healthy. Waiting on these,
never on a sleep, is how callers know the mesh has caught up.
"""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

from elasti_istio.localcluster.istio import synced
from elasti_istio.playground.manifests import Api

ANN_SIDECAR_ADDRESS = "elasti.truefoundry.com/sim-sidecar-address"
ADMIN_PORT = 15000
CLIENT_NAMESPACE = "elasti-mesh-client"
CLIENT = "mesh-client"


def get_json(url: str, timeout: float = 10) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.load(resp)


def syncz(istiod: str) -> list[dict[str, Any]]:
    return list(get_json(istiod.rstrip("/") + "/debug/syncz") or [])


def unsynced(istiod: str) -> list[str]:
    """The proxies istiod has not seen ack their latest configuration (empty: every proxy is synced)."""
    entries = syncz(istiod)
    return sorted(e.get("proxy", "?") for e in entries if not synced(entries, e.get("proxy", "")))


def wait_synced(istiod: str, timeout: float = 60, proxies: tuple[str, ...] = ()) -> None:
    """Until istiod reports every proxy (and each of ``proxies``, ``pod.namespace``) synced."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            entries = syncz(istiod)
            known = {e.get("proxy") for e in entries}
            missing = [p for p in proxies if p not in known]
            late = [e.get("proxy") for e in entries if not synced(entries, e.get("proxy", ""))]
            if not missing and not late:
                return
            last = f"not connected: {missing}, not synced: {late}"
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"istiod did not report the proxies synced within {timeout:.0f}s ({last})")


def healthy_hosts(admin: str) -> dict[str, int]:
    """Cluster name → number of healthy endpoints, as one Envoy sees them now."""
    doc = get_json(admin.rstrip("/") + "/clusters?format=json")
    out: dict[str, int] = {}
    for cluster in doc.get("cluster_statuses") or []:
        hosts = cluster.get("host_statuses") or []
        out[cluster["name"]] = sum(1 for h in hosts if _healthy(h))
    return out


def _healthy(host: dict[str, Any]) -> bool:
    return (host.get("health_status") or {}).get("eds_health_status", "HEALTHY") == "HEALTHY"


def cluster_hosts(admin: str, cluster: str, healthy: bool = False) -> set[str]:
    """The addresses one Envoy has for a cluster now: all of them, or only the healthy ones (istiod sends
    a pod that is not Ready as an unhealthy endpoint, which Envoy never picks)."""
    doc = get_json(admin.rstrip("/") + "/clusters?format=json")
    for c in doc.get("cluster_statuses") or []:
        if c["name"] == cluster:
            return {
                h["address"]["socket_address"]["address"]
                for h in c.get("host_statuses") or []
                if not healthy or _healthy(h)
            }
    return set()


def pod_sidecar(api: Api, namespace: str, label_selector: str) -> str | None:
    """The sidecar address of the first running pod matching the selector, once it has one."""
    for pod in api.core.list_namespaced_pod(namespace, label_selector=label_selector).items:
        if pod.metadata.deletion_timestamp:
            continue
        address = (pod.metadata.annotations or {}).get(ANN_SIDECAR_ADDRESS)
        if address:
            return str(address)
    return None


def sidecar_admins(api: Api, namespace: str, label_selector: str = "") -> list[str]:
    """The admin URLs of the Ready pods' sidecars in a namespace (those matching the selector)."""
    out = []
    for pod in api.core.list_namespaced_pod(namespace, label_selector=label_selector).items:
        address = (pod.metadata.annotations or {}).get(ANN_SIDECAR_ADDRESS)
        ready = any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))
        if address and ready and not pod.metadata.deletion_timestamp:
            out.append(f"http://{address}:{ADMIN_PORT}")
    return out


def client_manifests() -> list[dict[str, Any]]:
    """A pod whose only part is its sidecar: the mesh client of tests, the demo and the benchmarks."""
    labels = {"app": CLIENT}
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": CLIENT, "namespace": CLIENT_NAMESPACE},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {
                        "labels": {**labels, "sidecar.istio.io/inject": "true"},
                        "annotations": {"elasti.truefoundry.com/sim-startup-seconds": "0"},
                    },
                    "spec": {"containers": [{"name": "client", "image": "mesh-client"}]},
                },
            },
        }
    ]


def start_client(api: Api, timeout: float = 90) -> str:
    """Deploys the mesh client and returns its sidecar's address once the pod is Ready."""
    api.ensure_namespace(CLIENT_NAMESPACE)
    api.apply_all(client_manifests(), CLIENT_NAMESPACE)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sidecar_admins(api, CLIENT_NAMESPACE):
            address = pod_sidecar(api, CLIENT_NAMESPACE, f"app={CLIENT}")
            if address:
                return address
        time.sleep(0.1)
    raise TimeoutError(f"the mesh client's sidecar was not ready within {timeout:.0f}s")


def routed_clusters(admin: str, host: str, port: int | None = None) -> set[str] | None:
    """The clusters one Envoy sends traffic for ``host`` (on ``port``, or on any port) to now: weight > 0,
    any route of its virtual hosts. None when that Envoy has no virtual host for it yet."""
    doc = get_json(admin.rstrip("/") + "/config_dump?resource=dynamic_route_configs")
    out: set[str] | None = None
    for config in doc.get("configs") or []:
        rc = config.get("route_config") or {}
        if port is not None and rc.get("name") != str(port):
            continue
        for vh in rc.get("virtual_hosts") or []:
            if host not in (vh.get("domains") or []):
                continue
            out = out or set()
            for route in vh.get("routes") or []:
                action = route.get("route") or {}
                if action.get("cluster"):
                    out.add(action["cluster"])
                for wc in (action.get("weighted_clusters") or {}).get("clusters") or []:
                    if int(wc.get("weight") or 0) > 0:
                        out.add(wc["name"])
    return out


def routes_to_activator(admin: str, host: str, port: int | None = None) -> bool | None:
    """Whether one Envoy sends traffic for ``host`` to the activator now (None: it has no route for it)."""
    clusters = routed_clusters(admin, host, port)
    if clusters is None:
        return None
    return any("|elasti-activator." in c for c in clusters)
