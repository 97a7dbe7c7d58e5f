"""What an operator sees with the real kubectl: ``kubectl get es`` shows broken ElastiServices as not Ready
with their reason (the Ready condition, not a replica count), and ``kubectl explain`` documents the status."""

from __future__ import annotations

import json
import re
import subprocess
from typing import Any

from tests.cluster.test_controller_lifecycle import bookinfo
from tests.cluster.test_controller_resilience import cond_is, es_doc
from tests.conftest import K8s
from tests.harness import create, wait_until
from tests.rendered import kubectl

TARGET = {"kind": "Deployment", "name": "details-v1"}
BROKEN: dict[str, tuple[dict[str, Any], str]] = {
    "no-target": ({"service": "details", "virtualServices": ["details"],
                   "scaleTargetRef": {"kind": "Deployment", "name": "ghost"}}, "TargetNotFound"),
    "no-service": ({"service": "ghost", "virtualServices": ["details"], "scaleTargetRef": TARGET}, "ServiceNotFound"),
    "bad-port": ({"service": "details", "port": 9999, "virtualServices": ["details"], "scaleTargetRef": TARGET},
                 "PortNotFound"),
    "no-vs": ({"service": "details", "virtualServices": ["ghost"], "scaleTargetRef": TARGET},
              "VirtualServiceNotFound"),
    "unbound": ({"service": "details", "scaleTargetRef": TARGET}, "NoVirtualService"),
    "no-route": ({"service": "details", "virtualServices": ["reviews"], "scaleTargetRef": TARGET},
                 "NoRouteToTarget"),
    "bad-trigger": ({"service": "details", "virtualServices": ["details"], "scaleTargetRef": TARGET,
                     "triggers": [{"type": "prometheus", "metadata": {"serverAddress": "http://p:9090/?x=",
                                                                        "query": "q", "threshold": "1"}}]},
                    "InvalidTrigger"),
}  # fmt: skip


def table(k8s: K8s, namespace: str) -> dict[str, dict[str, str]]:
    """``kubectl get es`` as printed, cut at the header's column starts (blank cells stay blank)."""
    out = subprocess.run(
        [kubectl(), "--kubeconfig", str(k8s.kubeconfig), "-n", namespace, "get", "es"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    columns = list(re.finditer(r"\S+", out[0]))
    names, starts = [m.group() for m in columns], [m.start() for m in columns]
    rows = {}
    for line in out[1:]:
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        rows[cells[0]] = dict(zip(names, cells, strict=True))
    return rows


def test_kubectl_get_shows_what_is_wrong(k8s: K8s, namespace: str, start_controller: Any) -> None:
    bookinfo(k8s, namespace, es_docs=False)
    create(k8s, namespace, es_doc("details", service="details", virtualServices=["details"], scaleTargetRef=TARGET))
    for name, (spec, _) in BROKEN.items():
        create(k8s, namespace, es_doc(name, **spec))
    start_controller()
    for name, (_, reason) in BROKEN.items():
        wait_until(lambda n=name, r=reason: cond_is(k8s, namespace, n, "Ready", "False", r), what=f"{name}: {reason}")
    wait_until(lambda: cond_is(k8s, namespace, "details", "Ready", "True", "Serving"), what="details Ready")
    rows = table(k8s, namespace)
    assert list(rows["details"]) == ["NAME", "SERVICE", "PHASE", "MODE", "READY", "REASON", "REPLICAS", "AGE"]
    good = rows["details"]
    assert (good["PHASE"], good["MODE"], good["READY"], good["REASON"], good["REPLICAS"]) == (
        "Serving", "serve", "True", "Serving", "1",
    )  # fmt: skip
    for name, (_, reason) in BROKEN.items():
        assert (rows[name]["READY"], rows[name]["REASON"]) == ("False", reason), rows[name]


def test_kubectl_explain_documents_the_status(k8s: K8s) -> None:
    for field, says in (
        ("elastiservices.status", "conditions tell whether it works"),
        ("elastiservices.status.conditions", "VirtualServicesBound"),
        ("elastiservices.status.mode", "proxy"),
    ):
        out = subprocess.run(
            [kubectl(), "--kubeconfig", str(k8s.kubeconfig), "explain", field],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert says in " ".join(out.split()) and "<empty>" not in out, out


# KubeElasti's playground ElastiService (truefoundry/KubeElasti playground/config/demo-elastiService.yaml) for
# bookinfo's details, with the uptimeFilter of its e2e tests: applied as it is.
KUBEELASTI = """\
apiVersion: elasti.truefoundry.com/v1alpha1
kind: ElastiService
metadata:
  name: details-ke
spec:
  service: details
  minTargetReplicas: 1
  cooldownPeriod: 100
  scaleTargetRef:
    apiVersion: apps/v1
    kind: deployments
    name: details-v1
  triggers:
    - metadata:
        query: round(sum(rate(envoy_http_downstream_rq_total{container="istio-proxy"}[1m])),0.001) or vector(0)
        serverAddress: http://prometheus-operated.monitoring.svc.cluster.local:9090
        threshold: "0.01"
        uptimeFilter: container="istio-proxy"
      type: prometheus
"""


def test_a_kubeelasti_manifest_is_accepted_unpruned(k8s: K8s, namespace: str, start_controller: Any) -> None:
    bookinfo(k8s, namespace, es_docs=False)

    def run(*args: str, stdin: str | None = None) -> str:
        cmd = [kubectl(), "--kubeconfig", str(k8s.kubeconfig), "-n", namespace, *args]
        return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60, check=True).stdout

    run("apply", "--validate=strict", "-f", "-", stdin=KUBEELASTI)  # an unknown field would be refused
    run("annotate", "virtualservice", "details", "elasti.truefoundry.com/elastiservice=details-ke")
    start_controller()
    wait_until(lambda: cond_is(k8s, namespace, "details-ke", "IgnoredFields", "True", "NotUsed"), what="NotUsed")
    wait_until(lambda: cond_is(k8s, namespace, "details-ke", "Ready", "True", "Serving"), what="Ready")
    obj = json.loads(run("get", "elastisvc", "details-ke", "-o", "json"))
    spec = obj["spec"]
    assert spec["scaleTargetRef"]["kind"] == "deployments" and spec["cooldownPeriod"] == 100
    assert spec["triggers"][0]["metadata"]["uptimeFilter"] == 'container="istio-proxy"'  # not pruned
    ignored = next(c for c in obj["status"]["conditions"] if c["type"] == "IgnoredFields")
    assert "spec.triggers[0].metadata.uptimeFilter" in ignored["message"]
    assert json.loads(run("get", "es", "-o", "json"))["items"][0]["metadata"]["name"] == "details-ke"
