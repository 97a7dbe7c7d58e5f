"""gRPC through the real ingress gateway: stock grpcio clients, the gateway's Envoy, the activator (h2c),
its sidecar, and the local cluster's gRPC echo workload (``elasti.echo.v1.Echo``)."""

from __future__ import annotations

import http.client
import json
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from elasti_istio.kubelet import grpcecho
from elasti_istio.playground.bookinfo import proxied
from elasti_istio.playground.procs import ControllerProc
from tests.e2e.conftest import System
from tests.e2e.support import envoys_route, mesh_serves, phase, scale, until, vs_spec

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

GROUP, VERSION = "elasti.truefoundry.com", "v1alpha1"
PORT = 9090
COLD = "x-elasti-cold-start"


def grpc_app(
    ns: str, *, replicas: int = 1, queue_limit: int = 1000, startup_seconds: float | None = None
) -> list[dict[str, Any]]:
    """The echo workload on a port named ``grpc``; a Gateway and its VirtualService ``echo-gw``, a mesh
    VirtualService ``echo``; an ElastiService bound to both."""
    host = f"echo.{ns}.example"
    labels = {"app": "echo"}
    template: dict[str, Any] = {
        "metadata": {"labels": labels},
        "spec": {
            "containers": [{"name": "app", "image": "e2e/echo", "ports": [{"name": "grpc", "containerPort": PORT}]}]
        },
    }
    if startup_seconds is not None:
        template["metadata"]["annotations"] = {"elasti.truefoundry.com/sim-startup-seconds": f"{startup_seconds:g}"}
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "echo"},
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels}, "template": template},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "echo"},
            "spec": {"selector": labels, "ports": [{"name": "grpc", "port": PORT, "targetPort": PORT}]},
        },
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "echo-gw"},
            "spec": {
                "selector": {"istio": "ingressgateway"},
                "servers": [{"port": {"number": 80, "name": "http", "protocol": "HTTP"}, "hosts": [host]}],
            },
        },
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": "echo-gw"},
            "spec": {
                "hosts": [host],
                "gateways": ["echo-gw"],
                "http": [{"route": [{"destination": {"host": "echo", "port": {"number": PORT}}}]}],
            },
        },
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": "echo"},
            "spec": {"hosts": ["echo"], "http": [{"route": [{"destination": {"host": "echo"}}]}]},
        },
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ElastiService",
            "metadata": {"name": "echo"},
            "spec": {
                "service": "echo",
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "echo"},
                "virtualServices": ["echo-gw", "echo"],
                "minTargetReplicas": 1,
                "activator": {"holdTimeout": "60s", "retryInterval": "100ms", "queueLimit": queue_limit},
            },
        },
    ]


@pytest.fixture
def channel(e2e: System, namespace: str) -> Iterator[grpc.Channel]:
    """A plain grpcio channel to the ingress gateway, naming the workload's gateway host."""
    address = e2e.mesh.ingress.removeprefix("http://")
    ch = grpc.insecure_channel(address, options=[("grpc.default_authority", f"echo.{namespace}.example")])
    try:
        yield ch
    finally:
        ch.close()


def gateway_routes(e2e: System, ns: str, to_activator: bool) -> None:
    until(
        lambda: envoys_route(e2e.api, ns, "echo-gw", to_activator, [e2e.mesh.gateway_admin]),
        "the gateway to route to " + ("the activator" if to_activator else "the workload"),
        timeout=60,
    )


def at_zero(e2e: System, ns: str) -> None:
    scale(e2e.api, ns, "echo", 0)
    until(lambda: proxied(vs_spec(e2e.api, ns, "echo-gw")), "the gateway route moved to the activator")
    until(lambda: phase(e2e.api, ns, "echo") == "ScaledToZero", "ScaledToZero")
    gateway_routes(e2e, ns, True)
    until(lambda: envoys_route(e2e.api, ns, "echo", True), "the mesh client's sidecar to route to the activator")


def by_protocol(e2e: System) -> dict[str, float]:
    """The activator's count of requests by the protocol they arrived in."""
    url = f"http://127.0.0.1:{e2e.activator.admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    out = {"http1": 0.0, "h2": 0.0}
    for line in text.splitlines():
        if line.startswith("elasti_activator_requests_by_protocol_total{"):
            labels, _, value = line.partition("} ")
            out[labels.split('protocol="')[1].split('"')[0]] = float(value)
    return out


