"""Idle triggers as a tenant can write them: the Prometheus address is checked, nothing it answers is
copied into the ElastiService's status or Events, and redirects are not followed."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from elasti_istio.controller.spec import SpecError, Trigger, check_server_address, parse
from elasti_istio.controller.triggers import allowed, evaluate, parse_allow


def es_with(address: str) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "shop", "name": "details"},
        "spec": {
            "service": "details",
            "scaleTargetRef": {"kind": "Deployment", "name": "details-v1"},
            "triggers": [
                {"type": "prometheus", "metadata": {"serverAddress": address, "query": "up", "threshold": "1"}}
            ],
        },
    }


@pytest.mark.parametrize(
    "address",
    [
        "http://user:secret@prometheus:9090",  # userinfo
        "http://prometheus:9090/?x=",  # a query swallows the query path
        "http://prometheus:9090#frag",
        "ftp://prometheus:9090",
        "file:///etc/passwd",
        "prometheus:9090",  # no scheme
        "http://",  # no host
        "http://prometheus:99999",
    ],
)
def test_server_addresses_a_tenant_cannot_use(address: str) -> None:
    assert check_server_address(address) is not None
    with pytest.raises(SpecError) as info:
        parse(es_with(address))
    assert info.value.reason == "InvalidTrigger"


@pytest.mark.parametrize(
    "address", ["http://prometheus.monitoring:9090", "https://prom.example.com/prometheus", "http://10.0.0.7:9090/"]
)
def test_server_addresses_that_are_fine(address: str) -> None:
    assert check_server_address(address) is None
    assert parse(es_with(address)).triggers[0].server == address.rstrip("/")


def test_the_allow_list_takes_hosts_and_cidrs() -> None:
    allow = parse_allow("prometheus.monitoring, 10.0.0.0/8 ,fd00::/8")
    assert allowed("http://prometheus.monitoring:9090", allow)
    assert allowed("http://PROMETHEUS.monitoring:9090", allow)
    assert allowed("http://10.1.2.3:9090", allow)
    assert allowed("http://[fd00::1]:9090", allow)
    assert not allowed("http://169.254.169.254/latest", allow)
    assert not allowed("http://prometheus.monitoring.evil.example:9090", allow)
    assert not allowed("http://kubernetes.default.svc", allow)
    assert allowed("http://anything:1", parse_allow(""))  # no list: any address the spec allows
    with pytest.raises(ValueError):
        parse_allow("10.0.0.0/33")


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, Counter[str]]]:
    hits: Counter[str] = Counter()

    async def secret(request: web.Request) -> web.Response:
        hits["secret"] += 1
        return web.Response(status=500, text="the database password is hunter2")

    async def redirect(request: web.Request) -> web.Response:
        hits["redirect"] += 1
        raise web.HTTPFound("/internal/api/v1/query")

    async def internal(request: web.Request) -> web.Response:
        hits["internal"] += 1
        return web.json_response({"status": "success", "data": {"resultType": "scalar", "result": [0, "0"]}})

    async def refused(request: web.Request) -> web.Response:
        hits["refused"] += 1
        return web.json_response({"status": "error", "errorType": "bad_data", "error": "hunter2 in the error"})

    app = web.Application()
    app.router.add_get("/s/api/v1/query", secret)
    app.router.add_get("/r/api/v1/query", redirect)
    app.router.add_get("/internal/api/v1/query", internal)
    app.router.add_get("/e/api/v1/query", refused)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", hits
    finally:
        await runner.cleanup()


async def test_nothing_prometheus_answers_is_copied_into_status(server: tuple[str, Counter[str]]) -> None:
    base, hits = server
    async with aiohttp.ClientSession() as session:
        for path in ("/s", "/e"):
            result = await evaluate(session, Trigger(base + path, "up", 1.0))
            assert not result.healthy
            assert "hunter2" not in result.message, result.message
        redirected = await evaluate(session, Trigger(base + "/r", "up", 1.0))
    assert not redirected.healthy and "302" in redirected.message
    assert hits["internal"] == 0  # the redirect was not followed
