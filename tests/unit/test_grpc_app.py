"""The generic app's gRPC server (health, reflection, elasti.echo.v1.Echo) called with stock grpcio clients."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from elasti_istio.kubelet import grpcecho
from elasti_istio.kubelet.apps import PodIdentity
from elasti_istio.kubelet.grpcapp import GrpcApp, is_grpc_port
from elasti_istio.kubelet.grpcecho import EchoRequest, SeenRequest
from elasti_istio.kubelet.node import Kubelet

IDENT = PodIdentity("demo", "echo-7d9f-abcde", "10.1.2.3", 9000, "main")


async def eventually(probe: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """The first truthy value of the awaitable ``probe()`` within ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last: {value!r}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def server() -> AsyncIterator[GrpcApp]:
    app = GrpcApp(IDENT)
    await app.start("127.0.0.1", 0)
    yield app
    await app.stop(None)


@pytest.fixture
async def channel(server: GrpcApp) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


def pod_headers(md: Any) -> dict[str, str]:
    return {k: v for k, v in md or () if k.startswith("x-pod-")}


def test_grpc_port_names() -> None:
    assert is_grpc_port("grpc") and is_grpc_port("grpc-echo") and is_grpc_port("grpc-web")
    assert not is_grpc_port("http") and not is_grpc_port("") and not is_grpc_port(None) and not is_grpc_port("h2c")


def test_schema_round_trips_as_json() -> None:
    resp = grpcecho.EchoResponse(message="m", pod="p", index=2, metadata={"a": "b"}, payload=b"xy")
    doc = json_format.MessageToDict(resp)
    assert doc == {"message": "m", "pod": "p", "index": 2, "metadata": {"a": "b"}, "payload": "eHk="}
    assert json_format.ParseDict({"message": "hi", "delayMs": 5, "statusCode": 3}, EchoRequest()) == EchoRequest(
        message="hi", delay_ms=5, status_code=3
    )


async def test_unary_sends_pod_headers_trailers_and_echoes_x_echo_metadata(channel: grpc.aio.Channel) -> None:
    stub = grpcecho.stub(channel)
    call = stub.Unary(
        EchoRequest(message="hello", payload_size=1000),
        metadata=(("x-echo-color", "blue"), ("x-other", "1"), ("x-echo-token-bin", b"\x00\x01")),
    )
    resp = await call
    assert (resp.message, resp.pod, resp.namespace, resp.ip, resp.port, resp.container, resp.index) == (
        "hello",
        "echo-7d9f-abcde",
        "demo",
        "10.1.2.3",
        9000,
        "main",
        0,
    )
    assert resp.received == 1 and resp.payload == b"x" * 1000
    assert resp.metadata["x-echo-color"] == "blue" and resp.metadata["x-other"] == "1"
    assert pod_headers(await call.initial_metadata()) == {
        "x-pod-name": "echo-7d9f-abcde",
        "x-pod-namespace": "demo",
        "x-pod-ip": "10.1.2.3",
    }
    trailers = list(await call.trailing_metadata())
    assert trailers == [("x-echo-trailer", "Unary"), ("x-echo-color", "blue"), ("x-echo-token-bin", b"\x00\x01")]
    assert await call.code() == grpc.StatusCode.OK


async def test_server_stream_sends_count_responses(channel: grpc.aio.Channel) -> None:
    call = grpcecho.stub(channel).ServerStream(EchoRequest(message="s", count=5))
    got = [r async for r in call]
    assert [r.index for r in got] == [0, 1, 2, 3, 4] and {r.message for r in got} == {"s"}
    assert pod_headers(await call.initial_metadata())["x-pod-name"] == IDENT.name
    assert ("x-echo-trailer", "ServerStream") in list(await call.trailing_metadata())
    single = [r async for r in grpcecho.stub(channel).ServerStream(EchoRequest(message="one"))]
    assert [r.index for r in single] == [0]


async def test_client_stream_answers_once_with_all_messages(channel: grpc.aio.Channel) -> None:
    async def requests() -> AsyncIterator[Any]:
        for word in ("a", "b", "c"):
            yield EchoRequest(message=word)

    call = grpcecho.stub(channel).ClientStream(requests(), metadata=(("x-echo-k", "v"),))
    resp = await call
    assert resp.message == "a,b,c" and resp.received == 3 and resp.pod == IDENT.name
    assert list(await call.trailing_metadata()) == [("x-echo-trailer", "ClientStream"), ("x-echo-k", "v")]


async def test_bidi_echoes_each_message_as_it_arrives(channel: grpc.aio.Channel) -> None:
    call = grpcecho.stub(channel).Bidi(metadata=(("x-echo-session", "42"),))
    for i, word in enumerate(("x", "y", "z")):
        await call.write(EchoRequest(message=word))
        resp = await call.read()  # answered before the next request is sent
        assert (resp.message, resp.index, resp.received) == (word, i, i + 1)
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK
    assert pod_headers(await call.initial_metadata())["x-pod-ip"] == IDENT.ip
    assert list(await call.trailing_metadata()) == [("x-echo-trailer", "Bidi"), ("x-echo-session", "42")]


