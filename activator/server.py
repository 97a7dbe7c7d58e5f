"""The two HTTP faces of the activator: the proxy (requests routed by the mesh) and the admin endpoints."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST

from activator.body import BodyError, RequestBody, Spool
from activator.config import Config
from activator.forward import Forwarder, Upstream, UpstreamError
from activator.hold import Holds
from activator.metrics import Metrics
from activator.queue import Admission
from activator.registry import Registry, Target
from activator.routing import Rejection, route
from activator.static import StaticResponse, first_match
from elasti_istio import routekey
from elasti_istio.resources import HEADER, TOKEN_HEADER

log = logging.getLogger(__name__)

SYNC_WAIT = 5.0  # a request that arrives before the first list completed waits this long for it
RETRY_AFTER = "1"
FIRST_RETRY = 0.001  # the prober's shortest pause after "no healthy upstream"
RETRY_SHARE = 0.1  # ... and after that a tenth of the time it has been retrying


def retry_pause(interval: float, retrying_for: float) -> float:
    """The prober's pause before forwarding again, ``retrying_for`` seconds after the mesh first
    answered "no healthy upstream". A target is reported ready when its first pod is, and the mesh
    learns of the new endpoint about then, usually a few milliseconds later, sometimes tens: the pause
    is a tenth of the wait so far (1 ms at least, ``interval`` at most), so a slow endpoint adds at most
    about 10% to the wait while the retries thin out (about 10 per tenfold of waiting)."""
    return min(interval, max(FIRST_RETRY, retrying_for * RETRY_SHARE))


def error(status: int, err: str, detail: str, retry_after: bool = False, close: bool = False) -> web.Response:
    """The activator's own answer: ``{"error", "detail"}``; ``close`` when the request body was not read to its end."""
    headers = {hdrs.RETRY_AFTER: RETRY_AFTER} if retry_after else None
    resp = web.json_response({"error": err, "detail": detail}, status=status, headers=headers)
    if close:
        resp.force_close()
    return resp


def body_refusal(exc: BodyError) -> Refusal:
    return Refusal(exc.status, exc.error, exc.detail, retry_after=exc.status == 503, close=True)


def not_utf8(request: web.BaseRequest) -> str | None:
    """What in the request is not valid UTF-8, if anything.

    The parser lets such bytes through (as surrogate escapes) but the forwarding client would silently
    drop them, so the workload would get something other than what the client sent.
    """
    path = request.raw_path
    if not path.isascii():
        try:
            path.encode()
        except UnicodeEncodeError:
            return "the request target is not valid UTF-8"
    for name, value in request.raw_headers:
        if not value.isascii():
            try:
                value.decode()
            except UnicodeDecodeError:
                return f"the value of the {name.decode('latin-1')[:100]!r} header is not valid UTF-8"
    return None


def _is_websocket(request: web.BaseRequest) -> bool:
    return request.method == "GET" and request.headers.get(hdrs.UPGRADE, "").lower() == "websocket"


@dataclass(frozen=True, slots=True)
class Refusal:
    """The activator's own answer to a request it will not forward, in a form each protocol renders."""

    status: int
    error: str
    detail: str
    retry_after: bool = False
    close: bool = False  # the request body was not read to its end


class Exchange(Protocol):
    """One request as the hold loop sees it, whatever protocol carries it."""

    @property
    def retryable(self) -> bool:
        """Whether a forward the mesh answered "not ready" can be sent again (its body was kept)."""

    @property
    def deadline(self) -> float | None:
        """The client's own deadline (loop time), when it set one; the hold never outlasts it."""

    async def send(self, target: Target, was_held: bool) -> object | None:
        """Forwards once: what the upstream answered, or None when the mesh says it is not ready yet.
        Raises :class:`UpstreamError` or :class:`BodyError`."""

    async def relay(self, up: object, was_held: bool) -> Any:
        """Passes the upstream's answer on to the client."""

    async def refuse(self, refusal: Refusal) -> Any:
        """The activator's own answer."""

    def close(self) -> None:
        """Frees what the request kept (its body)."""


