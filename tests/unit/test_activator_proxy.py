"""The activator end to end over real HTTP: a hand-fed registry, local backends behind a forward proxy
standing in for the sidecar, and a stub of the controller's wake endpoint.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import itertools
import json
import os
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from activator.app import Activator
from activator.config import Config
from activator.registry import Registry
from activator.server import retry_pause
from tests.activator_stubs import MeshProxy, WakeEndpoint, elastiservice, serve

NS = "shop"
_rv = itertools.count(2)


def backend_app(state: dict[str, Any]) -> web.Application:
    """The workload: echoes what it received, streams, drips, redirects, speaks websocket."""
    hits: Counter[str] = state.setdefault("hits", Counter())
    state.setdefault("drip_gate", asyncio.Event())
    state.setdefault("upload_started", asyncio.Event())

    async def echo(request: web.Request) -> web.Response:
        hits["echo"] += 1
        body = await request.read()
        return web.json_response(
            {
                "method": request.method,
                "target": request.raw_path,
                "headers": list(request.headers.items()),
                "length": len(body),
                "sha256": hashlib.sha256(body).hexdigest(),
            }
        )

    async def mirror(request: web.Request) -> web.StreamResponse:
        hits["mirror"] += 1
        out = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await out.prepare(request)
        async for chunk in request.content.iter_chunked(65536):
            await out.write(chunk)
        await out.write_eof()
        return out

    async def upload(request: web.Request) -> web.Response:
        hits["upload"] += 1
        total = 0
        async for chunk in request.content.iter_any():
            total += len(chunk)
            state["upload_started"].set()
        return web.json_response({"length": total})

    async def drip(request: web.Request) -> web.StreamResponse:
        hits["drip"] += 1
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        await out.write(b"data: first\n\n")
        await state["drip_gate"].wait()  # opened by the client once it has the first event
        await out.write(b"data: second\n\n")
        await out.write_eof()
        return out

    async def redirect(request: web.Request) -> web.Response:
        hits["redirect"] += 1
        resp = web.Response(status=302, headers={"Location": "/elsewhere?x=1"})
        resp.headers.add("Set-Cookie", "a=1; Path=/")
        resp.headers.add("Set-Cookie", "b=2; Path=/")
        return resp

    async def gz(request: web.Request) -> web.Response:
        return web.Response(body=gzip.compress(b"compressed" * 100), headers={"Content-Encoding": "gzip"})

    async def ws(request: web.Request) -> web.WebSocketResponse:
        hits["ws"] += 1
        sock = web.WebSocketResponse(protocols=("echo.v1",), max_msg_size=0)  # the workload takes any size
        await sock.prepare(request)
        async for msg in sock:
            if msg.type == aiohttp.WSMsgType.TEXT:
                if msg.data == "bye":
                    await sock.close(code=4001, message=b"bye")
                    break
                if msg.data.startswith("big:"):
                    await sock.send_bytes(b"x" * int(msg.data[4:]))
                    continue
                await sock.send_str("echo:" + msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await sock.send_bytes(msg.data[::-1])
        return sock

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/echo{tail:.*}", echo)
    app.router.add_post("/mirror", mirror)
    app.router.add_post("/upload", upload)
    app.router.add_get("/drip", drip)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/gzip", gz)
    app.router.add_get("/ws", ws)
    return app


class Env:
    """One activator with its surroundings, all on 127.0.0.1."""

    def __init__(self, **cfg: Any) -> None:
        self.cfg_overrides = cfg
        self.state: dict[str, Any] = {}
        self.registry = Registry()
        self.registry.mark_synced()

    async def start(self) -> Env:
        self._backend_runner, self.backend_port = await serve(backend_app(self.state))
        self.mesh = await MeshProxy().start()
        self.wake = await WakeEndpoint().start()
        cfg = dict(
            listen=("127.0.0.1", 0),
            admin_listen=("127.0.0.1", 0),
            controller_url=self.wake.url,
            upstream_proxy=self.mesh.url,
        )
        cfg.update(self.cfg_overrides)
        self.activator = Activator(Config(**cfg), self.registry)
        await self.activator.start()
        self.url = f"http://127.0.0.1:{self.activator.proxy_address[1]}"
        self.admin = f"http://127.0.0.1:{self.activator.admin_address[1]}"
        self.client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            auto_decompress=False,
            skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent"),
        )
        return self

    async def stop(self) -> None:
        await self.client.close()
        await self.activator.close()
        await self.wake.stop()
        await self.mesh.stop()
        await self._backend_runner.cleanup()

    def origin(self, name: str) -> str:
        return f"{name}-elasti-origin.{NS}.svc.cluster.local:9080"

    def put(self, name: str, *, mesh_ready: bool | None = None, ns: str = NS, **kw: Any) -> None:
        """Creates or updates the ElastiService ``ns/name`` (origin routed to the backend) as a watch event would."""
        kw.setdefault("origin", (f"{name}-elasti-origin", 9080))
        obj = elastiservice(ns, name, resource_version=str(next(_rv)), **kw)
        self.registry.apply("MODIFIED", obj)
        authority = f"{kw['origin'][0]}.{ns}.svc.cluster.local:{kw['origin'][1]}"
        self.mesh.route(authority, f"http://127.0.0.1:{self.backend_port}", ready=False)
        ready = kw.get("ready", False) if mesh_ready is None else mesh_ready
        (self.mesh.ready.add if ready else self.mesh.ready.discard)(authority)

    def get(self, path: str, name: str = "details", ns: str = NS, **kw: Any) -> Any:
        headers = {"elasti-service": f"{ns}/{name}", **kw.pop("headers", {})}
        return self.client.get(self.url + path, headers=headers, **kw)

    async def pending(self, name: str = "details", ns: str = NS) -> int:
        async with self.client.get(f"{self.admin}/v1/pending/{ns}/{name}") as r:
            return (await r.json())["pending"]

    def pending_sync(self, ns: str = NS, name: str = "details") -> int:
        return self.activator.holds.pending((ns, name))

    async def until_pending(self, n: int, name: str = "details", ns: str = NS, timeout: float = 20) -> None:
        async with asyncio.timeout(timeout):
            while await self.pending(name, ns) != n:
                await asyncio.sleep(0.02)

    async def metric(self, metric: str, **labels: str) -> float:
        async with self.client.get(self.admin + "/metrics") as r:
            return sample(await r.text(), metric, **labels)


def sample(text: str, metric: str, **labels: str) -> float:
    """The value of one series in a Prometheus text exposition (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(metric + " "):  # a series without labels
            body, value = "", line.split(" ", 1)[1]
        else:
            name, _, rest = line.partition("{")
            if name != metric:
                continue
            body, _, value = rest.rpartition("} ")
        got = dict(kv.split("=", 1) for kv in body.replace('"', "").split(",")) if body else {}
        if got == labels:
            return float(value)
    return 0.0


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    e = await Env().start()
    try:
        yield e
    finally:
        await e.stop()


async def body_json(resp: aiohttp.ClientResponse) -> Any:
    return json.loads(await resp.read())


# --- routing -----------------------------------------------------------------------------------------


async def test_missing_malformed_duplicate_and_unknown_header(env: Env) -> None:
    env.put("details", ready=True)
    url = env.url + "/echo"
    async with env.client.get(url) as r:
        assert r.status == 400
        assert (await body_json(r))["error"] == "missing elasti-service header"
    async with env.client.get(url, headers={"elasti-service": "details"}) as r:
        assert r.status == 400
        body = await body_json(r)
        assert body["error"] == "malformed elasti-service header" and "<namespace>/<name>" in body["detail"]
    dup = [("elasti-service", f"{NS}/details"), ("elasti-service", f"{NS}/details")]
    async with env.client.get(url, headers=dup) as r:
        assert r.status == 400
        assert (await body_json(r))["error"] == "duplicate elasti-service header"
    async with env.client.get(url, headers={"elasti-service": f"{NS}/nope"}) as r:
        assert r.status == 404
        body = await body_json(r)
        assert body["error"] == "unknown ElastiService" and f"{NS}/nope" in body["detail"]
    assert env.state["hits"]["echo"] == 0
    assert env.wake.calls == []
    assert await env.metric("elasti_activator_requests_total", namespace="", name="", outcome="rejected") == 4


# --- holding -----------------------------------------------------------------------------------------


async def test_overflow_answers_503_with_retry_after() -> None:
    e = await Env(max_held=3).start()
    try:
        e.put("details", queue_limit=2)
        e.put("reviews", queue_limit=10)
        held = [asyncio.create_task(_status(e, "/echo")) for _ in range(2)]
        await e.until_pending(2)
        async with e.get("/echo") as r:  # the ElastiService's queueLimit
            assert r.status == 503 and r.headers["Retry-After"].isdigit()
            assert "queueLimit" in (await body_json(r))["detail"]
        held.append(asyncio.create_task(_status(e, "/echo", name="reviews")))
        await e.until_pending(1, name="reviews")
        async with e.get("/echo", name="reviews") as r:  # the global --max-held
            assert r.status == 503 and r.headers["Retry-After"].isdigit()
            assert "--max-held" in (await body_json(r))["detail"]
        e.put("details", queue_limit=2, ready=True)
        e.put("reviews", ready=True)
        assert await asyncio.gather(*held) == [200, 200, 200]
        assert await e.metric("elasti_activator_requests_total", namespace=NS, name="details", outcome="overflow") == 1
    finally:
        await e.stop()


async def test_hold_timeout_answers_504(env: Env) -> None:
    env.put("details", hold_timeout="300ms")
    async with env.get("/echo") as r:
        assert r.status == 504
        body = await body_json(r)
        assert body["error"] == "hold timeout" and "holdTimeout" in body["detail"]
    assert env.state["hits"]["echo"] == 0
    assert await env.pending() == 0
    assert await env.metric("elasti_activator_requests_total", namespace=NS, name="details", outcome="timeout") == 1


async def test_wake_failure_fails_held_requests_early(env: Env) -> None:
    env.put("details", hold_timeout="10m")
    held = [asyncio.create_task(_response(env, "/echo")) for _ in range(3)]
    await env.until_pending(3)
    env.put("details", hold_timeout="10m", wake_failed=("ScaleRefused", "exceeded quota: pods=0", "t1"))
    for status, body, _ in await asyncio.wait_for(asyncio.gather(*held), 30):  # long before the 10m holdTimeout
        assert status == 503
        assert json.loads(body) == {"error": "wake failed", "detail": "exceeded quota: pods=0"}
    assert await env.pending() == 0
    assert env.wake.count(NS, "details") == 1
    assert await env.metric("elasti_activator_requests_total", namespace=NS, name="details", outcome="wake_failed") == 3


async def test_refused_wake_fails_held_requests_at_once(env: Env) -> None:
    """The controller refuses (409) while WakeFailed stays as it was: the answer itself fails the cycle."""
    env.wake.refuse = (409, {"error": "scale-up refused: quota", "reason": "ScaleRefused"})
    env.put("details", hold_timeout="10m", wake_failed=("ScaleRefused", "scale-up refused: quota", "t1"))
    status, body, _ = await asyncio.wait_for(_response(env, "/echo"), 30)
    assert status == 503 and json.loads(body) == {"error": "wake failed", "detail": "scale-up refused: quota"}
    status, _, _ = await asyncio.wait_for(_response(env, "/echo"), 30)  # the next request tries again
    assert status == 503 and env.wake.count(NS, "details") == 2
    assert (
        await env.metric("elasti_activator_wake_notifications_total", namespace=NS, name="details", result="refused")
        == 2
    )


async def test_stale_wake_failure_starts_a_new_cycle(env: Env) -> None:
    """A WakeFailed left from an earlier cycle fails nobody: the next request is held and wakes again."""
    env.put("details", wake_failed=("ScaleRefused", "old", "t1"))
    task = asyncio.create_task(_response(env, "/echo"))
    await env.until_pending(1)
    async with asyncio.timeout(20):
        while env.wake.count(NS, "details") < 1:
            await asyncio.sleep(0.02)
    env.put("details")  # the controller clears the condition as the new wake starts
    env.put("details", ready=True)
    status, _, headers = await asyncio.wait_for(task, 30)
    assert status == 200 and headers["X-Elasti-Cold-Start"] == "true"


async def test_client_disconnect_dequeues_and_is_never_forwarded(env: Env) -> None:
    env.put("details")
    _, writer = await asyncio.open_connection("127.0.0.1", env.activator.proxy_address[1])
    writer.write(
        f"POST /echo HTTP/1.1\r\nHost: x\r\nelasti-service: {NS}/details\r\nContent-Length: 2\r\n\r\nhi".encode()
    )
    await writer.drain()
    await env.until_pending(1)
    writer.close()
    await env.until_pending(0)
    env.put("details", ready=True)
    async with env.get("/echo") as r:  # a later request goes through: the backend is reachable
        assert r.status == 200
    assert env.state["hits"]["echo"] == 1  # ...and it is the only one that arrived
    assert await env.metric("elasti_activator_requests_total", namespace=NS, name="details", outcome="client_gone") == 1
    assert await env.metric("elasti_activator_held_requests", namespace=NS, name="details") == 0


async def test_one_wake_for_100_concurrent_requests(env: Env) -> None:
    env.put("details")
    env.put("details", ns="other")  # same name, another namespace: its own wake
    tasks = [asyncio.create_task(_status(env, f"/echo/{i}")) for i in range(100)]
    tasks.append(asyncio.create_task(_status(env, "/echo", ns="other")))
    await env.until_pending(100)
    await env.until_pending(1, ns="other")
    async with asyncio.timeout(20):
        while len(env.wake.calls) < 2:
            await asyncio.sleep(0.02)
    env.put("details", ready=True)
    env.put("details", ns="other", ready=True)
    assert await asyncio.gather(*tasks) == [200] * 101
    assert env.wake.count(NS, "details") == 1
    assert env.wake.count("other", "details") == 1
    assert (
        await env.metric("elasti_activator_wake_notifications_total", namespace=NS, name="details", result="accepted")
        == 1
    )
    # the cycle is over: the next held request notifies again
    env.put("details")
    task = asyncio.create_task(_status(env, "/echo"))
    async with asyncio.timeout(20):
        while env.wake.count(NS, "details") < 2:
            await asyncio.sleep(0.02)
    env.put("details", ready=True)
    assert await task == 200


async def test_wake_is_retried_while_the_controller_fails(env: Env) -> None:
    env.wake.fail_first = 2
    env.put("details")
    task = asyncio.create_task(_status(env, "/echo"))
    async with asyncio.timeout(20):
        while env.wake.count(NS, "details") < 3:
            await asyncio.sleep(0.02)
    assert (
        await env.metric("elasti_activator_wake_notifications_total", namespace=NS, name="details", result="error") == 2
    )
    env.put("details", ready=True)
    assert await task == 200


async def test_released_as_soon_as_the_status_says_ready(env: Env) -> None:
    """retryInterval and holdTimeout are an hour: only the status event can release the request."""
    env.put("details", hold_timeout="1h", retry_interval="1h", origin=("details-elasti-origin", 9080))
    task = asyncio.create_task(_response(env, "/echo"))
    await env.until_pending(1)
    env.put("details", hold_timeout="1h", retry_interval="1h", ready=True)
    status, _, headers = await asyncio.wait_for(task, 30)
    assert status == 200 and headers["X-Elasti-Cold-Start"] == "true"
    assert env.mesh.not_ready_answers == 0  # nothing was sent before the status said ready


async def test_released_by_the_wake_answer_before_the_status(env: Env) -> None:
    """The controller answers the (waiting) wake call with a ready replica; the status never says so."""
    env.wake.answer_ready = True
    env.put("details", hold_timeout="1h", retry_interval="1h", mesh_ready=True)
    status, _, headers = await asyncio.wait_for(_response(env, "/echo"), 30)
    assert status == 200 and headers["X-Elasti-Cold-Start"] == "true"
    assert env.wake.calls[0]["wait"] == 30.0  # --wake-wait's default, asked of the controller
    assert env.registry.targets[(NS, "details")].ready  # marked by the answer: no status event said so


async def test_held_without_origin_until_it_appears(env: Env) -> None:
    env.registry.apply("ADDED", elastiservice(NS, "details", ready=True))  # ready, but no status.origin yet
    task = asyncio.create_task(_status(env, "/echo"))
    await env.until_pending(1)
    env.put("details", ready=True)
    assert await asyncio.wait_for(task, 30) == 200


async def _mesh_ready_after(env: Env, answers: int) -> None:
    """Lets the mesh answer "no healthy upstream" ``answers`` times, then gives it the endpoint."""
    async with asyncio.timeout(20):
        while env.mesh.not_ready_answers < answers:
            await asyncio.sleep(0.002)
    env.mesh.ready.add(env.origin("details"))


async def test_retry_through_no_healthy_upstream(env: Env) -> None:
    env.put("details", ready=True, mesh_ready=False, retry_interval="20ms")
    payload = os.urandom(1000)
    task = asyncio.create_task(_response(env, "/echo", method="POST", data=payload))
    await _mesh_ready_after(env, 3)
    status, body, headers = await asyncio.wait_for(task, 30)
    assert status == 200 and headers["X-Elasti-Cold-Start"] == "true"
    echoed = json.loads(body)
    assert echoed["length"] == 1000 and echoed["sha256"] == hashlib.sha256(payload).hexdigest()  # resent whole
    assert env.state["hits"]["echo"] == 1


async def test_first_retries_come_before_retry_interval(env: Env) -> None:
    """retryInterval is an hour: only the prober's short first pauses (1 ms) let it through."""
    env.put("details", ready=True, mesh_ready=False, retry_interval="1h", hold_timeout="1h")
    task = asyncio.create_task(_response(env, "/echo"))
    await _mesh_ready_after(env, 3)
    status, _, headers = await asyncio.wait_for(task, 30)
    assert status == 200 and headers["X-Elasti-Cold-Start"] == "true"


async def test_one_request_probes_the_mesh_for_all(env: Env) -> None:
    """50 requests released into a mesh without the endpoint yet: one retries soon, the others wait
    for it (retryInterval is an hour), and all go through once it gets an answer."""
    env.put("details", ready=True, mesh_ready=False, retry_interval="1h", hold_timeout="1h")
    tasks = [asyncio.create_task(_status(env, f"/echo?n={i}")) for i in range(50)]
    await _mesh_ready_after(env, 54)
    assert await asyncio.wait_for(asyncio.gather(*tasks), 30) == [200] * 50
    # Each sent once into the missing endpoint, and one of them a few times more (every millisecond).
    assert 54 <= env.mesh.not_ready_answers < 50 + 30
    assert await env.metric("elasti_activator_mesh_not_ready_total", namespace=NS, name="details") == (
        env.mesh.not_ready_answers
    )


def test_retry_pause_is_a_tenth_of_the_wait_between_1_ms_and_the_interval() -> None:
    assert [retry_pause(0.1, t) for t in (0, 0.005, 0.01)] == [0.001] * 3
    assert retry_pause(0.1, 0.04) == pytest.approx(0.004)
    assert retry_pause(0.1, 0.5) == pytest.approx(0.05)
    assert retry_pause(0.1, 5) == 0.1
    assert retry_pause(0.0005, 0) == 0.0005


@pytest.mark.parametrize("chunked", [False, True])
async def test_bodies_over_the_memory_bound_are_spooled_and_sent_again(chunked: bool) -> None:
    """A body larger than --retry-body-limit is spooled to disk as it is read, so a forward the mesh
    answered "not ready" (nothing reached the workload) is sent again, whole, like a small one."""
    e = await Env(retry_body_limit=1024).start()
    try:
        e.put("details")  # asleep: the request is held, its body read whole before the first forward
        payload = os.urandom(3 * 1024 * 1024 + 17)

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(payload), 100_000):
                yield payload[i : i + 100_000]

        headers = {"elasti-service": f"{NS}/details"}
        call = asyncio.create_task(
            e.client.post(e.url + "/echo", data=chunks() if chunked else payload, headers=headers)
        )
        await e.until_pending(1)
        e.put("details", ready=True, mesh_ready=False)  # ready, but the mesh has no endpoint yet
        async with asyncio.timeout(20):
            while e.mesh.not_ready_answers < 2:
                await asyncio.sleep(0.01)
        assert e.activator.proxy.spool.used > 0  # beyond the memory bound it is on disk
        e.mesh.ready.add(e.origin("details"))
        async with await asyncio.wait_for(call, 30) as r:
            assert r.status == 200, await r.text()
            echoed = await body_json(r)
        assert (echoed["length"], echoed["sha256"]) == (len(payload), hashlib.sha256(payload).hexdigest())
        assert e.state["hits"]["echo"] == 1
        assert e.activator.proxy.spool.used == 0  # its spooled part was freed with the request
    finally:
        await e.stop()


