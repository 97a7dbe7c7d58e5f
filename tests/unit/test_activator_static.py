"""Static responses: answered by the activator while the target sleeps, without waking it unless asked."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from activator.static import first_match, parse
from tests.unit.test_activator_proxy import NS, Env, body_json

PROBES = [
    {"match": {"method": "GET", "path": {"exact": "/healthz"}}, "response": {"status": 200, "body": "ok"}},
    {
        "match": {"path": {"prefix": "/status"}, "headers": {"User-Agent": "uptime-robot"}},
        "response": {"status": 204, "headers": {"X-Asleep": "yes"}},
    },
    {
        "match": {"path": {"prefix": "/"}, "headers": {"x-warmup": "1"}},
        "response": {"status": 202, "body": "waking"},
        "wake": True,
    },
    {"match": {"path": {"prefix": "/healthz"}}, "response": {"status": 500, "body": "never: the first match wins"}},
]


def test_parse_and_first_match() -> None:
    rules = parse(PROBES)
    assert len(rules) == 4
    assert first_match(rules, "GET", "/healthz", {}).body == "ok"  # type: ignore[union-attr]
    assert first_match(rules, "POST", "/healthz", {}).status == 500  # type: ignore[union-attr]
    assert first_match(rules, "GET", "/status/x", {"user-agent": "uptime-robot"}).status == 204  # type: ignore
    assert first_match(rules, "GET", "/status/x", {"User-Agent": "curl"}) is None
    assert parse([{"response": {"status": 999}}, {"nope": 1}, "junk"]) == ()


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Injected": "a\r\nSet-Cookie: b"},  # would split the answer over HTTP/1.1
        {"Bad Name": "x"},
        {"x-nul": "a\x00b"},
        {"Content-Length": "3"},  # the activator writes the length of the body it sends
        {"Transfer-Encoding": "chunked"},
    ],
)
def test_an_answer_header_that_cannot_be_sent_skips_its_rule(headers: dict[str, str]) -> None:
    rule = {"match": {"path": {"exact": "/h"}}, "response": {"status": 200, "headers": headers}}
    assert parse([rule, PROBES[0]]) == parse([PROBES[0]])


def test_answer_header_values_lose_surrounding_whitespace() -> None:
    rule = {"response": {"headers": {"Cache-Control": "  no-store\t", "X-Tab": "a\tb"}}}
    (parsed,) = parse([rule])
    assert parsed.response_headers == (("Cache-Control", "no-store"), ("X-Tab", "a\tb"))


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    e = await Env().start()
    try:
        yield e
    finally:
        await e.stop()


async def test_probes_are_answered_without_waking(env: Env) -> None:
    env.put("details", ready=False, hold_timeout="2s", static_responses=PROBES)
    async with env.get("/healthz") as r:
        assert r.status == 200 and await r.text() == "ok"
    async with env.get("/status/page", headers={"User-Agent": "uptime-robot"}) as r:
        assert r.status == 204 and r.headers["X-Asleep"] == "yes"
    await asyncio.sleep(0.3)  # a wake would have been sent at once
    assert env.wake.count(NS, "details") == 0
    assert await env.metric("elasti_activator_requests_total", namespace=NS, name="details", outcome="static") == 2


async def test_a_static_response_may_wake(env: Env) -> None:
    env.put("details", ready=False, hold_timeout="2s", static_responses=PROBES)
    async with env.get("/anything", headers={"x-warmup": "1"}) as r:
        assert r.status == 202 and await r.text() == "waking"
    async with asyncio.timeout(10):
        while env.wake.count(NS, "details") != 1:
            await asyncio.sleep(0.02)


async def test_other_requests_are_held_and_an_awake_target_is_forwarded(env: Env) -> None:
    env.put("details", ready=False, hold_timeout="1s", static_responses=PROBES)
    async with env.get("/echo/not-static") as r:
        assert r.status == 504 and (await body_json(r))["error"] == "hold timeout"
    rules = [{"match": {"path": {"prefix": "/echo/probe"}}, "response": {"status": 200, "body": "static"}}]
    env.put("details", ready=False, hold_timeout="1s", static_responses=rules)
    async with env.get("/echo/probe") as r:
        assert await r.text() == "static"
    env.put("details", ready=True, static_responses=rules)
    async with env.get("/echo/probe") as r:  # awake: the workload answers for itself
        assert r.status == 200 and (await body_json(r))["target"] == "/echo/probe"
    assert env.state["hits"]["echo"] == 1


async def _h2_get(env: Env, path: str, *headers: tuple[bytes, bytes]) -> tuple[dict[bytes, bytes], bytes]:
    from activator.h2client import H2Pool

    pool = H2Pool()
    try:
        request = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", path.encode())]
        request += [(b"elasti-service", f"{NS}/details".encode()), *headers]
        stream = await pool.open("127.0.0.1", env.activator.proxy_address[1], request, end=True)
        answer = dict(await stream.response)
        body = b""
        while (chunk := await stream.read()) is not None:
            body += chunk
        return answer, body
    finally:
        await pool.close()


async def test_static_responses_over_http2_are_the_same_answers(env: Env) -> None:
    """An HTTP/2 request (not gRPC) gets the same static answer as over HTTP/1.1: status, headers, body,
    no wake unless the rule asks, counted as static."""
    env.put("details", ready=False, hold_timeout="2s", static_responses=PROBES)
    async with env.get("/healthz") as r:
        http1_type = r.headers["Content-Type"]
    headers, body = await _h2_get(env, "/healthz")
    assert (headers[b":status"], body) == (b"200", b"ok")
    assert headers[b"content-type"].decode() == http1_type
    assert headers[b"content-length"] == b"2"
    headers, body = await _h2_get(env, "/status/page", (b"user-agent", b"uptime-robot"))
    assert headers[b":status"] == b"204" and headers[b"x-asleep"] == b"yes" and body == b""
    await asyncio.sleep(0.3)  # a wake would have been sent at once
    assert env.wake.count(NS, "details") == 0
    assert await env.metric("elasti_activator_requests_total", namespace=NS, name="details", outcome="static") == 3
    headers, body = await _h2_get(env, "/anything", (b"x-warmup", b"1"))
    assert (headers[b":status"], body) == (b"202", b"waking")
    async with asyncio.timeout(20):
        while env.wake.count(NS, "details") < 1:
            await asyncio.sleep(0.02)
