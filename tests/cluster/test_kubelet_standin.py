"""The kubelet stand-in with the real ReplicaSet, Deployment and EndpointSlice controllers."""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
import time
import urllib.request

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from elasti_istio.localcluster.cluster import ClusterInfo
from tests.conftest import K8s
from tests.helpers import wait_for


def deployment(name: str, replicas: int = 1, port: int = 9080, annotations: dict | None = None) -> client.V1Deployment:
    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1DeploymentSpec(
            replicas=replicas,
            selector=client.V1LabelSelector(match_labels={"app": name}),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels={"app": name}, annotations=annotations),
                spec=client.V1PodSpec(
                    containers=[
                        client.V1Container(
                            name="app", image="example/app", ports=[client.V1ContainerPort(container_port=port)]
                        )
                    ]
                ),
            ),
        ),
    )


def service(name: str, port: int = 9080) -> client.V1Service:
    return client.V1Service(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1ServiceSpec(selector={"app": name}, ports=[client.V1ServicePort(port=port, name="http")]),
    )


def http_get(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def connect_refused(ip: str, port: int) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=1):
            return False
    except OSError:
        return True


def test_deployment_becomes_ready_serves_http_and_scales_to_zero(
    k8s: K8s, cluster: ClusterInfo, namespace: str
) -> None:
    k8s.apps.create_namespaced_deployment(namespace, deployment("web"))  # type: ignore[attr-defined]
    k8s.core.create_namespaced_service(namespace, service("web"))  # type: ignore[attr-defined]
    wait_for(
        lambda: k8s.apps.read_namespaced_deployment("web", namespace).status.ready_replicas == 1,  # type: ignore[attr-defined]
        what="deployment web to report 1 ready replica",
    )
    pod = k8s.core.list_namespaced_pod(namespace, label_selector="app=web").items[0]  # type: ignore[attr-defined]
    ip = pod.status.pod_ip
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(cluster.pod_cidr)  # not loopback: EndpointSlices take it
    assert pod.spec.node_name == "elasti-sim-node"
    assert wait_for(lambda: k8s.endpoint_addresses(namespace, "web") == [ip], what="EndpointSlice with the pod")

    answer = http_get(f"http://{ip}:9080/some/path?x=1")
    assert answer["pod"] == pod.metadata.name and answer["path"] == "/some/path" and answer["query"] == "x=1"

    k8s.apps.patch_namespaced_deployment_scale("web", namespace, {"spec": {"replicas": 0}})  # type: ignore[attr-defined]
    wait_for(
        lambda: not k8s.core.list_namespaced_pod(namespace, label_selector="app=web").items,  # type: ignore[attr-defined]
        what="the pod to be deleted",
    )
    assert k8s.endpoint_addresses(namespace, "web") == []
    assert wait_for(lambda: connect_refused(ip, 9080), what="the pod's listener to stop")


def test_pods_get_distinct_addresses(k8s: K8s, namespace: str) -> None:
    k8s.apps.create_namespaced_deployment(namespace, deployment("multi", replicas=3))  # type: ignore[attr-defined]
    wait_for(
        lambda: k8s.apps.read_namespaced_deployment("multi", namespace).status.ready_replicas == 3,  # type: ignore[attr-defined]
        what="3 ready replicas",
    )
    pods = k8s.core.list_namespaced_pod(namespace, label_selector="app=multi").items  # type: ignore[attr-defined]
    ips = {p.status.pod_ip for p in pods}
    assert len(ips) == 3
    for p in pods:
        assert http_get(f"http://{p.status.pod_ip}:9080/")["pod"] == p.metadata.name


