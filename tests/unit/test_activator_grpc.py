"""gRPC and HTTP/2 through the activator with stock grpcio on both sides: a hand-fed registry, the origin a
grpcio server on 127.0.0.1 (reached as the sidecar would be: ``--sidecar-address 127.0.0.1``, origin
port), and a stub of the controller's wake endpoint. The mesh's part is tested in the e2e suite."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from activator.registry import Registry
from tests.activator_stubs import WakeEndpoint, elastiservice, sidecar_activator

NS = "shop"
_rv = itertools.count(2)
ident = (lambda b: b), (lambda b: b)


def _sha(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()


class Origin:
    """A grpcio server with four raw-bytes methods that say what they got."""

    def __init__(self) -> None:
        self.calls = 0
        self.mesh_replies = 0
        self.from_upstream = False
        self.cancelled = asyncio.Event()
        self.server = grpc.aio.server()

    async def unary(self, req: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        self.calls += 1
        md = dict(ctx.invocation_metadata())
        if self.mesh_replies > 0:  # answers as Envoy does when it has no endpoint: trailers only, UNAVAILABLE
            self.mesh_replies -= 1
            if self.from_upstream:
                ctx.set_trailing_metadata((("x-envoy-upstream-service-time", "3"),))
            await ctx.abort(grpc.StatusCode.UNAVAILABLE, "no healthy upstream")
        await ctx.send_initial_metadata((("x-origin", "yes"),))
        if req.startswith(b"fail:"):
            await ctx.abort(grpc.StatusCode.FAILED_PRECONDITION, req[5:].decode())
        if req.startswith(b"slow"):
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        ctx.set_trailing_metadata((("x-trailer", "t1"), ("x-got-echo", md.get("x-echo-me", ""))))
        return b"unary:" + req

    async def server_stream(self, req: bytes, ctx: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        self.calls += 1
        if req.startswith(b"big:"):  # many large messages: the activator's send windows fill and drain
            for i in range(int(req[4:])):
                yield bytes([i % 256]) * 100_000
            return
        for i in range(int(req or b"3")):
            yield b"item%d" % i

    async def client_stream(self, reqs: AsyncIterator[bytes], ctx: grpc.aio.ServicerContext) -> bytes:
        self.calls += 1
        got = [r async for r in reqs]
        if sum(map(len, got)) > 1000:
            return b"%d messages, %d bytes, sha256 %s" % (len(got), sum(map(len, got)), _sha(got).encode())
        return b"|".join(got)

    async def bidi(self, reqs: AsyncIterator[bytes], ctx: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        self.calls += 1
        stop_after = int(dict(ctx.invocation_metadata()).get("x-stop-after", "0"))
        n = 0
        async for r in reqs:
            yield b"echo:" + r
            n += 1
            if n == stop_after:  # ends the call while the client is still sending
                return

    async def start(self) -> int:
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self.unary, *ident),
            "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream, *ident),
            "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream, *ident),
            "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi, *ident),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.Echo", handlers),))
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return port


class Env:
    def __init__(self, **cfg: Any) -> None:
        self.registry = Registry()
        self.registry.mark_synced()
        self.cfg = cfg

    async def start(self) -> Env:
        self.origin = Origin()
        self.origin_port = await self.origin.start()
        self.wake = await WakeEndpoint().start()
        self.activator = await sidecar_activator(self.registry, self.wake.url, **self.cfg)
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.activator.proxy_address[1]}")
        return self

    async def stop(self) -> None:
        await self.channel.close()
        await self.activator.close()
        await self.wake.stop()
        await self.origin.server.stop(0)

    def put(self, name: str = "grpcsvc", **kw: Any) -> None:
        kw.setdefault("origin", (f"{name}-elasti-origin", self.origin_port))
        self.registry.apply("MODIFIED", elastiservice(NS, name, resource_version=str(next(_rv)), **kw))

    def md(self, name: str = "grpcsvc", *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
        return (("elasti-service", f"{NS}/{name}"), *extra)

    def method(self, kind: str, name: str) -> Any:
        factory = {
            "Unary": self.channel.unary_unary,
            "ServerStream": self.channel.unary_stream,
            "ClientStream": self.channel.stream_unary,
            "Bidi": self.channel.stream_stream,
        }[kind]
        return factory(f"/t.Echo/{name}", request_serializer=ident[0], response_deserializer=ident[1])

    async def until_pending(self, n: int, name: str = "grpcsvc") -> None:
        async with asyncio.timeout(20):
            while self.activator.holds.pending((NS, name)) != n:
                await asyncio.sleep(0.01)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    e = await Env().start()
    try:
        yield e
    finally:
        await e.stop()


async def test_a_warm_unary_call_passes_with_its_metadata_and_trailers(env: Env) -> None:
    env.put(ready=True)
    call = env.method("Unary", "Unary")(b"hi", metadata=env.md("grpcsvc", ("x-echo-me", "v1")))
    assert await call == b"unary:hi"
    assert ("x-origin", "yes") in tuple(await call.initial_metadata())
    trailers = dict(await call.trailing_metadata())
    assert trailers["x-trailer"] == "t1" and trailers["x-got-echo"] == "v1"
    assert await call.code() == grpc.StatusCode.OK


async def test_all_four_kinds_of_call_are_held_woken_and_answered(env: Env) -> None:
    env.put(ready=False)
    unary = env.method("Unary", "Unary")(b"a", metadata=env.md())
    sstream = env.method("ServerStream", "ServerStream")(b"4", metadata=env.md())
    cstream = env.method("ClientStream", "ClientStream")(iter([b"x", b"y", b"z"]), metadata=env.md())

    bidi_sent: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def bidi_requests() -> AsyncIterator[bytes]:
        while (item := await bidi_sent.get()) is not None:
            yield item

    bidi = env.method("Bidi", "Bidi")(bidi_requests(), metadata=env.md())
    await bidi_sent.put(b"1")
    unary_task = asyncio.ensure_future(unary)
    sstream_task = asyncio.ensure_future(_collect(sstream))
    cstream_task = asyncio.ensure_future(cstream)
    await env.until_pending(4)
    async with asyncio.timeout(20):  # the four share one wake call, which may still be on its way
        while env.wake.count(NS, "grpcsvc") == 0:
            await asyncio.sleep(0.01)
    assert env.origin.calls == 0 and env.wake.count(NS, "grpcsvc") == 1
    env.put(ready=True)
    assert await unary_task == b"unary:a"
    assert await sstream_task == [b"item0", b"item1", b"item2", b"item3"]
    assert await cstream_task == b"x|y|z"
    assert await bidi.read() == b"echo:1"
    await bidi_sent.put(b"2")
    assert await bidi.read() == b"echo:2"
    await bidi_sent.put(None)
    assert await bidi.read() is grpc.aio.EOF
    assert await bidi.code() == grpc.StatusCode.OK
    assert env.origin.calls == 4
    cold = dict(await unary.initial_metadata())
    assert cold.get("x-elasti-cold-start") == "true"


async def _collect(call: Any) -> list[bytes]:
    return [m async for m in call]


async def test_a_non_ok_status_and_its_message_pass_through(env: Env) -> None:
    env.put(ready=True)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await env.method("Unary", "Unary")(b"fail:no stock", metadata=env.md())
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details() == "no stock"


async def test_a_deadline_shorter_than_the_hold_is_deadline_exceeded_and_the_call_leaves_the_queue(env: Env) -> None:
    env.put(ready=False, hold_timeout="60s")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await env.method("Unary", "Unary")(b"a", metadata=env.md(), timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await env.until_pending(0)
    assert env.origin.calls == 0


async def test_the_hold_timeout_answers_deadline_exceeded_in_grpc_form(env: Env) -> None:
    env.put(ready=False, hold_timeout="200ms")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await env.method("Unary", "Unary")(b"a", metadata=env.md())
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "hold timeout" in err.value.details()
    assert "holdTimeout" in err.value.details()


async def test_a_cancelled_held_call_leaves_the_queue(env: Env) -> None:
    env.put(ready=False)
    call = env.method("Unary", "Unary")(b"a", metadata=env.md())
    task = asyncio.ensure_future(call)
    await env.until_pending(1)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await env.until_pending(0)


async def test_a_cancelled_forwarded_call_is_cancelled_at_the_origin(env: Env) -> None:
    env.put(ready=True)
    call = env.method("Unary", "Unary")(b"slow", metadata=env.md())
    task = asyncio.ensure_future(call)
    async with asyncio.timeout(20):
        while env.origin.calls == 0:
            await asyncio.sleep(0.01)
    call.cancel()
    async with asyncio.timeout(20):
        await env.origin.cancelled.wait()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_overflow_unknown_and_wake_failed_are_grpc_answers(env: Env) -> None:
    env.put(ready=False, queue_limit=1)
    first = asyncio.ensure_future(env.method("Unary", "Unary")(b"a", metadata=env.md()))
    await env.until_pending(1)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await env.method("Unary", "Unary")(b"b", metadata=env.md())
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "too many held requests" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await env.method("Unary", "Unary")(b"b", metadata=env.md("nosuch"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    env.put(ready=False, queue_limit=1, wake_failed=("ScaleFailed", "quota exceeded", "2026-01-01T00:00:00Z"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await first
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "quota exceeded" in err.value.details()


async def test_http1_still_works_beside_http2(env: Env) -> None:
    import aiohttp

    env.put(ready=True)
    async with aiohttp.ClientSession() as s:
        url = f"http://127.0.0.1:{env.activator.proxy_address[1]}/x"
        async with s.get(url) as r:
            assert r.status == 400
            assert (await r.json())["error"]


async def test_the_meshs_no_healthy_upstream_is_retried_and_a_workloads_own_is_relayed(env: Env) -> None:
    """Envoy answers a gRPC call it has no endpoint for with a trailers-only UNAVAILABLE "no healthy
    upstream" and no x-envoy-upstream-service-time (checked on Envoy 1.40): nothing reached the workload,
    the call is sent again. The same status with that header came from a workload: relayed, once."""
    env.put(ready=True, retry_interval="10ms")
    env.origin.mesh_replies = 2
    assert await env.method("Unary", "Unary")(b"again", metadata=env.md(), timeout=30) == b"unary:again"
    assert env.origin.calls == 3 and env.origin.mesh_replies == 0
    assert env.activator.metrics.target((NS, "grpcsvc")).mesh_not_ready._value.get() == 2

    env.origin.mesh_replies, env.origin.from_upstream = 1, True
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await env.method("Unary", "Unary")(b"once", metadata=env.md(), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and err.value.details() == "no healthy upstream"
    assert env.origin.calls == 4


async def test_a_call_held_at_shutdown_is_answered_unavailable_within_the_drain() -> None:
    env = await Env(drain_timeout=2.0).start()
    try:
        env.put(ready=False)
        task = asyncio.ensure_future(env.method("Unary", "Unary")(b"a", metadata=env.md()))
        await env.until_pending(1)
        drain = asyncio.ensure_future(env.activator.drain())
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await task
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.value.details()
        await drain
    finally:
        await env.stop()


async def test_garbage_after_the_http2_preface_closes_that_connection_only(env: Env) -> None:
    from activator.h2server import PREFACE

    env.put(ready=True)
    reader, writer = await asyncio.open_connection("127.0.0.1", env.activator.proxy_address[1])
    writer.write(PREFACE + b"\x00\x00\x04\x00\x00\x00\x00\x00\x00junk")  # DATA on stream 0: a protocol error
    await writer.drain()
    async with asyncio.timeout(20):
        while await reader.read(65536):
            pass  # the activator answers GOAWAY and closes
    writer.close()
    assert await env.method("Unary", "Unary")(b"still", metadata=env.md(), timeout=30) == b"unary:still"


async def test_a_plain_http2_request_gets_the_json_answers(env: Env) -> None:
    """Not a gRPC call: the activator's refusals keep their HTTP status and JSON body over HTTP/2."""
    from activator.h2client import H2Pool

    pool = H2Pool()
    try:
        for header, status in ((f"{NS}/nosuch", b"404"), ("not a key", b"400")):
            stream = await pool.open(
                "127.0.0.1",
                env.activator.proxy_address[1],
                [
                    (b":method", b"GET"),
                    (b":scheme", b"http"),
                    (b":authority", b"x"),
                    (b":path", b"/"),
                    (b"elasti-service", header.encode()),
                ],
                end=True,
            )
            headers = dict(await stream.response)
            body = b""
            while (chunk := await stream.read()) is not None:
                body += chunk
            assert headers[b":status"] == status and headers[b"content-type"].startswith(b"application/json")
            assert set(json.loads(body)) == {"error", "detail"}
    finally:
        await pool.close()