async def test_a_full_spool_answers_503_with_retry_after(tmp_path: Path) -> None:
    e = await Env(retry_body_limit=1024, spool_limit=1024 * 1024, spool_dir=str(tmp_path)).start()
    try:
        e.put("details")
        headers = {"elasti-service": f"{NS}/details"}
        first = asyncio.create_task(e.client.post(e.url + "/echo", data=os.urandom(900 * 1024), headers=headers))
        await e.until_pending(1)
        e.put("details", ready=True, mesh_ready=False)
        async with asyncio.timeout(20):
            while e.mesh.not_ready_answers < 1:
                await asyncio.sleep(0.01)
        e.put("details", ready=False)  # asleep again: the next request is held and kept whole too
        second = asyncio.create_task(e.client.post(e.url + "/echo", data=os.urandom(900 * 1024), headers=headers))
        await e.until_pending(2)
        e.put("details", ready=True, mesh_ready=False)  # both read whole now: no room for the second
        async with await asyncio.wait_for(second, 30) as r:
            assert r.status == 503 and "Retry-After" in r.headers
            assert (await body_json(r))["error"] == "spool full"
        e.mesh.ready.add(e.origin("details"))
        async with await asyncio.wait_for(first, 30) as r:
            assert r.status == 200  # the first one was not affected
    finally:
        await e.stop()


