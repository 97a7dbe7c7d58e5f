"""The shipped monitors, as the Prometheus Operator turns them into a scrape configuration, scraped by a
real Prometheus: the series keep the ElastiService's ``namespace`` and ``name`` (not
``exported_namespace``), the dashboard's variables list the ElastiServices' namespaces, every dashboard
query and alert finds its series, and the alerts' ``job`` and ``pod`` labels are the ones the operator
gives.

The operator (built once with the other binaries) runs against the local API server and writes its
configuration into the Secret ``prometheus-<name>`` as it does in a cluster. Prometheus (built with
them too: Debian's lacks the Kubernetes service discovery) runs here rather than in a Pod; the test
changes only what that requires: the Kubernetes service discovery gets the API server's kubeconfig,
the rule files point at a local copy of the operator's rules ConfigMap, ``$(SHARD)`` and ``$(POD_NAME)``
are expanded as the operator's config-reloader expands them in the Pod, and the monitors' scrape
interval is 1 s so that rates have two samples within seconds. The relabelling is the operator's,
untouched.
"""

from __future__ import annotations

import base64
import copy
import gzip
import json
import os
import re
import subprocess
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from elasti_istio.localcluster import binaries
from elasti_istio.playground import system
from elasti_istio.playground.manifests import load, repo_path
from elasti_istio.playground.procs import ControllerProc, free_ports
from tests.e2e.conftest import System
from tests.e2e.support import serving, to_zero, url, web_app
from tests.harness import http_json
from tests.helpers import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

MON = repo_path("deploy", "monitoring")
NS = system.SYSTEM_NAMESPACE
PROMETHEUS = "elasti-scrape-check"


def shipped_monitors() -> list[dict[str, Any]]:
    """deploy/monitoring's PodMonitor, ServiceMonitor and PrometheusRule, scraped every second."""
    docs = []
    for name in ("podmonitor-controller.yaml", "servicemonitor-activator.yaml", "prometheusrule.yaml"):
        for doc in load(MON / name):
            doc = copy.deepcopy(doc)
            doc["metadata"]["namespace"] = NS
            for endpoint in doc["spec"].get("podMetricsEndpoints", []) + doc["spec"].get("endpoints", []):
                endpoint["interval"] = "1s"
            docs.append(doc)
    return docs


def controller_pod(ctrl: ControllerProc) -> dict[str, Any]:
    """The shipped controller Deployment, its ports forwarded to the controller process of this test."""
    dep = next(
        d for d in load(repo_path("deploy", "kustomize", "base", "controller.yaml")) if d["kind"] == "Deployment"
    )
    dep = copy.deepcopy(dep)
    dep["metadata"]["namespace"] = NS
    dep["spec"]["replicas"] = 1
    pod = dep["spec"]["template"]
    ports = {p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
    pod["metadata"].setdefault("annotations", {}).update(
        {
            system.ANNOTATION + "sim-forward": f"{ports['metrics']}=127.0.0.1:{ctrl.metrics_port}",
            system.ANNOTATION + "sim-readiness-url": f"{ctrl.metrics_url}/readyz",
            system.ANNOTATION + "sim-startup-seconds": "0",
        }
    )
    pod["spec"].pop("affinity", None)
    return dep


def prometheus_resource(prometheus: Path) -> dict[str, Any]:
    """What kube-prometheus-stack's Prometheus selects: monitors and rules labelled with its release, in any
    namespace. ``version`` is the Prometheus that runs here, so the operator writes what it understands."""
    version = subprocess.run([str(prometheus), "--version"], capture_output=True, text=True).stdout.split()[2]
    release = {"matchLabels": {"release": "kube-prometheus-stack"}}
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "Prometheus",
        "metadata": {"name": PROMETHEUS, "namespace": NS},
        "spec": {
            "version": "v" + version.split("+")[0],
            "replicas": 1,
            "evaluationInterval": "1s",
            "serviceMonitorSelector": release,
            "podMonitorSelector": release,
            "ruleSelector": release,
            "serviceMonitorNamespaceSelector": {},
            "podMonitorNamespaceSelector": {},
            "ruleNamespaceSelector": {},
        },
    }