def pending(e2e: System, ns: str) -> int:
    url = f"http://127.0.0.1:{e2e.activator.admin_port}/v1/pending/{ns}/echo"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return int(json.loads(resp.read())["pending"])


def all_four(stub: grpcecho.EchoStub, tag: str) -> dict[str, Any]:
    """One call of each kind, concurrently; what each returned (or raised), with its metadata."""
    out: dict[str, Any] = {}
    md = (("x-echo-tag", tag),)

    def unary() -> None:
        resp, call = stub.Unary.with_call(grpcecho.EchoRequest(message=f"u-{tag}"), metadata=md, timeout=90)
        out["unary"] = (resp, dict(call.initial_metadata()), dict(call.trailing_metadata()))

    def server_stream() -> None:
        call = stub.ServerStream(grpcecho.EchoRequest(message=f"s-{tag}", count=3), metadata=md, timeout=90)
        out["server_stream"] = (list(call), dict(call.initial_metadata()), dict(call.trailing_metadata()))

    def client_stream() -> None:
        reqs = iter([grpcecho.EchoRequest(message=f"c{i}-{tag}") for i in range(3)])
        resp, call = stub.ClientStream.with_call(reqs, metadata=md, timeout=90)
        out["client_stream"] = (resp, dict(call.initial_metadata()), dict(call.trailing_metadata()))

    def bidi() -> None:
        reqs = iter([grpcecho.EchoRequest(message=f"b{i}-{tag}") for i in range(3)])
        call = stub.Bidi(reqs, metadata=md, timeout=90)
        out["bidi"] = (list(call), dict(call.initial_metadata()), dict(call.trailing_metadata()))

    def run(fn: Any) -> None:
        try:
            fn()
        except Exception as exc:  # reported below, per call
            out[fn.__name__] = exc

    threads = [threading.Thread(target=run, args=(fn,)) for fn in (unary, server_stream, client_stream, bidi)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def check_four(out: dict[str, Any], tag: str, cold: bool) -> None:
    failed = {k: v for k, v in out.items() if isinstance(v, BaseException)}
    assert not failed, failed
    resp, head, tail = out["unary"]
    assert resp.message == f"u-{tag}" and resp.pod.startswith("echo-")
    assert head[grpcecho.POD_NAME] == resp.pod and (head.get(COLD) == "true") is cold, head
    assert tail[grpcecho.TRAILER] and tail["x-echo-tag"] == tag, tail
    msgs, head, tail = out["server_stream"]
    assert [(m.message, m.index) for m in msgs] == [(f"s-{tag}", i) for i in range(3)]
    assert (head.get(COLD) == "true") is cold and tail["x-echo-tag"] == tag
    resp, head, tail = out["client_stream"]
    assert resp.received == 3 and (head.get(COLD) == "true") is cold and tail["x-echo-tag"] == tag, resp
    msgs, head, tail = out["bidi"]
    assert [m.message for m in msgs] == [f"b{i}-{tag}" for i in range(3)]
    assert (head.get(COLD) == "true") is cold and tail["x-echo-tag"] == tag


def test_grpc_calls_through_the_gateway_warm_and_at_zero(
    e2e: System, namespace: str, controller: ControllerProc, channel: grpc.Channel
) -> None:
    """All four kinds of call through the ingress gateway: on the warm workload, then held at zero,
    woken, and answered with their headers, messages and trailers, each reaching the workload once."""
    api, ns = e2e.api, namespace
    api.apply_all(grpc_app(ns), ns)
    until(lambda: phase(api, ns, "echo") == "Serving", "Serving")
    until(lambda: mesh_serves(api, ns, "echo-gw", [e2e.mesh.gateway_admin]), "the gateway to route to the pods")
    stub = grpcecho.stub(channel)
    check_four(all_four(stub, "warm"), "warm", cold=False)
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
    assert health.status == health_pb2.HealthCheckResponse.SERVING

    at_zero(e2e, ns)
    before = by_protocol(e2e)
    check_four(all_four(stub, "cold"), "cold", cold=True)
    after = by_protocol(e2e)
    # The gateway kept the calls' protocol to the activator: HTTP/2, not HTTP/1.1.
    assert after["h2"] - before["h2"] >= 4 and after["http1"] == before["http1"], (before, after)
    # Exactly once each: the echo server counts the calls it got (the warm ones were on a pod now gone).
    for method in grpcecho.ECHO_METHODS:
        seen = stub.Seen(grpcecho.SeenRequest(method=method), timeout=30)
        assert seen.count == 1, (method, seen)
    # A status the workload ends a call with passes through as it is.
    with pytest.raises(grpc.RpcError) as err:
        stub.Unary(grpcecho.EchoRequest(status_code=9, status_message="no stock"), timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and err.value.details() == "no stock"


def test_grpc_deadline_cancellation_and_overflow_at_zero(
    e2e: System, namespace: str, controller: ControllerProc, channel: grpc.Channel
) -> None:
    """A workload that takes a minute to start: a deadline shorter than the hold is DEADLINE_EXCEEDED at
    the deadline, a cancelled call leaves the queue, a full queue answers UNAVAILABLE; all in gRPC form
    through the gateway."""
    api, ns = e2e.api, namespace
    api.apply_all(grpc_app(ns, replicas=0, queue_limit=1, startup_seconds=120), ns)
    at_zero(e2e, ns)
    stub = grpcecho.stub(channel)

    with pytest.raises(grpc.RpcError) as err:
        stub.Unary(grpcecho.EchoRequest(message="late"), timeout=1.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    until(lambda: pending(e2e, ns) == 0, "the expired call out of the queue")

    held = stub.Unary.future(grpcecho.EchoRequest(message="held"), timeout=90)
    until(lambda: pending(e2e, ns) == 1, "one call held")
    with pytest.raises(grpc.RpcError) as err:
        stub.Unary(grpcecho.EchoRequest(message="one too many"), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "too many held requests" in (err.value.details() or ""), err.value.details()

    held.cancel()
    until(lambda: pending(e2e, ns) == 0, "the cancelled call out of the queue")
    assert held.cancelled()


def test_grpc_and_http1_east_west_keep_their_protocol_to_the_activator(
    e2e: System, namespace: str, controller: ControllerProc
) -> None:
    """From an application pod's sidecar: a gRPC call at zero reaches the activator as HTTP/2 and is
    answered; a plain HTTP/1.1 request to the same sleeping workload's Service reaches it as HTTP/1.1
    (and, the workload speaking only gRPC, gets the workload's own refusal, which is relayed)."""
    api, ns = e2e.api, namespace
    api.apply_all(grpc_app(ns), ns)
    until(lambda: phase(api, ns, "echo") == "Serving", "Serving")
    at_zero(e2e, ns)
    authority = f"echo.{ns}.svc.cluster.local:{PORT}"
    before = by_protocol(e2e)
    with grpc.insecure_channel(f"{e2e.mesh.client}:{PORT}", options=[("grpc.default_authority", authority)]) as ch:
        stub = grpcecho.stub(ch)
        resp, call = stub.Unary.with_call(grpcecho.EchoRequest(message="east-west"), timeout=90)
        assert resp.message == "east-west" and dict(call.initial_metadata()).get(COLD) == "true"
        replies = list(stub.Bidi(iter([grpcecho.EchoRequest(message=m) for m in "ab"]), timeout=90))
        assert [r.message for r in replies] == ["a", "b"]
        # Messages larger than HTTP/2's default frame and stream window, both ways, through Envoy.
        at_zero(e2e, ns)
        big = "x" * 300_000
        resp = stub.Unary(grpcecho.EchoRequest(message=big, payload_size=2_000_000), timeout=90)
        assert resp.message == big and len(resp.payload) == 2_000_000
    after = by_protocol(e2e)
    assert after["h2"] - before["h2"] >= 1 and after["http1"] == before["http1"], (before, after)

    at_zero(e2e, ns)
    before = by_protocol(e2e)
    conn = http.client.HTTPConnection(e2e.mesh.client, PORT, timeout=90)
    try:
        conn.request("GET", f"http://{authority}/not-grpc")
        resp_ = conn.getresponse()
        resp_.read()
    finally:
        conn.close()
    after = by_protocol(e2e)
    assert after["http1"] - before["http1"] >= 1 and after["h2"] == before["h2"], (before, after)
