"""The mesh stand-in with the generic test app: Envoy's own answers, timeouts, headers, streaming, websockets.

One namespace for the module: ``web`` (Service port 80 → container port 9080) backed by ``web-v1`` (2 pods)
and ``web-v2`` (1 pod), a DestinationRule with both subsets and a Gateway for the ingress. Each test
brings its own VirtualService under its own host name, so tests do not see each other's routes.
"""

from __future__ import annotations

import asyncio
import collections
import http.client
import json
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from kubernetes import client

from tests.cluster.test_mesh_bookinfo import apply, delete_istio, request, via_sidecar
from tests.conftest import K8s, MeshInfo, _cleanup_namespace
from tests.helpers import wait_for


def deployment(name: str, app: str, version: str, replicas: int) -> dict[str, Any]:
    labels = {"app": app, "version": version}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [{"name": "app", "image": "example/httpbin", "ports": [{"containerPort": 9080}]}]
                },
            },
        },
    }


def service(name: str, app: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"selector": {"app": app}, "ports": [{"name": "http", "port": 80, "targetPort": 9080}]},
    }


def virtualservice(name: str, hosts: list[str], http: list[dict[str, Any]], gateways: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1beta1",
        "kind": "VirtualService",
        "metadata": {"name": name},
        "spec": {"hosts": hosts, "gateways": gateways, "http": http},
    }


def ready_count(k8s: K8s, ns: str, name: str) -> int:
    return k8s.apps.read_namespaced_deployment(name, ns).status.ready_replicas or 0  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def site(k8s: K8s, mesh: MeshInfo) -> Iterator[str]:
    ns = f"t-mesh-{uuid.uuid4().hex[:6]}"
    k8s.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))  # type: ignore[attr-defined]
    try:
        apply(
            k8s,
            ns,
            [
                deployment("web-v1", "web", "v1", 2),
                deployment("web-v2", "web", "v2", 1),
                service("web", "web"),
                {
                    "apiVersion": "networking.istio.io/v1beta1",
                    "kind": "DestinationRule",
                    "metadata": {"name": "web"},
                    "spec": {
                        "host": "web",
                        "subsets": [
                            {"name": "v1", "labels": {"version": "v1"}},
                            {"name": "v2", "labels": {"version": "v2"}},
                        ],
                    },
                },
                {
                    "apiVersion": "networking.istio.io/v1beta1",
                    "kind": "Gateway",
                    "metadata": {"name": "edge"},
                    "spec": {
                        "selector": {"istio": "ingressgateway"},
                        "servers": [{"port": {"number": 8080, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]}],
                    },
                },
            ],
        )
        wait_for(
            lambda: ready_count(k8s, ns, "web-v1") == 2 and ready_count(k8s, ns, "web-v2") == 1,
            timeout=60,
            what="web deployments ready",
        )
        wait_for(lambda: len(k8s.endpoint_addresses(ns, "web")) == 3, timeout=30, what="3 endpoints for web")
        yield ns
    finally:
        delete_istio(k8s, ns, "Gateway", "edge")
        _cleanup_namespace(k8s, ns)


def host_for(site: str, test: str) -> str:
    return f"{test}.{site}.test"


def route_vs(k8s: K8s, site: str, name: str, http: list[dict[str, Any]], mesh_too: bool = False) -> str:
    host = host_for(site, name)
    apply(
        k8s,
        site,
        [virtualservice(name, [host] + (["web"] if mesh_too else []), http, ["edge"] + (["mesh"] if mesh_too else []))],
    )
    return host


def echo(mesh: MeshInfo, host: str, path: str = "/anything", headers: dict[str, str] | None = None) -> dict[str, Any]:
    status, _, body = request(mesh.ingress, path, host=host, headers=headers)
    assert status == 200, (status, body[:300])
    return json.loads(body)


def test_subsets_weights_and_a_change_that_applies(k8s: K8s, mesh: MeshInfo, site: str) -> None:
    host = route_vs(k8s, site, "split", [{"route": [{"destination": {"host": "web", "subset": "v2"}}]}])
    pods_v2 = {p.metadata.name for p in k8s.core.list_namespaced_pod(site, label_selector="version=v2").items}  # type: ignore[attr-defined]
    wait_for(lambda: echo(mesh, host)["pod"] in pods_v2, timeout=30, what="the subset route to apply")
    assert all(echo(mesh, host)["pod"] in pods_v2 for _ in range(10))
    # The Service port (80) maps to the container port (9080) through the EndpointSlice.
    assert echo(mesh, host)["port"] == 9080

    route_vs(
        k8s,
        site,
        "split",
        [
            {
                "route": [
                    {"destination": {"host": "web", "subset": "v1"}, "weight": 75},
                    {"destination": {"host": "web", "subset": "v2"}, "weight": 25},
                ]
            }
        ],
    )
    wait_for(lambda: echo(mesh, host)["pod"] not in pods_v2, timeout=30, what="the weighted route to apply")
    counts = collections.Counter("v2" if echo(mesh, host)["pod"] in pods_v2 else "v1" for _ in range(200))
    # 200 draws at p=0.25: mean 50, sd ~6.1; [15, 90] is beyond 5 sd either way.
    assert 15 <= counts["v2"] <= 90, counts
    v1_pods = {echo(mesh, host)["pod"] for _ in range(20)} - pods_v2
    assert len(v1_pods) == 2  # both v1 endpoints take traffic


