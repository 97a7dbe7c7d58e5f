"""HTTP/1.1 trailers through the activator (``--http1-trailers``), over real sockets: a client and an
origin that write and read the chunked framing themselves (aiohttp's client and server drop trailers),
the activator in sidecar mode between them."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest

from activator import trailers
from activator.config import Config, add_flags
from activator.registry import Registry
from activator.trailers import KEPT_PER_CONNECTION, forwardable, parser_keeps_trailers
from tests.activator_stubs import WakeEndpoint, elastiservice, sidecar_activator, until
from tests.trailer_wire import RESPONSE_TRAILERS, Fields, Origin, chunked, read_message

NS = "shop"
_rv = itertools.count(2)


class Env:
    def __init__(self, **cfg: Any) -> None:
        self.registry = Registry()
        self.registry.mark_synced()
        self.cfg = {"http1_trailers": True, **cfg}

    async def start(self) -> Env:
        # Besides those that pass: one that frames (never a trailer) and one whose name is not a token.
        self.origin = Origin([*RESPONSE_TRAILERS, ("Content-Length", "99"), ("X-Bad Name", "1")])
        self.origin_port = await self.origin.start()
        self.wake = await WakeEndpoint().start()
        self.activator = await sidecar_activator(self.registry, self.wake.url, **self.cfg)
        return self

    async def stop(self) -> None:
        await self.activator.close()
        await self.wake.stop()
        await self.origin.stop()

    def put(self, name: str = "details", **kw: Any) -> None:
        kw.setdefault("origin", (f"{name}-elasti-origin", self.origin_port))
        self.registry.apply("MODIFIED", elastiservice(NS, name, resource_version=str(next(_rv)), **kw))

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.activator.proxy_address[1])


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    e = await Env().start()
    try:
        yield e
    finally:
        await e.stop()


def post(body: bytes, trailers: Fields, path: str = "/upload", extra: str = "") -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: details:9080\r\nelasti-service: {NS}/details\r\n"
        f"Transfer-Encoding: chunked\r\nTE: trailers\r\nTrailer: X-Checksum\r\n{extra}\r\n"
    )
    return head.encode() + chunked(body, trailers)


REQUEST_TRAILERS: Fields = [
    ("X-Checksum", "c1"),
    ("elasti-service", "other/victim"),  # routing: never passes, as a header or as a trailer
    ("Host", "elsewhere"),
    ("Transfer-Encoding", "gzip"),
    ("X-Forwarded-For", "10.9.9.9"),
]


@pytest.mark.parametrize("size", [10, 3 * 1024 * 1024], ids=["in-memory", "streamed"])
async def test_trailers_pass_both_ways_to_a_ready_workload(size: int) -> None:
    """A ready target: the request's trailers reach the workload after its body (sent in memory, or
    streamed through when larger than --retry-body-limit), the response's reach the client; fields
    that frame, route or belong to one hop stay behind in both directions."""
    e = await Env(retry_body_limit=64 * 1024).start()
    try:
        e.put(ready=True)
        body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        reader, writer = await e.connect()
        writer.write(post(body, REQUEST_TRAILERS))
        resp = await asyncio.wait_for(read_message(reader), 30)
        writer.close()
        assert resp.start == "HTTP/1.1 200 OK"
        assert resp.body == hashlib.sha256(body).hexdigest().encode()
        assert resp.trailers == [("X-Digest", "sha256"), ("X-Count", "1")]
        assert resp.header("Trailer") == ["X-Digest, X-Count"]
        [got] = e.origin.requests
        assert got.body == body
        assert got.trailers == [("X-Checksum", "c1")]
        assert got.header("Trailer") == ["X-Checksum"] and got.header("TE") == ["trailers"]
        assert got.header("elasti-service") == [] and got.header("Host") == [
            f"details-elasti-origin.{NS}.svc.cluster.local:{e.origin_port}"
        ]
    finally:
        await e.stop()


@pytest.mark.parametrize("size", [10, 3 * 1024 * 1024], ids=["in-memory", "spooled"])
async def test_a_held_requests_trailers_reach_the_workload_once(size: int) -> None:
    """Held while the target sleeps, the body is read whole (in memory, or spooled to disk) and its
    trailers kept with it; once woken, the workload gets the request once, trailers after the body."""
    e = await Env(retry_body_limit=64 * 1024).start()
    try:
        e.put(ready=False)
        body = b"held!" * (size // 5)
        reader, writer = await e.connect()
        writer.write(post(body, [("X-Checksum", "held")]))
        await until(lambda: e.activator.holds.pending((NS, "details")) == 1, what="held")
        await until(lambda: e.wake.count(NS, "details") >= 1, what="the wake call")
        assert e.origin.requests == []
        e.put(ready=True)
        resp = await asyncio.wait_for(read_message(reader), 30)
        writer.close()
        assert resp.start == "HTTP/1.1 200 OK" and resp.trailers == [("X-Digest", "sha256"), ("X-Count", "1")]
        assert resp.header("X-Elasti-Cold-Start") == ["true"]
        [got] = e.origin.requests
        assert (got.body, got.trailers) == (body, [("X-Checksum", "held")])
        assert e.wake.count(NS, "details") == 1
    finally:
        await e.stop()


async def test_pipelined_requests_keep_their_own_trailers(env: Env) -> None:
    """Three requests in one write: each reaches the workload with its own trailer section (the second
    has none), and the connection's store of trailers is empty once they are answered."""
    env.put(ready=True)
    reader, writer = await env.connect()
    writer.write(
        post(b"first", [("X-Checksum", "1")])
        + post(b"second", [])
        + post(b"third", [("X-Checksum", "3"), ("X-Extra", "e")])
    )
    answers = [await asyncio.wait_for(read_message(reader), 30) for _ in range(3)]
    assert [a.body for a in answers] == [
        hashlib.sha256(b).hexdigest().encode() for b in (b"first", b"second", b"third")
    ]
    assert [(r.body, r.trailers) for r in env.origin.requests] == [
        (b"first", [("X-Checksum", "1")]),
        (b"second", []),
        (b"third", [("X-Checksum", "3"), ("X-Extra", "e")]),
    ]
    stores = [h.trailers for h in env.activator._proxy_runner.server.connections]  # type: ignore[union-attr]
    assert stores and all(s is not None and len(s) == 0 for s in stores)
    writer.close()