async def test_requested_status_reaches_the_client_with_details_and_trailers(channel: grpc.aio.Channel) -> None:
    stub = grpcecho.stub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Unary(EchoRequest(status_code=5, status_message="no such thing"), metadata=(("x-echo-a", "1"),))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and err.value.details() == "no such thing"
    assert pod_headers(err.value.initial_metadata())["x-pod-name"] == IDENT.name
    assert list(err.value.trailing_metadata()) == [("x-echo-trailer", "Unary"), ("x-echo-a", "1")]

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Unary(EchoRequest(status_code=14))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and err.value.details() == "requested status UNAVAILABLE"

    # A stream sends its responses first, then ends with the status.
    call = stub.ServerStream(EchoRequest(message="m", count=2, status_code=8, status_message="enough"))
    got = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for r in call:
            got.append(r.index)
    assert got == [0, 1] and err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.value.details() == "enough"

    bidi = stub.Bidi()
    await bidi.write(EchoRequest(message="ok"))
    assert (await bidi.read()).message == "ok"
    await bidi.write(EchoRequest(status_code=9))
    assert await bidi.code() == grpc.StatusCode.FAILED_PRECONDITION

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Unary(EchoRequest(status_code=99))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ServerStream(EchoRequest(count=-1)).read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_deadline_cancels_the_call_on_the_server(server: GrpcApp, channel: grpc.aio.Channel) -> None:
    stub = grpcecho.stub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Unary(EchoRequest(message="slow", delay_ms=60_000), timeout=0.2)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    async def seen_cancelled() -> Any:
        r = await stub.Seen(SeenRequest(method="Unary"))
        return r.cancelled == 1 and r.inflight == 0 and r

    seen = await eventually(seen_cancelled, "the server to see the call cancelled")
    assert seen.count == 1


async def test_seen_counts_calls_per_method(channel: grpc.aio.Channel) -> None:
    stub = grpcecho.stub(channel)
    for _ in range(3):
        await stub.Unary(EchoRequest())
    _ = [r async for r in stub.ServerStream(EchoRequest(count=2))]
    unary = await stub.Seen(SeenRequest(method="Unary"))
    full = await stub.Seen(SeenRequest(method="/elasti.echo.v1.Echo/ServerStream"))
    total = await stub.Seen(SeenRequest())
    assert (unary.count, full.count, total.count) == (3, 1, 4)
    assert (await stub.Seen(SeenRequest(method="Nope"))).count == 0


async def test_sync_channel_works_with_the_same_stub(server: GrpcApp) -> None:
    def call() -> tuple[str, list[int]]:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = grpcecho.stub(ch)
            resp, c = stub.Unary.with_call(EchoRequest(message="sync"), timeout=30)
            assert dict(c.initial_metadata())["x-pod-name"] == IDENT.name
            stream = [r.index for r in stub.ServerStream(EchoRequest(count=3), timeout=30)]
            bidi = [r.received for r in stub.Bidi(iter([EchoRequest(), EchoRequest()]), timeout=30)]
            return resp.message, stream + bidi

    assert await asyncio.to_thread(call) == ("sync", [0, 1, 2, 1, 2])


async def test_health_serves_the_server_and_the_echo_service(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "elasti.echo.v1.Echo"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await health.Check(health_pb2.HealthCheckRequest(service="nope.Nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_services_and_describes_the_echo_service(channel: grpc.aio.Channel) -> None:
    call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    listed = await call.read()
    names = {s.name for s in listed.list_services_response.service}
    assert names == {"elasti.echo.v1.Echo", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}

    await call.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol="elasti.echo.v1.Echo"))
    found = await call.read()
    await call.done_writing()
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in found.file_descriptor_response.file_descriptor_proto
    ]
    echo = next(f for f in files if f.name == grpcecho.FILE_NAME)
    assert echo.package == "elasti.echo.v1"
    (service,) = echo.service
    methods = {m.name: (m.client_streaming, m.server_streaming) for m in service.method}
    assert methods == {
        "Unary": (False, False),
        "ServerStream": (False, True),
        "ClientStream": (True, False),
        "Bidi": (True, True),
        "Seen": (False, False),
    }
    request = next(m for m in echo.message_type if m.name == "EchoRequest")
    assert [f.name for f in request.field] == [
        "message",
        "count",
        "delay_ms",
        "status_code",
        "status_message",
        "payload_size",
    ]


async def test_stop_lets_the_call_in_flight_finish_and_refuses_new_ones(
    server: GrpcApp, channel: grpc.aio.Channel
) -> None:
    stub = grpcecho.stub(channel)
    slow = asyncio.ensure_future(stub.Unary(EchoRequest(message="last", delay_ms=1000), timeout=60))

    async def in_flight() -> bool:
        return server.inflight() == 1

    await eventually(in_flight, "the slow call to reach the server")
    stopping = asyncio.ensure_future(server.stop(30))
    assert (await slow).message == "last"
    await stopping
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Unary(EchoRequest(), timeout=30, wait_for_ready=False)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_kubelet_readiness_probe_speaks_grpc_health_and_tcp(server: GrpcApp) -> None:
    kubelet = Kubelet(None, "n", "10.99.0.0/24")  # type: ignore[arg-type]  # probes need no API server
    addr = f"127.0.0.1:{server.port}"
    assert await kubelet.probe(f"grpc://{addr}")
    assert await kubelet.probe(f"grpc://{addr}/elasti.echo.v1.Echo")
    assert not await kubelet.probe(f"grpc://{addr}/no.such.Service")
    assert await kubelet.probe(f"tcp://{addr}")
    await server.stop(None)
    assert not await kubelet.probe(f"grpc://{addr}")
    assert not await kubelet.probe(f"tcp://{addr}")