def test_header_edits_per_destination_and_route(k8s: K8s, mesh: MeshInfo, site: str) -> None:
    host = route_vs(
        k8s,
        site,
        "headers",
        [
            {
                "headers": {"request": {"remove": ["x-secret"]}, "response": {"set": {"x-route": "headers"}}},
                "route": [
                    {
                        "destination": {"host": "web"},
                        "headers": {
                            "request": {"set": {"elasti-service": f"{site}/web"}, "add": {"x-added": "yes"}},
                            "response": {"add": {"x-dest": "web"}},
                        },
                    }
                ],
            }
        ],
    )
    wait_for(lambda: request(mesh.ingress, "/headers", host=host)[0] == 200, timeout=30, what="route to apply")
    status, resp_headers, body = request(
        mesh.ingress,
        "/headers",
        host=host,
        headers={"elasti-service": "other/queue", "x-secret": "s3cret", "x-kept": "1"},
    )
    assert status == 200
    seen = {k.lower(): v for k, v in json.loads(body)["headers"].items()}
    assert seen["elasti-service"] == f"{site}/web"  # set, not added: the client cannot choose
    assert seen["x-added"] == "yes" and seen["x-kept"] == "1" and "x-secret" not in seen
    assert seen["host"] == host and "x-request-id" in seen
    assert resp_headers["x-route"] == "headers" and resp_headers["x-dest"] == "web"
    assert "x-envoy-upstream-service-time" in resp_headers


def test_matches_and_envoy_404s(k8s: K8s, mesh: MeshInfo, site: str) -> None:
    host = route_vs(
        k8s,
        site,
        "matches",
        [
            {
                "match": [{"headers": {"x-version": {"exact": "v2"}}}],
                "route": [{"destination": {"host": "web", "subset": "v2"}}],
            },
            {"match": [{"uri": {"prefix": "/headers"}}], "route": [{"destination": {"host": "web", "subset": "v1"}}]},
        ],
    )
    pods_v2 = {p.metadata.name for p in k8s.core.list_namespaced_pod(site, label_selector="version=v2").items}  # type: ignore[attr-defined]
    wait_for(lambda: request(mesh.ingress, "/headers", host=host)[0] == 200, timeout=30, what="route to apply")
    assert echo(mesh, host, "/headers")["pod"] not in pods_v2
    assert echo(mesh, host, "/headers", {"x-version": "v2"})["pod"] in pods_v2
    assert echo(mesh, host, "/other", {"x-version": "v2"})["pod"] in pods_v2
    # No route matches: Envoy's 404, empty body.
    status, headers, body = request(mesh.ingress, "/other", host=host)
    assert (status, headers.get("server"), body) == (404, "envoy", b"")
    # Routing is by Host alone; a forwarded-host header does not route.
    status, headers, body = request(mesh.ingress, "/headers", host="nobody.example", headers={"X-Forwarded-Host": host})
    if status == 200:  # only if another test's VirtualService claims "*": then it is not this route
        assert json.loads(body).get("namespace") != site
    else:
        assert (status, headers.get("server")) == (404, "envoy")


def test_route_timeout_is_504_like_envoy(k8s: K8s, mesh: MeshInfo, site: str) -> None:
    host = route_vs(k8s, site, "timeout", [{"timeout": "0.5s", "route": [{"destination": {"host": "web"}}]}])
    wait_for(lambda: request(mesh.ingress, "/status/200", host=host)[0] == 200, timeout=30, what="route to apply")
    status, headers, body = request(mesh.ingress, "/delay/5", host=host)
    assert (status, body) == (504, b"upstream request timeout")
    assert headers["server"] == "envoy" and headers["content-type"] == "text/plain"
    assert request(mesh.ingress, "/delay/0.1", host=host)[0] == 200


def test_no_ready_endpoint_is_503_no_healthy_upstream_and_recovers(k8s: K8s, mesh: MeshInfo, site: str) -> None:
    apply(k8s, site, [deployment("solo", "solo", "v1", 1), service("solo", "solo")])
    host = route_vs(k8s, site, "solo", [{"route": [{"destination": {"host": "solo"}}]}])
    wait_for(lambda: request(mesh.ingress, "/get", host=host)[0] == 200, timeout=60, what="solo serving")
    # Without a VirtualService for it, a sidecar goes straight to the Service (port 80 → 9080).
    fqdn_url = f"http://solo.{site}/get"
    assert via_sidecar(mesh, fqdn_url)[0] == 200

    k8s.apps.patch_namespaced_deployment_scale("solo", site, {"spec": {"replicas": 0}})  # type: ignore[attr-defined]

    wait_for(lambda: request(mesh.ingress, "/get", host=host)[0] == 503, timeout=30, what="503 without endpoints")
    for status, headers, body in (request(mesh.ingress, "/get", host=host), via_sidecar(mesh, fqdn_url)):
        assert (status, body) == (503, b"no healthy upstream")
        assert headers["server"] == "envoy" and headers["content-type"] == "text/plain"
        assert headers["content-length"] == "19" and "x-envoy-upstream-service-time" not in headers

    k8s.apps.patch_namespaced_deployment_scale("solo", site, {"spec": {"replicas": 1}})  # type: ignore[attr-defined]
    wait_for(lambda: request(mesh.ingress, "/get", host=host)[0] == 200, timeout=60, what="solo back")
    assert via_sidecar(mesh, fqdn_url)[0] == 200