async def test_a_request_without_trailers_and_a_content_length_answer_are_unchanged(env: Env) -> None:
    """A Content-Length request goes with its Content-Length; an answer with one keeps it (no trailers)."""
    env.put(ready=True)
    reader, writer = await env.connect()
    writer.write(
        f"POST /plain HTTP/1.1\r\nHost: d\r\nelasti-service: {NS}/details\r\nContent-Length: 5\r\n\r\nhello".encode()
    )
    resp = await asyncio.wait_for(read_message(reader), 30)
    writer.close()
    assert resp.header("Content-Length") == ["64"] and resp.trailers == []
    [got] = env.origin.requests
    assert got.header("Content-Length") == ["5"] and got.header("Transfer-Encoding") == [] and got.body == b"hello"


async def test_an_http10_client_gets_the_body_without_the_trailers(env: Env) -> None:
    """HTTP/1.0 has no chunked framing: the body arrives until close, the trailers cannot follow."""
    env.put(ready=True)
    reader, writer = await env.connect()
    writer.write(f"GET /x HTTP/1.0\r\nHost: d\r\nelasti-service: {NS}/details\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    rest = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    assert head.startswith(b"HTTP/1.0 200") and b"chunked" not in head.lower()
    assert rest == hashlib.sha256(b"").hexdigest().encode()


@pytest.mark.parametrize("size", [4, 3 * 1024 * 1024], ids=["in-memory", "streamed"])
async def test_too_many_request_trailers_answer_400_and_no_whole_request_reaches_the_workload(size: int) -> None:
    """Read before the forward (in memory), the request goes nowhere; streamed through to the ready
    workload, it is broken off before its end, so the workload never takes it for a whole one."""
    e = await Env(retry_body_limit=64 * 1024).start()
    try:
        e.put(ready=True)
        reader, writer = await e.connect()
        writer.write(post(b"b" * size, [(f"X-T{i}", "v") for i in range(200)]))
        resp = await asyncio.wait_for(read_message(reader), 30)
        writer.close()
        assert resp.start.startswith("HTTP/1.1 400") and b"malformed request body" in resp.body
        assert e.origin.requests == []
    finally:
        await e.stop()


async def test_without_the_option_trailers_stay_behind() -> None:
    """The default: aiohttp's C parser reads the requests and trailers go nowhere, as the mesh's
    sidecars do unless Envoy's enable_trailers is set; ``Trailer`` does not announce what never comes."""
    e = await Env(http1_trailers=False).start()
    try:
        e.put(ready=True)
        reader, writer = await e.connect()
        writer.write(post(b"body", [("X-Checksum", "c1")]))
        resp = await asyncio.wait_for(read_message(reader), 30)
        writer.close()
        assert resp.start == "HTTP/1.1 200 OK" and resp.trailers == [] and resp.header("Trailer") == []
        [got] = e.origin.requests
        assert got.body == b"body" and got.trailers == [] and got.header("Trailer") == []
    finally:
        await e.stop()


def test_the_option_is_refused_with_a_parser_that_skips_trailers(monkeypatch: pytest.MonkeyPatch) -> None:
    """An aiohttp release whose Python parser skips the trailer section unparsed: the activator says so
    at start (one line) rather than drop trailers it promised to carry."""
    assert parser_keeps_trailers()  # this one keeps them
    p = argparse.ArgumentParser()
    add_flags(p)
    assert Config.from_args(p.parse_args(["--http1-trailers"])).http1_trailers
    monkeypatch.setattr(trailers, "parser_keeps_trailers", lambda: False)
    with pytest.raises(SystemExit, match="--http1-trailers: this aiohttp release"):
        Config.from_args(p.parse_args(["--http1-trailers"]))
    assert not Config.from_args(p.parse_args([])).http1_trailers  # off by default: not checked


def test_trailer_fields_that_frame_route_or_cannot_be_written_are_left_out() -> None:
    fields = [
        ("X-Checksum", " c1 "),
        ("content-length", "5"),
        ("Elasti-Service", "a/b"),
        ("Authorization", "Bearer x"),
        ("X-Named", "by Connection"),
        ("X Space", "1"),
        ("X-Newline", "a\nb"),
        ("Grpc-Status", "0"),
    ]
    assert forwardable(fields, frozenset({"x-named"})) == [("X-Checksum", "c1"), ("Grpc-Status", "0")]


async def test_trailers_of_requests_answered_without_their_body_are_not_kept(env: Env) -> None:
    """A request answered before its body was read (an unknown ElastiService: 404) has its body drained
    afterwards, trailers and all: what the connection keeps of them stays bounded however many come."""
    reader, writer = await env.connect()
    for i in range(300):
        writer.write(
            f"POST /x HTTP/1.1\r\nHost: d\r\nelasti-service: {NS}/nobody\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        resp = await asyncio.wait_for(read_message(reader), 30)  # answered before the body is sent
        assert resp.start.startswith("HTTP/1.1 404"), resp
        writer.write(chunked(b"body", [("X-Checksum", str(i))]))
    stores = [h.trailers for h in env.activator._proxy_runner.server.connections]  # type: ignore[union-attr]
    assert stores and all(s is not None and len(s) <= KEPT_PER_CONNECTION for s in stores), [len(s) for s in stores]
    writer.close()
