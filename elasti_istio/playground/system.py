"""``elasti-system`` in the local cluster: the shipped RBAC and the activator's Deployment and Service.

The activator runs as a local process; its Pod in the cluster forwards ports 8012 and 9091 to it
(``sim-forward``) and is Ready exactly while the process answers ``/readyz`` (``sim-readiness-url``).
The mesh therefore routes ``elasti-activator.elasti-system.svc.cluster.local:8012`` to the process,
and the controller's fail-open check sees the real activator's readiness. The Pod has an Istio
sidecar, as in a real install: the process sends its upstream requests to that Envoy
(``--sidecar-address``, see :func:`activator_sidecar`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

from elasti_istio.playground.manifests import Api, load, repo_path

SYSTEM_NAMESPACE = "elasti-system"
ACTIVATOR = "elasti-activator"
CONTROLLER = "elasti-controller"
RBAC_FILES = ("rbac-controller.yaml", "rbac-activator.yaml")
ANNOTATION = "elasti.truefoundry.com/"


def rbac_docs() -> list[dict[str, Any]]:
    """The shipped RBAC, as in ``deploy/kustomize/base``."""
    docs: list[dict[str, Any]] = []
    for name in RBAC_FILES:
        docs += load(repo_path("deploy", "kustomize", "base", name))
    return docs


def service_accounts() -> list[dict[str, Any]]:
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": n, "namespace": SYSTEM_NAMESPACE}}
        for n in (CONTROLLER, ACTIVATOR)
    ]


def activator_workload(port: int, admin_port: int, replicas: int = 1) -> list[dict[str, Any]]:
    """Deployment + Service ``elasti-system/elasti-activator`` standing for the local process."""
    labels = {"app": ACTIVATOR, "app.kubernetes.io/name": "elasti-istio", "app.kubernetes.io/component": "activator"}
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": ACTIVATOR, "namespace": SYSTEM_NAMESPACE, "labels": labels},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": ACTIVATOR}},
                "template": {
                    "metadata": {
                        "labels": {**labels, "sidecar.istio.io/inject": "true"},
                        "annotations": {
                            ANNOTATION + "sim-forward": f"8012=127.0.0.1:{port},9091=127.0.0.1:{admin_port}",
                            ANNOTATION + "sim-readiness-url": f"http://127.0.0.1:{admin_port}/readyz",
                            ANNOTATION + "sim-startup-seconds": "0",
                        },
                    },
                    "spec": {
                        "serviceAccountName": ACTIVATOR,
                        "containers": [
                            {
                                "name": "activator",
                                "image": "elasti-istio",
                                "args": ["activator"],
                                "ports": [
                                    {"name": "http", "containerPort": 8012},
                                    {"name": "admin", "containerPort": 9091},
                                ],
                            }
                        ],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": ACTIVATOR, "namespace": SYSTEM_NAMESPACE, "labels": labels},
            "spec": {
                "selector": {"app": ACTIVATOR},
                "ports": [
                    # No protocol in the name: Istio keeps the caller's protocol (HTTP/1.1 or h2c for gRPC).
                    {"name": "proxy", "port": 8012, "targetPort": 8012},
                    {"name": "http-admin", "port": 9091, "targetPort": 9091},
                ],
            },
        },
        activator_destination_rule(),
    ]


def activator_destination_rule() -> dict[str, Any]:
    """The shipped DestinationRule that has gateways keep the caller's protocol too."""
    docs = load(repo_path("deploy", "kustomize", "base", "activator.yaml"))
    rule = next(d for d in docs if d["kind"] == "DestinationRule")
    rule["metadata"]["namespace"] = SYSTEM_NAMESPACE
    return rule


def install(api: Api, port: int, admin_port: int, *, cluster_wide_controller: bool = True) -> None:
    """The namespace, the shipped RBAC and the activator workload.

    With ``cluster_wide_controller=False`` the controller's ClusterRoleBinding is left out: its
    ClusterRole is then granted per namespace by :func:`bind_controller` (a controller run with
    ``--namespace``, beside others in the same cluster).
    """
    _namespace_active(api)
    # An activator workload left behind by someone else may have another selector, which is immutable.
    for kind, version in (("Deployment", "apps/v1"), ("Service", "v1"), ("DestinationRule", "networking.istio.io/v1")):
        api.delete(version, kind, ACTIVATOR, SYSTEM_NAMESPACE)
    _until(lambda: not api.core.list_namespaced_pod(SYSTEM_NAMESPACE).items, "no pod left in elasti-system")
    api.apply_all(service_accounts())
    for doc in rbac_docs():
        controller_grant = doc["kind"] == "ClusterRoleBinding" and doc["metadata"]["name"] == CONTROLLER
        if controller_grant and not cluster_wide_controller:
            continue
        api.apply(doc, SYSTEM_NAMESPACE)
    api.apply_all(activator_workload(port, admin_port), SYSTEM_NAMESPACE)


def bind_controller(api: Api, namespace: str) -> None:
    """The shipped ``elasti-controller`` ClusterRole, granted in one namespace only."""
    binding = next(d for d in rbac_docs() if d["kind"] == "ClusterRoleBinding" and d["metadata"]["name"] == CONTROLLER)
    doc = copy.deepcopy(binding)
    doc["kind"] = "RoleBinding"
    doc["metadata"]["namespace"] = namespace
    api.apply(doc, namespace)


def uninstall(api: Api) -> None:
    """Removes what :func:`install` made, cluster-wide grants first."""
    for doc in reversed(rbac_docs()):
        meta = doc["metadata"]
        api.delete(doc["apiVersion"], doc["kind"], meta["name"], meta.get("namespace"))
    api.delete("v1", "Namespace", SYSTEM_NAMESPACE)


def activator_ready(api: Api) -> bool:
    dep = api.get("apps/v1", "Deployment", ACTIVATOR, SYSTEM_NAMESPACE)
    return bool(dep and ((dep.get("status") or {}).get("readyReplicas") or 0) >= 1)


def activator_sidecar(api: Api, timeout: float = 90) -> str:
    """The address of the activator Pod's sidecar, once the kubelet stand-in has given it one."""
    from elasti_istio.playground.mesh import pod_sidecar

    found: list[str] = []

    def probe() -> bool:
        address = pod_sidecar(api, SYSTEM_NAMESPACE, f"app={ACTIVATOR}")
        if address:
            found.append(address)
        return bool(address)

    _until(probe, "the activator Pod's sidecar address", timeout)
    return found[0]


def _namespace_active(api: Api) -> None:
    """Creates elasti-system, waiting out an earlier deletion that has not finished."""

    def active() -> bool:
        api.ensure_namespace(SYSTEM_NAMESPACE)
        ns = api.get("v1", "Namespace", SYSTEM_NAMESPACE)
        return bool(ns and (ns.get("status") or {}).get("phase") == "Active")

    _until(active, f"namespace {SYSTEM_NAMESPACE} to be active")


def _until(probe: Callable[[], bool], what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)