async def test_megabytes_both_ways_through_a_held_call(env: Env) -> None:
    """More than the stream windows each way: a held client stream is released whole (its client was held
    back by flow control while it waited) and a large server stream comes back intact."""
    env.put(ready=False)
    parts = [os.urandom(300_000) for _ in range(10)]
    call = env.method("ClientStream", "ClientStream")(iter(parts), metadata=env.md(), timeout=60)
    task = asyncio.ensure_future(call)
    await env.until_pending(1)
    env.put(ready=True)
    assert await task == b"10 messages, 3000000 bytes, sha256 " + _sha(parts).encode()
    got = [m async for m in env.method("ServerStream", "ServerStream")(b"big:40", metadata=env.md(), timeout=60)]
    assert [len(m) for m in got] == [100_000] * 40 and all(m == bytes([i]) * 100_000 for i, m in enumerate(got))


async def _h2_origin(handler: Any) -> tuple[asyncio.AbstractServer, int]:
    """An HTTP/2 origin whose answers are written frame by frame as a test wants them."""
    from activator.h2server import H2Server

    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: H2Server(handler, 100, 0, lambda conn: None), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_a_status_after_initial_metadata_that_arrives_with_it_is_relayed(env: Env) -> None:
    """Initial metadata and the trailers arrive together (an error right after the headers): both go
    to the client, the status in the trailers."""

    async def handler(req: Any) -> None:
        await req.respond([(b":status", b"200"), (b"content-type", b"application/grpc"), (b"x-first", b"1")])
        await req.stream.send_headers([(b"grpc-status", b"9"), (b"grpc-message", b"after headers")], end=True)

    server, port = await _h2_origin(handler)
    try:
        env.put(ready=True, origin=("grpcsvc-elasti-origin", port))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await env.method("Unary", "Unary")(b"x", metadata=env.md(), timeout=30)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value
        assert err.value.details() == "after headers"
    finally:
        server.close()


