"""The HTTP app a simulated container serves on ``podIP:containerPort``.

It answers like a small httpbin and always says which pod answered, so tests can tell where a
request landed. ``/call?url=`` makes an east-west call through the mesh, from the pod's address.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web
from yarl import URL


@dataclasses.dataclass(frozen=True)
class PodIdentity:
    namespace: str
    name: str
    ip: str
    port: int
    container: str


def _ident(request: web.Request) -> PodIdentity:
    ident: PodIdentity = request.app["pod"]
    return ident


def _pod_headers(ident: PodIdentity) -> dict[str, str]:
    return {"x-pod-name": ident.name, "x-pod-namespace": ident.namespace, "x-pod-ip": ident.ip}


async def echo(request: web.Request) -> web.StreamResponse:
    ident = _ident(request)
    body = await request.read()
    doc: dict[str, Any] = {
        "pod": ident.name,
        "namespace": ident.namespace,
        "ip": ident.ip,
        "port": ident.port,
        "container": ident.container,
        "method": request.method,
        "path": request.path,
        "query": request.query_string,
        "headers": {k: v for k, v in request.headers.items()},
        "body_length": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
    }
    return web.json_response(doc, headers=_pod_headers(ident))


async def echo_body(request: web.Request) -> web.StreamResponse:
    """Streams the request body back as it arrives."""
    resp = web.StreamResponse(headers=_pod_headers(_ident(request)))
    resp.content_type = request.content_type or "application/octet-stream"
    await resp.prepare(request)
    async for chunk in request.content.iter_any():
        await resp.write(chunk)
    await resp.write_eof()
    return resp


async def status(request: web.Request) -> web.StreamResponse:
    """``/status/503``; ``?body=`` sets the text (an app relaying a dependency's "no healthy upstream")."""
    code = int(request.match_info["code"])
    text = request.query.get("body", f"status {code}\n")
    return web.Response(status=code, text=text, headers=_pod_headers(_ident(request)))


async def seen(request: web.Request) -> web.StreamResponse:
    """How many requests this container has received for ``?path=`` (exactly-once checks)."""
    path = request.query.get("path", "")
    return web.json_response({"path": path, "count": request.app["seen"].get(path, 0)})


async def delay(request: web.Request) -> web.StreamResponse:
    await asyncio.sleep(min(float(request.match_info["seconds"]), 120.0))
    return await echo(request)


async def drip(request: web.Request) -> web.StreamResponse:
    """``numbytes`` bytes over ``duration`` seconds, one byte-chunk at a time."""
    n = min(int(request.query.get("numbytes", "10")), 1_000_000)
    duration = min(float(request.query.get("duration", "2")), 60.0)
    resp = web.StreamResponse(headers=_pod_headers(_ident(request)))
    resp.content_type = "application/octet-stream"
    await resp.prepare(request)
    pause = duration / max(n, 1)
    for _ in range(n):
        await resp.write(b"*")
        await asyncio.sleep(pause)
    await resp.write_eof()
    return resp


async def stream(request: web.Request) -> web.StreamResponse:
    """``n`` JSON lines, flushed one by one with ``interval`` seconds between them."""
    n = min(int(request.match_info["n"]), 10_000)
    interval = min(float(request.query.get("interval", "0")), 10.0)
    ident = _ident(request)
    resp = web.StreamResponse(headers=_pod_headers(ident))
    resp.content_type = "application/x-ndjson"
    await resp.prepare(request)
    for i in range(n):
        await resp.write(json.dumps({"id": i, "pod": ident.name}).encode() + b"\n")
        if interval:
            await asyncio.sleep(interval)
    await resp.write_eof()
    return resp


async def bytes_(request: web.Request) -> web.StreamResponse:
    n = min(int(request.match_info["n"]), 1 << 30)
    resp = web.StreamResponse(headers=_pod_headers(_ident(request)))
    resp.content_type = "application/octet-stream"
    resp.content_length = n
    await resp.prepare(request)
    block = b"x" * 65536
    left = n
    while left > 0:
        await resp.write(block[: min(left, len(block))])
        left -= min(left, len(block))
    await resp.write_eof()
    return resp


async def headers(request: web.Request) -> web.StreamResponse:
    return web.json_response(
        {"headers": dict(request.headers), "pod": _ident(request).name}, headers=_pod_headers(_ident(request))
    )


async def redirect(request: web.Request) -> web.StreamResponse:
    n = int(request.match_info["n"])
    location = "/get" if n <= 1 else f"/redirect/{n - 1}"
    raise web.HTTPFound(location, headers=_pod_headers(_ident(request)))


async def websocket(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse()
    ws.headers.update(_pod_headers(_ident(request)))
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


class Caller:
    """Calls other services through the pod's Istio sidecar.

    The sidecar does not capture traffic: it listens on its own address at each service port (an
    Istio ``Sidecar`` with ``captureMode: NONE``), so ``http://reviews:9080/x`` is sent to
    ``<sidecar>:9080`` in absolute-URI form and Envoy routes it by the service name.
    """

    def __init__(self, ident: PodIdentity, sidecar: str | None, timeout: float) -> None:
        self.ident = ident
        self.sidecar = sidecar
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, use_dns_cache=False),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """``(status, headers, body)``; status 0 when the call failed before any answer."""
        if self.sidecar is None:
            return 0, {}, b"no sidecar (sidecar.istio.io/inject): service names do not resolve"
        try:
            port = URL(url).port or 80
            async with self.session.request(
                method,
                url,
                headers=dict(headers),
                data=body,
                proxy=f"http://{self.sidecar}:{port}",
                allow_redirects=False,
            ) as resp:
                return resp.status, dict(resp.headers), await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            return 0, {}, f"{type(exc).__name__}: {exc}".encode()

    async def get_json(self, url: str, headers: Mapping[str, str]) -> tuple[int, Any]:
        """``(status, json)``; status 0 when the call failed before any answer."""
        status, _headers, body = await self.call("GET", url, headers)
        try:
            return status, json.loads(body) if status and body else None
        except ValueError:
            return status, None


async def call(request: web.Request) -> web.StreamResponse:
    """East-west call through the mesh: ``/call?url=http://svc:port/path`` (method and body are passed on)."""
    caller: Caller | None = request.app.get("caller")
    url = request.query.get("url")
    if caller is None or not url:
        return web.json_response({"error": "usage: /call?url=http://service:port/path"}, status=400)
    fwd = {k: v for k, v in request.headers.items() if k.lower().startswith("x-") or k.lower() == "end-user"}
    body = await request.read() if request.can_read_body else None
    status, headers, data = await caller.call(request.method, url, fwd, body)
    return web.json_response(
        {"status": status, "headers": headers, "body": data.decode(errors="replace")},
        headers=_pod_headers(_ident(request)),
    )


@web.middleware
async def track_inflight(request: web.Request, handler: Any) -> web.StreamResponse:
    """Counts requests in flight so that a terminating pod can let them finish, and every request by path."""
    counts = request.app.get("seen")
    if counts is not None:
        counts[request.path] = counts.get(request.path, 0) + 1
    request.app["inflight"][0] += 1
    try:
        return await handler(request)
    finally:
        request.app["inflight"][0] -= 1


def inflight(app: web.Application) -> int:
    return int(app["inflight"][0])


def generic_app(ident: PodIdentity, caller: Caller | None = None) -> web.Application:
    app = web.Application(client_max_size=1 << 31, middlewares=[track_inflight])
    app["pod"] = ident
    app["inflight"] = [0]
    app["seen"] = {}
    if caller is not None:
        app["caller"] = caller
        app.on_cleanup.append(lambda _app: caller.close())
    r = app.router
    r.add_get("/seen", seen)
    r.add_route("*", "/call", call)
    r.add_route("*", "/status/{code:\\d{3}}", status)
    r.add_route("*", "/delay/{seconds:[0-9.]+}", delay)
    r.add_get("/drip", drip)
    r.add_get("/stream/{n:\\d+}", stream)
    r.add_get("/bytes/{n:\\d+}", bytes_)
    r.add_get("/headers", headers)
    r.add_get("/redirect/{n:\\d+}", redirect)
    r.add_get("/ws", websocket)
    r.add_route("*", "/echo", echo_body)
    r.add_route("*", "/{tail:.*}", echo)
    return app
