"""The ElastiService CRD file and the sanitizing of third-party CRDs for old API servers."""

from __future__ import annotations

from pathlib import Path

from elasti_istio.localcluster import crds

ROOT = Path(__file__).resolve().parents[2]


def schema() -> dict:
    doc = crds.load_documents(ROOT / "crds" / "elastiservice.yaml")[0]
    return doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_packaged_crd_is_the_repository_file() -> None:
    assert crds.elastiservice_crd_path().read_bytes() == (ROOT / "crds" / "elastiservice.yaml").read_bytes()


def test_crd_names_and_columns() -> None:
    doc = crds.load_documents(ROOT / "crds" / "elastiservice.yaml")[0]
    assert doc["apiVersion"] == "apiextensions.k8s.io/v1"
    spec = doc["spec"]
    assert (spec["group"], spec["scope"], spec["names"]["plural"], spec["names"]["kind"]) == (
        "elasti.truefoundry.com",
        "Namespaced",
        "elastiservices",
        "ElastiService",
    )
    assert spec["names"]["shortNames"] == ["es", "elastisvc"]  # es is also ECK's Elasticsearch
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert list(columns) == ["Service", "Phase", "Mode", "Ready", "Reason", "Replicas", "Age"]
    assert columns["Ready"] == '.status.conditions[?(@.type=="Ready")].status'  # the condition, not a count
    assert columns["Reason"] == '.status.conditions[?(@.type=="Ready")].reason'


def test_every_field_is_documented_for_kubectl_explain() -> None:
    missing: list[str] = []

    def walk(node: dict, path: str) -> None:
        for name, child in (node.get("properties") or {}).items():
            if path == "es" and name == "metadata":
                continue  # the API server refuses anything on metadata but name and generateName
            if not child.get("description"):
                missing.append(f"{path}.{name}")
            walk(child, f"{path}.{name}")
        if "items" in node:
            walk(node["items"], f"{path}[]")

    walk(schema(), "es")
    assert missing == []


def test_spec_schema() -> None:
    spec = schema()["properties"]["spec"]
    assert set(spec["required"]) == {"service", "scaleTargetRef"}
    props = spec["properties"]
    assert props["scaleTargetRef"]["properties"]["kind"]["enum"] == [
        "Deployment",
        "StatefulSet",
        "ReplicaSet",
        "Rollout",
        "ScaledObject",
        "deployments",  # KubeElasti's spelling
        "statefulsets",
        "rollouts",
    ]
    metadata = props["triggers"]["items"]["properties"]["metadata"]
    assert metadata["x-kubernetes-preserve-unknown-fields"] is True  # KubeElasti's uptimeFilter is kept
    assert props["cooldownPeriod"]["type"] == "integer" and props["cooldownPeriod"]["default"] == 300
    assert props["minTargetReplicas"]["minimum"] == 1 and props["minTargetReplicas"]["default"] == 1
    act = props["activator"]["properties"]
    assert (act["holdTimeout"]["default"], act["retryInterval"]["default"], act["queueLimit"]["default"]) == (
        "60s",
        "100ms",
        1000,
    )
    assert props["autoscaler"]["properties"]["type"]["enum"] == ["keda", "hpa"]


def test_status_schema() -> None:
    st = schema()["properties"]["status"]["properties"]
    assert st["phase"]["enum"] == ["Serving", "ScalingToZero", "ScaledToZero", "ScalingUp"]
    assert st["mode"]["enum"] == ["serve", "proxy"]
    for field in (
        "readyReplicas",
        "origin",
        "lastScaledToZeroTime",
        "lastWakeTime",
        "boundVirtualServices",
        "conditions",
        "observedGeneration",
    ):
        assert field in st
