"""HTTP/2 requests (gRPC calls among them) through the hold loop, forwarded to the origin over h2c.

Everything the client sent reaches the origin as sent: headers, each DATA frame's bytes, trailers;
and back: headers, data, trailers (``grpc-status`` lives there). A held call is not read while it
waits, so its client is held back by flow control; once forwarded, what it sent is kept (up to
``--retry-body-limit``) until the origin answers, so that a forward the mesh answers "no healthy
upstream" (nothing reached the workload) can be sent again. ``grpc-timeout`` bounds the hold and is
passed on reduced by the time held. Refusals to a gRPC call are gRPC answers (``grpcwire``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass

import h2.errors

from activator import grpcwire
from activator.body import BodyError
from activator.forward import COLD_START_HEADER, MESH_REPLY_MAX, UpstreamError, mesh_not_ready
from activator.h2client import H2Pool
from activator.h2conn import Headers, Stream, StreamGone
from activator.h2server import H2Request
from activator.headerpolicy import H2_REQUEST_DROP, H2_RESPONSE_DROP, connection_tokens, h2_request_keeps
from activator.registry import Target
from activator.server import Proxy, Refusal
from activator.static import first_match

log = logging.getLogger(__name__)

DEADLINE_MARGIN = 0.1  # seconds before a call's deadline that a hold gives up (a tenth of its timeout at most)


@dataclass(slots=True)
class H2Upstream:
    stream: Stream
    headers: Headers
    prefetched: bytes = b""


class H2Forwarder:
    """Where an origin's HTTP/2 connections go (the sidecar at the origin's port, a forward proxy, or the
    origin itself) and the pool that keeps them."""

    def __init__(self, pool: H2Pool, proxy: str | None, sidecar: str | None, cold_start_header: bool) -> None:
        self.pool = pool
        self.proxy = proxy
        self.sidecar = sidecar
        self.cold_start_header = cold_start_header

    def where(self, target: Target) -> tuple[str, int]:
        assert target.authority is not None
        host, _, port = target.authority.rpartition(":")
        if self.sidecar is not None:
            return self.sidecar, int(port)
        if self.proxy is not None:
            rest = self.proxy.split("://", 1)[-1].rstrip("/")
            phost, _, pport = rest.rpartition(":")
            return phost.strip("[]"), int(pport or 80)
        return host.strip("[]"), int(port)


def forward_headers(req: H2Request, target: Target, timeout_left: float | None) -> Headers:
    """Pseudo-headers for the origin, the client's headers as they came (minus connection-specific ones),
    X-Forwarded-*, and ``grpc-timeout`` reduced by the time the call was held."""
    out: Headers = [
        (b":method", req.method.encode("latin-1")),
        (b":scheme", b"http"),
        (b":authority", (target.authority or "").encode()),
        (b":path", req.path.encode("latin-1")),
    ]
    conn = req.header(b"connection")
    named = connection_tokens(conn.decode("latin-1") if conn else None)
    xff = xfh = xfp = None
    for name, value in req.raw:
        if not h2_request_keeps(name, value, named):
            continue
        if name == b"grpc-timeout" and timeout_left is not None:
            continue
        if name == b"x-forwarded-for":
            xff = value
            continue
        if name == b"x-forwarded-host":
            xfh = value
        elif name == b"x-forwarded-proto":
            xfp = value
        out.append((name, value))
    remote = req.remote.encode()
    out.append((b"x-forwarded-for", xff + b", " + remote if xff else remote))
    if xfp is None:
        out.append((b"x-forwarded-proto", (req.scheme or "http").encode()))
    if xfh is None and req.authority:
        out.append((b"x-forwarded-host", req.authority.encode("latin-1")))
    if timeout_left is not None:
        out.append((b"grpc-timeout", f"{max(1, int(timeout_left * 1e6))}u".encode()))
    return out


def response_headers(headers: Headers, cold: bool) -> Headers:
    out = [(k, v) for k, v in headers if k not in H2_RESPONSE_DROP]
    if cold:
        out.append((COLD_START_HEADER.lower().encode(), b"true"))
    return out


class H2Exchange:
    """One HTTP/2 request in the hold loop (see ``server.Exchange``)."""

    __slots__ = (
        "_kept",
        "_kept_size",
        "_pump",
        "_retryable",
        "_up",
        "deadline",
        "expires",
        "fwd",
        "grpc",
        "loop",
        "max_body",
        "req",
        "retry_limit",
    )

    def __init__(self, req: H2Request, fwd: H2Forwarder, retry_limit: int, max_body: int) -> None:
        self.req = req
        self.fwd = fwd
        self.retry_limit = retry_limit
        self.max_body = max_body
        self.loop = asyncio.get_running_loop()
        self.grpc = grpcwire.is_grpc(req.header(b"content-type"))
        timeout = grpcwire.timeout_seconds(req.header(b"grpc-timeout")) if self.grpc else None
        self.expires = self.loop.time() + timeout if timeout is not None else None
        # The hold answers a little before the deadline: Istio has every Envoy on the way time the call
        # out at its grpc-timeout too (UNAVAILABLE "upstream request timeout"), so an answer at the
        # deadline itself would lose the race and the client would not learn DEADLINE_EXCEEDED.
        self.deadline = None if timeout is None else self.expires - min(DEADLINE_MARGIN, timeout * 0.1)
        self._kept: list[bytes] = []  # what was read from the client, for another try
        self._kept_size = 0
        self._retryable = True
        self._pump: asyncio.Task[None] | None = None
        self._up: Stream | None = None

    @property
    def retryable(self) -> bool:
        return self._retryable

    async def send(self, target: Target, was_held: bool) -> H2Upstream | None:
        self._drop_upstream()
        left = None if self.expires is None else self.expires - self.loop.time()
        headers = forward_headers(self.req, target, left)
        done = self.req.stream.ended and not self._kept and self.req.stream.trailers is None
        host, port = self.fwd.where(target)
        try:
            up = await self.fwd.pool.open(host, port, headers, end=done)
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(str(exc) or type(exc).__name__) from exc
        self._up = up
        if not done:
            self._pump = self.loop.create_task(self._send_body(up))
            self._pump.add_done_callback(_retrieved)
        try:
            answer = await up.response
        except StreamGone as exc:
            if exc.code == h2.errors.ErrorCodes.REFUSED_STREAM:
                return None  # the peer processed nothing: as good as "not ready"
            raise UpstreamError(f"the upstream reset the stream ({exc})") from exc
        if self._pump is not None and self._pump.done() and not self._pump.cancelled():
            failure = self._pump.exception()
            if isinstance(failure, BodyError):
                raise failure
        status = _status(answer)
        if self.grpc and up.ended and grpcwire.mesh_not_ready(answer):
            self._drop_upstream()
            return None
        if status == 503 and not self.grpc:
            data = b""
            with contextlib.suppress(StreamGone):
                while len(data) <= MESH_REPLY_MAX:
                    chunk = await up.read()
                    if chunk is None:
                        break
                    data += chunk
            if up.ended and mesh_not_ready(503, data, (k.decode("latin-1") for k, _ in answer)):
                self._drop_upstream()
                return None
            return H2Upstream(up, answer, data)
        return H2Upstream(up, answer)

    async def _send_body(self, up: Stream) -> None:
        """Replays what was kept, then passes on what the client still sends, then its trailers."""
        req = self.req.stream
        try:
            for chunk in self._kept:
                await up.send_data(chunk)
            while True:
                chunk = await req.read()
                if chunk is None:
                    break
                self._keep(chunk)
                await up.send_data(chunk)
            if req.trailers is not None:
                await up.send_headers([(k, v) for k, v in req.trailers if k not in H2_REQUEST_DROP], end=True)
            else:
                await up.send_data(b"", end=True)
        except StreamGone as exc:
            if req.gone is not None:  # the client went: so does the call upstream
                up.reset(h2.errors.ErrorCodes.CANCEL)
            raise exc from None
        except BodyError:
            up.reset(h2.errors.ErrorCodes.CANCEL)
            raise

    def _keep(self, chunk: bytes) -> None:
        self._kept_size += len(chunk)
        if self.max_body and self._kept_size > self.max_body:
            raise BodyError(
                413,
                "request body too large",
                f"the request body is larger than {self.max_body} bytes (--max-body-size)",
            )
        if self._retryable:
            if self._kept_size > self.retry_limit:
                self._retryable = False  # too large to keep: this try is the only one
                self._kept.clear()
            else:
                self._kept.append(chunk)

    def _drop_upstream(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            self._pump = None
        if self._up is not None:
            self._up.reset(h2.errors.ErrorCodes.CANCEL)
            self._up = None

    async def relay(self, up: H2Upstream, was_held: bool) -> None:
        req = self.req
        # Headers alone only when nothing else came: a body already read, or trailers that arrived
        # before this (a gRPC status after initial metadata), still follow.
        alone = up.stream.ended and up.stream.trailers is None and not up.prefetched
        await req.respond(response_headers(up.headers, was_held and self.fwd.cold_start_header), end=alone)
        if alone:
            self._finish()
            return
        try:
            if up.prefetched:
                await req.stream.send_data(up.prefetched)
            while True:
                chunk = await up.stream.read()
                if chunk is None:
                    break
                await req.stream.send_data(chunk)
            if up.stream.trailers is not None:
                await req.stream.send_headers(response_headers(up.stream.trailers, False), end=True)
            else:
                await req.stream.send_data(b"", end=True)
        except StreamGone:
            if up.stream.gone is not None:  # the upstream broke off: so does the answer
                req.stream.reset(up.stream.gone.code)
            raise
        self._finish()

    def _finish(self) -> None:
        """The answer is complete: the request's stream upstream is done with. If the request was still
        being sent (the origin answered before the client finished), the stream is reset: left half
        open, it would hold one of the connection's concurrent streams for good."""
        sending = self._pump is not None and not self._pump.done()
        if self._pump is not None:
            self._pump.cancel()
        self._pump = None
        if self._up is not None:
            if sending:
                self._up.reset(h2.errors.ErrorCodes.CANCEL)
            else:
                self._up._conn.forget(self._up.id)
            self._up = None

    async def refuse(self, refusal: Refusal) -> None:
        self._drop_upstream()
        await send_refusal(self.req, refusal, self.grpc)

    def close(self) -> None:
        self._drop_upstream()
        self._kept.clear()