# --- forwarding --------------------------------------------------------------------------------------


async def test_host_rewritten_to_the_origin(env: Env) -> None:
    env.put("details", ready=True)
    path = "/echo/a%2Fb/c?x=1&y=%20z&x=2"
    headers = {
        "Host": "details:9080",
        "Connection": "keep-alive, X-Hop",
        "X-Hop": "secret",
        "TE": "trailers",
        "Proxy-Authorization": "Basic eDp5",
        "X-Custom": "kept",
        "User-Agent": "tester/1",
    }
    async with env.get(path, headers=headers) as r:
        assert r.status == 200
        echoed = await body_json(r)
    got = {k.lower(): v for k, v in echoed["headers"]}
    assert got["host"] == env.origin("details")
    assert got["x-forwarded-host"] == "details:9080"
    assert got["x-forwarded-for"] == "127.0.0.1"
    assert got["x-forwarded-proto"] == "http"
    assert got["x-custom"] == "kept" and got["user-agent"] == "tester/1"
    for gone in ("x-hop", "te", "proxy-authorization", "elasti-service"):
        assert gone not in got
    assert "accept-encoding" not in got and "accept" not in got  # nothing added on the way
    assert echoed["target"] == path  # path and query byte for byte
    method, target, _ = env.mesh.seen[-1]
    assert (method, target) == ("GET", f"http://{env.origin('details')}{path}")  # absolute form to the proxy


