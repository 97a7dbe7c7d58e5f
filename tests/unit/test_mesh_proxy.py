"""The mesh's data path over real local HTTP, with its state fed by hand instead of by watches.

Upstream "pods" are aiohttp servers on 127.0.0.1; the objects the informers would hold are put in
their stores and announced through the same event handlers the watches call.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from elasti_istio.mesh.metrics import Metrics
from elasti_istio.mesh.proxy import INGRESS, OUTBOUND, Proxy
from elasti_istio.mesh.state import MeshState

NS = "shop"


class Cluster:
    """A MeshState whose stores are filled directly."""

    def __init__(self) -> None:
        self.state = MeshState(None, gateway_labels={"istio": "ingressgateway"})  # type: ignore[arg-type]
        from elasti_istio.kube.informer import Informer
        from elasti_istio.resources import ENDPOINTSLICES_V1BETA1

        self.state.endpointslices = Informer(None, ENDPOINTSLICES_V1BETA1, self.state._slice_event)  # type: ignore[arg-type]

    def put(self, informer_name: str, obj: dict[str, Any]) -> None:
        inf = getattr(self.state, informer_name)
        meta = obj["metadata"]
        meta.setdefault("namespace", NS)
        meta.setdefault("creationTimestamp", "2024-01-01T00:00:00Z")
        inf.store[(meta["namespace"], meta["name"])] = obj
        assert inf.handler is not None
        inf.handler("ADDED", obj)

    def service(self, name: str, port: int = 80) -> None:
        self.put("services", {"metadata": {"name": name}, "spec": {"ports": [{"name": "http", "port": port}]}})

    def endpoints(self, service: str, ports: list[int], pod_labels: dict[str, str] | None = None) -> None:
        """One slice per target port (each local server has its own port)."""
        for i, port in enumerate(ports):
            pod = f"{service}-{i}"
            self.put(
                "pods",
                {
                    "metadata": {"name": pod, "labels": dict(pod_labels or {}, app=service)},
                    "status": {"podIP": f"127.0.0.{100 + i}"},
                },
            )
            self.put(
                "endpointslices",
                {
                    "metadata": {"name": f"{service}-{i}", "labels": {"kubernetes.io/service-name": service}},
                    "ports": [{"name": "http", "port": port}],
                    "endpoints": [
                        {
                            "addresses": ["127.0.0.1"],
                            "conditions": {"ready": True},
                            "targetRef": {"kind": "Pod", "namespace": NS, "name": pod},
                        }
                    ],
                },
            )

    def virtualservice(
        self, name: str, hosts: list[str], http: list[dict[str, Any]], gateways: list[str] | None = None
    ) -> None:
        spec: dict[str, Any] = {"hosts": hosts, "http": http}
        if gateways:
            spec["gateways"] = gateways
        self.put("virtualservices", {"metadata": {"name": name}, "spec": spec})

    def gateway(self, name: str) -> None:
        self.put(
            "gateways",
            {
                "metadata": {"name": name},
                "spec": {"selector": {"istio": "ingressgateway"}, "servers": [{"hosts": ["*"]}]},
            },
        )


async def serve(handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]) -> tuple[web.BaseRunner, int]:
    runner = web.ServerRunner(web.Server(handler, handler_cancellation=True))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, port


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def env() -> AsyncIterator[dict[str, Any]]:
    cluster = Cluster()
    metrics = Metrics()
    session = aiohttp.ClientSession(auto_decompress=False)
    runners = []
    ports = {}
    for role in (INGRESS, OUTBOUND):
        proxy = Proxy(cluster.state, metrics, session, role=role)
        runner, port = await serve(proxy.handle)
        runners.append(runner)
        ports[role] = port
    seen: list[dict[str, Any]] = []
    gate = asyncio.Event()
    cancelled = asyncio.Event()

    async def upstream(request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        seen.append({"path": request.path_qs, "headers": dict(request.headers), "body": body})
        if request.path == "/hold":
            try:
                await gate.wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise
        if request.path.startswith("/sleep"):
            await asyncio.sleep(float(request.query.get("s", "5")))
        return web.json_response(
            {"port": request.transport.get_extra_info("sockname")[1] if request.transport else 0},
            headers={"Connection": "keep-alive, x-hop", "x-hop": "1", "Server": "app/1"},
        )

    up_runner, up_port = await serve(upstream)
    runners.append(up_runner)
    yield {
        "cluster": cluster,
        "metrics": metrics,
        "ingress": f"http://127.0.0.1:{ports[INGRESS]}",
        "outbound": f"http://127.0.0.1:{ports[OUTBOUND]}",
        "upstream_port": up_port,
        "seen": seen,
        "gate": gate,
        "cancelled": cancelled,
    }
    for r in runners:
        await r.cleanup()
    await session.close()


async def raw(port_url: str, data: bytes) -> bytes:
    host, port = port_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    out = await asyncio.wait_for(reader.read(65536), 10)
    writer.close()
    return out


def head_and_body(response: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return lines[0], headers, body


async def test_ingress_routes_by_host_and_passes_a_clean_request(env: dict[str, Any]) -> None:
    c: Cluster = env["cluster"]
    c.gateway("gw")
    c.service("web")
    c.endpoints("web", [env["upstream_port"]])
    c.virtualservice("web", ["shop.example"], [{"route": [{"destination": {"host": "web"}}]}], ["gw"])
    async with aiohttp.ClientSession() as s:
        async with s.get(
            f"{env['ingress']}/a?b=1",
            headers={"Host": "shop.example", "Connection": "keep-alive, x-private", "x-private": "p", "TE": "trailers"},
        ) as r:
            assert r.status == 200
            assert r.headers["Server"] == "app/1" and "x-envoy-upstream-service-time" in r.headers
            assert "x-hop" not in r.headers  # named in the upstream's Connection header
        async with s.get(f"{env['ingress']}/a", headers={"Host": "other.example"}) as r:
            assert (r.status, r.headers["server"], await r.read()) == (404, "envoy", b"")
    got = env["seen"][0]
    assert got["path"] == "/a?b=1"
    h = {k.lower(): v for k, v in got["headers"].items()}
    assert h["host"] == "shop.example" and "x-request-id" in h and h["x-forwarded-proto"] == "http"
    assert "x-private" not in h and "te" not in h
    assert h["x-forwarded-for"] == "127.0.0.1"


async def test_outbound_absolute_form_and_short_names_by_source_pod(env: dict[str, Any]) -> None:
    c: Cluster = env["cluster"]
    c.service("web")
    c.endpoints("web", [env["upstream_port"]])
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://web.{NS}.svc.cluster.local/x", proxy=env["outbound"]) as r:
            assert r.status == 200
        # The caller (127.0.0.1) is no pod: a short name resolves in the default namespace.
        async with s.get("http://web/x", proxy=env["outbound"]) as r:
            assert (r.status, r.headers["server"]) == (404, "envoy")
        # Once 127.0.0.1 is a pod of this namespace, "web" is its neighbour.
        c.put("pods", {"metadata": {"name": "caller", "labels": {}}, "status": {"podIP": "127.0.0.1"}})
        async with s.get("http://web/x", proxy=env["outbound"]) as r:
            assert r.status == 200
        # Origin-form with a Host header works the same (a captured sidecar request).
        async with s.get(f"{env['outbound']}/y", headers={"Host": "web:80"}) as r:
            assert r.status == 200
    assert [e["headers"]["Host"] for e in env["seen"]] == [f"web.{NS}.svc.cluster.local", "web", "web:80"]


async def test_exact_envoy_answers(env: dict[str, Any]) -> None:
    c: Cluster = env["cluster"]
    c.service("empty")
    status, headers, body = head_and_body(
        await raw(env["outbound"], f"GET http://empty.{NS}.svc.cluster.local/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    )
    assert status == "HTTP/1.1 503 Service Unavailable"
    assert body == b"no healthy upstream"
    assert (
        headers["server"] == "envoy" and headers["content-type"] == "text/plain" and headers["content-length"] == "19"
    )
    assert "x-envoy-upstream-service-time" not in headers
    status, headers, body = head_and_body(
        await raw(env["outbound"], b"GET /x HTTP/1.1\r\nHost: nothing.example\r\n\r\n")
    )
    assert status == "HTTP/1.1 404 Not Found" and body == b""
    assert headers["server"] == "envoy" and headers["content-length"] == "0"


async def test_connect_failure_tries_another_endpoint(env: dict[str, Any]) -> None:
    c: Cluster = env["cluster"]
    c.service("web")
    dead = free_port()
    c.endpoints("web", [dead, env["upstream_port"]])
    async with aiohttp.ClientSession() as s:
        for _ in range(6):
            async with s.get(f"http://web.{NS}/x", proxy=env["outbound"]) as r:
                assert r.status == 200
    c.service("gone")
    c.endpoints("gone", [dead, free_port()])
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://gone.{NS}/x", proxy=env["outbound"]) as r:
            body = await r.text()
            assert (r.status, r.headers["server"]) == (503, "envoy")
            assert body.startswith(
                "upstream connect error or disconnect/reset before headers. reset reason: connection failure"
            )


async def test_route_timeout_and_client_disconnect(env: dict[str, Any]) -> None:
    c: Cluster = env["cluster"]
    c.service("web")
    c.endpoints("web", [env["upstream_port"]])
    c.virtualservice(
        "web",
        ["web"],
        [
            {"timeout": "0.3s", "match": [{"uri": {"prefix": "/sleep"}}], "route": [{"destination": {"host": "web"}}]},
            {"route": [{"destination": {"host": "web"}}]},
        ],
    )
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://web.{NS}/sleep?s=5", proxy=env["outbound"]) as r:
            assert (r.status, await r.text(), r.headers["server"]) == (504, "upstream request timeout", "envoy")
        # A client that goes away takes its upstream request with it (the activator relies on this).
        task = asyncio.create_task(s.get(f"http://web.{NS}/hold", proxy=env["outbound"]))
        while not any(e["path"] == "/hold" for e in env["seen"]):
            await asyncio.sleep(0.02)
        task.cancel()
        await asyncio.wait_for(env["cancelled"].wait(), 10)


async def test_metrics_labels(env: dict[str, Any]) -> None:
    c: Cluster = env["cluster"]
    c.service("web")
    c.endpoints("web", [env["upstream_port"]], {"version": "v7"})
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://web.{NS}/x", proxy=env["outbound"]) as r:
            assert r.status == 200
        async with s.get(f"{env['outbound']}/x", headers={"Host": "made-up-host.example"}) as r:
            assert r.status == 404
    text = env["metrics"].render().decode()
    lines = [line for line in text.splitlines() if line.startswith("istio_requests_total{")]
    ok = next(line for line in lines if 'response_code="200"' in line)
    for label in (
        'destination_service="web.shop.svc.cluster.local"',
        'destination_service_name="web"',
        'destination_service_namespace="shop"',
        'destination_version="v7"',
        'destination_workload="web-0"',
        'reporter="source"',
        'response_flags="-"',
    ):
        assert label in ok, ok
    assert any('response_code="404"' in line and 'response_flags="NR"' in line for line in lines)
    assert "made-up-host" not in text


def test_state_caches_follow_every_change() -> None:
    """Tables, subsets and endpoint lists are cached; any event invalidates them."""
    c = Cluster()
    st = c.state
    fqdn = f"web.{NS}.svc.cluster.local"
    c.put(
        "destinationrules",
        {"metadata": {"name": "web"}, "spec": {"host": "web", "subsets": [{"name": "a", "labels": {"v": "1"}}]}},
    )
    assert st.subset_labels(fqdn, "a", None) == {"v": "1"}
    c.put(
        "destinationrules",
        {"metadata": {"name": "web"}, "spec": {"host": "web", "subsets": [{"name": "a", "labels": {"v": "2"}}]}},
    )
    assert st.subset_labels(fqdn, "a", None) == {"v": "2"}

    c.endpoints("web", [1111], {"v": "2"})
    assert [e.port for e in st.endpoints(NS, "web", "http", {"v": "2"})] == [1111]
    c.put("pods", {"metadata": {"name": "web-0", "labels": {"v": "3"}}, "status": {"podIP": "127.0.0.100"}})
    assert st.endpoints(NS, "web", "http", {"v": "2"}) == []
    st._slice_event("DELETED", st.endpointslices.store.pop((NS, "web-0")))  # type: ignore[union-attr]
    assert st.endpoints(NS, "web", "http", None) == []

    assert st.table("mesh").lookup("web", NS) is None
    c.virtualservice("web", ["web"], [{"route": [{"destination": {"host": "web"}}]}])
    assert st.table("mesh").lookup("web", NS) is not None
    assert st.pod_by_ip("127.0.0.100")["metadata"]["name"] == "web-0"  # type: ignore[index]