async def send_refusal(req: H2Request, refusal: Refusal, grpc: bool) -> None:
    if req.started:
        req.stream.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
        return
    if grpc:
        await req.respond(grpcwire.refusal(refusal.status, refusal.error, refusal.detail, refusal.retry_after), True)
        return
    body = json.dumps({"error": refusal.error, "detail": refusal.detail}).encode()
    headers = [
        (b":status", str(refusal.status).encode()),
        (b"content-type", b"application/json; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
    ]
    if refusal.retry_after:
        headers.append((b"retry-after", b"1"))
    await req.respond(headers)
    await req.stream.send_data(body, end=True)


def _retrieved(task: asyncio.Task[None]) -> None:
    """A request body's failure shows in the answer (a reset or a refusal), not as an unretrieved task."""
    if not task.cancelled():
        task.exception()


def _status(headers: Headers) -> int:
    for name, value in headers:
        if name == b":status":
            return int(value)
    return 0


class H2Front:
    """The HTTP/2 face of the proxy: the same checks and hold loop as HTTP/1.1, answers in the call's form."""

    def __init__(self, proxy: Proxy, forwarder: H2Forwarder) -> None:
        self.proxy = proxy
        self.forwarder = forwarder

    async def handle(self, req: H2Request) -> None:
        proxy = self.proxy
        proxy.metrics.h2_request()
        grpc = grpcwire.is_grpc(req.header(b"content-type"))
        if req.method == "CONNECT":
            proxy.metrics.rejected_unrouted()
            await send_refusal(req, Refusal(405, "method not allowed", "CONNECT is not proxied by the activator"), grpc)
            return
        found = await proxy.resolve(req.headers, req.authority, req.content_length)
        if isinstance(found, Refusal):
            await send_refusal(req, found, grpc)
            return
        target, port = found
        if target.static and not target.ready and not grpc:
            hit = first_match(target.static, req.method, req.path.split("?", 1)[0], req.headers)
            if hit is not None:
                proxy.count_static(target, hit)
                body = hit.body.encode()
                headers = [(b":status", str(hit.status).encode())]
                headers += [
                    (k.lower().encode(), v.encode()) for k, v in hit.answer_headers() if k.lower() != "content-length"
                ]
                headers.append((b"content-length", str(len(body)).encode()))
                await req.respond(headers)
                await req.stream.send_data(body, end=True)
                return
        cfg = proxy.cfg
        ex = H2Exchange(req, self.forwarder, cfg.retry_body_limit, cfg.max_body_size)
        await proxy.serve(ex, target, port)
