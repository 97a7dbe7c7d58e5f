"""Stand-ins for tests and local experiments: the mesh's sidecar as an HTTP forward proxy, and the
controller's wake endpoint. Both listen on 127.0.0.1 on a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

NO_HEALTHY_UPSTREAM = b"no healthy upstream"
_HOP = frozenset(("connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"))


async def sidecar_activator(registry: Any, controller_url: str, **cfg: Any) -> Any:
    """A started activator on loopback whose upstream requests go to 127.0.0.1 at the origin's port (as to
    its sidecar's listener there); ``cfg``: more of its :class:`~activator.config.Config`."""
    from activator.app import Activator
    from activator.config import Config

    base: dict[str, Any] = dict(
        listen=("127.0.0.1", 0),
        admin_listen=("127.0.0.1", 0),
        controller_url=controller_url,
        sidecar_address="127.0.0.1",
    )
    activator = Activator(Config(**{**base, **cfg}), registry)
    await activator.start()
    return activator


async def until(cond: Callable[[], bool], timeout: float = 20, what: str = "condition") -> None:
    """Polls ``cond`` until it holds; fails after ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            while not cond():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"{what} not reached within {timeout:g}s") from None


async def serve(
    handler: web.Application | Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
) -> tuple[web.BaseRunner, int]:
    """Starts ``handler`` (an Application or a low-level handler) on 127.0.0.1; returns the runner and port."""
    if isinstance(handler, web.Application):
        runner: web.BaseRunner = web.AppRunner(handler, access_log=None, shutdown_timeout=0.5)
    else:
        runner = web.ServerRunner(web.Server(handler, access_log=None), shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, int(runner.addresses[0][1])


class MeshProxy:
    """An HTTP forward proxy standing in for the activator's sidecar.

    Requests arrive in absolute-URI form; ``routes`` maps an authority (``host:port``) to a local
    backend URL. While an authority is not in ``ready`` the proxy answers like Envoy does without a
    healthy endpoint: 503, ``server: envoy``, body ``no healthy upstream``. Websocket upgrades are
    relayed message by message.
    """

    def __init__(self) -> None:
        self.routes: dict[str, str] = {}
        self.ready: set[str] = set()
        self.seen: list[tuple[str, str, CIMultiDict[str]]] = []  # (method, request target, headers)
        self.not_ready_answers = 0
        self.peers: set[tuple[str, int]] = set()
        self.port = 0
        self._runner: web.BaseRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    def route(self, authority: str, backend: str, ready: bool = True) -> None:
        self.routes[authority] = backend.rstrip("/")
        if ready:
            self.ready.add(authority)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> MeshProxy:
        self._session = aiohttp.ClientSession(auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())
        self._runner, self.port = await serve(self.handle)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer:
            self.peers.add(tuple(peer[:2]))
        self.seen.append((request.method, request.raw_path, CIMultiDict(request.headers)))
        target = URL(request.raw_path)
        if not target.is_absolute():
            return web.Response(status=400, text="a forward proxy needs an absolute-form request target")
        authority = f"{target.host}:{target.port}"
        backend = self.routes.get(authority)
        if backend is None or authority not in self.ready:
            self.not_ready_answers += 1
            async for _ in request.content.iter_any():  # drained, of any size, as Envoy does
                pass
            return web.Response(
                status=503, body=NO_HEALTHY_UPSTREAM, headers={"server": "envoy", "content-type": "text/plain"}
            )
        url = URL(backend + target.raw_path_qs, encoded=True)
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in _HOP)
        assert self._session is not None
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._websocket(request, url, headers)
        async with self._session.request(
            request.method,
            url,
            headers=headers,
            data=request.content if request.body_exists else None,
            allow_redirects=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        ) as up:
            out = web.StreamResponse(status=up.status, reason=up.reason)
            for k, v in up.headers.items():
                if k.lower() not in _HOP:
                    out.headers.add(k, v)
            await out.prepare(request)
            async for chunk in up.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    async def _websocket(self, request: web.BaseRequest, url: URL, headers: CIMultiDict[str]) -> web.StreamResponse:
        assert self._session is not None
        for h in ("Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions", "Sec-WebSocket-Protocol"):
            headers.popall(h, None)
        protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        async with self._session.ws_connect(url, headers=headers, protocols=protocols, max_msg_size=0) as up:
            ws = web.WebSocketResponse(protocols=[up.protocol] if up.protocol else (), max_msg_size=0)
            await ws.prepare(request)

            async def pump(src: Any, dst: Any) -> None:
                async for msg in src:
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        await dst.send_str(msg.data)
                    elif msg.type == aiohttp.WSMsgType.BINARY:
                        await dst.send_bytes(msg.data)

            tasks = [asyncio.create_task(pump(ws, up)), asyncio.create_task(pump(up, ws))]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in tasks:
                t.cancel()
                with contextlib.suppress(BaseException):
                    await t
            if tasks[0] in done:
                await up.close(code=ws.close_code or 1000)
            else:
                await ws.close(code=up.close_code or 1000)
            return ws


class WakeEndpoint:
    """The controller's ``POST /v1/wake``: records each call and answers 202 (or ``fail_first`` times 503,
    or ``refuse = (status, body)``)."""

    def __init__(self, known: set[tuple[str, str]] | None = None, fail_first: int = 0) -> None:
        self.calls: list[dict[str, Any]] = []
        self.known = known
        self.fail_first = fail_first
        self.refuse: tuple[int, dict[str, Any]] | None = None
        self.on_wake: Callable[[str, str], Any] | None = None
        self.answer_ready = False  # answer as a controller that saw a ready replica while the call waited
        self.port = 0
        self._runner: web.BaseRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def count(self, namespace: str, name: str) -> int:
        return sum(1 for c in self.calls if c.get("namespace") == namespace and c.get("name") == name)

    async def start(self) -> WakeEndpoint:
        app = web.Application()
        app.router.add_post("/v1/wake", self._wake)
        self._runner, self.port = await serve(app)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _wake(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "malformed"}, status=400)
        if not isinstance(body, dict) or not body.get("namespace") or not body.get("name"):
            return web.json_response({"error": "malformed"}, status=400)
        self.calls.append(body)
        if self.fail_first > 0:
            self.fail_first -= 1
            return web.json_response({"error": "try again"}, status=503)
        if self.refuse is not None:
            return web.json_response(self.refuse[1], status=self.refuse[0])
        key = (body["namespace"], body["name"])
        if self.known is not None and key not in self.known:
            return web.json_response({"error": "unknown"}, status=404)
        if self.on_wake is not None:
            result = self.on_wake(*key)
            if asyncio.iscoroutine(result):
                await result
        if self.answer_ready:
            answer = {"phase": "Serving", "ready": True, "readyReplicas": 1}
        else:
            answer = {"phase": "ScalingUp", "ready": False}
        return web.json_response({"namespace": key[0], "name": key[1], **answer}, status=202)


def elastiservice(
    namespace: str,
    name: str,
    *,
    ready: bool = False,
    origin: tuple[str, int] | None = None,
    hold_timeout: str = "60s",
    retry_interval: str = "100ms",
    queue_limit: int = 1000,
    wake_failed: tuple[str, str, str] | None = None,
    resource_version: str = "1",
    static_responses: list[dict[str, Any]] | None = None,
    ports: list[int] | None = None,
) -> dict[str, Any]:
    """An ElastiService object as the API server would return it (``wake_failed``: reason, message, since)."""
    status: dict[str, Any] = {"readyReplicas": 1 if ready else 0}
    if origin is not None:
        status["origin"] = {"service": origin[0], "port": origin[1]}
        if ports is not None:
            status["origin"]["ports"] = ports
    if wake_failed is not None:
        reason, message, since = wake_failed
        status["conditions"] = [
            {"type": "WakeFailed", "status": "True", "reason": reason, "message": message, "lastTransitionTime": since}
        ]
    return {
        "apiVersion": "elasti.truefoundry.com/v1alpha1",
        "kind": "ElastiService",
        "metadata": {"namespace": namespace, "name": name, "resourceVersion": resource_version},
        "spec": {
            "service": name,
            "scaleTargetRef": {"kind": "Deployment", "name": name},
            "activator": {
                "holdTimeout": hold_timeout,
                "retryInterval": retry_interval,
                "queueLimit": queue_limit,
                **({"staticResponses": static_responses} if static_responses is not None else {}),
            },
        },
        "status": status,
    }
