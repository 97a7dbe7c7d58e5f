"""Faults with nothing lost: the API server or etcd restarted while requests are held, the activator
killed with requests held. The session cluster's own processes are restarted for real."""

from __future__ import annotations

import signal
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from elasti_istio.localcluster.cluster import LocalCluster
from elasti_istio.playground.procs import ActivatorProc, free_port
from tests.cluster.test_controller_lifecycle import activator_dests, bookinfo, phase, vs_spec
from tests.conftest import K8s, MeshInfo
from tests.harness import create, http_json, ready_replicas, scale, wait_until


def held_request(url: str, namespace: str, result: dict[str, Any]) -> threading.Thread:
    def run() -> None:
        req = urllib.request.Request(url + "/details/0", headers={"elasti-service": f"{namespace}/details"})
        try:
            with urllib.request.urlopen(req, timeout=90) as resp:
                result["status"], result["body"] = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            result["status"] = exc.code
        except OSError as exc:
            result["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    return t


def pending(act: ActivatorProc, namespace: str) -> int:
    code, body = http_json("GET", f"{act.admin_url}/v1/pending/{namespace}/details", timeout=2)
    return int(body["pending"]) if code == 200 else -1


@pytest.mark.parametrize("component", ["kube-apiserver", "etcd"])
def test_requests_held_across_a_control_plane_restart_are_served(
    k8s: K8s,
    namespace: str,
    local_cluster: LocalCluster,
    cluster: Any,
    mesh: MeshInfo,
    start_controller: Any,
    tmp_path: Path,
    component: str,
) -> None:
    bookinfo(k8s, namespace)
    ctrl = start_controller()
    act = ActivatorProc(
        cluster.admin_kubeconfig,
        tmp_path / "activator.log",
        "--namespace",
        namespace,
        controller_url=ctrl.wake_url.rsplit("/v1/", 1)[0],
        sidecar_address=mesh.client,
    ).start()
    try:
        act.wait_ready()
        scale(k8s, namespace, "details-v1", 0)
        wait_until(lambda: phase(k8s, namespace, "details") == "ScaledToZero", what="ScaledToZero")
        local_cluster.restart_component(component, stop_only=True)
        try:
            result: dict[str, Any] = {}
            t = held_request(act.url, namespace, result)
            wait_until(lambda: pending(act, namespace) == 1, what="the request held while the control plane is down")
        finally:
            local_cluster.restart_component(component)
        t.join(90)
        assert result.get("status") == 200, result
        assert b"Shakespeare" in result["body"]
        wait_until(lambda: phase(k8s, namespace, "details") == "Serving", what="Serving after the restart")
        # Both watches recovered: a second cycle works end to end.
        scale(k8s, namespace, "details-v1", 0)
        wait_until(lambda: activator_dests(vs_spec(k8s, namespace, "details")), what="proxy again")
        wait_until(lambda: phase(k8s, namespace, "details") == "ScaledToZero", what="ScaledToZero again")
        again: dict[str, Any] = {}
        held_request(act.url, namespace, again).join(90)
        assert again.get("status") == 200, again
    finally:
        act.stop()
        print(act.logs()[-3000:])


def test_activator_killed_with_requests_held(
    k8s: K8s, namespace: str, cluster: Any, mesh: MeshInfo, start_controller: Any, tmp_path: Path
) -> None:
    """Clients get an error at once (not a hold timeout), and the controller fails open."""
    bookinfo(k8s, namespace)
    original = vs_spec(k8s, namespace, "details")
    # The controller is unreachable from this activator: what it holds stays held.
    act = ActivatorProc(
        cluster.admin_kubeconfig,
        tmp_path / "activator.log",
        "--namespace",
        namespace,
        controller_url=f"http://127.0.0.1:{free_port()}",
        sidecar_address=mesh.client,
    ).start()
    act.wait_ready()
    create(
        k8s,
        namespace,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "elasti-activator"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "elasti-activator"}},
                "template": {
                    "metadata": {
                        "labels": {"app": "elasti-activator"},
                        "annotations": {"elasti.truefoundry.com/sim-readiness-url": f"{act.admin_url}/readyz"},
                    },
                    "spec": {
                        "containers": [{"name": "a", "image": "elasti-istio", "ports": [{"containerPort": 8012}]}]
                    },
                },
            },
        },
    )
    wait_until(lambda: ready_replicas(k8s, namespace, "elasti-activator") == 1, what="activator pod ready")
    start_controller(activator_deployment=f"{namespace}/elasti-activator")
    scale(k8s, namespace, "details-v1", 0)
    wait_until(lambda: phase(k8s, namespace, "details") == "ScaledToZero", what="ScaledToZero")
    assert activator_dests(vs_spec(k8s, namespace, "details"))
    result: dict[str, Any] = {}
    t = held_request(act.url, namespace, result)
    wait_until(lambda: pending(act, namespace) == 1, what="held")
    act.kill(signal.SIGKILL)
    t.join(30)
    assert not t.is_alive() and "error" in result, result  # the connection died with the process
    wait_until(lambda: vs_spec(k8s, namespace, "details") == original, 60, "routes restored (fail open)")
    wait_until(lambda: ready_replicas(k8s, namespace, "details-v1") == 1, 60, "target woken (fail open)")