async def test_1mib_body_both_ways(env: Env) -> None:
    env.put("details", ready=True)
    payload = os.urandom(1 << 20)
    async with env.client.post(env.url + "/mirror", data=payload, headers={"elasti-service": f"{NS}/details"}) as r:
        assert r.status == 200
        assert await r.read() == payload


@pytest.mark.parametrize("chunked", [True, False])
async def test_upload_larger_than_the_limit_is_streamed(chunked: bool) -> None:
    """The backend sees the upload begin before the client has produced the rest: nothing buffers it whole."""
    e = await Env(retry_body_limit=64 * 1024).start()
    try:
        e.put("details", ready=True)
        produced = 0

        async def body() -> AsyncIterator[bytes]:
            nonlocal produced
            for _ in range(4):
                produced += 64 * 1024
                yield os.urandom(64 * 1024)
            await asyncio.wait_for(e.state["upload_started"].wait(), 20)
            for _ in range(60):
                produced += 64 * 1024
                yield os.urandom(64 * 1024)

        headers = {"elasti-service": f"{NS}/details"}
        if not chunked:
            headers["Content-Length"] = str(64 * 64 * 1024)
        async with e.client.post(e.url + "/upload", data=body(), headers=headers) as r:
            assert r.status == 200
            assert (await r.json())["length"] == produced == 64 * 64 * 1024
    finally:
        await e.stop()


