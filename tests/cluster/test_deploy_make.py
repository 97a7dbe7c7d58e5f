"""``make deploy`` / ``make undeploy`` against the local cluster: ElastiServices go first, their
finalizers run while the controller is still there, and nothing is removed while one is left.

The overlay applied is the cluster-wide one, PodDisruptionBudget and HorizontalPodAutoscaler included,
minus the CRD, which the test session shares. The controller runs as a local process with the
identity the applied bindings name; the Deployments' pods run the kubelet stand-in's test app.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from elasti_istio.localcluster.cluster import ClusterInfo
from tests.cluster.test_deploy_rbac import bookinfo, installed, phase, proxied, vs_spec  # noqa: F401 - fixture
from tests.conftest import K8s
from tests.harness import ROOT, ControllerProc, create, get, patch, scale, wait_until
from tests.rendered import copy_tree, kubectl, run_kubectl

OVERLAY = """\
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../cluster-wide
patches:
  - patch: |
      $patch: delete
      apiVersion: apiextensions.k8s.io/v1
      kind: CustomResourceDefinition
      metadata: {name: elastiservices.elasti.truefoundry.com}
"""


def make(tree: Path, cluster: ClusterInfo, target: str, **variables: str) -> subprocess.CompletedProcess[str]:
    args = [f"{k}={v}" for k, v in variables.items()]
    return subprocess.run(
        ["make", "-C", str(tree), target, "OVERLAY=test-server", f"PYTHON={sys.executable}", *args,
         f"KUBECTL={kubectl()} --kubeconfig {cluster.admin_kubeconfig}"],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if not k.startswith("MAKE")},
    )  # fmt: skip


def exists(k8s: K8s, kind: str, name: str) -> bool:
    from kubernetes.client.exceptions import ApiException

    try:
        if kind == "Deployment":
            k8s.apps.read_namespaced_deployment(name, "elasti-system")  # type: ignore[attr-defined]
        else:
            k8s.rbac.read_cluster_role(name)  # type: ignore[attr-defined]
        return True
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise


@pytest.mark.usefixtures("installed")
def test_undeploy_deletes_elastiservices_first_and_waits_for_their_finalizers(
    cluster: ClusterInfo, k8s: K8s, namespace: str, tmp_path: Path
) -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    tree = copy_tree(tmp_path / "repo")
    shutil.copy(ROOT / "Makefile", tree / "Makefile")
    (tree / "deploy" / "kustomize" / "overlays" / "test-server").mkdir()
    (tree / "deploy" / "kustomize" / "overlays" / "test-server" / "kustomization.yaml").write_text(OVERLAY)
    try:
        out = make(tree, cluster, "deploy")
        assert out.returncode == 0, out.stderr
        assert exists(k8s, "Deployment", "elasti-controller") and exists(k8s, "ClusterRole", "elasti-controller")

        # An ElastiService whose finalizer nobody runs: undeploy gives up and removes nothing.
        blocker: dict[str, Any] = {
            "apiVersion": "elasti.truefoundry.com/v1alpha1",
            "kind": "ElastiService",
            "metadata": {"name": "blocker", "finalizers": ["example.com/never"]},
            "spec": {"service": "nothing", "scaleTargetRef": {"kind": "Deployment", "name": "nothing"}},
        }
        create(k8s, namespace, blocker)
        out = make(tree, cluster, "undeploy", UNDEPLOY_TIMEOUT="3s")
        assert out.returncode != 0 and "elasti-istio was not removed" in out.stderr, out.stdout + out.stderr
        assert exists(k8s, "Deployment", "elasti-controller") and exists(k8s, "ClusterRole", "elasti-controller")
        patch(k8s, namespace, "ElastiService", "blocker", {"metadata": {"finalizers": None}})

        # With the controller running, undeploy restores the routes and wakes details before going.
        bookinfo(k8s, namespace)
        original = vs_spec(k8s, namespace, "details")
        ctrl = ControllerProc(
            cluster.controller_kubeconfig,
            None,
            tmp_path / "controller.log",
            activator_deployment="elasti-system/elasti-activator",
        ).start()
        try:
            ctrl.wait_ready()
            wait_until(lambda: phase(k8s, namespace, "details") == "Serving", what="details Serving")
            scale(k8s, namespace, "details-v1", 0)
            wait_until(lambda: phase(k8s, namespace, "details") == "ScaledToZero", what="ScaledToZero")
            assert proxied(vs_spec(k8s, namespace, "details"))
            out = make(tree, cluster, "undeploy", UNDEPLOY_TIMEOUT="120s")
            assert out.returncode == 0, out.stdout + out.stderr
        finally:
            ctrl.stop()
            print(ctrl.logs()[-3000:])
        assert get(k8s, namespace, "ElastiService", "details") is None
        assert vs_spec(k8s, namespace, "details") == original
        assert k8s.apps.read_namespaced_deployment("details-v1", namespace).spec.replicas == 1  # type: ignore
        lines = out.stdout.splitlines()
        first_es = next(i for i, line in enumerate(lines) if line.startswith("elastiservice"))
        controller = next(i for i, line in enumerate(lines) if 'deployment.apps "elasti-controller" deleted' in line)
        assert first_es < controller
        assert not exists(k8s, "ClusterRole", "elasti-controller")
    finally:
        for name in ("blocker", "details"):
            if get(k8s, namespace, "ElastiService", name):
                patch(k8s, namespace, "ElastiService", name, {"metadata": {"finalizers": None}})
        overlay = tree / "deploy" / "kustomize" / "overlays" / "test-server"
        run_kubectl(cluster.admin_kubeconfig, "delete", "--ignore-not-found", "--wait=false", "-k", str(overlay))
