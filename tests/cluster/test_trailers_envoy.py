"""HTTP/1.1 trailers through real Envoys on both sides of the activator: in front of it (as the caller's
sidecar or a gateway talks to it) and as its sidecar's egress listener at the origin's port (the
activator in ``--sidecar-address`` mode), with the HTTP/1 codec's ``enable_trailers`` as an
EnvoyFilter would set it, and without (Istio's default)."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from activator.registry import Registry
from benchmarks import tools
from elasti_istio.localcluster import binaries
from elasti_istio.playground.procs import free_ports
from tests.activator_stubs import WakeEndpoint, elastiservice, sidecar_activator, until
from tests.trailer_wire import Origin, chunked, read_message

pytestmark = pytest.mark.cluster

NS = "shop"
_rv = itertools.count(2)


def bootstrap(admin: int, listeners: dict[int, int], enable_trailers: bool) -> dict[str, Any]:
    """Static Envoy: each listener port routes everything to its upstream port on loopback, HTTP/1.1 both
    ways, with or without the HTTP/1 codec's trailers."""
    h1 = {"enable_trailers": enable_trailers}

    def address(port: int) -> dict[str, Any]:
        return {"socket_address": {"address": "127.0.0.1", "port_value": port}}

    out_listeners, clusters = [], []
    for port, upstream in listeners.items():
        name = f"to{upstream}"
        hcm = {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
            "HttpConnectionManager",
            "stat_prefix": name,
            "codec_type": "HTTP1",
            "http_protocol_options": h1,
            "route_config": {
                "virtual_hosts": [
                    {
                        "name": "all",
                        "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": name, "timeout": "0s"}}],
                    }
                ]
            },
            "http_filters": [
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                }
            ],
        }
        out_listeners.append(
            {
                "name": f"l{port}",
                "address": address(port),
                "filter_chains": [
                    {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
                ],
            }
        )
        clusters.append(
            {
                "name": name,
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {
                    "cluster_name": name,
                    "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address(upstream)}}]}],
                },
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": {"http_protocol_options": h1},
                    }
                },
            }
        )
    return {
        "admin": {"address": address(admin)},
        "static_resources": {"listeners": out_listeners, "clusters": clusters},
    }


class Chain:
    """client -> Envoy -> activator -> Envoy (its sidecar's listener at the origin's port) -> origin."""

    def __init__(self, tmp: Path, enable_trailers: bool) -> None:
        self.tmp = tmp
        self.enable_trailers = enable_trailers
        self.registry = Registry()
        self.registry.mark_synced()

    async def start(self) -> Chain:
        self.origin = Origin()
        origin_port = await self.origin.start()
        self.wake = await WakeEndpoint().start()
        self.front, self.sidecar_port, admin = free_ports(3)
        self.activator = await sidecar_activator(self.registry, self.wake.url, http1_trailers=True)
        routes = {self.front: self.activator.proxy_address[1], self.sidecar_port: origin_port}
        envoy = (await asyncio.to_thread(binaries.find, True))["envoy"]
        self.envoy = tools.Envoy(self.tmp / "envoy", envoy, "0-1")
        # Its static listeners start together: once the front one answers, so does the sidecar's.
        await asyncio.to_thread(self.envoy.start, self.front, bootstrap(admin, routes, self.enable_trailers))
        return self

    async def stop(self) -> None:
        await asyncio.to_thread(self.envoy.stop)
        await self.activator.close()
        await self.wake.stop()
        await self.origin.stop()

    def put(self, ready: bool) -> None:
        origin = ("details-elasti-origin", self.sidecar_port)
        self.registry.apply(
            "MODIFIED", elastiservice(NS, "details", ready=ready, origin=origin, resource_version=str(next(_rv)))
        )


@pytest.fixture(params=[True, False], ids=["enable_trailers", "istio-default"])
async def chain(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Chain]:
    c = await Chain(tmp_path, request.param).start()
    try:
        yield c
    finally:
        await c.stop()


@pytest.mark.parametrize("held", [False, True], ids=["warm", "held"])
async def test_trailers_cross_envoy_and_the_activator_when_envoy_keeps_them(chain: Chain, held: bool) -> None:
    """With ``enable_trailers`` on the Envoys, a chunked request's trailers reach the workload and its
    answer's reach the client, for a warm target and for a held one. With Istio's default the Envoys
    drop them (the activator gets none, and the client none), and the request still succeeds."""
    chain.put(ready=not held)
    body = b"0123456789" * 5000
    reader, writer = await asyncio.open_connection("127.0.0.1", chain.front)
    writer.write(
        f"POST /upload HTTP/1.1\r\nHost: details:9080\r\nelasti-service: {NS}/details\r\n"
        "Transfer-Encoding: chunked\r\nTE: trailers\r\nTrailer: X-Checksum\r\n\r\n".encode()
        + chunked(body, [("X-Checksum", "c1")])
    )
    if held:
        await until(lambda: chain.wake.count(NS, "details") >= 1, 30, "the wake call")
        assert chain.origin.requests == []
        chain.put(ready=True)
    resp = await asyncio.wait_for(read_message(reader), 60)
    writer.close()
    assert resp.start == "HTTP/1.1 200 OK", resp
    assert resp.body == hashlib.sha256(body).hexdigest().encode()
    [got] = chain.origin.requests
    assert got.body == body
    if chain.enable_trailers:  # Envoy writes field names in lower case
        assert [(k.lower(), v) for k, v in got.trailers] == [("x-checksum", "c1")]
        assert [(k.lower(), v) for k, v in resp.trailers] == [("x-digest", "sha256"), ("x-count", "1")]
    else:
        assert got.trailers == [] and resp.trailers == []
