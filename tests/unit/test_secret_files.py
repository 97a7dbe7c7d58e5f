"""The wake token and route key before their Secret is mounted: optional Secret volumes start empty
and fill a minute or so after the controller creates the Secrets. The controller works with the values
it created or read through the API meanwhile; the activator verifies nothing it cannot (503, not
Ready) and sends no wake call without a token; both pick the files up without a restart."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from activator.metrics import Metrics
from activator.wake import WakeNotifier
from elasti_istio import routekey
from elasti_istio.controller.base import Base
from elasti_istio.controller.config import ControllerConfig
from elasti_istio.controller.indexes import Indexes
from elasti_istio.controller.waker import Waker
from tests.unit.test_activator_proxy import NS, Env
from tests.unit.test_routekey import Clock

DEADLINE = 30.0  # seconds; each wait ends as soon as what it waits for is seen


async def _wake(namespace: str, name: str, by: str) -> str:
    return "ScalingUp"


async def post_wake(server: TestServer, token: str) -> int:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            server.make_url("/v1/wake"),
            json={"namespace": "ns", "name": "svc"},
            headers={"Authorization": f"Bearer {token}"},
        ) as resp,
    ):
        return resp.status


async def test_controller_checks_wakes_with_the_api_value_until_the_file_is_there(tmp_path: Path) -> None:
    token = tmp_path / "wake-token" / "token"  # the empty volume of a Secret that does not exist yet
    waker = Waker(_wake, lambda: True, str(token))
    server = TestServer(waker.app(), host="127.0.0.1")
    await server.start_server()
    try:
        assert await post_wake(server, "from-api") == 401  # nothing to check against: refused
        waker.use_token_until_read("from-api")
        assert await post_wake(server, "from-api") == 202
        assert await post_wake(server, "other") == 401
        token.parent.mkdir()
        token.write_text("from-api")  # the kubelet fills the volume
        assert await post_wake(server, "from-api") == 202
        fresh = tmp_path / "fresh"
        fresh.write_text("rotated\n")
        os.replace(fresh, token)  # a rotation: the file wins, the API value is gone
        assert await post_wake(server, "rotated") == 202
        assert await post_wake(server, "from-api") == 401
        waker.use_token_until_read("late")  # once the file has spoken, it alone counts
        assert await post_wake(server, "late") == 401
        token.unlink()  # an emptied volume keeps the token last read
        assert await post_wake(server, "rotated") == 202
    finally:
        await server.close()


def test_route_keys_from_the_api_until_the_file_gives_some(tmp_path: Path) -> None:
    path = tmp_path / "route-key" / "key"
    clock = Clock()
    keys = routekey.KeyFile(str(path), clock=clock)
    assert keys.keys == () and keys.token("a", "b") is None
    assert keys.use_until_read("from-api\n")
    assert keys.keys == (b"from-api",) and keys.token("a", "b") == routekey.token(b"from-api", "a", "b")
    generation = keys.generation
    path.parent.mkdir()
    path.write_text("from-api\n")
    clock.t += routekey.CHECK_EVERY
    assert not keys.refresh(), "the same key from the file: nothing to re-sign"
    assert keys.from_file and keys.generation == generation
    assert not keys.use_until_read("late") and keys.keys == (b"from-api",)
    path.write_text("new\nfrom-api\n")
    os.utime(path, (1, 1))
    clock.t += routekey.CHECK_EVERY
    assert keys.refresh() and keys.keys == (b"new", b"from-api")


def test_controller_writes_no_route_without_a_key(tmp_path: Path) -> None:
    """Without a route key every route would be refused by the activator: the controller treats the
    activator as unavailable (routes stay in serve mode, sleeping targets are woken) until it has one."""
    cfg = ControllerConfig(route_key_file=str(tmp_path / "missing"))
    base = Base(None, cfg, Indexes(), None)  # type: ignore[arg-type]
    base.activator_available = (True, "ActivatorReady", "ready")
    available, reason, message = base.activator_available
    assert (available, reason) == (False, "RouteKeyMissing") and "fail open" in message
    assert base.route_keys is not None and base.route_keys.use_until_read("from-api")
    assert base.activator_available == (True, "ActivatorReady", "ready")
    assert Base(None, ControllerConfig(), Indexes(), None).activator_available[0]  # type: ignore[arg-type]


async def test_activator_without_a_route_key_answers_503_and_is_not_ready_until_the_file_is_there(
    tmp_path: Path,
) -> None:
    key_file = tmp_path / "route-key" / "key"
    env = await Env(route_key_file=str(key_file)).start()
    try:
        env.put("details", ready=True)
        signed = {"elasti-token": routekey.token(b"the-key", NS, "details")}

        async def ask() -> tuple[int, dict[str, str], dict[str, str]]:
            async with env.get("/echo", headers=signed) as r:
                return r.status, dict(r.headers), await r.json()

        async def ready() -> int:
            async with env.client.get(env.admin + "/readyz") as r:
                return r.status

        status, headers, body = await ask()
        assert (status, body["error"]) == (503, "route key not loaded yet") and "Retry-After" in headers
        assert await ready() == 503
        assert env.state.get("hits", {}).get("echo", 0) == 0 and env.wake.calls == []

        key_file.parent.mkdir()
        key_file.write_text("the-key\n")  # the kubelet fills the volume; no restart
        async with asyncio.timeout(DEADLINE):
            while (await ask())[0] != 200:
                await asyncio.sleep(0.05)
            while await ready() != 200:
                await asyncio.sleep(0.05)
        status, _, body = await ask()
        assert status == 200
        async with env.get("/echo", headers={"elasti-token": "0" * 64}) as r:
            assert r.status == 403  # with a key, a wrong token is forbidden again
    finally:
        await env.stop()


async def test_activator_sends_no_wake_call_before_it_has_the_token(tmp_path: Path) -> None:
    seen: list[str | None] = []

    async def wake(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response({"phase": "ScalingUp"}, status=202)

    app = web.Application()
    app.router.add_post("/v1/wake", wake)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    token = tmp_path / "wake-token" / "token"
    metrics = Metrics()
    try:
        async with aiohttp.ClientSession() as session:
            notifier = WakeNotifier(
                session, str(server.make_url("/")), metrics, token_file=str(token), backoff=0.01, max_backoff=0.2
            )
            task = asyncio.create_task(notifier.notify("ns", "svc"))
            async with asyncio.timeout(DEADLINE):
                while 'result="error"' not in metrics.exposition().decode():
                    await asyncio.sleep(0.02)  # an attempt was put off
            assert not task.done() and seen == []
            token.parent.mkdir()
            token.write_text("s3cret\n")
            async with asyncio.timeout(DEADLINE):
                result = await task
            assert result.result == "accepted" and seen == ["Bearer s3cret"]
            token.unlink()  # an emptied volume: the token last read is still sent
            assert (await notifier.notify("ns", "svc")).result == "accepted" and seen[-1] == "Bearer s3cret"
    finally:
        await server.close()
