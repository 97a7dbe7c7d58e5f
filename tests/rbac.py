"""Binds the shipped RBAC rules to the local cluster's component identities, per test namespace."""

from __future__ import annotations

import copy
import uuid
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import K8s

BASE = Path(__file__).resolve().parents[1] / "deploy" / "kustomize" / "base"
CONTROLLER_USER = "system:serviceaccount:elasti-system:elasti-controller"
ACTIVATOR_USER = "system:serviceaccount:elasti-system:elasti-activator"


def shipped_rules(filename: str, role_name: str) -> list[dict[str, Any]]:
    for doc in yaml.safe_load_all((BASE / filename).read_text()):
        if doc and doc["kind"] in ("ClusterRole", "Role") and doc["metadata"]["name"] == role_name:
            return list(doc["rules"])
    raise LookupError(f"{role_name} not in {filename}")


def _bind(k8s: K8s, namespace: str, user: str, rules: list[dict[str, Any]]) -> str:
    name = f"test-{uuid.uuid4().hex[:8]}"
    k8s.rbac.create_cluster_role({"metadata": {"name": name}, "rules": rules})  # type: ignore[attr-defined]
    k8s.rbac.create_namespaced_role_binding(
        namespace,
        {  # type: ignore[attr-defined]
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": [{"kind": "User", "name": user, "apiGroup": "rbac.authorization.k8s.io"}],
        },
    )
    return name


def bind_controller_role(k8s: K8s, namespace: str, drop: tuple[str, ...] = ()) -> str:
    """The controller's shipped ClusterRole, bound in ``namespace`` only; ``drop`` removes resources."""
    rules = copy.deepcopy(shipped_rules("rbac-controller.yaml", "elasti-controller"))
    for rule in rules:
        rule["resources"] = [r for r in rule["resources"] if r not in drop]
    return _bind(k8s, namespace, CONTROLLER_USER, [r for r in rules if r["resources"]])


def bind_activator_role(k8s: K8s, namespace: str) -> str:
    return _bind(k8s, namespace, ACTIVATOR_USER, shipped_rules("rbac-activator.yaml", "elasti-activator"))