class Http1:
    """An HTTP/1.1 request (or websocket handshake) from aiohttp's server."""

    __slots__ = ("body", "forwarder", "request")

    def __init__(self, request: web.BaseRequest, forwarder: Forwarder, body: RequestBody | None) -> None:
        self.request = request
        self.forwarder = forwarder
        self.body = body  # None for a websocket

    @property
    def retryable(self) -> bool:
        return self.body is None or self.body.retryable

    @property
    def deadline(self) -> float | None:
        return None

    async def send(self, target: Target, was_held: bool) -> object | None:
        if self.body is None:
            return await self.forwarder.connect_websocket(self.request, target)
        await self.body.load(whole=was_held)
        return await self.forwarder.send(self.request, target, self.body)

    async def relay(self, up: object, was_held: bool) -> web.StreamResponse:
        if isinstance(up, web.StreamResponse):
            return up  # a refused websocket handshake
        if isinstance(up, Upstream):
            return await self.forwarder.relay(self.request, up, was_held)
        return await self.forwarder.relay_websocket(self.request, up, was_held)  # type: ignore[arg-type]

    async def refuse(self, refusal: Refusal) -> web.Response:
        return error(refusal.status, refusal.error, refusal.detail, refusal.retry_after, refusal.close)

    def close(self) -> None:
        if self.body is not None:
            self.body.close()