async def test_chunked_dripping_response_arrives_incrementally(env: Env) -> None:
    env.put("details", ready=True)
    async with env.get("/drip") as r:
        assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
        first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 20)  # before the backend sends the rest
        assert first == b"data: first\n\n"
        env.state["drip_gate"].set()
        assert await r.read() == b"data: second\n\n"


async def test_redirect_and_encoding_passed_through(env: Env) -> None:
    env.put("details", ready=True)
    async with env.get("/redirect", allow_redirects=False) as r:
        assert r.status == 302
        assert r.headers["Location"] == "/elsewhere?x=1"
        assert r.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
    async with env.get("/gzip", headers={"Accept-Encoding": "gzip"}) as r:
        assert r.headers["Content-Encoding"] == "gzip"
        assert gzip.decompress(await r.read()) == b"compressed" * 100  # not decoded on the way
    assert env.state["hits"]["redirect"] == 1


async def test_websocket_echo(env: Env) -> None:
    env.put("details")  # asleep: the upgrade is held too

    async def talk() -> tuple[list[Any], int | None, str | None, str | None]:
        async with env.client.ws_connect(
            env.url + "/ws", headers={"elasti-service": f"{NS}/details"}, protocols=("echo.v1",)
        ) as ws:
            await ws.send_str("hello")
            got = [(await ws.receive()).data]
            await ws.send_bytes(b"\x01\x02\x03")
            got.append((await ws.receive()).data)
            await ws.send_str("bye")
            closing = await ws.receive()
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            return got, ws.close_code, ws.protocol, ws._response.headers.get("X-Elasti-Cold-Start")

    task = asyncio.create_task(talk())
    await env.until_pending(1)
    env.put("details", ready=True)
    got, code, protocol, cold = await asyncio.wait_for(task, 30)
    assert got == ["echo:hello", b"\x03\x02\x01"]
    assert code == 4001 and protocol == "echo.v1" and cold == "true"
    assert env.state["hits"]["ws"] == 1