def test_pod_bound_to_another_node_is_left_alone(k8s: K8s, namespace: str) -> None:
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="elsewhere"),
        spec=client.V1PodSpec(node_name="some-other-node", containers=[client.V1Container(name="c", image="x")]),
    )
    k8s.core.create_namespaced_pod(namespace, pod)  # type: ignore[attr-defined]
    # A control pod created after it on this node must become ready; by then the other one has been
    # seen by the stand-in and must still be untouched.
    k8s.core.create_namespaced_pod(
        namespace,
        client.V1Pod(  # type: ignore[attr-defined]
            metadata=client.V1ObjectMeta(name="here"),
            spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="x")]),
        ),
    )
    wait_for(
        lambda: k8s.core.read_namespaced_pod("here", namespace).status.phase == "Running",  # type: ignore[attr-defined]
        what="control pod running",
    )
    other = k8s.core.read_namespaced_pod("elsewhere", namespace)  # type: ignore[attr-defined]
    assert other.status.pod_ip is None and other.status.phase == "Pending"


def test_startup_annotation_delays_readiness(k8s: K8s, namespace: str) -> None:
    k8s.apps.create_namespaced_deployment(  # type: ignore[attr-defined]
        namespace, deployment("slow", annotations={"elasti.truefoundry.com/sim-startup-seconds": "3"})
    )
    pod = wait_for(
        lambda: next(
            (
                p
                for p in k8s.core.list_namespaced_pod(  # type: ignore[attr-defined]
                    namespace, label_selector="app=slow"
                ).items
                if p.status.pod_ip
            ),
            None,
        ),
        what="pod with an address",
    )
    created = pod.metadata.creation_timestamp
    wait_for(
        lambda: k8s.apps.read_namespaced_deployment("slow", namespace).status.ready_replicas == 1,  # type: ignore[attr-defined]
        what="ready replica",
    )
    pod = k8s.core.read_namespaced_pod(pod.metadata.name, namespace)  # type: ignore[attr-defined]
    ready = next(c for c in pod.status.conditions if c.type == "Ready")
    assert (ready.last_transition_time - created).total_seconds() >= 2


def test_deletion_lets_in_flight_requests_finish(k8s: K8s, namespace: str) -> None:
    k8s.apps.create_namespaced_deployment(namespace, deployment("grace"))  # type: ignore[attr-defined]
    wait_for(
        lambda: k8s.apps.read_namespaced_deployment("grace", namespace).status.ready_replicas == 1,  # type: ignore[attr-defined]
        what="ready replica",
    )
    pod = k8s.core.list_namespaced_pod(namespace, label_selector="app=grace").items[0]  # type: ignore[attr-defined]
    ip = pod.status.pod_ip
    result: dict = {}

    def slow_request() -> None:
        try:
            result["answer"] = http_get(f"http://{ip}:9080/delay/2", timeout=20)
        except Exception as exc:
            result["error"] = exc

    t = threading.Thread(target=slow_request)
    t.start()
    time.sleep(0.5)  # let the request reach the app before the deletion starts
    k8s.core.delete_namespaced_pod(pod.metadata.name, namespace, grace_period_seconds=30)  # type: ignore[attr-defined]
    wait_for(lambda: connect_refused(ip, 9080), what="the listener to stop taking connections")
    t.join(20)
    assert result.get("answer", {}).get("pod") == pod.metadata.name, result

    def gone() -> bool:
        try:
            k8s.core.read_namespaced_pod(pod.metadata.name, namespace)  # type: ignore[attr-defined]
            return False
        except ApiException as exc:
            return exc.status == 404

    wait_for(gone, what="the pod object to be removed")


@pytest.mark.parametrize("path", ["/status/418", "/redirect/2"])
def test_generic_app_endpoints(k8s: K8s, namespace: str, path: str) -> None:
    k8s.apps.create_namespaced_deployment(namespace, deployment("gen"))  # type: ignore[attr-defined]
    wait_for(
        lambda: k8s.apps.read_namespaced_deployment("gen", namespace).status.ready_replicas == 1,  # type: ignore[attr-defined]
        what="ready replica",
    )
    ip = k8s.core.list_namespaced_pod(namespace, label_selector="app=gen").items[0].status.pod_ip  # type: ignore[attr-defined]
    conn = __import__("http.client").client.HTTPConnection(ip, 9080, timeout=5)
    conn.request("GET", path)
    resp = conn.getresponse()
    assert resp.status == (418 if "status" in path else 302)
