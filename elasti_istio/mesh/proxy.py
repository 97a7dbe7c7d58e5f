"""The data path: an aiohttp reverse proxy that plays Envoy for one role (ingress gateway or sidecar outbound).

Bodies stream both ways, websockets are bridged, upstream connections are pooled and kept alive.
The answers the proxy makes itself are Envoy's: ``404`` with an empty body for an unknown host or
no matching route, ``503 no healthy upstream`` when the destination has no ready endpoint,
``504 upstream request timeout`` when a route timeout expires, ``503 upstream connect error ...``
when every attempt to connect failed — all with ``server: envoy``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

from elasti_istio.mesh import routing
from elasti_istio.mesh.metrics import UNKNOWN, Metrics, RequestRecord
from elasti_istio.mesh.routing import Decision, Endpoint, RequestInfo
from elasti_istio.mesh.state import MeshState

log = logging.getLogger("elasti.mesh")

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "expect",
        "host",
    }
)
WS_HANDSHAKE = frozenset({"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions"})
# Set by the downstream handshake itself; the upstream's other 101 headers are passed on, as Envoy does.
WS_ANSWER = frozenset({"sec-websocket-accept", "sec-websocket-protocol", "sec-websocket-extensions", "content-length"})

NO_HEALTHY_UPSTREAM = "no healthy upstream"
UPSTREAM_TIMEOUT = "upstream request timeout"
CONNECT_FAILURE = (
    "upstream connect error or disconnect/reset before headers. reset reason: connection failure, "
    "transport failure reason: delayed connect error: 111"
)
CONNECTION_TERMINATION = (
    "upstream connect error or disconnect/reset before headers. reset reason: connection termination"
)

INGRESS = "ingress"
OUTBOUND = "outbound"


def local_reply(status: int, body: str = "") -> web.Response:
    """A response Envoy makes itself: ``server: envoy``; a body, when any, is ``text/plain``."""
    headers = {"server": "envoy"}
    if body:
        headers["content-type"] = "text/plain"
    return web.Response(status=status, body=body.encode() if body else None, headers=headers)


class Proxy:
    def __init__(
        self,
        state: MeshState,
        metrics: Metrics,
        session: aiohttp.ClientSession,
        *,
        role: str,
        retries: int = 2,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.state = state
        self.metrics = metrics
        self.session = session
        self.role = role
        self.retries = retries
        self.rand = rand

    # ---- entry -----------------------------------------------------------------------------------
    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        rec = RequestRecord()
        resp: web.StreamResponse | None = None
        try:
            resp = await self._handle(request, rec, t0)
            rec.response_code = resp.status
            return resp
        except asyncio.CancelledError:
            rec.response_flags = "DC"  # the client went away
            raise
        finally:
            self.metrics.record(rec, (loop.time() - t0) * 1000.0)

    def _source(self, request: web.BaseRequest, rec: RequestRecord) -> tuple[str | None, dict[str, str]]:
        """Who sent the request, from the connection's source address (a pod's own IP), not from headers."""
        if self.role == INGRESS:
            rec.source_workload, rec.source_workload_namespace = "istio-ingressgateway", "istio-system"
            return None, {}
        pod = self.state.pod_by_ip(request.remote)
        if pod is None:
            return self.state.default_namespace, {}
        meta = pod.get("metadata") or {}
        rec.source_workload = routing.workload_of(pod)
        rec.source_workload_namespace = meta.get("namespace") or UNKNOWN
        return meta.get("namespace"), dict(meta.get("labels") or {})

    async def _handle(self, request: web.BaseRequest, rec: RequestRecord, t0: float) -> web.StreamResponse:
        if request.method == "CONNECT":  # no tunnels here, as Envoy without CONNECT routes
            rec.response_flags = "NR"
            return local_reply(404)
        if request.raw_path[:1] != "/" and "://" in request.raw_path[:10]:
            # Proxy (absolute-form) request: the URI's authority wins over Host.
            target = request.url
            host = (target.raw_host or "").lower()
            port = target.explicit_port
            authority = host if port is None else f"{host}:{port}"
            req_port = port or (443 if target.scheme == "https" else 80)
        else:
            authority = request.headers.get("Host", "")
            host, req_port = routing.split_authority(authority)
        path = request.rel_url.raw_path_qs or "/"
        source_ns, source_labels = self._source(request, rec)
        table = self.state.table("ingress" if self.role == INGRESS else "mesh")
        info = RequestInfo(
            method=request.method,
            path=path,
            headers=request.headers,
            host=host,
            port=req_port,
            gateways=table.gateways,
            source_namespace=source_ns,
            source_labels=source_labels,
        )
        decision = routing.decide(table, info, self.rand)
        if decision.destination is None:
            if decision.route is None:
                rec.response_flags = "NR"
                return local_reply(404)
            rec.response_flags = "NC"  # every weight is 0: no cluster to send to
            return local_reply(503)
        dest = decision.destination
        rec.destination_service = dest.host
        if dest.service is not None:
            rec.destination_service_namespace, rec.destination_service_name = dest.service
        up = self.state.upstream(dest, req_port, source_ns)
        if isinstance(up, str):
            no_service = dest.service is None or self.state.service(*dest.service) is None
            if decision.route is None and no_service:  # a name no VirtualService and no Service knows
                rec.destination_service = rec.destination_service_name = UNKNOWN
                rec.destination_service_namespace = UNKNOWN
                rec.response_flags = "NR"
                return local_reply(404)
            rec.response_flags = up
            return local_reply(503)
        cluster = up.key

        def endpoints() -> list[Endpoint]:
            return self.state.endpoints(*up.service, up.port_name, up.labels)

        if not endpoints():
            rec.response_flags = "UH"
            return local_reply(503, NO_HEALTHY_UPSTREAM)

        headers = self._upstream_headers(request, decision, authority)
        if decision.route is not None:
            path = routing.rewrite_path(path, decision.route, decision.match)
        timeout = decision.route.timeout if decision.route is not None else None
        if request.headers.get("Upgrade", "").lower() == "websocket":
            rec.request_protocol = "websocket"
            return await self._websocket(request, rec, decision, cluster, endpoints, headers, path, timeout)
        if request.headers.get("Expect", "").lower() == "100-continue" and request.version >= (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # we will read the body
        return await self._forward(request, rec, decision, cluster, endpoints, headers, path, timeout, t0)

    def _upstream_headers(self, request: web.BaseRequest, decision: Decision, authority: str) -> CIMultiDict[str]:
        conn_tokens = {t.strip().lower() for t in request.headers.get("Connection", "").split(",") if t.strip()}
        headers: CIMultiDict[str] = CIMultiDict()
        for k, v in request.headers.items():
            lk = k.lower()
            if lk in HOP_BY_HOP or lk in conn_tokens:
                continue
            headers.add(k, v)
        route = decision.route
        headers["Host"] = route.rewrite_authority if route is not None and route.rewrite_authority else authority
        if "x-request-id" not in headers:
            headers["x-request-id"] = str(uuid.uuid4())
        headers["x-forwarded-proto"] = request.headers.get("x-forwarded-proto", "http")
        if self.role == INGRESS and request.remote:
            prior = request.headers.get("x-forwarded-for")
            headers["x-forwarded-for"] = f"{prior}, {request.remote}" if prior else request.remote
        assert decision.destination is not None
        # Envoy applies the more specific (destination) edits first, the route's last.
        decision.destination.request_headers.apply(headers)
        if route is not None:
            route.request_headers.apply(headers)
        return headers

    def _choose(self, cluster: tuple[Any, ...], eps: list[Endpoint], tried: set[Endpoint]) -> Endpoint | None:
        fresh = [e for e in eps if e not in tried]
        if not fresh:
            return None
        return fresh[self.state.next_index(cluster) % len(fresh)]

    def _note_endpoint(self, rec: RequestRecord, ep: Endpoint) -> None:
        pod = self.state.pod(*ep.pod) if ep.pod else None
        if pod is None:
            return
        meta = pod.get("metadata") or {}
        rec.destination_workload = routing.workload_of(pod)
        rec.destination_workload_namespace = meta.get("namespace") or UNKNOWN
        rec.destination_version = (meta.get("labels") or {}).get("version") or UNKNOWN

    # ---- plain HTTP ------------------------------------------------------------------------------
    async def _forward(
        self,
        request: web.BaseRequest,
        rec: RequestRecord,
        decision: Decision,
        cluster: tuple[Any, ...],
        endpoints: Callable[[], list[Endpoint]],
        headers: CIMultiDict[str],
        path: str,
        timeout: float | None,
        t0: float,
    ) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        has_body = request.body_exists
        tried: set[Endpoint] = set()
        resp: web.StreamResponse | None = None
        deadline = None if timeout is None else t0 + timeout
        try:
            async with asyncio.timeout_at(deadline) as scope:
                attempt = 0
                while True:
                    ep = self._choose(cluster, endpoints(), tried)
                    if ep is None:
                        rec.response_flags = "UH" if not tried else "UF"
                        return local_reply(503, CONNECT_FAILURE if tried else NO_HEALTHY_UPSTREAM)
                    self._note_endpoint(rec, ep)
                    url = URL(f"http://{_hostport(ep)}{path}", encoded=True)
                    try:
                        upstream = await self.session.request(
                            request.method,
                            url,
                            headers=headers,
                            data=request.content if has_body else None,
                            allow_redirects=False,
                        )
                        break
                    except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
                        flags, body = "UF", CONNECT_FAILURE  # nothing was sent: safe to try another endpoint
                    except aiohttp.ServerDisconnectedError:
                        if has_body:
                            rec.response_flags = "UC"
                            return local_reply(503, CONNECTION_TERMINATION)
                        flags, body = "UC", CONNECTION_TERMINATION
                    tried.add(ep)
                    attempt += 1
                    if attempt > self.retries:
                        rec.response_flags = flags
                        return local_reply(503, body)
                    await asyncio.sleep(0.025)  # Istio's default retry back-off
                async with upstream:
                    resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                    conn_tokens = {
                        t.strip().lower() for t in upstream.headers.get("Connection", "").split(",") if t.strip()
                    }
                    for k, v in upstream.headers.items():
                        lk = k.lower()
                        if lk in HOP_BY_HOP or lk in conn_tokens:
                            continue
                        resp.headers.add(k, v)
                    if "server" not in resp.headers:
                        resp.headers["server"] = "envoy"
                    resp.headers["x-envoy-upstream-service-time"] = str(int((loop.time() - t0) * 1000))
                    assert decision.destination is not None
                    decision.destination.response_headers.apply(resp.headers)
                    if decision.route is not None:
                        decision.route.response_headers.apply(resp.headers)
                    await resp.prepare(request)
                    async for chunk in upstream.content.iter_any():
                        await resp.write(chunk)
                    await resp.write_eof()
                    return resp
        except TimeoutError:
            if scope.expired():
                rec.response_flags = "UT"
                if resp is None or not resp.prepared:
                    return local_reply(504, UPSTREAM_TIMEOUT)
                _abort(request)  # the response has started: like Envoy, reset the stream
                return resp
            raise
        except (aiohttp.ClientPayloadError, aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
            rec.response_flags = "UPE" if isinstance(exc, aiohttp.ClientPayloadError) else "UC"
            if resp is None or not resp.prepared:
                return local_reply(503, CONNECTION_TERMINATION)
            _abort(request)
            return resp
        except ConnectionResetError:  # writing to a client that went away
            rec.response_flags = "DC"
            return resp if resp is not None else local_reply(503, CONNECTION_TERMINATION)

    # ---- websockets ------------------------------------------------------------------------------
    async def _websocket(
        self,
        request: web.BaseRequest,
        rec: RequestRecord,
        decision: Decision,
        cluster: tuple[Any, ...],
        endpoints: Callable[[], list[Endpoint]],
        headers: CIMultiDict[str],
        path: str,
        timeout: float | None,
    ) -> web.StreamResponse:
        """Bridges a websocket frame by frame; the route timeout covers the handshake only."""
        protocols = tuple(p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip())
        for name in WS_HANDSHAKE | {"sec-websocket-protocol"}:
            headers.popall(name, None)
        tried: set[Endpoint] = set()
        upstream: aiohttp.ClientWebSocketResponse | None = None
        try:
            async with asyncio.timeout(timeout):
                for _ in range(self.retries + 1):
                    ep = self._choose(cluster, endpoints(), tried)
                    if ep is None:
                        break
                    self._note_endpoint(rec, ep)
                    try:
                        upstream = await self.session.ws_connect(
                            URL(f"http://{_hostport(ep)}{path}", encoded=True),
                            headers=headers,
                            protocols=protocols,
                            autoping=False,
                            autoclose=False,
                            max_msg_size=0,
                        )
                        break
                    except aiohttp.WSServerHandshakeError as exc:
                        return local_reply(exc.status or 502)
                    except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
                        tried.add(ep)
        except TimeoutError:
            rec.response_flags = "UT"
            return local_reply(504, UPSTREAM_TIMEOUT)
        if upstream is None:
            rec.response_flags = "UF"
            return local_reply(503, CONNECT_FAILURE)
        down = web.WebSocketResponse(
            protocols=(upstream.protocol,) if upstream.protocol else (),
            autoping=False,
            autoclose=False,
            max_msg_size=0,
        )
        for name, value in upstream._response.headers.items():
            if name.lower() not in HOP_BY_HOP and name.lower() not in WS_ANSWER:
                down.headers.add(name, value)
        await down.prepare(request)
        rec.response_code = 101

        async def pump(src: Any, dst: Any) -> None:
            async for msg in src:
                if msg.type == WSMsgType.TEXT:
                    await dst.send_str(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await dst.send_bytes(msg.data)
                elif msg.type == WSMsgType.PING:
                    await dst.ping(msg.data)
                elif msg.type == WSMsgType.PONG:
                    await dst.pong(msg.data)
                elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                    break
            with contextlib.suppress(Exception):
                await dst.close(code=src.close_code or 1000)

        async with upstream:
            tasks = [asyncio.create_task(pump(down, upstream)), asyncio.create_task(pump(upstream, down))]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await down.close()
        return down


def _hostport(ep: Endpoint) -> str:
    return f"[{ep.ip}]:{ep.port}" if ":" in ep.ip else f"{ep.ip}:{ep.port}"


def _abort(request: web.BaseRequest) -> None:
    transport = request.transport
    if transport is not None:
        transport.close()