@pytest.mark.parametrize("direction", ["from the client", "from the workload"])
async def test_websocket_messages_over_the_limit_close_with_1009(env: Env, direction: str) -> None:
    """Each websocket message is reassembled in the activator's memory: one beyond the limit (4 MiB by
    default) closes both legs with 1009 (message too big) instead of growing the activator."""
    env.put("details", ready=True)
    big = 5 * 1024 * 1024
    async with env.client.ws_connect(
        env.url + "/ws", headers={"elasti-service": f"{NS}/details"}, max_msg_size=0
    ) as ws:
        await ws.send_bytes(b"y" * (1024 * 1024))  # under the limit: relayed both ways
        assert len((await ws.receive()).data) == 1024 * 1024
        if direction == "from the client":
            await ws.send_bytes(b"z" * big)
        else:
            await ws.send_str(f"big:{big}")
        msg = await asyncio.wait_for(ws.receive(), 30)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), (msg.type, len(msg.data or b""))
        assert ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG, (msg, ws.close_code)


async def test_held_requests_go_to_the_port_their_route_chose(env: Env) -> None:
    """A multi-port Service: the header's port, else the port a request to the Service by name came to."""
    env.put("web", ports=[9080, 9090])
    other = f"web-elasti-origin.{NS}.svc.cluster.local:9090"
    env.mesh.route(other, f"http://127.0.0.1:{env.backend_port}", ready=False)

    async def host_seen(header: str, host: str | None = None) -> tuple[int, str]:
        headers = {"elasti-service": header, **({"Host": host} if host else {})}
        async with env.client.get(env.url + "/echo", headers=headers) as r:
            return r.status, dict((await r.json())["headers"]).get("Host", "") if r.status == 200 else ""

    calls = [
        asyncio.create_task(host_seen(f"{NS}/web:9090")),
        asyncio.create_task(host_seen(f"{NS}/web")),
        asyncio.create_task(host_seen(f"{NS}/web", f"web.{NS}.svc.cluster.local:9090")),
        asyncio.create_task(host_seen(f"{NS}/web", "web:9090")),
        asyncio.create_task(host_seen(f"{NS}/web", "elsewhere.example.com:9090")),  # not the Service: default
    ]
    await env.until_pending(5, "web")
    env.mesh.ready.add(other)
    env.put("web", ports=[9080, 9090], ready=True)
    got = await asyncio.wait_for(asyncio.gather(*calls), 30)
    assert got == [(200, other), (200, env.origin("web")), (200, other), (200, other), (200, env.origin("web"))]
    async with env.client.get(env.url + "/echo", headers={"elasti-service": f"{NS}/web:7777"}) as r:
        assert r.status == 502 and (await r.json())["error"] == "port not on the Service"


