"""The CRDs the local cluster installs, sanitized for the API server's version."""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

THIRD_PARTY = ("istio-networking.yaml", "keda-scaledobjects.yaml", "argo-rollouts.yaml")


def elastiservice_crd_path() -> Path:
    """The packaged CRD (a link to ``crds/elastiservice.yaml`` in a source checkout)."""
    return Path(str(resources.files("elasti_istio") / "data" / "elastiservice.yaml"))


def load_documents(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d]


def third_party_documents() -> list[dict[str, Any]]:
    base = Path(str(resources.files("elasti_istio.localcluster") / "crds"))
    docs: list[dict[str, Any]] = []
    for name in THIRD_PARTY:
        docs.extend(load_documents(base / name))
    return docs


def all_crds() -> list[dict[str, Any]]:
    return load_documents(elastiservice_crd_path()) + third_party_documents()


def sanitize(doc: dict[str, Any], server_minor: int = 20) -> dict[str, Any]:
    """Returns a copy that an API server of version 1.<server_minor> accepts.

    Before 1.25 the server does not know ``x-kubernetes-validations``; 1.20 also refuses the empty
    defaults (``default: ""``, read back as null) in Argo Rollouts' schema; a list-map key that loses
    its default becomes required. Everything else is kept as published.
    """
    out = copy.deepcopy(doc)
    if server_minor >= 25:
        return out

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            node.pop("x-kubernetes-validations", None)
            if "default" in node and node["default"] in (None, ""):
                del node["default"]
            for v in node.values():
                walk(v)
            keys = node.get("x-kubernetes-list-map-keys") or []
            items = node.get("items") or {}
            props = items.get("properties") or {}
            for k in keys:
                # A map key must have a default or be required; with the default gone, require it.
                if k in props and "default" not in props[k] and k not in items.get("required", []):
                    items.setdefault("required", []).append(k)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        return node

    for version in out.get("spec", {}).get("versions", []):
        walk(version.get("schema"))
    return out