async def test_a_workloads_short_503_over_http2_keeps_its_body(env: Env) -> None:
    async def handler(req: Any) -> None:
        await req.respond([(b":status", b"503"), (b"content-length", b"4"), (b"x-envoy-upstream-service-time", b"2")])
        await req.stream.send_data(b"busy", end=True)

    from activator.h2client import H2Pool

    server, port = await _h2_origin(handler)
    pool = H2Pool()
    try:
        env.put(ready=True, origin=("grpcsvc-elasti-origin", port))
        headers = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", b"/")]
        stream = await pool.open(
            "127.0.0.1", env.activator.proxy_address[1], [*headers, (b"elasti-service", f"{NS}/grpcsvc".encode())], True
        )
        answer = dict(await stream.response)
        body = b""
        while (chunk := await stream.read()) is not None:
            body += chunk
        assert (answer[b":status"], body) == (b"503", b"busy")
    finally:
        await pool.close()
        server.close()


async def test_refused_uploads_do_not_use_up_the_connection(env: Env) -> None:
    """Held uploads that time out leave data nobody will read (up to the stream window each); it gives
    the connection's window back, so one connection survives far more than its 16 MiB window of them."""
    parts = [b"x" * 300_000] * 4
    address = f"127.0.0.1:{env.activator.proxy_address[1]}"
    env.put(ready=False, hold_timeout="100ms")

    def uploads() -> list[grpc.StatusCode]:
        with grpc.insecure_channel(address) as channel:  # one connection for every call
            upload = channel.stream_unary("/t.Echo/ClientStream", *ident)
            codes = []
            for _ in range(24):  # up to 24 MiB left unread by calls whose hold ran out
                try:
                    upload(iter(parts), metadata=env.md(), timeout=30)
                except grpc.RpcError as exc:
                    codes.append(exc.code())  # type: ignore[attr-defined]
            env.put(ready=True)
            codes.append(grpc.StatusCode.OK if upload(iter(parts), metadata=env.md(), timeout=30) else None)
            return codes

    codes = await asyncio.to_thread(uploads)
    assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 24 + [grpc.StatusCode.OK], codes