async def test_keep_alive_connection_reused(env: Env) -> None:
    env.put("details")
    reader, writer = await asyncio.open_connection("127.0.0.1", env.activator.proxy_address[1])
    try:
        request = f"GET /echo/{{}} HTTP/1.1\r\nHost: details\r\nelasti-service: {NS}/details\r\n\r\n"
        writer.write(request.format(0).encode())  # held first...
        await writer.drain()
        await env.until_pending(1)
        env.put("details", ready=True)
        statuses = [await _read_response(reader)]
        for i in range(1, 4):  # ...then late traffic on the same connection
            writer.write(request.format(i).encode())
            await writer.drain()
            statuses.append(await _read_response(reader))
        assert statuses == [200, 200, 200, 200]
    finally:
        writer.close()
    assert env.state["hits"]["echo"] == 4
    assert len(env.mesh.peers) == 1  # upstream, one pooled keep-alive connection carried them all


async def test_late_traffic_forwarded_at_once(env: Env) -> None:
    env.put("details", ready=True)
    for _ in range(3):
        async with env.get("/echo") as r:
            assert r.status == 200
            assert "X-Elasti-Cold-Start" not in r.headers
    assert env.wake.calls == []
    assert await env.metric("elasti_activator_requests_total", namespace=NS, name="details", outcome="forwarded") == 3
    assert await env.metric("elasti_activator_hold_duration_seconds_count", namespace=NS, name="details") == 0


async def test_no_cold_start_header_when_disabled() -> None:
    e = await Env(cold_start_header=False).start()
    try:
        e.put("details")
        task = asyncio.create_task(_response(e, "/echo"))
        await e.until_pending(1)
        e.put("details", ready=True)
        status, _, headers = await asyncio.wait_for(task, 30)
        assert status == 200 and "X-Elasti-Cold-Start" not in headers
    finally:
        await e.stop()


async def test_upstream_connection_failure_is_502() -> None:
    e = await Env(upstream_proxy=None).start()  # direct: the origin name resolves nowhere
    try:
        e.put("details", ready=True, origin=("no-such-origin", 9080))
        async with e.get("/echo") as r:
            assert r.status == 502
            assert (await body_json(r))["error"] == "upstream unreachable"
        assert (
            await e.metric("elasti_activator_requests_total", namespace=NS, name="details", outcome="upstream_error")
            == 1
        )
    finally:
        await e.stop()


async def test_deleted_while_held(env: Env) -> None:
    env.put("details")
    task = asyncio.create_task(_response(env, "/echo"))
    await env.until_pending(1)
    env.registry.apply("DELETED", elastiservice(NS, "details"))
    status, body, headers = await asyncio.wait_for(task, 30)
    assert status == 503 and json.loads(body)["error"] == "ElastiService deleted" and "Retry-After" in headers
    async with env.get("/echo") as r:
        assert r.status == 404


