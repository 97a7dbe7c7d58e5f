"""Forwarding to the origin Service: header rewriting, request bodies, streamed responses, websockets.

``Host`` becomes the origin's authority (a request that kept ``Host: details`` would be routed by
the sidecar back to the activator), the client's Host moves to ``X-Forwarded-Host``. In a mesh the
connection always reaches the local sidecar; when the origin has no ready endpoint the sidecar
answers by itself with 503 ``no healthy upstream``, which :func:`mesh_not_ready` recognises as
"not ready yet, nothing was sent to the workload".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from activator.body import RequestBody
from activator.headerpolicy import (
    REQUEST_DROP,
    REQUEST_DROP_KEEPING_TRAILERS,
    RESPONSE_DROP,
    RESPONSE_DROP_KEEPING_TRAILERS,
    UPSTREAM_TIME,
    connection_tokens,
    te_trailers_only,
)
from activator.registry import Target
from activator.trailers import end_chunked, forwardable
from activator.upstream import Response as FastResponse
from activator.upstream import UpstreamClient

log = logging.getLogger(__name__)

COLD_START_HEADER = "X-Elasti-Cold-Start"
_WS_DROP = frozenset(
    ("sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol", "origin")
)
# The sidecar's own replies when no upstream was reached: no ready endpoint, or the connect failed.
MESH_REPLY_MAX = 512
# Response bodies up to this size (with a Content-Length) are read whole and sent with the headers.
_SMALL_BODY = 64 * 1024


class UpstreamError(Exception):
    """No response from upstream (connection refused, reset, malformed): answered 502."""


def mesh_not_ready(status: int, body: bytes, headers: Iterable[str] | None = None) -> bool:
    """Envoy's local reply for "no ready endpoint" or "could not connect": safe to send again.

    Only Envoy's own reply: an answer that came from an upstream carries ``x-envoy-upstream-service-time``
    (a workload may relay a dependency's "no healthy upstream" itself) and is never taken for the mesh.
    ``headers``: the answer's header names (a mapping of them will do).
    """
    if status != 503 or (headers is not None and UPSTREAM_TIME in {k.lower() for k in headers}):
        return False
    return body.startswith(b"no healthy upstream") or (
        body.startswith(b"upstream connect error") and b"connection failure" in body
    )


def upstream_headers(request: web.BaseRequest, target: Target, drop: frozenset[str] = REQUEST_DROP) -> CIMultiDict[str]:
    """The client's headers minus hop-by-hop ones, with Host and X-Forwarded-* set for the origin."""
    h = request.headers
    extra = connection_tokens(h.get("Connection"))
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in h.items():
        lk = k.lower()
        if lk in drop or lk in extra:
            continue
        out.add(k, v)
    remote = request.remote or ""
    xff = h.get("X-Forwarded-For")
    out["X-Forwarded-For"] = f"{xff}, {remote}" if xff else remote
    if "X-Forwarded-Proto" not in out:
        out["X-Forwarded-Proto"] = request.scheme
    if "X-Forwarded-Host" not in out and "Host" in h:
        out["X-Forwarded-Host"] = h["Host"]
    out["Host"] = target.authority or ""
    return out


def response_headers(headers: CIMultiDictProxy[str], drop: frozenset[str] = RESPONSE_DROP) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    extra = connection_tokens(headers.get("Connection"))
    for k, v in headers.items():
        lk = k.lower()
        if lk not in drop and lk not in extra:
            out.add(k, v)
    return out


def upstream_url(request: web.BaseRequest, target: Target) -> URL:
    path = request.raw_path
    if not path.startswith("/"):  # absolute-form request target
        path = request.rel_url.raw_path_qs
    return URL(f"{target.base_url}{path}", encoded=True)


class _Complete(web.StreamResponse):
    """A response whose whole body is in hand: its headers wait for the body and leave in the same write."""

    _send_headers_immediately = False  # read by aiohttp >= 3.12; older releases send headers first


@dataclass(slots=True)
class Upstream:
    """An upstream response whose body is still to be streamed (``prefetched`` when it was read to classify it)."""

    response: aiohttp.ClientResponse | FastResponse
    prefetched: bytes | None = None


class Forwarder:
    """Sends requests to origins: through ``fast`` when their body is in memory (or absent), else through
    aiohttp's client (bodies streamed through, websockets)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        proxy: str | None,
        cold_start_header: bool,
        fast: UpstreamClient | None = None,
        *,
        sidecar: str | None = None,
        websocket_max_message: int = 4 * 1024 * 1024,
        http1_trailers: bool = False,
    ) -> None:
        self.session = session
        self.http1_trailers = http1_trailers
        self.websocket_max_message = websocket_max_message
        self.proxy = proxy
        self.sidecar = sidecar
        self.cold_start_header = cold_start_header
        self.fast = fast

    def proxy_for(self, target: Target) -> str | None:
        """The forward proxy for this origin: the sidecar's listener at the origin's port, or the one proxy."""
        if self.sidecar is not None and target.authority:
            return f"http://{self.sidecar}:{target.authority.rpartition(':')[2]}"
        return self.proxy

    async def send(self, request: web.BaseRequest, target: Target, body: RequestBody) -> Upstream | None:
        """Sends the request once; None when the mesh says the origin is not ready (nothing reached it).

        Raises :class:`BodyError` when the request body failed while it was being sent.
        """
        try:
            payload = body.payload()
            in_memory = payload is None or isinstance(payload, bytes)
            if self.fast is not None and request.method != "CONNECT" and target.authority:
                trailers = None
                if self.http1_trailers:
                    headers = upstream_headers(request, target, REQUEST_DROP_KEEPING_TRAILERS)
                    te_trailers_only(headers)
                    named = connection_tokens(request.headers.get("Connection"))
                    trailers = lambda: forwardable(body.trailers(), named)  # noqa: E731
                else:
                    headers = upstream_headers(request, target)
                if payload is not None:
                    headers.popall("Content-Length", None)  # set from the body by the client
                path = request.raw_path
                if not path.startswith("/"):  # absolute-form request target
                    path = request.rel_url.raw_path_qs
                resp: aiohttp.ClientResponse | FastResponse = await self.fast.request(
                    request.method,
                    target.authority,
                    path,
                    [f"{k}: {v}" for k, v in headers.items()],
                    payload,
                    None if in_memory else request.content_length,
                    trailers,
                )
            else:
                resp = await self.session.request(
                    request.method,
                    upstream_url(request, target),
                    headers=upstream_headers(request, target),
                    data=payload,
                    allow_redirects=False,
                    proxy=self.proxy_for(target),
                )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            if body.failure is not None:
                raise body.failure from exc
            raise UpstreamError(str(exc) or type(exc).__name__) from exc
        if resp.status != 503:
            return Upstream(resp)
        length = resp.content_length
        if length is not None and length > MESH_REPLY_MAX:
            return Upstream(resp)
        try:
            data = await resp.content.read(MESH_REPLY_MAX + 1) if length is None else await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            resp.release()
            raise UpstreamError(str(exc) or type(exc).__name__) from exc
        if length is None and not resp.content.at_eof():
            return Upstream(resp, data)  # longer than any mesh reply: the workload's own 503
        if mesh_not_ready(resp.status, data, resp.headers):
            resp.release()
            return None
        return Upstream(resp, data)

    async def relay(self, request: web.BaseRequest, up: Upstream, cold: bool) -> web.StreamResponse:
        """Streams the upstream response to the client chunk by chunk, status and headers untouched.

        A small body with a Content-Length is read whole first and leaves with the headers in one write.
        """
        resp = up.response
        try:
            length = resp.content_length
            small = (
                length is not None
                and length <= _SMALL_BODY
                and (up.prefetched is None or resp.content.at_eof())
                and request.method != "HEAD"
                and resp.status >= 200
                and resp.status not in (204, 304)
            )
            drop = RESPONSE_DROP_KEEPING_TRAILERS if self.http1_trailers else RESPONSE_DROP
            out = (_Complete if small else web.StreamResponse)(
                status=resp.status, reason=resp.reason, headers=response_headers(resp.headers, drop)
            )
            if cold and self.cold_start_header:
                out.headers[COLD_START_HEADER] = "true"
            if small:
                try:
                    data = up.prefetched if up.prefetched is not None else await resp.read()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    log.debug("upstream broke off mid-response: %s", exc)
                    if request.transport is not None:
                        request.transport.abort()
                    return out
                await out.prepare(request)
                await out.write_eof(data)
                return out
            await out.prepare(request)
            try:
                if up.prefetched:
                    await out.write(up.prefetched)
                if up.prefetched is None or not resp.content.at_eof():
                    async for chunk in resp.content.iter_any():
                        await out.write(chunk)
            except (aiohttp.ClientError, TimeoutError) as exc:
                # Headers are out: the only honest signal of a truncated body is a dropped connection.
                log.debug("upstream broke off mid-response: %s", exc)
                if request.transport is not None:
                    request.transport.abort()
                return out
            if self.http1_trailers and isinstance(resp, FastResponse) and resp.trailers:
                named = connection_tokens(resp.headers.get("Connection"))
                await end_chunked(request, forwardable(resp.trailers, named))
            await out.write_eof()
            return out
        finally:
            resp.release()

    async def connect_websocket(
        self, request: web.BaseRequest, target: Target
    ) -> aiohttp.ClientWebSocketResponse | web.Response | None:
        """Opens the upstream websocket: None when the mesh says the origin is not ready, a Response
        when the upstream refused the handshake (its status, passed on)."""
        protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        try:
            return await self.session.ws_connect(
                upstream_url(request, target),
                headers=upstream_headers(request, target, REQUEST_DROP | _WS_DROP),
                protocols=protocols,
                origin=request.headers.get("Origin"),
                proxy=self.proxy_for(target),
                max_msg_size=self.websocket_max_message,
            )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 503 and _looks_like_mesh_reply(exc.headers):
                return None
            return web.json_response(
                {"error": "websocket handshake refused by upstream", "detail": f"{exc.status} {exc.message}"},
                status=exc.status if exc.status >= 200 else 502,
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise UpstreamError(str(exc) or type(exc).__name__) from exc

    async def relay_websocket(
        self, request: web.BaseRequest, upstream: aiohttp.ClientWebSocketResponse, cold: bool
    ) -> web.StreamResponse:
        """Relays messages both ways until one side closes, then closes the other with the same code."""
        try:
            ws = web.WebSocketResponse(
                protocols=[upstream.protocol] if upstream.protocol else (), max_msg_size=self.websocket_max_message
            )
            if cold and self.cold_start_header:
                ws.headers[COLD_START_HEADER] = "true"
            await ws.prepare(request)
            to_up = asyncio.create_task(_pump(ws, upstream))
            to_client = asyncio.create_task(_pump(upstream, ws))
            try:
                done, _ = await asyncio.wait((to_up, to_client), return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in (to_up, to_client):
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await t
            if to_up in done:  # the client closed first
                await upstream.close(code=ws.close_code or aiohttp.WSCloseCode.OK)
            else:
                await ws.close(code=upstream.close_code or aiohttp.WSCloseCode.OK)
            return ws
        finally:
            await upstream.close()


def _looks_like_mesh_reply(headers: object) -> bool:
    """A websocket handshake refusal has no readable body: Envoy's local reply is short and text/plain."""
    get = getattr(headers, "get", None)
    if get is None:
        return True
    if get(UPSTREAM_TIME) is not None:  # came from an upstream: the workload refused the handshake
        return False
    ctype = (get("Content-Type") or "").lower()
    length = get("Content-Length")
    return ctype.startswith("text/plain") and (length is None or (length.isdigit() and int(length) <= MESH_REPLY_MAX))


async def _pump(src: web.WebSocketResponse | aiohttp.ClientWebSocketResponse, dst: object) -> None:
    async for msg in src:
        if msg.type == WSMsgType.TEXT:
            await dst.send_str(msg.data)  # type: ignore[attr-defined]
        elif msg.type == WSMsgType.BINARY:
            await dst.send_bytes(msg.data)  # type: ignore[attr-defined]
        elif msg.type == WSMsgType.ERROR:
            break
