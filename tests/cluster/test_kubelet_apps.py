"""What the kubelet stand-in runs in a pod: Bookinfo stand-ins, TCP forwarders to local processes, and
readiness that follows a URL."""

from __future__ import annotations

import http.client
import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from elasti_istio.kubelet.forward import parse_forward
from elasti_istio.playground.bookinfo import INJECTION
from tests.cluster.test_mesh_bookinfo import apply, load, via_sidecar
from tests.conftest import K8s, MeshInfo
from tests.helpers import wait_for


class LocalServer:
    """An HTTP server on 127.0.0.1 standing for a process outside the cluster (the activator, say)."""

    def __init__(self) -> None:
        self.healthy = True
        self.hits = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits += 1
                if self.path == "/healthz":
                    code, body = (200, b"ok") if outer.healthy else (503, b"not yet")
                else:
                    code, body = (
                        200,
                        json.dumps({"local": True, "path": self.path, "host": self.headers["Host"]}).encode(),
                    )
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LocalServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def local_server() -> Iterator[LocalServer]:
    with LocalServer() as s:
        yield s


def deployment(name: str, annotations: dict[str, str], ports: list[int]) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}, "annotations": annotations},
                "spec": {
                    "containers": [
                        {
                            "name": "main",
                            "image": "example/local-process",
                            "ports": [{"containerPort": p} for p in ports],
                        }
                    ]
                },
            },
        },
    }


def service(name: str, port: int, target: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": port, "targetPort": target}]},
    }


def only_pod(k8s: K8s, namespace: str, app: str) -> Any:
    pods = k8s.core.list_namespaced_pod(namespace, label_selector=f"app={app}").items  # type: ignore[attr-defined]
    return pods[0] if len(pods) == 1 else None


def ready_condition(pod: Any) -> str | None:
    return next((c.status for c in pod.status.conditions or [] if c.type == "Ready"), None)


