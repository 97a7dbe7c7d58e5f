"""The gRPC app a simulated container serves on a ``grpc*``-named container port.

A real ``grpc.aio`` server with the standard health service, server reflection and the
``elasti.echo.v1.Echo`` service (:mod:`elasti_istio.kubelet.grpcecho`), so stock clients such as
``grpcurl`` work against a pod and tests can see what a proxy in front does to a gRPC call: every
call says which pod answered (initial metadata ``x-pod-*``), ends with trailers (``x-echo-trailer``
and the request's ``x-echo-*`` keys), and a request can ask for a delay, a stream length, padding or
a non-OK status.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from elasti_istio.kubelet.apps import PodIdentity
from elasti_istio.kubelet.grpcecho import (
    ECHO_METHODS,
    ECHO_PREFIX,
    POD_IP,
    POD_NAME,
    POD_NAMESPACE,
    SERVICE,
    TRAILER,
    EchoRequest,
    EchoResponse,
    SeenRequest,
    SeenResponse,
    method_path,
)

log = logging.getLogger("elasti.kubelet")

MAX_DELAY_MS = 120_000
MAX_COUNT = 100_000
MAX_PAYLOAD = 64 << 20
_CODES = {c.value[0]: c for c in grpc.StatusCode}
SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", MAX_PAYLOAD + (1 << 20)),
    ("grpc.max_send_message_length", MAX_PAYLOAD + (1 << 20)),
    # Proxies and clients may ping idle connections; a pod should not answer them with GOAWAY.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_ping_strikes", 0),
]


def is_grpc_port(name: str | None) -> bool:
    """Container ports named ``grpc`` or ``grpc-*`` (Istio's own naming convention for gRPC)."""
    return bool(name) and str(name).startswith("grpc")


class _Status(Exception):
    """A requested non-OK status, or a request that cannot be served."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def _requested_status(req: Any) -> _Status | None:
    if not req.status_code:
        return None
    code = _CODES.get(req.status_code)
    if code is None:
        return _Status(grpc.StatusCode.INVALID_ARGUMENT, f"status_code {req.status_code} is not a gRPC status")
    return _Status(code, req.status_message or f"requested status {code.name}")


def _check(req: Any) -> None:
    for field, top in (("count", MAX_COUNT), ("delay_ms", MAX_DELAY_MS), ("payload_size", MAX_PAYLOAD)):
        value = getattr(req, field)
        if not 0 <= value <= top:
            raise _Status(grpc.StatusCode.INVALID_ARGUMENT, f"{field} must be within 0..{top}, got {value}")


class _Call:
    """What one call sends besides its responses: the pod headers once, the trailers at the end."""

    def __init__(self, app: GrpcApp, context: grpc.aio.ServicerContext, method: str) -> None:
        self.app = app
        self.context = context
        self.headers_sent = False
        request_md = [(k, v) for k, v in context.invocation_metadata() or ()]
        self.metadata: dict[str, str] = {}
        for k, v in request_md:
            text = base64.b64encode(v).decode() if isinstance(v, bytes) else v
            self.metadata[k] = f"{self.metadata[k]},{text}" if k in self.metadata else text
        trailers: list[tuple[str, str | bytes]] = [(TRAILER, method)]
        trailers += [(k, v) for k, v in request_md if k.startswith(ECHO_PREFIX)]
        self.trailers = tuple(trailers)
        context.set_trailing_metadata(self.trailers)

    async def headers(self) -> None:
        if not self.headers_sent:
            self.headers_sent = True
            ident = self.app.ident
            await self.context.send_initial_metadata(
                ((POD_NAME, ident.name), (POD_NAMESPACE, ident.namespace), (POD_IP, ident.ip))
            )

    async def answer(self, req: Any, index: int, received: int, message: str | None = None) -> Any:
        """The response to ``req`` after its delay (headers first if not sent yet)."""
        if req.delay_ms:
            await asyncio.sleep(req.delay_ms / 1000)
        await self.headers()
        ident = self.app.ident
        return EchoResponse(
            message=req.message if message is None else message,
            pod=ident.name,
            namespace=ident.namespace,
            ip=ident.ip,
            port=ident.port,
            index=index,
            container=ident.container,
            received=received,
            payload=b"x" * req.payload_size,
            metadata=self.metadata,
        )


class GrpcApp:
    """One container port's gRPC server; it listens on loopback and the pod address is forwarded to it."""

    def __init__(self, ident: PodIdentity) -> None:
        self.ident = ident
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.count = {method_path(m): 0 for m in ECHO_METHODS}
        self.inflight_by = dict.fromkeys(self.count, 0)
        self.cancelled = dict.fromkeys(self.count, 0)

    def inflight(self) -> int:
        return sum(self.inflight_by.values())

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serves on ``host:port`` (0: a free port) and returns the bound port."""
        server = grpc.aio.server(options=SERVER_OPTIONS)
        server.add_generic_rpc_handlers((self._handlers(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        for service in (health.OVERALL_HEALTH, SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        bound = server.add_insecure_port(f"{host}:{port}")
        if not bound:
            raise OSError(f"gRPC server cannot listen on {host}:{port}")
        await server.start()
        self.server, self.port = server, bound
        return bound

    async def stop(self, grace: float | None) -> None:
        """Refuses new calls (GOAWAY, health NOT_SERVING), lets calls in flight finish within ``grace``."""
        server, self.server = self.server, None
        if server is None:
            return
        await self.health.enter_graceful_shutdown()
        await server.stop(grace if grace and grace > 0 else None)

    def _handlers(self) -> grpc.GenericRpcHandler:
        echo = {"request_deserializer": EchoRequest.FromString, "response_serializer": EchoResponse.SerializeToString}
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Unary": grpc.unary_unary_rpc_method_handler(self._unary_call("Unary", self.unary), **echo),
                "ServerStream": grpc.unary_stream_rpc_method_handler(
                    self._stream_call("ServerStream", self.server_stream), **echo
                ),
                "ClientStream": grpc.stream_unary_rpc_method_handler(
                    self._unary_call("ClientStream", self.client_stream), **echo
                ),
                "Bidi": grpc.stream_stream_rpc_method_handler(self._stream_call("Bidi", self.bidi), **echo),
                "Seen": grpc.unary_unary_rpc_method_handler(
                    self.seen,
                    request_deserializer=SeenRequest.FromString,
                    response_serializer=SeenResponse.SerializeToString,
                ),
            },
        )

    # Counting and status handling around each echo method.

    def _enter(self, path: str) -> None:
        self.count[path] += 1
        self.inflight_by[path] += 1

    async def _finish(self, call: _Call, status: _Status) -> None:
        await call.headers()
        await call.context.abort(status.code, status.details, call.trailers)

    def _unary_call(
        self, name: str, fn: Callable[[Any, _Call], Awaitable[Any]]
    ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        path = method_path(name)

        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            self._enter(path)
            call = _Call(self, context, name)
            try:
                return await fn(request, call)
            except _Status as status:
                await self._finish(call, status)
            except asyncio.CancelledError:
                self.cancelled[path] += 1
                raise
            finally:
                self.inflight_by[path] -= 1

        return handle

    def _stream_call(
        self, name: str, fn: Callable[[Any, _Call], AsyncIterator[Any]]
    ) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
        path = method_path(name)

        async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            self._enter(path)
            call = _Call(self, context, name)
            try:
                async for response in fn(request, call):
                    yield response
            except _Status as status:
                await self._finish(call, status)
            except asyncio.CancelledError:
                self.cancelled[path] += 1
                raise
            finally:
                self.inflight_by[path] -= 1

        return handle

    # The methods.

    async def unary(self, req: Any, call: _Call) -> Any:
        """The request echoed after ``delay_ms``, or the requested status instead."""
        _check(req)
        status = _requested_status(req)
        if status is not None:
            if req.delay_ms:
                await asyncio.sleep(req.delay_ms / 1000)
            raise status
        return await call.answer(req, 0, 1)

    async def server_stream(self, req: Any, call: _Call) -> AsyncIterator[Any]:
        """``count`` responses (at least one), ``delay_ms`` before each, then the requested status if any."""
        _check(req)
        status = _requested_status(req)
        for i in range(max(req.count, 1)):
            yield await call.answer(req, i, 1)
        if status is not None:
            raise status

    async def client_stream(self, requests: AsyncIterator[Any], call: _Call) -> Any:
        """One response once the client half-closes: the messages joined by ``,``; the last request's
        ``delay_ms``, ``payload_size`` and status apply."""
        messages: list[str] = []
        last = EchoRequest()
        async for req in requests:
            _check(req)
            messages.append(req.message)
            last = req
        status = _requested_status(last)
        if status is not None:
            if last.delay_ms:
                await asyncio.sleep(last.delay_ms / 1000)
            raise status
        return await call.answer(last, 0, len(messages), ",".join(messages))

    async def bidi(self, requests: AsyncIterator[Any], call: _Call) -> AsyncIterator[Any]:
        """Each request echoed as it arrives (after its ``delay_ms``); a request with a status ends the call."""
        received = 0
        async for req in requests:
            received += 1
            _check(req)
            status = _requested_status(req)
            if status is not None:
                if req.delay_ms:
                    await asyncio.sleep(req.delay_ms / 1000)
                raise status
            yield await call.answer(req, received - 1, received)
        await call.headers()

    async def seen(self, req: Any, context: grpc.aio.ServicerContext) -> Any:
        """Calls this server has received for ``method`` (all echo methods when empty), like ``/seen`` over HTTP."""
        paths = [method_path(req.method)] if req.method else list(self.count)
        return SeenResponse(
            method=req.method,
            count=sum(self.count.get(p, 0) for p in paths),
            inflight=sum(self.inflight_by.get(p, 0) for p in paths),
            cancelled=sum(self.cancelled.get(p, 0) for p in paths),
        )