class Proxy:
    """Routes each request by its ``elasti-service`` header; forwards it at once or holds it until ready."""

    def __init__(self, cfg: Config, registry: Registry, holds: Holds, forwarder: Forwarder, metrics: Metrics) -> None:
        self.cfg = cfg
        self.registry = registry
        self.holds = holds
        self.forwarder = forwarder
        self.metrics = metrics
        self.drain_deadline: float | None = None
        self.spool = Spool(cfg.spool_dir, cfg.spool_limit)
        self.route_keys = routekey.KeyFile(cfg.route_key_file) if cfg.route_key_file else None

    def start_drain(self, timeout: float) -> None:
        """Held requests get an answer before ``timeout`` runs out: forwarded if ready by then, else 503."""
        margin = min(1.0, timeout * 0.1)
        self.drain_deadline = asyncio.get_running_loop().time() + max(0.0, timeout - margin)
        self.holds.wake_all()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.metrics.http1_request()
        invalid = not_utf8(request)
        if invalid is not None:
            self.metrics.rejected_unrouted()
            return error(400, "invalid request", invalid, close=True)
        found = await self.resolve(request.headers, request.host, request.content_length)
        if isinstance(found, Refusal):
            return error(found.status, found.error, found.detail, found.retry_after, found.close)
        target, port = found
        if target.static and not target.ready:
            hit = first_match(target.static, request.method, request.path, request.headers)
            if hit is not None:
                return self.static_hit(target, hit)
        cfg = self.cfg
        body = (
            None
            if _is_websocket(request)
            else RequestBody(request, cfg.retry_body_limit, cfg.max_body_size, cfg.request_body_timeout, self.spool)
        )
        return await self.serve(Http1(request, self.forwarder, body), target, port)

    def count_static(self, target: Target, hit: StaticResponse) -> None:
        """A static answer is about to be given (either protocol): counted, and the wake it may ask for."""
        if hit.wake:
            self.holds.want_wake(target)
        self.metrics.target(target.key).outcome("static")

    def static_hit(self, target: Target, hit: StaticResponse) -> web.Response:
        self.count_static(target, hit)
        return web.Response(status=hit.status, text=hit.body, headers=dict(hit.response_headers))

    async def resolve(
        self, headers: Mapping[str, str], host: str, length: int | None
    ) -> tuple[Target, int | None] | Refusal:
        """The ElastiService and origin port a request is for, or why it is refused; counted either way."""
        routed = route(headers.getall(HEADER, []))  # type: ignore[attr-defined]
        if isinstance(routed, Rejection):
            self.metrics.rejected_unrouted()
            return Refusal(400, routed.error, routed.detail)
        key, header_port = routed
        if self.route_keys is not None and not self.route_keys.valid(key[0], key[1], headers.get(TOKEN_HEADER)):
            self.metrics.rejected_unrouted()
            if not self.route_keys.keys:  # nothing can be verified yet: a moment later it can
                return Refusal(
                    503,
                    "route key not loaded yet",
                    f"the route key file {self.route_keys.path} has given no key yet (a new Secret reaches its "
                    "mount within a minute or so)",
                    retry_after=True,
                )
            return Refusal(
                403,
                "forbidden",
                f"no valid {TOKEN_HEADER} for {key[0]}/{key[1]}: requests reach the activator through the "
                "VirtualServices the controller rewrote, not directly",
            )
        target = self.registry.get(key)
        if target is None and not self.registry.synced and await self.registry.wait_synced(SYNC_WAIT):
            target = self.registry.get(key)
        if target is None:
            self.metrics.rejected_unrouted()
            if not self.registry.synced:
                return Refusal(503, "not ready", "ElastiServices have not been listed yet", retry_after=True)
            return Refusal(404, "unknown ElastiService", f"no ElastiService {key[0]}/{key[1]} is known here")
        port = target.port_for(header_port, host)
        if port is not None and target.ports and port not in target.ports:
            self.metrics.target(target.key).outcome("rejected")
            return Refusal(
                502,
                "port not on the Service",
                f"the route chose port {port}, which the Service of {key[0]}/{key[1]} does not have "
                f"(it has {', '.join(map(str, target.ports))})",
            )
        limit = self.cfg.max_body_size
        if limit and length is not None and length > limit:
            self.metrics.target(target.key).outcome("rejected")
            return Refusal(
                413,
                "request body too large",
                f"Content-Length {length} is larger than {limit} bytes (--max-body-size)",
                close=True,
            )
        return target, port

    async def serve(self, ex: Exchange, target: Target, port: int | None = None) -> Any:
        """Forwards at once when the target is ready, else holds the request until it is, the hold times
        out, the wake fails, the client's deadline passes or the client goes away."""
        key = target.key
        if port is not None:
            target = target.at_port(port)
        tm = self.metrics.target(key)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + target.hold_timeout
        client_deadline = ex.deadline
        held = was_held = probing = False
        held_at = 0.0
        mark = 0
        retrying_since: float | None = None
        outcome = "client_gone"  # unless something else is decided before the handler ends
        try:
            while True:
                if target.forwardable:
                    try:
                        up = await ex.send(target, was_held)
                    except UpstreamError as exc:
                        outcome = "upstream_error"
                        return await ex.refuse(Refusal(502, "upstream unreachable", f"{target.authority}: {exc}"))
                    except BodyError as exc:
                        outcome = "rejected"
                        return await ex.refuse(body_refusal(exc))
                    if up is not None:
                        outcome = "forwarded"
                        if probing:
                            probing = False
                            self.holds.end_probe(key, ex)
                        if held:
                            held = False
                            self.holds.leave(key, tm)
                            tm.hold_seconds.observe(loop.time() - held_at)
                        return await ex.relay(up, was_held)
                    tm.mesh_not_ready.inc()
                    if not ex.retryable:
                        outcome = "upstream_error"
                        return await ex.refuse(
                            Refusal(
                                503,
                                "upstream not ready",
                                f"the mesh found no ready endpoint for {target.authority}; the request came when its "
                                f"target was ready and its body, larger than --retry-body-limit "
                                f"({self.cfg.retry_body_limit} bytes), was being streamed through, so it was not "
                                "kept for another try",
                                retry_after=True,
                            )
                        )
                    probing = self.holds.probe(key, ex)
                    if probing:
                        if retrying_since is None:
                            retrying_since = loop.time()
                        step = retry_pause(target.retry_interval, loop.time() - retrying_since)
                    else:
                        step = target.retry_interval
                else:
                    step = math.inf
                now = loop.time()
                limit = deadline if self.drain_deadline is None else min(deadline, self.drain_deadline)
                if client_deadline is not None:
                    limit = min(limit, client_deadline)
                if now >= limit:
                    outcome = "timeout"
                    if limit == client_deadline and client_deadline < deadline:
                        return await ex.refuse(
                            Refusal(
                                504,
                                "deadline exceeded",
                                f"the client's deadline passed while {key[0]}/{key[1]} was not ready",
                            )
                        )
                    if limit < deadline:
                        return await ex.refuse(
                            Refusal(
                                503,
                                "shutting down",
                                "the activator stopped before the target was ready",
                                retry_after=True,
                            )
                        )
                    return await ex.refuse(
                        Refusal(
                            504,
                            "hold timeout",
                            f"{key[0]}/{key[1]} was not ready within {target.hold_timeout:g}s "
                            "(spec.activator.holdTimeout)",
                        )
                    )
                if not held:
                    admission = self.holds.admit(target, tm)
                    if admission is not Admission.ADMITTED:
                        outcome = "overflow"
                        what = "queueLimit" if admission is Admission.QUEUE_FULL else "--max-held"
                        return await ex.refuse(
                            Refusal(
                                503, "too many held requests", f"{key[0]}/{key[1]}: {what} reached", retry_after=True
                            )
                        )
                    held = was_held = True
                    held_at = now
                    mark = self.holds.failures(key)
                if not target.ready:
                    self.holds.want_wake(target)
                await self.holds.wait(key, min(step, limit - now))
                failure = self.holds.failed_since(key, mark)
                if failure is not None:
                    outcome = "wake_failed"
                    return await ex.refuse(
                        Refusal(
                            503,
                            "wake failed",
                            failure.message or failure.reason or "the controller could not wake the target",
                        )
                    )
                fresh = self.registry.get(key)
                if fresh is None:
                    outcome = "rejected"
                    return await ex.refuse(
                        Refusal(
                            503,
                            "ElastiService deleted",
                            f"{key[0]}/{key[1]} was deleted while the request was held",
                            retry_after=True,
                        )
                    )
                target = fresh if port is None else fresh.at_port(port)
        except asyncio.CancelledError:
            raise
        except Exception:
            outcome = "upstream_error"
            raise
        finally:
            ex.close()
            if probing:
                self.holds.end_probe(key, ex)
            if held:
                self.holds.leave(key, tm)
                tm.hold_seconds.observe(loop.time() - held_at)
            tm.outcome(outcome)