# --- admin and metrics -------------------------------------------------------------------------------


async def test_admin_endpoints() -> None:
    registry = Registry()  # not synced yet
    e = Env()
    e.registry = registry
    await e.start()
    try:
        async with e.client.get(e.admin + "/healthz") as r:
            assert r.status == 200
        async with e.client.get(e.admin + "/readyz") as r:
            assert r.status == 503
        registry.mark_synced()
        async with e.client.get(e.admin + "/readyz") as r:
            assert r.status == 200
        async with e.client.get(e.admin + f"/v1/pending/{NS}/nope") as r:
            assert r.status == 404
        e.put("details")
        tasks = [asyncio.create_task(_status(e, "/echo")) for _ in range(2)]
        await e.until_pending(2)
        async with e.client.get(e.admin + f"/v1/pending/{NS}/details") as r:
            assert await r.json() == {"pending": 2}
        e.put("details", ready=True)
        assert await asyncio.gather(*tasks) == [200, 200]
        assert await e.pending() == 0
    finally:
        await e.stop()


async def test_metrics_labels_are_bounded(env: Env) -> None:
    env.put("details", ready=True)
    env.put("ratings", hold_timeout="50ms")
    for i in range(20):
        async with env.client.get(
            f"{env.url}/secret-path-{i}?q={i}", headers={"elasti-service": f"ns{i}/svc{i}", "Host": f"host{i}.example"}
        ) as r:
            assert r.status == 404
        async with env.client.get(env.url + f"/p{i}", headers={"elasti-service": f"bad value {i}"}) as r:
            assert r.status == 400
    async with env.get("/echo/abc?token=xyz") as r:
        assert r.status == 200
    async with env.get("/echo", name="ratings") as r:
        assert r.status == 504
    async with env.client.get(env.admin + "/metrics") as r:
        text = await r.text()
    allowed = {("", ""), (NS, "details"), (NS, "ratings")}
    seen = set()
    for line in text.splitlines():
        if not line.startswith("elasti_activator_") or "{" not in line:
            continue
        labels = dict(
            part.split("=", 1) for part in line[line.index("{") + 1 : line.index("}")].replace('"', "").split(",")
        )
        assert set(labels) <= {"namespace", "name", "outcome", "result", "le", "protocol"}, line
        if "protocol" in labels:
            assert labels["protocol"] in {"http1", "h2"}, line
            continue
        seen.add((labels.get("namespace"), labels.get("name")))
        if "outcome" in labels:
            assert labels["outcome"] in {
                "forwarded",
                "timeout",
                "overflow",
                "rejected",
                "client_gone",
                "upstream_error",
                "wake_failed",
                "static",
            }
    assert seen <= allowed and ("", "") in seen
    for leaked in ("secret-path", "host1", "ns1", "svc1", "bad value", "token", "abc"):
        assert leaked not in text
    assert await env.metric("elasti_activator_requests_total", namespace="", name="", outcome="rejected") == 40


# --- helpers -----------------------------------------------------------------------------------------


async def _status(env: Env, path: str, name: str = "details", ns: str = NS) -> int:
    async with env.get(path, name=name, ns=ns) as r:
        await r.read()
        return r.status


async def _response(env: Env, path: str, method: str = "GET", data: bytes | None = None) -> tuple[int, bytes, Any]:
    async with env.client.request(method, env.url + path, data=data, headers={"elasti-service": f"{NS}/details"}) as r:
        return r.status, await r.read(), r.headers


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    length = next(int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:"))
    await reader.readexactly(length)
    return status


async def test_queue_limit_gauges_give_the_alerts_their_denominators() -> None:
    """``elasti_activator_queue_limit`` is the ElastiService's queueLimit from its first held request,
    ``elasti_activator_max_held`` is --max-held; both go with the ElastiService's other series."""
    e = await Env(max_held=7).start()
    try:
        assert await e.metric("elasti_activator_max_held") == 7
        e.put("details", queue_limit=5)
        task = asyncio.create_task(_status(e, "/echo"))
        await e.until_pending(1)
        assert await e.metric("elasti_activator_queue_limit", namespace=NS, name="details") == 5
        assert await e.metric("elasti_activator_held_requests", namespace=NS, name="details") == 1
        e.put("details", ready=True, queue_limit=5)
        assert await asyncio.wait_for(task, 30) == 200
        e.registry.apply("DELETED", elastiservice(NS, "details", resource_version=str(next(_rv))))
        async with e.client.get(e.admin + "/metrics") as r:
            text = await r.text()
        assert "elasti_activator_queue_limit{" not in text, text
    finally:
        await e.stop()
