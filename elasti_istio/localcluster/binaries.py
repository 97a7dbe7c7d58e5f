"""Finds the programs the local cluster runs, installing them once when missing.

Control plane: etcd, kube-apiserver, kube-controller-manager (``KUBEBUILDER_ASSETS`` when set).
Mesh: pilot-discovery (istiod), Istio's CRDs of the same build, and envoy — always from the cache.
Monitoring: the Prometheus Operator and its CRDs, and a Prometheus with Kubernetes service discovery, from
the cache too (the monitoring tests use them).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager")
MESH = ("pilot-discovery", "envoy")
MONITORING = ("prometheus-operator", "prometheus")
ISTIO_CRDS = "istio-crds.yaml"
PROMETHEUS_OPERATOR_CRDS = "prometheus-operator-crds.yaml"


class BinariesMissing(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class Binaries:
    control_plane: Path
    mesh: Path

    def __getitem__(self, name: str) -> Path:
        return (self.control_plane if name in CONTROL_PLANE else self.mesh) / name

    @property
    def istio_crds(self) -> Path:
        return self.mesh / ISTIO_CRDS

    @property
    def prometheus_operator_crds(self) -> Path:
        return self.mesh / PROMETHEUS_OPERATOR_CRDS


def cache_dir() -> Path:
    return Path(os.environ.get("ELASTI_CACHE_DIR") or Path.home() / ".cache" / "elasti-istio")


def install_script() -> Path:
    return Path(str(resources.files("elasti_istio.localcluster") / "install-control-plane.sh"))


def _executables(folder: Path, names: tuple[str, ...]) -> list[str]:
    """The names that are not an executable file in ``folder``."""
    return [n for n in names if not ((folder / n).is_file() and os.access(folder / n, os.X_OK))]


def _missing(control_plane: Path, mesh: Path, monitoring: bool) -> list[str]:
    missing = _executables(control_plane, CONTROL_PLANE) + _executables(mesh, MESH)
    missing += [] if (mesh / ISTIO_CRDS).is_file() else [ISTIO_CRDS]
    if monitoring:
        missing += _executables(mesh, MONITORING)
        missing += [] if (mesh / PROMETHEUS_OPERATOR_CRDS).is_file() else [PROMETHEUS_OPERATOR_CRDS]
    return missing


def find(install: bool = True, monitoring: bool = False) -> Binaries:
    """Where each program is; the install script fills the cache on first use (progress on stderr).
    ``monitoring``: the Prometheus Operator and Prometheus too (the local cluster itself needs neither)."""
    mesh = cache_dir() / "bin"
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    control_plane = Path(assets) if assets else mesh
    if assets and (gone := _executables(control_plane, CONTROL_PLANE)):
        raise BinariesMissing(f"KUBEBUILDER_ASSETS={assets} lacks {', '.join(gone)}")
    missing = _missing(control_plane, mesh, monitoring)
    if not missing:
        return Binaries(control_plane, mesh)
    if not install:
        raise BinariesMissing(
            f"{', '.join(missing)} not found in {mesh}; run {install_script()} (or set KUBEBUILDER_ASSETS for the "
            "control plane)"
        )
    print(f"missing in {mesh}: {', '.join(missing)}; building them (first run only)", file=sys.stderr)
    env = dict(os.environ)
    if assets:
        env["ELASTI_SKIP_K8S"] = "1"
    if not monitoring:
        env["ELASTI_SKIP_MONITORING"] = "1"
    proc = subprocess.run(["bash", str(install_script())], stdout=subprocess.PIPE, text=True, env=env)
    if proc.returncode != 0 or (missing := _missing(control_plane, mesh, monitoring)):
        raise BinariesMissing(
            f"installing {', '.join(missing) or 'the binaries'} failed (exit {proc.returncode}); see the output above"
        )
    return Binaries(control_plane, mesh)
