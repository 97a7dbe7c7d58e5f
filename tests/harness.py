"""Helpers for cluster tests: applying manifests, reading objects, running the real programs."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from kubernetes.client.exceptions import ApiException

from elasti_istio.playground.procs import ControllerProc as PlaygroundControllerProc
from elasti_istio.playground.procs import Proc as Proc  # re-exported: tests run programs with it
from elasti_istio.playground.procs import ProcError
from elasti_istio.playground.procs import free_port as free_port
from tests.conftest import K8s
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parents[1]
BOOKINFO = ROOT / "examples" / "bookinfo"
GROUP, VERSION = "elasti.truefoundry.com", "v1alpha1"

PLURALS = {
    "Deployment": "deployments",
    "StatefulSet": "statefulsets",
    "ReplicaSet": "replicasets",
    "VirtualService": "virtualservices",
    "DestinationRule": "destinationrules",
    "Gateway": "gateways",
    "ElastiService": "elastiservices",
    "ScaledObject": "scaledobjects",
    "Rollout": "rollouts",
}


def load(name: str) -> list[dict[str, Any]]:
    path = BOOKINFO / name if not os.path.isabs(name) else Path(name)
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def apply(k8s: K8s, namespace: str, docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        create(k8s, namespace, doc)


def create(k8s: K8s, namespace: str, doc: dict[str, Any]) -> dict[str, Any]:
    kind = doc["kind"]
    if kind == "Service":
        return k8s.core.create_namespaced_service(namespace, doc).to_dict()  # type: ignore[attr-defined]
    if kind == "ServiceAccount":
        return k8s.core.create_namespaced_service_account(namespace, doc).to_dict()  # type: ignore[attr-defined]
    group, _, version = doc["apiVersion"].rpartition("/")
    return k8s.custom.create_namespaced_custom_object(group, version, namespace, PLURALS[kind], doc)  # type: ignore


def get(k8s: K8s, namespace: str, kind: str, name: str, api_version: str | None = None) -> dict[str, Any] | None:
    group, version = _gv(kind, api_version)
    try:
        return k8s.custom.get_namespaced_custom_object(group, version, namespace, PLURALS[kind], name)  # type: ignore
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def patch(
    k8s: K8s, namespace: str, kind: str, name: str, body: dict[str, Any], api_version: str | None = None
) -> dict[str, Any]:
    group, version = _gv(kind, api_version)
    return k8s.custom.patch_namespaced_custom_object(group, version, namespace, PLURALS[kind], name, body)  # type: ignore


def delete(k8s: K8s, namespace: str, kind: str, name: str, api_version: str | None = None) -> None:
    group, version = _gv(kind, api_version)
    try:
        k8s.custom.delete_namespaced_custom_object(group, version, namespace, PLURALS[kind], name)  # type: ignore
    except ApiException as exc:
        if exc.status != 404:
            raise


def _gv(kind: str, api_version: str | None) -> tuple[str, str]:
    default = {
        "Deployment": "apps/v1",
        "StatefulSet": "apps/v1",
        "ReplicaSet": "apps/v1",
        "VirtualService": "networking.istio.io/v1beta1",
        "DestinationRule": "networking.istio.io/v1beta1",
        "Gateway": "networking.istio.io/v1beta1",
        "ElastiService": f"{GROUP}/{VERSION}",
        "ScaledObject": "keda.sh/v1alpha1",
        "Rollout": "argoproj.io/v1alpha1",
    }
    group, _, version = (api_version or default[kind]).rpartition("/")
    return group, version


def es(k8s: K8s, namespace: str, name: str) -> dict[str, Any]:
    obj = get(k8s, namespace, "ElastiService", name)
    assert obj is not None, f"ElastiService {namespace}/{name} not found"
    return obj


def condition(obj: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == ctype), None)


def events_for(k8s: K8s, namespace: str, name: str) -> list[Any]:
    evs = k8s.core.list_namespaced_event(namespace).items  # type: ignore[attr-defined]
    return [e for e in evs if e.involved_object.name == name]


def wait_event(k8s: K8s, namespace: str, name: str, reason: str, timeout: float = 30) -> Any:
    return wait_for(
        lambda: next((e for e in events_for(k8s, namespace, name) if e.reason == reason), None),
        timeout,
        f"Event {reason} on {name}",
    )


def scale(k8s: K8s, namespace: str, name: str, replicas: int, kind: str = "Deployment") -> None:
    if kind == "Deployment":
        k8s.apps.patch_namespaced_deployment_scale(name, namespace, {"spec": {"replicas": replicas}})  # type: ignore
    elif kind == "StatefulSet":
        k8s.apps.patch_namespaced_stateful_set_scale(name, namespace, {"spec": {"replicas": replicas}})  # type: ignore
    else:
        raise ValueError(kind)


def ready_replicas(k8s: K8s, namespace: str, name: str) -> int:
    return int(k8s.apps.read_namespaced_deployment(name, namespace).status.ready_replicas or 0)  # type: ignore


def http_json(
    method: str, url: str, body: Any = None, timeout: float = 30, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None and "Content-Type" not in (headers or {}):
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return resp.status, _maybe_json(raw)
    except urllib.error.HTTPError as exc:
        return exc.code, _maybe_json(exc.read())


def _maybe_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


class ControllerProc(PlaygroundControllerProc):
    """The controller as tests run it: debug logs, the fail-open check off unless an activator is named."""

    def __init__(
        self,
        kubeconfig: Path,
        namespace: str | None,
        log_path: Path,
        *extra: str,
        activator_deployment: str | None = None,
    ) -> None:
        super().__init__(
            kubeconfig, namespace, log_path, *extra, activator_deployment=activator_deployment, log_level="debug"
        )

    def wait_ready(self, timeout: float = 60) -> ControllerProc:
        try:
            super().wait_ready(timeout)
        except ProcError as exc:
            raise AssertionError(f"{exc}\n{self.logs()[-4000:]}") from exc
        return self

    def wake(self, namespace: str, name: str) -> tuple[int, Any]:
        return http_json("POST", self.wake_url, {"namespace": namespace, "name": name})

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url + "/metrics", timeout=10) as resp:
            return str(resp.read().decode())


def wait_until(probe: Any, timeout: float = 45, what: str = "condition") -> Any:
    return wait_for(probe, timeout, what, interval=0.05)


def now() -> float:
    return time.monotonic()