class Admin:
    """``/healthz``, ``/readyz``, ``/metrics`` and ``/v1/pending/<namespace>/<name>`` (for KEDA's metrics-api)."""

    def __init__(
        self, registry: Registry, holds: Holds, metrics: Metrics, route_keys: routekey.KeyFile | None = None
    ) -> None:
        self.registry = registry
        self.holds = holds
        self.metrics = metrics
        self.route_keys = route_keys
        self.draining = False

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/v1/pending/{namespace}/{name}", self.pending)
        return app

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        if self.draining:
            return web.json_response({"ready": False, "reason": "draining"}, status=503)
        if not self.registry.synced:
            return web.json_response({"ready": False, "reason": "ElastiServices not listed yet"}, status=503)
        if self.route_keys is not None:
            # Not Ready without a key: the controller then keeps routes off the activators (fail open)
            # rather than send requests that would be refused.
            self.route_keys.refresh()
            if not self.route_keys.keys:
                return web.json_response({"ready": False, "reason": "route key not loaded yet"}, status=503)
        return web.json_response({"ready": True})

    async def metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(), headers={hdrs.CONTENT_TYPE: CONTENT_TYPE_LATEST})

    async def pending(self, request: web.Request) -> web.Response:
        key = (request.match_info["namespace"], request.match_info["name"])
        if self.registry.get(key) is None:
            return error(404, "unknown ElastiService", f"no ElastiService {key[0]}/{key[1]} is known here")
        return web.json_response({"pending": self.holds.pending(key)})
