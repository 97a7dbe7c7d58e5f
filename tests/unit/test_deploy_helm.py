"""The Helm chart, rendered by Helm's own template engine (its Go SDK, from the helm-python-sdk
package), is the kustomize install: same objects, same specs, same RBAC rules, for both scopes."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.rendered import ROOT, SYSTEM_NS, copy_tree, render, shipped, watch_namespaces

CHART = ROOT / "deploy" / "helm" / "elasti-istio"
RENDERER = "helm-python-sdk==0.2.2"
TOOLS = ROOT / ".elasti" / "helm-renderer"
SCRIPT = r"""
import json, sys
import helm_python as helm
chart, values, namespace = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
with helm.Chart.load(chart) as c:
    out = {"manifests": c.render(values, name="elasti-istio", namespace=namespace, is_install=True), "crds": c.crds}
out["lint"] = helm.lint(chart, values, strict=True, namespace=namespace, kube_version="v1.37.2")
print(json.dumps(out))
"""


def renderer() -> str:
    """A Python with helm-python-sdk (Helm's Go SDK behind ctypes), in a tool venv of its own."""
    why = _install()
    if why:
        pytest.fail(why)
    return str(TOOLS / "bin" / "python")


@cache
def _install() -> str:
    """Installs the renderer once per machine; the reason it could not be installed, else ""."""
    python, done = TOOLS / "bin" / "python", TOOLS / f"{RENDERER}.installed"
    if done.exists():
        return ""
    shutil.rmtree(TOOLS, ignore_errors=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(TOOLS)], check=True, capture_output=True, timeout=120)
        pip = [str(python), "-m", "pip", "install", "-q", RENDERER]
        subprocess.run(pip, check=True, capture_output=True, timeout=600)
        done.touch()
    except (subprocess.SubprocessError, OSError) as exc:
        output = getattr(exc, "stderr", b"") or b""
        shutil.rmtree(TOOLS, ignore_errors=True)
        return f"the Helm renderer ({RENDERER}) could not be installed: {exc} {output.decode()[-500:]}"
    return ""


def helm(values: dict[str, Any] | None = None) -> dict[str, Any]:
    out = subprocess.run(
        [renderer(), "-c", SCRIPT, str(CHART), json.dumps(values or {}), SYSTEM_NS],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    manifests = [text for name, text in result["manifests"].items() if name.endswith(".yaml")]
    result["docs"] = [d for text in manifests for d in yaml.safe_load_all(text) if d]
    return dict(result)


def key(doc: dict[str, Any]) -> tuple[str, str, str]:
    return doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"]


def comparable(doc: dict[str, Any]) -> dict[str, Any]:
    """What the install does with the object: labels and annotations of the object itself (Helm's
    bookkeeping, kustomize's part-of label) and the random token aside."""
    doc = copy.deepcopy(doc)
    doc["metadata"].pop("labels", None)
    doc["metadata"].pop("annotations", None)
    if doc["kind"] == "Secret":
        doc["data"] = {k: "<token>" for k in doc["data"]}
    return doc


def assert_same_install(chart: list[dict[str, Any]], kustomize: list[dict[str, Any]]) -> None:
    expected = {key(d): comparable(d) for d in kustomize if d["kind"] not in ("Namespace", "CustomResourceDefinition")}
    got = {key(d): comparable(d) for d in chart}
    assert sorted(got) == sorted(expected)
    for k in expected:
        assert got[k] == expected[k], k


def test_default_values_install_what_the_cluster_wide_overlay_installs() -> None:
    out = helm()
    assert_same_install(out["docs"], shipped("cluster-wide"))
    assert [c["name"] for c in out["crds"]] == ["crds/elastiservice.yaml"]
    assert yaml.safe_load(out["crds"][0]["data"]) == yaml.safe_load((ROOT / "crds" / "elastiservice.yaml").read_text())
    assert out["lint"]["errors"] == [] and all(m["severity"] < 2 for m in out["lint"]["messages"]), out["lint"]
    assert "NOTES.txt" in " ".join(out["manifests"])


def test_watch_namespaces_install_what_the_namespace_scoped_overlay_installs(tmp_path: Path) -> None:
    namespaces = ["team-a", "team-b"]
    tree = copy_tree(tmp_path / "tree")
    watch_namespaces(tree, namespaces)
    out = helm({"watchNamespaces": namespaces})
    assert_same_install(out["docs"], render(tree, "namespace-scoped"))
    assert out["lint"]["errors"] == []


def test_wake_token_is_random_unless_given() -> None:
    def token(out: dict[str, Any]) -> str:
        import base64

        secret = next(d for d in out["docs"] if d["kind"] == "Secret")
        return base64.b64decode(secret["data"]["token"]).decode()

    first, second = token(helm()), token(helm())
    assert first != second and re.fullmatch(r"[A-Za-z0-9]{43}", first)
    assert token(helm({"wakeToken": "s3cret-value"})) == "s3cret-value"


def test_values_reach_the_manifests() -> None:
    out = helm(
        {
            "image": {"repository": "registry.example.com/elasti-istio", "tag": "9.9.9"},
            "activator": {"drainTimeoutSeconds": 50, "minReplicas": 3},
            "networkPolicy": {"enabled": False},
        }
    )
    docs = {key(d): d for d in out["docs"]}
    act = docs[("Deployment", SYSTEM_NS, "elasti-activator")]["spec"]["template"]
    c = act["spec"]["containers"][0]
    assert c["image"] == "registry.example.com/elasti-istio:9.9.9"
    assert "--drain-timeout=50" in c["args"]
    assert act["spec"]["terminationGracePeriodSeconds"] > 55
    assert "terminationDrainDuration: 55s" in act["metadata"]["annotations"]["proxy.istio.io/config"]
    assert docs[("HorizontalPodAutoscaler", SYSTEM_NS, "elasti-activator")]["spec"]["minReplicas"] == 3
    assert ("NetworkPolicy", SYSTEM_NS, "elasti-controller") not in docs
