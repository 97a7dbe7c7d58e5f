"""gRPC on the generic app's ``grpc*`` container ports, reached at the pod's address with stock grpcio clients,
and readiness that follows a gRPC health check."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from elasti_istio.kubelet import grpcecho
from elasti_istio.kubelet.grpcecho import EchoRequest, SeenRequest
from tests.conftest import K8s
from tests.helpers import wait_for

pytestmark = pytest.mark.cluster

GRPC_PORT = 9000
HTTP_PORT = 9080


def deployment(name: str, ports: list[dict[str, Any]], annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}, "annotations": annotations or {}},
                "spec": {"containers": [{"name": "main", "image": "example/grpc-echo", "ports": ports}]},
            },
        },
    }


def ready_pod(k8s: K8s, namespace: str, app: str) -> Any:
    pods = k8s.core.list_namespaced_pod(namespace, label_selector=f"app={app}").items  # type: ignore[attr-defined]
    ready = [
        p
        for p in pods
        if not p.metadata.deletion_timestamp
        and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
    ]
    return ready[0] if len(ready) == 1 else None


def ready_condition(k8s: K8s, namespace: str, app: str) -> str | None:
    pods = k8s.core.list_namespaced_pod(namespace, label_selector=f"app={app}").items  # type: ignore[attr-defined]
    if len(pods) != 1:
        return None
    return next((c.status for c in pods[0].status.conditions or [] if c.type == "Ready"), None)


@pytest.fixture
def echo_pod(k8s: K8s, namespace: str) -> Any:
    ports = [
        {"name": "grpc", "containerPort": GRPC_PORT},
        {"name": "http", "containerPort": HTTP_PORT},
        {"name": "grpc-echo", "containerPort": GRPC_PORT + 1},
    ]
    k8s.apps.create_namespaced_deployment(namespace, deployment("echo", ports))  # type: ignore[attr-defined]
    return wait_for(lambda: ready_pod(k8s, namespace, "echo"), timeout=60, what="the echo pod Ready")


def test_grpc_port_serves_echo_health_and_reflection_and_http_port_stays_http(echo_pod: Any) -> None:
    ip, name = echo_pod.status.pod_ip, echo_pod.metadata.name
    with grpc.insecure_channel(f"{ip}:{GRPC_PORT}") as channel:
        stub = grpcecho.stub(channel)
        resp, call = stub.Unary.with_call(EchoRequest(message="hi"), metadata=(("x-echo-k", "v"),), timeout=30)
        assert (resp.message, resp.pod, resp.ip, resp.port) == ("hi", name, ip, GRPC_PORT)
        assert dict(call.initial_metadata())["x-pod-name"] == name
        assert dict(call.initial_metadata())["x-pod-ip"] == ip
        assert list(call.trailing_metadata()) == [("x-echo-trailer", "Unary"), ("x-echo-k", "v")]

        bidi = stub.Bidi(iter([EchoRequest(message=w) for w in ("a", "b", "c")]), timeout=30)
        got = [(r.message, r.index, r.pod) for r in bidi]
        assert got == [("a", 0, name), ("b", 1, name), ("c", 2, name)]
        assert dict(bidi.initial_metadata())["x-pod-name"] == name

        with pytest.raises(grpc.RpcError) as err:
            stub.Unary(EchoRequest(status_code=7, status_message="go away"), timeout=30)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and err.value.details() == "go away"  # type: ignore[attr-defined]

        checks = health_pb2_grpc.HealthStub(channel)
        for service in ("", grpcecho.SERVICE):
            reply = checks.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

        listing = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30
        )
        (answer,) = list(listing)
        assert grpcecho.SERVICE in {s.name for s in answer.list_services_response.service}

    with grpc.insecure_channel(f"{ip}:{GRPC_PORT + 1}") as channel:  # a grpc-* name is gRPC too
        assert grpcecho.stub(channel).Unary(EchoRequest(message="second"), timeout=30).port == GRPC_PORT + 1

    conn = http.client.HTTPConnection(ip, HTTP_PORT, timeout=30)
    try:
        conn.request("GET", "/headers")
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["pod"] == name
    finally:
        conn.close()


def test_deleting_the_pod_lets_a_grpc_call_in_flight_finish(k8s: K8s, namespace: str, echo_pod: Any) -> None:
    ip, name = echo_pod.status.pod_ip, echo_pod.metadata.name
    with grpc.insecure_channel(f"{ip}:{GRPC_PORT}") as channel:
        stub = grpcecho.stub(channel)
        slow = stub.Unary.future(EchoRequest(message="last", delay_ms=3000), timeout=120)
        wait_for(
            lambda: stub.Seen(SeenRequest(method="Unary"), timeout=10).inflight == 1,
            what="the slow call to reach the pod",
        )
        k8s.core.delete_namespaced_pod(name, namespace)  # type: ignore[attr-defined]
        resp = slow.result(timeout=120)
        assert (resp.message, resp.pod) == ("last", name)


@pytest.fixture
def health_server() -> Iterator[tuple[int, health.HealthServicer]]:
    """A gRPC health service on 127.0.0.1 standing for a process outside the cluster."""
    server = grpc.server(ThreadPoolExecutor(4))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, servicer
    finally:
        server.stop(None)


def test_sim_readiness_url_follows_a_grpc_health_check(
    k8s: K8s, namespace: str, health_server: tuple[int, health.HealthServicer]
) -> None:
    port, servicer = health_server
    servicer.set("demo.Svc", health_pb2.HealthCheckResponse.NOT_SERVING)
    url = f"grpc://127.0.0.1:{port}/demo.Svc"
    k8s.apps.create_namespaced_deployment(  # type: ignore[attr-defined]
        namespace,
        deployment(
            "gprobe",
            [{"name": "grpc", "containerPort": GRPC_PORT}],
            {"elasti.truefoundry.com/sim-readiness-url": url},
        ),
    )

    def running() -> bool:
        pods = k8s.core.list_namespaced_pod(namespace, label_selector="app=gprobe").items  # type: ignore[attr-defined]
        return len(pods) == 1 and pods[0].status.phase == "Running"

    wait_for(running, timeout=60, what="gprobe running")
    assert ready_condition(k8s, namespace, "gprobe") == "False"

    servicer.set("demo.Svc", health_pb2.HealthCheckResponse.SERVING)
    wait_for(lambda: ready_condition(k8s, namespace, "gprobe") == "True", timeout=30, what="Ready once SERVING")
    servicer.set("demo.Svc", health_pb2.HealthCheckResponse.NOT_SERVING)
    wait_for(lambda: ready_condition(k8s, namespace, "gprobe") == "False", timeout=30, what="unready again")
