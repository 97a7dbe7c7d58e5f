"""GitOps: a VirtualService kept in Git and applied with ``kubectl apply --server-side`` (as Argo CD and
Flux do) goes through proxy/serve cycles, and Git's next route change still applies without conflict."""

from __future__ import annotations

import subprocess
from typing import Any

import yaml

from tests.cluster.test_controller_lifecycle import activator_dests, bookinfo, phase, vs_spec
from tests.conftest import K8s
from tests.harness import create, get, scale, wait_until
from tests.rendered import kubectl

GIT_MANAGER = "gitops"


def server_side_apply(k8s: K8s, namespace: str, doc: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            kubectl(),
            "--kubeconfig",
            str(k8s.kubeconfig),
            "-n",
            namespace,
            "apply",
            "--server-side",
            f"--field-manager={GIT_MANAGER}",
            "-f",
            "-",
        ],
        input=yaml.safe_dump(doc),
        capture_output=True,
        text=True,
        timeout=60,
    )


def in_git(timeout: str | None = None) -> dict[str, Any]:
    route: dict[str, Any] = {"route": [{"destination": {"host": "details", "subset": "v1"}}]}
    if timeout:
        route["timeout"] = timeout
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "details-git"},
        "spec": {"hosts": ["details"], "http": [route]},
    }


def owners_of_http(k8s: K8s, namespace: str) -> set[str]:
    vs = get(k8s, namespace, "VirtualService", "details-git") or {}
    return {
        e["manager"]
        for e in vs["metadata"].get("managedFields") or []
        if "f:http" in ((e.get("fieldsV1") or {}).get("f:spec") or {})
    }


def test_a_server_side_apply_from_git_after_a_proxy_serve_cycle_does_not_conflict(
    k8s: K8s, namespace: str, start_controller: Any
) -> None:
    bookinfo(k8s, namespace, es_docs=False)
    first = server_side_apply(k8s, namespace, in_git())
    assert first.returncode == 0, first.stderr
    create(
        k8s,
        namespace,
        {
            "apiVersion": "elasti.truefoundry.com/v1alpha1",
            "kind": "ElastiService",
            "metadata": {"name": "details"},
            "spec": {
                "service": "details",
                "scaleTargetRef": {"kind": "Deployment", "name": "details-v1"},
                "virtualServices": ["details-git"],
            },
        },
    )
    start_controller()
    wait_until(lambda: phase(k8s, namespace, "details") == "Serving", what="Serving")
    original = vs_spec(k8s, namespace, "details-git")
    for _ in range(2):  # the second cycle starts from Git's own ownership again
        scale(k8s, namespace, "details-v1", 0)
        wait_until(lambda: bool(activator_dests(vs_spec(k8s, namespace, "details-git"))), what="proxy mode")
        scale(k8s, namespace, "details-v1", 1)
        wait_until(lambda: vs_spec(k8s, namespace, "details-git") == original, what="serve mode, routes restored")
        # Serve mode: the routes are Git's again (the controller gave up its claim on spec.http).
        wait_until(lambda: owners_of_http(k8s, namespace) == set(), what="no owner of spec.http but Git's next apply")
    changed = server_side_apply(k8s, namespace, in_git(timeout="45s"))
    assert changed.returncode == 0, changed.stderr  # before: conflict with "elasti-controller" on .spec.http
    assert vs_spec(k8s, namespace, "details-git")["http"][0]["timeout"] == "45s"
    assert owners_of_http(k8s, namespace) == {GIT_MANAGER}
    # And the controller goes on working on Git's new routes.
    scale(k8s, namespace, "details-v1", 0)
    wait_until(lambda: bool(activator_dests(vs_spec(k8s, namespace, "details-git"))), what="proxy mode again")
    assert vs_spec(k8s, namespace, "details-git")["http"][0]["timeout"] == "45s"
