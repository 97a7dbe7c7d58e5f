"""The Grafana dashboard and the Prometheus Operator objects match what the programs export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
from pathlib import Path

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


def test_every_dashboard_metric_and_label_exists() -> None:
    known = exported()
    for expr in expressions():
        names = set(re.findall(r"\b(elasti_[a-z_]+)", expr))
        assert names, expr
        for name in names:
            assert name in known, f"{name} is not exported ({expr})"
        for group in re.findall(r"by \(([^)]*)\)", expr):
            for label in (x.strip() for x in group.split(",")):
                assert any(label in known[n] for n in names), f"label {label} not on {names} ({expr})"


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