def get(ip: str, port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(ip, port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_parse_forward() -> None:
    assert parse_forward("127.0.0.1:8080", [80, 81]) == {80: ("127.0.0.1", 8080), 81: ("127.0.0.1", 8080)}
    assert parse_forward("9090=localhost:19090, 127.0.0.1:18080", [8080, 9090]) == {
        9090: ("localhost", 19090),
        8080: ("127.0.0.1", 18080),
    }
    for bad in ("nope", "x=127.0.0.1:1", "127.0.0.1:http"):
        with pytest.raises(ValueError):
            parse_forward(bad, [80])


def test_sim_forward_pod_relays_to_a_local_server(
    k8s: K8s, namespace: str, mesh: MeshInfo, local_server: LocalServer
) -> None:
    apply(
        k8s,
        namespace,
        [
            deployment("fwd", {"elasti.truefoundry.com/sim-forward": f"127.0.0.1:{local_server.port}"}, [8080]),
            service("fwd", 80, 8080),
        ],
    )
    pod = wait_for(
        lambda: (p := only_pod(k8s, namespace, "fwd")) and ready_condition(p) == "True" and p,
        timeout=30,
        what="forwarding pod ready",
    )
    status, body = get(pod.status.pod_ip, 8080, "/direct")
    assert status == 200 and json.loads(body)["path"] == "/direct"
    # As the playground's activator is reached: a Service in front of the pod, through the mesh.
    wait_for(lambda: k8s.endpoint_addresses(namespace, "fwd") == [pod.status.pod_ip], what="endpoint for fwd")
    wait_for(lambda: mesh.routable("fwd", namespace, 80), what="the mesh client's Envoy to have fwd's endpoint")
    status, _, body = via_sidecar(mesh, f"http://fwd.{namespace}.svc.cluster.local/via-mesh")
    assert status == 200
    doc = json.loads(body)
    assert doc == {"local": True, "path": "/via-mesh", "host": f"fwd.{namespace}.svc.cluster.local"}


def test_sim_readiness_url_flips_ready_both_ways(k8s: K8s, namespace: str, local_server: LocalServer) -> None:
    local_server.healthy = False
    apply(
        k8s,
        namespace,
        [
            deployment(
                "probe",
                {"elasti.truefoundry.com/sim-readiness-url": f"http://127.0.0.1:{local_server.port}/healthz"},
                [9080],
            ),
            service("probe", 80, 9080),
        ],
    )
    pod = wait_for(
        lambda: (p := only_pod(k8s, namespace, "probe")) and p.status.phase == "Running" and p,
        timeout=30,
        what="probe pod running",
    )
    assert ready_condition(pod) == "False"
    hits = local_server.hits
    wait_for(lambda: local_server.hits > hits + 2, timeout=30, what="the readiness URL being polled")
    pod = only_pod(k8s, namespace, "probe")
    assert ready_condition(pod) == "False"
    assert k8s.endpoint_addresses(namespace, "probe") == []

    def ready_is(value: str) -> bool:
        p = only_pod(k8s, namespace, "probe")
        return p is not None and ready_condition(p) == value

    local_server.healthy = True
    wait_for(lambda: ready_is("True"), timeout=30, what="Ready once the URL answers 200")
    ip = only_pod(k8s, namespace, "probe").status.pod_ip
    wait_for(lambda: k8s.endpoint_addresses(namespace, "probe") == [ip], what="ready endpoint")
    assert get(ip, 9080, "/status/200")[0] == 200  # the app itself runs all along

    local_server.healthy = False
    wait_for(lambda: ready_is("False"), timeout=30, what="unready once the URL fails")
    wait_for(lambda: k8s.endpoint_addresses(namespace, "probe") == [], what="endpoint no longer ready")

    local_server.healthy = True
    wait_for(lambda: ready_is("True"), timeout=30, what="ready again")
    wait_for(
        lambda: (k8s.apps.read_namespaced_deployment("probe", namespace).status.ready_replicas or 0) == 1,  # type: ignore[attr-defined]
        what="deployment counting the ready replica",
    )


def sidecar_of(k8s: K8s, namespace: str, app: str) -> str:
    pods = k8s.core.list_namespaced_pod(namespace, label_selector=f"app={app}").items  # type: ignore[attr-defined]
    return str(pods[0].metadata.annotations["elasti.truefoundry.com/sim-sidecar-address"])


def test_bookinfo_apps_answer_like_the_real_ones(k8s: K8s, namespace: str, mesh: MeshInfo) -> None:
    """details and ratings from the real manifests; productpage alone shows the real error texts."""
    k8s.core.patch_namespace(namespace, {"metadata": {"labels": INJECTION}})  # type: ignore[attr-defined]
    docs = [
        d
        for d in load("bookinfo.yaml")
        if d["metadata"]["name"] in ("details", "details-v1", "ratings", "ratings-v1", "productpage", "productpage-v1")
        or d["kind"] == "ServiceAccount"
    ]
    apply(k8s, namespace, docs)

    def pod_ip(app: str) -> str | None:
        pods = k8s.core.list_namespaced_pod(namespace, label_selector=f"app={app}").items  # type: ignore[attr-defined]
        return next((p.status.pod_ip for p in pods if ready_condition(p) == "True"), None)

    details_ip = wait_for(lambda: pod_ip("details"), timeout=30, what="details pod")
    ratings_ip = wait_for(lambda: pod_ip("ratings"), timeout=30, what="ratings pod")
    page_ip = wait_for(lambda: pod_ip("productpage"), timeout=30, what="productpage pod")

    status, body = get(details_ip, 9080, "/details/3")
    assert status == 200
    assert json.loads(body) == {
        "id": 3,
        "author": "William Shakespeare",
        "year": 1595,
        "type": "paperback",
        "pages": 200,
        "publisher": "PublisherA",
        "language": "English",
        "ISBN-10": "1234567890",
        "ISBN-13": "123-1234567890",
    }
    assert get(details_ip, 9080, "/details/x")[0] == 400
    status, body = get(ratings_ip, 9080, "/ratings/1")
    assert json.loads(body) == {"id": 1, "ratings": {"Reviewer1": 5, "Reviewer2": 4}}
    assert get(page_ip, 9080, "/health") == (200, b"Product page is healthy")

    # details is reachable (through the mesh), reviews does not exist in this namespace.
    wait_for(lambda: k8s.endpoint_addresses(namespace, "details") == [details_ip], what="details endpoint")
    page_sidecar = f"http://{sidecar_of(k8s, namespace, 'productpage')}:15000"
    wait_for(
        lambda: all(mesh.routable(svc, namespace, 9080, admin=page_sidecar) for svc in ("details", "ratings")),
        what="productpage's sidecar to have the endpoints of details and ratings",
    )
    conn = http.client.HTTPConnection(page_ip, 9080, timeout=30)
    conn.request("GET", "/productpage")
    resp = conn.getresponse()
    page = resp.read().decode()
    assert resp.status == 200
    assert resp.getheader("x-bookinfo-degraded") == "reviews"
    assert "PublisherA" in page
    assert "Sorry, product reviews are currently unavailable for this book." in page
    status, body = get(page_ip, 9080, "/api/v1/products/0/ratings")
    assert status == 200 and json.loads(body)["ratings"] == {"Reviewer1": 5, "Reviewer2": 4}


def test_generic_app_reports_its_pod(k8s: K8s, namespace: str) -> None:
    k8s.core.create_namespaced_pod(  # type: ignore[attr-defined]
        namespace,
        client.V1Pod(
            metadata=client.V1ObjectMeta(name="plain"),
            spec=client.V1PodSpec(
                containers=[
                    client.V1Container(
                        name="c", image="example/app", ports=[client.V1ContainerPort(container_port=9080)]
                    )
                ]
            ),
        ),
    )
    pod = wait_for(
        lambda: (p := k8s.core.read_namespaced_pod("plain", namespace)) and ready_condition(p) == "True" and p,  # type: ignore[attr-defined]
        what="plain pod ready",
    )
    status, body = get(pod.status.pod_ip, 9080, "/headers")
    assert status == 200 and json.loads(body)["pod"] == "plain"
    status, body = get(pod.status.pod_ip, 9080, "/stream/3")
    assert [json.loads(line)["id"] for line in body.splitlines()] == [0, 1, 2]
    status, body = get(pod.status.pod_ip, 9080, "/bytes/1000")
    assert len(body) == 1000
