"""The Helm chart, rendered by Helm's own template engine (its Go SDK, from the helm-python-sdk
package), is the kustomize install: same objects, same specs, same RBAC rules, for both scopes. Its
values are checked by its values.schema.json, its knobs reach both Deployments, and it is complete on
its own (no symlinks; its copies of the CRD and of the RBAC rules are those of the repository)."""

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
import json, sys, tempfile
import helm_python as helm
chart, values, namespace, packaged = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4] == "packaged"
with tempfile.TemporaryDirectory() as tmp:
    try:
        with helm.Chart.load(helm.package(chart, destination=tmp) if packaged else chart) as c:
            manifests = c.render(values, name="elasti-istio", namespace=namespace, is_install=True)
            out = {"manifests": manifests, "crds": c.crds, "files": c.files}
    except (helm.HelmValuesError, helm.HelmRenderError) as exc:
        print(json.dumps({"refused": str(exc)}))
        raise SystemExit(0)
out["lint"] = helm.lint(chart, values, strict=True, namespace=namespace, kube_version="v1.37.2")
print(json.dumps(out))
"""
# The chart's copies of files kept elsewhere in the repository (a chart must not link outside itself).
COPIES = {
    "crds/elastiservice.yaml": ROOT / "crds" / "elastiservice.yaml",
    "files/rbac-controller.yaml": ROOT / "deploy" / "kustomize" / "base" / "rbac-controller.yaml",
    "files/rbac-activator.yaml": ROOT / "deploy" / "kustomize" / "base" / "rbac-activator.yaml",
}


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


def _run(values: dict[str, Any] | None, packaged: bool) -> dict[str, Any]:
    out = subprocess.run(
        [renderer(), "-c", SCRIPT, str(CHART), json.dumps(values or {}), SYSTEM_NS, "packaged" if packaged else "dir"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(json.loads(out.stdout))


def refusal(values: dict[str, Any]) -> str:
    """Why Helm refuses to render the chart with ``values`` (its schema, or a template's ``fail``)."""
    result = _run(values, packaged=False)
    assert "refused" in result, f"rendered with {values}"
    return str(result["refused"])


def helm(values: dict[str, Any] | None = None, *, packaged: bool = False) -> dict[str, Any]:
    """The chart rendered with ``values`` (from ``helm package``'s archive if ``packaged``)."""
    result = _run(values, packaged)
    assert "refused" not in result, result.get("refused")
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
    """The same objects, but the two Secrets: the chart makes them (random, kept on upgrades), while with
    kustomize the controller creates them at its first start (both leave an existing one alone)."""
    expected = {key(d): comparable(d) for d in kustomize if d["kind"] not in ("Namespace", "CustomResourceDefinition")}
    got = {key(d): comparable(d) for d in chart if d["kind"] != "Secret"}
    secrets = sorted(d["metadata"]["name"] for d in chart if d["kind"] == "Secret")
    assert secrets == ["elasti-route-key", "elasti-wake-token"], secrets
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


def deployments(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The pod templates of both Deployments, by component."""
    docs = {key(d): d for d in out["docs"]}
    return {p: docs[("Deployment", SYSTEM_NS, f"elasti-{p}")]["spec"]["template"] for p in ("controller", "activator")}


def test_chart_is_complete_on_its_own() -> None:
    assert [str(p) for p in CHART.rglob("*") if p.is_symlink()] == []
    for name, source in COPIES.items():
        refresh = f"cp {source.relative_to(ROOT)} {(CHART / name).relative_to(ROOT)}"
        assert (CHART / name).read_bytes() == source.read_bytes(), f"{name} is out of date: {refresh}"


def test_packaged_chart_renders_what_the_directory_renders() -> None:
    values = {"wakeToken": "t", "routeKey": "k"}
    packaged, unpacked = helm(values, packaged=True), helm(values)
    assert packaged["manifests"] == unpacked["manifests"]
    assert [c["name"] for c in packaged["crds"]] == ["crds/elastiservice.yaml"]
    assert packaged["crds"][0]["data"] == (ROOT / "crds" / "elastiservice.yaml").read_text()
    files = {f["name"]: f["data"] for f in packaged["files"]}
    for name, source in COPIES.items():
        assert files[name] == source.read_text(), name


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    return _resolve(schema, schema["definitions"][ref.rsplit("/", 1)[1]]) if ref else node


def test_schema_describes_every_value_and_refuses_unknown_keys() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"

    def walk(values: dict[str, Any], node: dict[str, Any], path: str) -> None:
        node = _resolve(schema, node)
        assert node["type"] == "object" and node["additionalProperties"] is False, path or "/"
        for name, value in values.items():
            assert name in node["properties"], f"{path}/{name} is not in values.schema.json"
            child = _resolve(schema, node["properties"][name])
            if isinstance(value, dict) and "properties" in child:
                walk(value, child, f"{path}/{name}")
            else:
                assert "type" in child, f"{path}/{name} has no type"

    walk(yaml.safe_load((CHART / "values.yaml").read_text()), schema, "")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"activator": {"drainTimeoutSeconds": "abc"}},
            "at '/activator/drainTimeoutSeconds': got string, want integer",
        ),
        ({"activator": {"drainTimeoutSeconds": -1}}, "at '/activator/drainTimeoutSeconds': minimum"),
        ({"activator": {"drainTimeoutSeconds": None}}, "at '/activator': missing property 'drainTimeoutSeconds'"),
        ({"drainTimeoutSeconds": 30}, "additional properties 'drainTimeoutSeconds' not allowed"),
        ({"contoller": {"replicas": 1}}, "additional properties 'contoller' not allowed"),
        ({"controller": {"replica": 1}}, "additional properties 'replica' not allowed"),
        ({"controller": {"replicas": 0}}, "at '/controller/replicas': minimum"),
        ({"controller": {"logLevel": "verbose"}}, "at '/controller/logLevel': value must be one of"),
        ({"activator": {"logFormat": "xml"}}, "at '/activator/logFormat': value must be one of"),
        ({"activator": {"extraArgs": "--max-held=10"}}, "at '/activator/extraArgs': got string, want array"),
        ({"activator": {"nodeSelector": {"pool": 1}}}, "at '/activator/nodeSelector/pool': got number, want string"),
        ({"controller": {"tolerations": [{"operator": "Maybe"}]}}, "at '/controller/tolerations/0/operator'"),
        ({"controller": {"affinity": {"nodeAfinity": {}}}}, "additional properties 'nodeAfinity' not allowed"),
        ({"activator": {"resources": {"limits": {"memory": "lots"}}}}, "at '/activator/resources/limits/memory'"),
        ({"activator": {"spoolSizeLimit": "2 GB"}}, "at '/activator/spoolSizeLimit'"),
        ({"imagePullSecrets": ["regcred"]}, "at '/imagePullSecrets/0': got string, want object"),
        ({"image": {"pullPolicy": "Sometimes"}}, "at '/image/pullPolicy': value must be one of"),
        ({"watchNamespaces": ["Team_A"]}, "at '/watchNamespaces/0'"),
        ({"networkPolicy": {"enabled": "yes"}}, "at '/networkPolicy/enabled': got string, want boolean"),
        ({"activator": {"minReplicas": 11}}, "activator.minReplicas (11) must not exceed activator.maxReplicas (10)"),
    ],
)
def test_bad_values_are_refused(values: dict[str, Any], message: str) -> None:
    assert message in refusal(values)


def test_knobs_reach_both_deployments() -> None:
    knobs = {
        "logLevel": "debug",
        "logFormat": "json",
        "extraArgs": ["--example=1", "--other=a b: c"],
        "nodeSelector": {"kubernetes.io/os": "linux", "pool": "system"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "elasti", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "In", "values": ["sys"]}]}]
                }
            }
        },
        "podAnnotations": {"example.com/team": "platform", "prometheus.io/scrape": "false"},
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
    }
    defaults = deployments(helm())
    out = helm(
        {
            "imagePullSecrets": [{"name": "regcred"}],
            "controller": copy.deepcopy(knobs),
            "activator": {**copy.deepcopy(knobs), "logLevel": "warning"},
        }
    )
    for component, pod in deployments(out).items():
        spec, c = pod["spec"], pod["spec"]["containers"][0]
        before = defaults[component]
        level = "debug" if component == "controller" else "warning"
        assert c["args"] == before["spec"]["containers"][0]["args"] + [
            f"--log-level={level}",
            "--log-format=json",
            "--example=1",
            "--other=a b: c",
        ], component
        assert spec["imagePullSecrets"] == [{"name": "regcred"}]
        assert spec["nodeSelector"] == knobs["nodeSelector"]
        assert spec["tolerations"] == knobs["tolerations"]
        # Merged with the default: the replicas are still spread over nodes.
        assert spec["affinity"] == {**before["spec"]["affinity"], **knobs["affinity"]}
        assert spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        assert c["resources"] == knobs["resources"]
        annotations = pod["metadata"]["annotations"]
        assert annotations == {**before["metadata"]["annotations"], **knobs["podAnnotations"]}, component
    assert (
        "terminationDrainDuration: 35s"
        in deployments(out)["activator"]["metadata"]["annotations"]["proxy.istio.io/config"]
    )


def test_knobs_left_at_their_defaults_add_nothing() -> None:
    for component, pod in deployments(helm()).items():
        spec = pod["spec"]
        assert not {"imagePullSecrets", "nodeSelector", "tolerations"} & set(spec), component
        assert not [a for a in spec["containers"][0]["args"] if a.startswith(("--log-level", "--log-format"))]
        assert set(spec["affinity"]) == {"podAntiAffinity"}


def test_default_anti_affinity_can_be_dropped() -> None:
    out = helm({p: {"affinity": {"podAntiAffinity": None}} for p in ("controller", "activator")})
    for component, pod in deployments(out).items():
        assert "affinity" not in pod["spec"], component
