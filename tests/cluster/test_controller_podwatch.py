"""A target waking from zero is reported ready at its first ready pod, before its own status says so.

The target is an Argo Rollout: no Argo controller runs here, so the test plays it (its ReplicaSet
follows ``spec.replicas``) and decides what the Rollout's status says. The real ReplicaSet
controller creates the pods and the kubelet stand-in makes them Ready; the Rollout's
``status.readyReplicas`` stays 0 after the wake, so only the controller's pod watch can see them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from tests.conftest import K8s
from tests.harness import GROUP, VERSION, create, es, get, patch, wait_until

HASH = "5f7c9d"


def rollout_docs() -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "ro"},
            "spec": {"selector": {"app": "ro"}, "ports": [{"name": "http", "port": 9080}]},
        },
        {
            "apiVersion": "networking.istio.io/v1beta1",
            "kind": "VirtualService",
            "metadata": {"name": "ro"},
            "spec": {"hosts": ["ro"], "http": [{"route": [{"destination": {"host": "ro"}}]}]},
        },
        {
            "apiVersion": "argoproj.io/v1alpha1",
            "kind": "Rollout",
            "metadata": {"name": "ro"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "ro"}},
                "template": {
                    "metadata": {"labels": {"app": "ro"}},
                    "spec": {
                        "containers": [{"name": "app", "image": "example/web", "ports": [{"containerPort": 9080}]}]
                    },
                },
                "strategy": {"canary": {}},
            },
        },
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ElastiService",
            "metadata": {"name": "ro"},
            "spec": {
                "service": "ro",
                "scaleTargetRef": {"apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout", "name": "ro"},
            },
        },
    ]


def replicaset(namespace: str, owner_uid: str, replicas: int) -> dict[str, Any]:
    labels = {"app": "ro", "rollouts-pod-template-hash": HASH, "pod-template-hash": HASH}
    return {
        "apiVersion": "apps/v1",
        "kind": "ReplicaSet",
        "metadata": {
            "name": f"ro-{HASH}",
            "namespace": namespace,
            "labels": labels,
            "ownerReferences": [
                {
                    "apiVersion": "argoproj.io/v1alpha1",
                    "kind": "Rollout",
                    "name": "ro",
                    "uid": owner_uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "app", "image": "example/web", "ports": [{"containerPort": 9080}]}]},
            },
        },
    }


class RolloutStandIn:
    """Mirrors the Rollout's spec.replicas onto its ReplicaSet; writes the Rollout's status only when told."""

    def __init__(self, k8s: K8s, namespace: str) -> None:
        self.k8s, self.namespace = k8s, namespace
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            try:
                ro = get(self.k8s, self.namespace, "Rollout", "ro")
                if ro is None:
                    continue
                want = ro["spec"].get("replicas", 1)
                rs = self.k8s.apps.read_namespaced_replica_set(f"ro-{HASH}", self.namespace)  # type: ignore
                if rs.spec.replicas != want:
                    self.k8s.apps.patch_namespaced_replica_set(  # type: ignore[attr-defined]
                        f"ro-{HASH}", self.namespace, {"spec": {"replicas": want}}
                    )
            except ApiException:
                continue

    def status(self, ready: int, replicas: int) -> None:
        self.k8s.custom.patch_namespaced_custom_object_status(  # type: ignore[attr-defined]
            "argoproj.io",
            "v1alpha1",
            self.namespace,
            "rollouts",
            "ro",
            {
                "status": {
                    "replicas": replicas,
                    "readyReplicas": ready,
                    "availableReplicas": ready,
                    "HPAReplicas": replicas,
                    "selector": "app=ro",
                }
            },
        )


@pytest.fixture
def rollout(k8s: K8s, namespace: str) -> Iterator[RolloutStandIn]:
    docs = rollout_docs()
    for doc in docs[:3]:
        create(k8s, namespace, doc)
    ro = get(k8s, namespace, "Rollout", "ro")
    assert ro is not None
    k8s.apps.create_namespaced_replica_set(namespace, replicaset(namespace, ro["metadata"]["uid"], 1))  # type: ignore
    stand_in = RolloutStandIn(k8s, namespace)
    wait_until(lambda: ready_pods(k8s, namespace) == 1, what="the Rollout's pod Ready")
    stand_in.status(ready=1, replicas=1)
    create(k8s, namespace, docs[3])
    stand_in.thread.start()
    try:
        yield stand_in
    finally:
        stand_in.stop.set()
        stand_in.thread.join(10)


def ready_pods(k8s: K8s, namespace: str) -> int:
    pods = k8s.core.list_namespaced_pod(namespace, label_selector="app=ro").items  # type: ignore[attr-defined]
    return sum(
        1
        for p in pods
        if p.metadata.deletion_timestamp is None
        and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
    )


def status(k8s: K8s, namespace: str) -> dict[str, Any]:
    return es(k8s, namespace, "ro").get("status") or {}


def sleep_and_wake(k8s: K8s, namespace: str, rollout: RolloutStandIn, ctl: Any) -> None:
    wait_until(lambda: status(k8s, namespace).get("phase") == "Serving", what="ro Serving")
    patch(k8s, namespace, "Rollout", "ro", {"spec": {"replicas": 0}})
    wait_until(lambda: ready_pods(k8s, namespace) == 0, what="the pod gone")
    rollout.status(ready=0, replicas=0)
    wait_until(lambda: status(k8s, namespace).get("phase") == "ScaledToZero", what="ro ScaledToZero")
    assert status(k8s, namespace)["readyReplicas"] == 0
    code, body = ctl.wake(namespace, "ro")
    assert code == 202, body
    wait_until(lambda: ready_pods(k8s, namespace) == 1, what="a new pod Ready")


def test_first_ready_pod_releases_before_the_workload_status(
    k8s: K8s, namespace: str, rollout: RolloutStandIn, start_controller: Any
) -> None:
    sleep_and_wake(k8s, namespace, rollout, start_controller())
    # The Rollout's own status still says no ready replica; the pod says otherwise.
    wait_until(lambda: status(k8s, namespace).get("readyReplicas") == 1, what="readyReplicas 1 from the pod")
    wait_until(lambda: status(k8s, namespace).get("phase") == "Serving", what="ro Serving from the pod")
    ro = get(k8s, namespace, "Rollout", "ro")
    assert ro is not None and ro["status"]["readyReplicas"] == 0
    assert status(k8s, namespace)["mode"] == "serve"
    # The Rollout catching up changes nothing.
    rollout.status(ready=1, replicas=1)
    wait_until(lambda: get(k8s, namespace, "Rollout", "ro")["status"]["readyReplicas"] == 1, what="Rollout ready")
    assert status(k8s, namespace).get("phase") == "Serving"


def test_without_pod_watches_the_workload_status_decides(
    k8s: K8s, namespace: str, rollout: RolloutStandIn, start_controller: Any
) -> None:
    sleep_and_wake(k8s, namespace, rollout, start_controller("--pod-watches", "0"))
    time.sleep(2)  # time enough for a pod watch to have told (it takes milliseconds)
    assert status(k8s, namespace).get("readyReplicas") == 0
    rollout.status(ready=1, replicas=1)
    wait_until(lambda: status(k8s, namespace).get("readyReplicas") == 1, what="readyReplicas 1 from the Rollout")
    wait_until(lambda: status(k8s, namespace).get("phase") == "Serving", what="ro Serving")