def test_keep_alive_connection_across_local_and_proxied_answers(k8s: K8s, mesh: MeshInfo, site: str) -> None:
    host = route_vs(
        k8s, site, "keepalive", [{"match": [{"uri": {"prefix": "/get"}}], "route": [{"destination": {"host": "web"}}]}]
    )
    wait_for(lambda: request(mesh.ingress, "/get", host=host)[0] == 200, timeout=30, what="route to apply")
    conn = http.client.HTTPConnection(mesh.ingress.removeprefix("http://"), timeout=30)
    try:
        statuses = []
        local_ports = set()
        for path in ("/get", "/nope", "/get", "/get?x=1", "/nope", "/get"):
            conn.request("GET", path, headers={"Host": host})
            resp = conn.getresponse()
            resp.read()
            statuses.append(resp.status)
            assert conn.sock is not None
            local_ports.add(conn.sock.getsockname()[1])
        assert statuses == [200, 404, 200, 200, 404, 200]
        assert len(local_ports) == 1  # one connection throughout
    finally:
        conn.close()


def test_request_and_response_bodies_stream_both_ways(k8s: K8s, mesh: MeshInfo, site: str) -> None:
    """The app echoes each request chunk as it arrives: reading the first echo before sending the rest
    proves that neither direction is buffered."""
    host = route_vs(k8s, site, "stream", [{"route": [{"destination": {"host": "web"}}]}])
    wait_for(lambda: request(mesh.ingress, "/get", host=host)[0] == 200, timeout=30, what="route to apply")
    port = int(mesh.ingress.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(
            f"POST /echo HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + b"6\r\nfirst|\r\n"
        )
        received = b""
        while b"first|" not in received:
            data = s.recv(65536)
            assert data, received
            received += data
        assert received.startswith(b"HTTP/1.1 200")
        s.sendall(b"7\r\nsecond|\r\n0\r\n\r\n")
        while not received.endswith(b"0\r\n\r\n"):
            data = s.recv(65536)
            assert data, received
            received += data
    assert b"second|" in received


def test_websocket_through_the_gateway(k8s: K8s, mesh: MeshInfo, site: str) -> None:
    host = route_vs(k8s, site, "ws", [{"timeout": "1s", "route": [{"destination": {"host": "web"}}]}])
    wait_for(lambda: request(mesh.ingress, "/get", host=host)[0] == 200, timeout=30, what="route to apply")

    async def talk() -> list[Any]:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{mesh.ingress}/ws", headers={"Host": host}) as ws:
                await ws.send_str("hello")
                first = await ws.receive(timeout=10)
                await asyncio.sleep(1.5)  # longer than the route timeout: it covers the handshake only
                await ws.send_bytes(b"\x00\x01")
                second = await ws.receive(timeout=10)
                return [first.data, second.data]

    assert asyncio.run(talk()) == ["hello", b"\x00\x01"]


def test_pods_call_short_names_in_their_own_namespace(k8s: K8s, mesh: MeshInfo, site: str) -> None:
    """An app's east-west call leaves from its pod address; the mesh resolves ``web`` in the pod's namespace
    and applies the mesh-bound VirtualService."""
    route_vs(
        k8s,
        site,
        "eastwest",
        [
            {
                "route": [
                    {"destination": {"host": "web", "subset": "v2"}, "headers": {"request": {"set": {"x-via": "mesh"}}}}
                ]
            }
        ],
        mesh_too=True,
    )
    pod = k8s.core.list_namespaced_pod(site, label_selector="version=v1").items[0]  # type: ignore[attr-defined]
    pods_v2 = {p.metadata.name for p in k8s.core.list_namespaced_pod(site, label_selector="version=v2").items}  # type: ignore[attr-defined]

    def call() -> dict[str, Any]:
        conn = http.client.HTTPConnection(pod.status.pod_ip, 9080, timeout=30)
        try:
            conn.request("GET", "/call?url=http://web/headers")
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    answer = wait_for(
        lambda: (a := call())["status"] == 200 and "x-via" in a["body"].lower() and a, timeout=30, what="east-west call"
    )
    inner = json.loads(answer["body"])
    assert inner["pod"] in pods_v2
    assert {k.lower(): v for k, v in inner["headers"].items()}["x-via"] == "mesh"