async def test_calls_the_origin_ends_early_free_their_upstream_streams(env: Env) -> None:
    """Bidirectional calls the origin finishes while their client is still sending: the stream to the
    origin is reset, not left half open, so the activator's connection to it keeps its stream slots."""
    env.put(ready=True)

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"more"
            await asyncio.sleep(0.01)

    for _ in range(5):
        call = env.method("Bidi", "Bidi")(endless(), metadata=env.md("grpcsvc", ("x-stop-after", "1")))
        assert await call.read() == b"echo:more"
        try:
            assert await call.read() is grpc.aio.EOF
        except grpc.aio.AioRpcError as exc:
            # grpcio's client, when a message it is sending fails because the call just ended, may report
            # the call as INTERNAL "Internal error from Core" instead of its status. It does so without
            # the activator too (a grpcio client against a grpcio server, both cores busy).
            assert exc.code() == grpc.StatusCode.INTERNAL, exc
            assert "SendMessageOperation" in (exc.debug_error_string() or ""), exc
            continue
        assert await call.code() == grpc.StatusCode.OK
    conns = [c for cs in env.activator.h2_pool._conns.values() for c in cs]
    assert conns
    async with asyncio.timeout(20):
        while any(c.h2.open_outbound_streams for c in conns):
            await asyncio.sleep(0.01)
