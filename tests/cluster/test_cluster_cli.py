"""``elasti-istio cluster`` against the session's running cluster."""

from __future__ import annotations

import subprocess
import sys

from elasti_istio.localcluster.cluster import LocalCluster


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "elasti_istio", *args], capture_output=True, text=True, timeout=120)


def test_up_on_a_running_cluster_prints_the_same_kubeconfig(local_cluster: LocalCluster) -> None:
    result = cli("cluster", "up", "--state-dir", str(local_cluster.state_dir))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(local_cluster.state_dir / "admin.kubeconfig")
    assert "already running" in result.stderr


def test_status_lists_running_components(local_cluster: LocalCluster) -> None:
    result = cli("cluster", "status", "--state-dir", str(local_cluster.state_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    for component in ("etcd", "kube-apiserver", "kube-controller-manager", "kubelet"):
        assert any(line.startswith(component) and "running" in line for line in result.stdout.splitlines())


def test_kubectl_lists_the_crds(cluster) -> None:  # type: ignore[no-untyped-def]
    out = subprocess.run(
        ["kubectl", "--kubeconfig", str(cluster.admin_kubeconfig), "get", "crd", "-o", "name"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    names = out.stdout.split()
    for crd in (
        "elastiservices.elasti.truefoundry.com",
        "virtualservices.networking.istio.io",
        "destinationrules.networking.istio.io",
        "scaledobjects.keda.sh",
        "rollouts.argoproj.io",
    ):
        assert f"customresourcedefinition.apiextensions.k8s.io/{crd}" in names
