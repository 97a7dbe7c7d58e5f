"""Wake and sleep asked for by annotating the ElastiService: ``kubectl annotate`` and ``elasti-istio
wake``/``sleep`` by default, as a namespace user with the shipped tenant roles only (no service proxy, no
network path to the controller), a refusal, and a request set while no controller runs."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client

from elasti_istio.localcluster.cluster import ClusterInfo
from tests.cluster.test_controller_lifecycle import bookinfo, phase
from tests.cluster.test_deploy_rbac import apply_tenant_roles
from tests.conftest import K8s
from tests.harness import es, events_for, patch, ready_replicas, scale, wait_until
from tests.rendered import kubectl

WAKE = "elasti.truefoundry.com/wake-requested"
SLEEP = "elasti.truefoundry.com/sleep-requested"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "elasti_istio", *args], capture_output=True, text=True, timeout=180)


def annotations(k8s: K8s, ns: str, name: str) -> dict[str, str]:
    return dict(es(k8s, ns, name)["metadata"].get("annotations") or {})


def tenant_kubeconfig(k8s: K8s, cluster: ClusterInfo, ns: str, path: Path) -> Path:
    """A ServiceAccount of ``ns`` bound there to the shipped tenant ClusterRoles and nothing else (not even
    Kubernetes' ``edit``, which would add ``services/proxy``), with a token from the TokenRequest API."""
    apply_tenant_roles(k8s)
    k8s.core.create_namespaced_service_account(ns, {"metadata": {"name": "tenant"}})  # type: ignore[attr-defined]
    for role in ("elasti-istio-view", "elasti-istio-edit"):
        k8s.rbac.create_namespaced_role_binding(  # type: ignore[attr-defined]
            ns,
            {
                "metadata": {"name": f"tenant-{role}"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                "subjects": [{"kind": "ServiceAccount", "name": "tenant", "namespace": ns}],
            },
        )
    user = f"system:serviceaccount:{ns}:tenant"
    authz = client.AuthorizationV1Api(k8s.api)

    def may(verb: str, resource: str, group: str = "elasti.truefoundry.com") -> bool:
        attrs = {"namespace": ns, "verb": verb, "group": group, "resource": resource}
        review = authz.create_subject_access_review(
            {"spec": {"user": user, "groups": ["system:serviceaccounts"], "resourceAttributes": attrs}}
        )
        return bool(review.status.allowed)

    wait_until(lambda: may("patch", "elastiservices") and may("watch", "elastiservices"), 60, "the roles bound")
    assert not may("create", "services/proxy", ""), "the tenant must not reach the controller's endpoint"
    token = k8s.core.create_namespaced_service_account_token("tenant", ns, {"spec": {}}).status.token  # type: ignore[attr-defined]
    admin = yaml.safe_load(cluster.admin_kubeconfig.read_text())
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": admin["clusters"],
        "users": [{"name": "tenant", "user": {"token": token}}],
        "contexts": [{"name": "tenant", "context": {"cluster": admin["clusters"][0]["name"], "user": "tenant"}}],
        "current-context": "tenant",
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def test_wake_and_sleep_by_annotation(
    k8s: K8s, cluster: ClusterInfo, namespace: str, start_controller: Any, tmp_path: Path
) -> None:
    bookinfo(k8s, namespace)
    ctrl = start_controller()
    wait_until(lambda: phase(k8s, namespace, "details") == "Serving", what="Serving")
    scale(k8s, namespace, "details-v1", 0)
    wait_until(lambda: phase(k8s, namespace, "details") == "ScaledToZero", what="ScaledToZero")

    # kubectl annotate wakes the target at zero; the annotation goes once it is acted on.
    asked = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    subprocess.run(
        [kubectl(), "--kubeconfig", str(cluster.admin_kubeconfig), "-n", namespace, "annotate", "es", "details",
         f"{WAKE}={asked}"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    wait_until(lambda: WAKE not in annotations(k8s, namespace, "details"), 60, "the wake annotation removed")
    record = es(k8s, namespace, "details")["status"]["lastWakeRequest"]
    assert (record["id"], record["result"], record["reason"]) == (asked, "Done", "Woken"), record
    wait_until(lambda: ready_replicas(k8s, namespace, "details-v1") == 1, 60, "woken by the annotation")
    wait_until(lambda: phase(k8s, namespace, "details") == "Serving", 60, "Serving")
    wait_until(lambda: said(k8s, namespace, "Normal", "Woken", f"asked to wake (annotation {WAKE})"), 60, "Woken")

    # elasti-istio as a namespace user: only the tenant roles, no --controller-url, no service proxy.
    tenant = ["--kubeconfig", str(tenant_kubeconfig(k8s, cluster, namespace, tmp_path / "tenant.kubeconfig"))]
    slept = cli("sleep", f"{namespace}/details", *tenant)
    assert slept.returncode == 0, slept.stderr
    assert "sleep done (ScaledToZeroOnRequest)" in slept.stdout, slept.stdout
    wait_until(lambda: SLEEP not in annotations(k8s, namespace, "details"), 60, "the sleep annotation removed")
    wait_until(lambda: phase(k8s, namespace, "details") == "ScaledToZero", 60, "asleep by elasti-istio sleep")
    again = cli("sleep", f"{namespace}/details", *tenant, "--output", "json")
    assert again.returncode == 0, again.stderr
    assert json_of(again)["outcome"]["reason"] == "AlreadyAsleep"
    over_http = cli("wake", f"{namespace}/details", *tenant, "--via", "http")
    assert over_http.returncode == 1 and "forbidden" in over_http.stderr, over_http.stderr  # the old path
    woke = cli("wake", f"{namespace}/details", *tenant)
    assert woke.returncode == 0 and "wake done (Woken)" in woke.stdout, (woke.stdout, woke.stderr)
    wait_until(lambda: ready_replicas(k8s, namespace, "details-v1") == 1, 60, "woken by elasti-istio wake")
    wait_until(lambda: said(k8s, namespace, "Normal", "Woken", "asked to wake (elasti-istio wake)"), 60, "Woken")

    # A refusal: outside the enabledPeriod, said with its reason, nothing scaled, the annotation gone.
    hour = (dt.datetime.now(dt.UTC).hour + 12) % 24
    patch(k8s, namespace, "ElastiService", "details", {"spec": {"enabledPeriod": {"schedule": f"0 {hour} * * *",
                                                                                   "duration": "1h"}}})  # fmt: skip
    wait_until(
        lambda: (
            (es(k8s, namespace, "details")["status"].get("observedGeneration") or 0)
            >= es(k8s, namespace, "details")["metadata"]["generation"]
        ),
        60,
        "the enabledPeriod seen",
    )
    refused = cli("sleep", f"{namespace}/details", *tenant)
    assert refused.returncode == 1 and "sleep refused (OutsideEnabledPeriod)" in refused.stderr, refused.stderr
    assert k8s.apps.read_namespaced_deployment("details-v1", namespace).spec.replicas == 1  # type: ignore[attr-defined]
    wait_until(lambda: SLEEP not in annotations(k8s, namespace, "details"), 60, "the sleep annotation removed")
    refusal = "asked to sleep (elasti-istio sleep): refused: scale to zero is not allowed now"
    wait_until(lambda: said(k8s, namespace, "Warning", "OutsideEnabledPeriod", refusal), 60, "the Warning")
    patch(k8s, namespace, "ElastiService", "details", {"spec": {"enabledPeriod": None}})

    # Asked while no controller runs: the command says so, the annotation stays, and the next
    # controller acts on it.
    ctrl.stop()
    scale(k8s, namespace, "details-v1", 0)
    wait_until(lambda: ready_replicas(k8s, namespace, "details-v1") == 0, 60, "details-v1 at zero")
    waiting = cli("wake", f"{namespace}/details", *tenant, "--timeout", "2")
    assert waiting.returncode == 1 and "not acted on within 2s" in waiting.stderr, waiting.stderr
    assert annotations(k8s, namespace, "details")[WAKE].startswith("cli/")
    start_controller()
    wait_until(lambda: WAKE not in annotations(k8s, namespace, "details"), 60, "acted on by the next controller")
    wait_until(lambda: ready_replicas(k8s, namespace, "details-v1") == 1, 60, "woken after the restart")

    missing = cli("wake", f"{namespace}/nope", *tenant)
    assert missing.returncode == 1 and "not found" in missing.stderr, missing.stderr


def json_of(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    return dict(json.loads(result.stdout))


def said(k8s: K8s, ns: str, etype: str, reason: str, text: str) -> bool:
    """An Event of ``etype`` and ``reason`` on the ElastiService details whose message holds ``text``."""
    return any(e.type == etype and e.reason == reason and text in e.message for e in events_for(k8s, ns, "details"))
