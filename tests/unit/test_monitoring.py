"""The Grafana dashboard and the Prometheus Operator objects match what the programs export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from activator.metrics import Metrics
from elasti_istio.controller import metrics as controller_metrics
from tests.harness import free_port, http_json

ROOT = Path(__file__).resolve().parents[2]
MON = ROOT / "deploy" / "monitoring"


def exported() -> dict[str, set[str]]:
    """Sample name -> label names, from the programs' real registries."""
    out: dict[str, set[str]] = {}
    for registry in (controller_metrics.REGISTRY, Metrics().registry):
        for collector in set(registry._names_to_collectors.values()):
            labels = set(getattr(collector, "_labelnames", ()))
            for family in collector.collect():
                for suffix in ("", "_total", "_bucket", "_count", "_sum"):
                    out[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return out


def expressions() -> list[str]:
    dash = json.loads((MON / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


# Labels every scraped series gets from the Prometheus Operator's relabelling of its target.
TARGET_LABELS = {"pod", "instance", "job"}


def check_expr(expr: str, known: dict[str, set[str]]) -> set[str]:
    """Every elasti_ metric in ``expr`` is exported, and each label it groups or matches by is on one of
    them (or is a target label)."""
    names = set(re.findall(r"\b(elasti_[a-z_]+)", expr))
    for name in names:
        assert name in known, f"{name} is not exported ({expr})"
    for group in re.findall(r"(?:by|on) \(([^)]*)\)", expr):
        for label in (x.strip() for x in group.split(",")):
            assert label in TARGET_LABELS or any(label in known[n] for n in names), f"label {label} not on {names}"
    return names


def test_every_dashboard_metric_and_label_exists() -> None:
    known = exported()
    for expr in expressions():
        assert check_expr(expr, known), expr


def test_scrape_objects_use_the_deployed_port_names() -> None:
    base = ROOT / "deploy" / "kustomize" / "base"
    docs = [d for f in ("controller.yaml", "activator.yaml") for d in yaml.safe_load_all((base / f).read_text()) if d]
    container_ports = {
        p["name"]
        for d in docs
        if d["kind"] == "Deployment"
        for c in d["spec"]["template"]["spec"]["containers"]
        for p in c.get("ports", [])
    }
    service_ports = {p["name"] for d in docs if d["kind"] == "Service" for p in d["spec"]["ports"]}
    pm = yaml.safe_load((MON / "podmonitor-controller.yaml").read_text())
    sm = yaml.safe_load((MON / "servicemonitor-activator.yaml").read_text())
    assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} <= container_ports
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= service_ports


@pytest.mark.cluster
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Each query is run by a real Prometheus (Debian's package), with the dashboard variables filled in."""
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    assert Path(binary).exists(), "Debian's prometheus is needed (scripts/install-control-plane installs it)"
    (tmp_path / "p.yml").write_text("global:\n  scrape_interval: 15s\n")
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'p.yml'}",
            f"--storage.tsdb.path={tmp_path / 'd'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=error",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if http_json("GET", f"http://127.0.0.1:{port}/-/ready", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "prometheus did not start"
            time.sleep(0.2)
        for expr in expressions():
            if expr.startswith("label_values("):
                continue  # a Grafana function, not PromQL
            q = expr.replace("$namespace", ".*").replace("$name", ".*")
            code, body = http_json("GET", f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(q)}")
            assert code == 200 and body["status"] == "success", (expr, body)
    finally:
        proc.terminate()
        proc.wait(20)


def rules() -> list[dict]:
    doc = yaml.safe_load((MON / "prometheusrule.yaml").read_text())
    assert doc["kind"] == "PrometheusRule"
    return [r for g in doc["spec"]["groups"] for r in g["rules"]]


def test_every_alert_metric_and_label_exists() -> None:
    known = exported()
    alerts = {r["alert"] for r in rules()}
    assert alerts == {
        "ElastiServiceNotReady",
        "ElastiServiceStuckWaking",
        "ElastiServiceWakeFailures",
        "ElastiActivatorQueueFull",
        "ElastiActivatorQueueNearLimit",
        "ElastiActivatorHeldNearMax",
        "ElastiActivatorUnavailable",
    }
    for rule in rules():
        check_expr(rule["expr"], known)


def test_the_monitors_keep_our_labels_and_carry_a_release_label() -> None:
    for f, key in (
        ("podmonitor-controller.yaml", "podMetricsEndpoints"),
        ("servicemonitor-activator.yaml", "endpoints"),
    ):
        doc = yaml.safe_load((MON / f).read_text())
        assert doc["metadata"]["labels"]["release"]
        assert all(e["honorLabels"] is True for e in doc["spec"][key]), f


def test_the_state_gauges_follow_the_status() -> None:
    status = {"phase": "ScalingUp", "mode": "proxy", "conditions": [{"type": "Ready", "status": "True"}]}
    controller_metrics.observe_status("shop", "gauge-test", status)

    def value(metric: Any, *labels: str) -> float:
        return float(metric.labels(*labels)._value.get())

    assert value(controller_metrics.READY, "shop", "gauge-test") == 1
    assert value(controller_metrics.PHASE, "shop", "gauge-test", "ScalingUp") == 1
    assert value(controller_metrics.PHASE, "shop", "gauge-test", "Serving") == 0
    assert value(controller_metrics.MODE, "shop", "gauge-test", "proxy") == 1
    controller_metrics.observe_status("shop", "gauge-test", {"phase": "Serving", "mode": "serve", "conditions": []})
    assert value(controller_metrics.READY, "shop", "gauge-test") == 0
    assert value(controller_metrics.MODE, "shop", "gauge-test", "proxy") == 0
    controller_metrics.forget("shop", "gauge-test")
    assert not [s for m in controller_metrics.PHASE.collect() for s in m.samples if s.labels["name"] == "gauge-test"]


@pytest.mark.cluster  # promtool comes with the binaries (Debian's prometheus package)
def test_promtool_accepts_the_rules(tmp_path: Path) -> None:
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    assert Path(promtool).exists(), "Debian's prometheus package (with promtool) is needed"
    doc = yaml.safe_load((MON / "prometheusrule.yaml").read_text())
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": doc["spec"]["groups"]}))
    out = subprocess.run([promtool, "check", "rules", str(tmp_path / "rules.yml")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.cluster  # promtool comes with the binaries (Debian's prometheus package)
def test_queue_alerts_fire_near_the_limits_and_only_then(tmp_path: Path) -> None:
    """promtool's rule tests: held requests against each replica's limits, as an activator exports them."""
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    doc = yaml.safe_load((MON / "prometheusrule.yaml").read_text())
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": doc["spec"]["groups"]}))
    described = {r["alert"]: r["annotations"]["description"] for r in rules()}
    a, b = 'pod="elasti-activator-a"', 'pod="elasti-activator-b"'
    series = [
        # shop/cart: replica a holds 90 of 100 for 5 minutes, replica b 10 of 100
        {"series": f'elasti_activator_held_requests{{namespace="shop",name="cart",{a}}}', "values": "90x10"},
        {"series": f'elasti_activator_queue_limit{{namespace="shop",name="cart",{a}}}', "values": "100x10"},
        {"series": f'elasti_activator_held_requests{{namespace="shop",name="cart",{b}}}', "values": "10x10"},
        {"series": f'elasti_activator_queue_limit{{namespace="shop",name="cart",{b}}}', "values": "100x10"},
        # shop/web: 50 of 100, well below
        {"series": f'elasti_activator_held_requests{{namespace="shop",name="web",{a}}}', "values": "50x10"},
        {"series": f'elasti_activator_queue_limit{{namespace="shop",name="web",{a}}}', "values": "100x10"},
        # --max-held 160: replica a holds 140 in all, b 10
        {"series": f'elasti_activator_max_held{{namespace="elasti-system",{a}}}', "values": "160x10"},
        {"series": f'elasti_activator_max_held{{namespace="elasti-system",{b}}}', "values": "160x10"},
        {"series": 'up{job="elasti-activator"}', "values": "1x10"},
    ]
    test = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "30s",
        "tests": [
            {
                "interval": "30s",
                "input_series": series,
                "alert_rule_test": [
                    {
                        "eval_time": "3m",
                        "alertname": "ElastiActivatorQueueNearLimit",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "warning", "namespace": "shop", "name": "cart"},
                                "exp_annotations": {
                                    "summary": "An activator holds 90% of the queue of shop/cart",
                                    "description": described["ElastiActivatorQueueNearLimit"],
                                },
                            }
                        ],
                    },
                    {
                        "eval_time": "3m",
                        "alertname": "ElastiActivatorHeldNearMax",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "warning", "pod": "elasti-activator-a"},
                                "exp_annotations": {
                                    "summary": "Activator elasti-activator-a holds 87.5% of --max-held",
                                    "description": described["ElastiActivatorHeldNearMax"],
                                },
                            }
                        ],
                    },
                    {"eval_time": "30s", "alertname": "ElastiActivatorQueueNearLimit", "exp_alerts": []},
                ],
            }
        ],
    }
    (tmp_path / "test.yml").write_text(yaml.safe_dump(test))
    out = subprocess.run(
        [promtool, "test", "rules", "test.yml"], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
