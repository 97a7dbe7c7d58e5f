"""The CRDs the local cluster installs, all as published (CEL validation rules included)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

# Istio's come from the build of istiod (``istio-crds.yaml`` beside pilot-discovery), so they match it.
THIRD_PARTY = ("keda-scaledobjects.yaml", "argo-rollouts.yaml")


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


def all_crds(istio_crds: Path) -> list[dict[str, Any]]:
    """Ours, Istio's (every CRD of the istiod build at hand) and the KEDA and Argo Rollouts ones we read."""
    return load_documents(elastiservice_crd_path()) + load_documents(istio_crds) + third_party_documents()
