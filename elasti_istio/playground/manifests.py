"""Applying manifests to the local cluster with the official client, as ``kubectl apply`` would do for them.

Objects are created, or merge-patched when they exist already (a Service keeps its cluster IP that way).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def repo_path(*parts: str) -> Path:
    """A file of the project's source tree (examples, deploy): next to the package, else under the cwd."""
    for root in (PACKAGE_ROOT, Path.cwd()):
        path = root.joinpath(*parts)
        if path.exists():
            return path
    raise FileNotFoundError(f"{os.path.join(*parts)} not found next to the package ({PACKAGE_ROOT}) or in {Path.cwd()}")


def load(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


class Api:
    """Generic create/patch/get/delete for any kind the server serves (CRDs included)."""

    def __init__(self, kubeconfig: str | os.PathLike[str]) -> None:
        from kubernetes import client, config, dynamic

        cfg = client.Configuration()
        config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
        self.client = client.ApiClient(cfg)
        self.dynamic = dynamic.DynamicClient(self.client)
        self.core = client.CoreV1Api(self.client)
        self.apps = client.AppsV1Api(self.client)
        self.custom = client.CustomObjectsApi(self.client)

    def close(self) -> None:
        self.client.close()

    def resource(self, api_version: str, kind: str) -> Any:
        return self.dynamic.resources.get(api_version=api_version, kind=kind)

    def apply(self, doc: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        res = self.resource(doc["apiVersion"], doc["kind"])
        ns = ((doc.get("metadata") or {}).get("namespace") or namespace) if res.namespaced else None
        try:
            return dict(res.create(body=doc, namespace=ns).to_dict())
        except ApiException as exc:
            if exc.status != 409:
                raise
        name = doc["metadata"]["name"]
        return dict(res.patch(body=doc, name=name, namespace=ns, content_type="application/merge-patch+json").to_dict())

    def apply_all(self, docs: list[dict[str, Any]], namespace: str | None = None) -> None:
        for doc in docs:
            self.apply(doc, namespace)

    def get(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        res = self.resource(api_version, kind)
        try:
            return dict(res.get(name=name, namespace=namespace if res.namespaced else None).to_dict())
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def delete(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> None:
        from kubernetes.client.exceptions import ApiException

        res = self.resource(api_version, kind)
        try:
            res.delete(name=name, namespace=namespace if res.namespaced else None)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def ensure_namespace(self, name: str) -> None:
        self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