@pytest.fixture
def operator(e2e: System, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    bins = binaries.find(monitoring=True)
    kubectl = ["kubectl", "--kubeconfig", str(e2e.cluster.admin_kubeconfig)]
    subprocess.run([*kubectl, "apply", "--server-side", "-f", str(bins.prometheus_operator_crds)], check=True)
    crds = ["-f", str(bins.prometheus_operator_crds)]
    subprocess.run([*kubectl, "wait", "--for=condition=Established", "--timeout=60s", *crds], check=True)
    port = free_ports(1)[0]
    log = (tmp_path / "operator.log").open("wb")
    proc = subprocess.Popen(
        [
            str(bins["prometheus-operator"]),
            f"--namespaces={NS}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log-level=info",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "KUBECONFIG": str(e2e.cluster.admin_kubeconfig)},
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()
        print("--- operator log tail\n" + "\n".join((tmp_path / "operator.log").read_text().splitlines()[-30:]))
        for kind, version, name in (
            ("Prometheus", "monitoring.coreos.com/v1", PROMETHEUS),
            ("PodMonitor", "monitoring.coreos.com/v1", "elasti-controller"),
            ("ServiceMonitor", "monitoring.coreos.com/v1", "elasti-activator"),
            ("PrometheusRule", "monitoring.coreos.com/v1", "elasti-istio"),
            ("Deployment", "apps/v1", system.CONTROLLER),
        ):
            e2e.api.delete(version, kind, name, NS)


def generated_config(e2e: System) -> tuple[dict[str, Any], dict[str, str]]:
    """The scrape configuration and rule files the operator wrote for the Prometheus resource."""

    def read() -> tuple[dict[str, Any], dict[str, str]] | None:
        try:
            secret = e2e.api.core.read_namespaced_secret(f"prometheus-{PROMETHEUS}", NS)
            rules = e2e.api.core.read_namespaced_config_map(f"prometheus-{PROMETHEUS}-rulefiles-0", NS)
        except Exception:
            return None
        raw = gzip.decompress(base64.b64decode(secret.data["prometheus.yaml.gz"]))
        config = yaml.safe_load(reloader_substitution(raw.decode()))
        jobs = [j["job_name"] for j in config.get("scrape_configs") or []]
        if not any("elasti-controller" in j for j in jobs) or not any("elasti-activator" in j for j in jobs):
            return None
        if not any("elasti" in name for name in rules.data or {}):
            return None
        return config, dict(rules.data)

    return wait_for(read, 120, "the operator's configuration for the shipped monitors", interval=0.5)


def reloader_substitution(text: str) -> str:
    """What the operator's config-reloader does to the file in the Pod before Prometheus reads it: it
    expands ``$(VAR)`` from the container's environment (the shard number, the Pod's name)."""
    env = {"SHARD": "0", "POD_NAME": f"prometheus-{PROMETHEUS}-0"}
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def runnable_here(config: dict[str, Any], kubeconfig: Path, rules_dir: Path) -> dict[str, Any]:
    """The operator's configuration, run outside a Pod: the service discovery reads the API server with a
    kubeconfig and the rules come from a local folder. Nothing else changes."""
    config = copy.deepcopy(config)
    for job in config.get("scrape_configs") or []:
        for sd in job.get("kubernetes_sd_configs") or []:
            sd["kubeconfig_file"] = str(kubeconfig)
    config["rule_files"] = [str(rules_dir / "*.yaml")]
    config.pop("alerting", None)  # no Alertmanager here; the alerts are read from the rules API
    return config


def query(base: str, expr: str) -> list[dict[str, Any]]:
    code, body = http_json("GET", f"{base}/api/v1/query?query={urllib.parse.quote(expr)}")
    assert code == 200 and body["status"] == "success", (expr, body)
    return list(body["data"]["result"])


def dashboard() -> dict[str, Any]:
    return dict(json.loads((MON / "grafana-dashboard.json").read_text()))


def test_a_real_prometheus_through_the_operator_sees_our_labels(
    e2e: System, namespace: str, controller: ControllerProc, operator: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    api, ns = e2e.api, namespace
    # Something to show: an ElastiService that slept and was woken by a held request.
    api.apply_all(web_app(), ns)
    serving(api, ns)
    to_zero(api, ns)
    assert e2e.sidecar.get(url(ns, "/metrics-check")).cold

    api.apply(controller_pod(controller), NS)
    for doc in shipped_monitors():
        api.apply(doc, NS)
    prometheus = binaries.find(monitoring=True)["prometheus"]
    api.apply(prometheus_resource(prometheus), NS)
    config, rule_files = generated_config(e2e)

    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    for name, text in rule_files.items():
        (rules_dir / name).write_text(text)
    (tmp_path / "prometheus.yml").write_text(
        yaml.safe_dump(runnable_here(config, e2e.cluster.admin_kubeconfig, rules_dir))
    )
    port = free_ports(1)[0]
    base = f"http://127.0.0.1:{port}"
    prom_log = (tmp_path / "prometheus.log").open("wb")
    prom = subprocess.Popen(
        [
            str(prometheus),
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=prom_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for(lambda: http_json("GET", f"{base}/-/ready", timeout=2)[0] == 200, 60, "prometheus ready", 0.2)

        def both_up() -> list[dict[str, Any]] | None:
            up = [r for r in query(base, "up") if r["value"][1] == "1"]
            jobs = {r["metric"].get("job") for r in up}
            return up if {"elasti-activator"} <= jobs and any("controller" in (j or "") for j in jobs) else None

        try:
            up = wait_for(both_up, 120, "both targets scraped (up == 1)", 0.5)
        except AssertionError:
            raise AssertionError(f"targets not up: {targets(base)}") from None
        # The operator's target labels: the alerts name the activator's job and group by pod.
        assert all(r["metric"].get("pod") for r in up), up

        def ours() -> list[dict[str, Any]] | None:
            found = query(base, f'elasti_controller_elastiservice_ready{{namespace="{ns}", name="web"}}')
            held = query(base, f'elasti_activator_hold_duration_seconds_count{{namespace="{ns}", name="web"}}')
            return found + held if found and held else None

        wait_for(ours, 60, "our series under the ElastiService's namespace", 0.5)
        assert not query(base, '{__name__=~"elasti_.*", exported_namespace!=""}'), "exported_namespace appeared"
        assert not query(base, '{__name__=~"elasti_.*", exported_name!=""}'), "exported_name appeared"

        # The dashboard's variables, as Grafana asks for them.
        variables = {v["name"]: v["query"] for v in dashboard()["templating"]["list"] if v["type"] == "query"}
        metric = variables["namespace"].removeprefix("label_values(").split(",")[0].strip()
        code, body = http_json("GET", f"{base}/api/v1/label/namespace/values?match[]={urllib.parse.quote(metric)}")
        assert code == 200 and ns in body["data"], body
        assert NS not in body["data"], f"$namespace lists {NS}: {body['data']}"

        # Every panel query evaluates; each one about what happened here (a sleep, a held request, a wake)
        # finds series for this ElastiService. "Problems" stays empty: nothing went wrong.
        panels = [(p["title"], t["expr"]) for p in dashboard()["panels"] for t in p.get("targets", [])]
        assert panels

        def answers() -> dict[str, list[dict[str, Any]]]:
            return {e: query(base, e.replace("$namespace", ns).replace("$name", "web")) for _, e in panels}

        def missing() -> list[str]:
            got = answers()
            return [e for title, e in panels if title != "Problems" and not got[e]]

        try:
            wait_for(lambda: not missing(), 60, "every dashboard query to find series", 1)
        except Exception:
            raise AssertionError(f"dashboard queries with no series: {missing()}") from None

        # The alerts are loaded from the operator's rule file and evaluate without error.
        code, body = http_json("GET", f"{base}/api/v1/rules")
        rules = [r for g in body["data"]["groups"] for r in g["rules"]]
        assert {r["name"] for r in rules} >= {
            "ElastiServiceNotReady",
            "ElastiActivatorQueueNearLimit",
            "ElastiActivatorHeldNearMax",
            "ElastiActivatorUnavailable",
        }, rules
        wait_for(lambda: all(r.get("health") == "ok" for r in rules_now(base)), 60, "every rule evaluated", 0.5)
        # With the activator up, the unavailability alert's expression is empty: its job label matches.
        assert not query(base, next(r["query"] for r in rules if r["name"] == "ElastiActivatorUnavailable"))
        # The queue alerts' ratios exist (below their threshold): held requests, limits and pods line up.
        for name in ("ElastiActivatorQueueNearLimit", "ElastiActivatorHeldNearMax"):
            ratio = next(r["query"] for r in rules if r["name"] == name).rsplit(">", 1)[0]
            assert query(base, ratio), f"{name}: {ratio} finds no series"
    finally:
        prom.terminate()
        prom.wait(20)
        prom_log.close()
        print("--- prometheus log tail\n" + "\n".join((tmp_path / "prometheus.log").read_text().splitlines()[-20:]))


def rules_now(base: str) -> list[dict[str, Any]]:
    code, body = http_json("GET", f"{base}/api/v1/rules")
    assert code == 200, body
    return [r for g in body["data"]["groups"] for r in g["rules"]]


def targets(base: str) -> list[tuple[str, str, str, str]]:
    """(job, scrape URL, health, last error) of every target Prometheus found, kept or not."""
    code, body = http_json("GET", f"{base}/api/v1/targets")
    if code != 200:
        return [("?", "?", str(code), str(body))]
    active = [
        (t["labels"].get("job", ""), t["scrapeUrl"], t["health"], t["lastError"]) for t in body["data"]["activeTargets"]
    ]
    dropped = [
        ("dropped", str(t.get("discoveredLabels", {}).get("__address__")), "", "")
        for t in body["data"]["droppedTargets"]
    ]
    return active + dropped[:10]
