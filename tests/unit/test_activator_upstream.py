"""The activator's lean upstream client against a raw TCP server that answers with scripted bytes:
every response framing, keep-alive reuse, stale connections, the per-origin limit, flow control."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest

from activator.upstream import UpstreamBroken, UpstreamClient

Answer = Callable[[bytes], list[bytes] | None]  # request head -> pieces to send (None: close at once)


class Scripted:
    """Reads one request head at a time and answers with what ``answer`` returns, piece by piece."""

    def __init__(self, answer: Answer, *, close_after: bool = False) -> None:
        self.answer = answer
        self.close_after = close_after
        self.heads: list[bytes] = []
        self.connections = 0
        self.open = 0
        self.max_open = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> Scripted:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def origin(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length) if length else b""
                self.heads.append(head + body)
                pieces = self.answer(head)
                if pieces is None:
                    break
                for p in pieces:
                    writer.write(p)
                    await writer.drain()
                    await asyncio.sleep(0.001)
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def stop(self) -> None:
        for w in self.writers:
            w.close()
        self.server.close()
        await self.server.wait_closed()


@contextlib.asynccontextmanager
async def setup(answer: Answer, limit: int = 10, **kw: object) -> AsyncIterator[tuple[Scripted, UpstreamClient]]:
    srv = await Scripted(answer, **kw).start()  # type: ignore[arg-type]
    client = UpstreamClient(None, limit)
    try:
        yield srv, client
    finally:
        await client.close()
        await srv.stop()


def ok(body: bytes = b"hello") -> Answer:
    return lambda head: [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body), body]


async def get(client: UpstreamClient, origin: str, path: str = "/", method: str = "GET", body: bytes | None = None):
    resp = await client.request(method, origin, path, [f"Host: {origin}"], body)
    try:
        return resp.status, dict(resp.headers), await resp.read()
    finally:
        resp.release()


async def test_content_length_bodies_reuse_one_connection() -> None:
    async with setup(ok(b"x" * 10000)) as (srv, client):
        for _ in range(3):
            assert await get(client, srv.origin) == (200, {"Content-Length": "10000"}, b"x" * 10000)
        assert srv.connections == 1
        assert srv.heads[0].startswith(b"GET / HTTP/1.1\r\nHost: 127.0.0.1:")


async def test_chunked_body_with_extensions_and_trailers_in_pieces() -> None:
    pieces = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhel",
        b"lo\r\n",
        b"6\r\n world\r\n0\r\nX-Trailer: t\r\n",
        b"\r\n",
    ]
    async with setup(lambda head: pieces) as (srv, client):
        for _ in range(2):
            status, _, body = await get(client, srv.origin)
            assert (status, body) == (200, b"hello world")
        assert srv.connections == 1  # the chunked response ended exactly: the connection was reused


async def test_a_chunked_responses_trailers_are_kept_once_its_body_is_read() -> None:
    pieces = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nX-A: 1\r\nX-B:  two \r\n\r\n"]
    async with setup(lambda head: pieces) as (srv, client):
        for _ in range(2):
            resp = await client.request("GET", srv.origin, "/", [f"Host: {srv.origin}"], None)
            try:
                assert resp.trailers == []  # not before the end of the body
                assert await resp.read() == b"hi"
                assert resp.trailers == [("X-A", "1"), ("X-B", "two")]
            finally:
                resp.release()
        assert srv.connections == 1


async def test_trailer_lines_that_are_no_field_or_beyond_the_bounds_are_left_out() -> None:
    """The body stands (a workload's odd trailer section never broke a response, and does not now)."""
    section = b"no colon here\r\n X-Folded: 1\r\nX-Ok: 1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(150))
    pieces = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n" + section + b"\r\n"]
    async with setup(lambda head: pieces) as (srv, client):
        for _ in range(2):
            resp = await client.request("GET", srv.origin, "/", [f"Host: {srv.origin}"], None)
            try:
                assert await resp.read() == b"hi"
                kept = resp.trailers
                assert len(kept) == 100 and kept[:2] == [("X-Ok", "1"), ("X-0", "v")]
            finally:
                resp.release()
        assert srv.connections == 1  # the response ended where it should: the connection was reused


async def test_a_body_in_memory_with_trailers_goes_chunked_with_them() -> None:
    """With trailer fields the body goes chunked, the fields after it; without any, with a Content-Length."""
    ends = (b"0\r\nX-Sum: 5\r\n\r\n", b"\r\n\r\nplain")
    raw = bytearray()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen = 0
        while data := await reader.read(65536):
            raw.extend(data)
            while seen < len(ends) and raw.find(ends[seen]) >= 0:  # a whole request: answered
                seen += 1
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    client = UpstreamClient(None, 10)
    try:
        origin = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        for body, fields in ((b"hello", [("X-Sum", "5")]), (b"plain", [])):
            resp = await client.request("POST", origin, "/", ["Host: o"], body, trailers=lambda f=fields: f)
            assert resp.status == 204
            resp.release()
    finally:
        await client.close()
        server.close()
        await server.wait_closed()
    assert bytes(raw) == (
        b"POST / HTTP/1.1\r\nHost: o\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Sum: 5\r\n\r\n"
        b"POST / HTTP/1.1\r\nHost: o\r\nContent-Length: 5\r\n\r\nplain"
    )


async def test_body_until_close_is_read_and_the_connection_not_reused() -> None:
    async with setup(lambda head: [b"HTTP/1.1 200 OK\r\n\r\nall of ", b"it"], close_after=True) as (srv, client):
        assert (await get(client, srv.origin))[2] == b"all of it"
        assert (await get(client, srv.origin))[2] == b"all of it"
        assert srv.connections == 2


async def test_head_204_and_interim_responses_have_no_body() -> None:
    def answer(head: bytes) -> list[bytes]:
        if head.startswith(b"HEAD"):
            return [b"HTTP/1.1 200 OK\r\nContent-Length: 42\r\n\r\n"]
        if b"/empty" in head:
            return [b"HTTP/1.1 204 No Content\r\n\r\n"]
        return [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", *ok()(head)]

    async with setup(answer) as (srv, client):
        assert await get(client, srv.origin, method="HEAD") == (200, {"Content-Length": "42"}, b"")
        assert (await get(client, srv.origin, "/empty"))[:2] == (204, {})
        assert await get(client, srv.origin, "/interim") == (200, {"Content-Length": "5"}, b"hello")
        assert srv.connections == 1


async def test_request_body_gets_its_own_content_length() -> None:
    async with setup(ok()) as (srv, client):
        await get(client, srv.origin, "/post", method="POST", body=b"payload")
        assert srv.heads[0].endswith(b"Content-Length: 7\r\n\r\npayload")


async def test_connection_close_answer_is_not_reused() -> None:
    answer: Answer = lambda head: [b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"]  # noqa: E731
    async with setup(answer) as (srv, client):
        await get(client, srv.origin)
        await get(client, srv.origin)
        assert srv.connections == 2


async def test_a_keep_alive_connection_closed_by_the_server_is_skipped() -> None:
    async with setup(ok()) as (srv, client):
        await get(client, srv.origin)
        for w in srv.writers:  # the server drops its idle connection
            w.close()
        await asyncio.sleep(0.05)
        assert await get(client, srv.origin) == (200, {"Content-Length": "5"}, b"hello")
        assert srv.connections == 2


async def test_a_get_on_a_connection_the_server_was_closing_is_sent_again() -> None:
    n = 0

    def answer(head: bytes) -> list[bytes] | None:
        nonlocal n
        n += 1
        return None if n == 2 else ok()(head)  # the second request: read, then closed unanswered

    async with setup(answer) as (srv, client):
        await get(client, srv.origin)
        assert await get(client, srv.origin, "/again") == (200, {"Content-Length": "5"}, b"hello")
        assert srv.connections == 2 and n == 3


async def test_a_post_on_a_dropped_connection_is_not_sent_twice() -> None:
    calls = []

    def answer(head: bytes) -> list[bytes] | None:
        calls.append(head)
        return None  # read the request, then close without answering

    async with setup(answer) as (srv, client):
        with pytest.raises(aiohttp.ClientError):
            await get(client, srv.origin, method="POST", body=b"once")
        assert len(calls) == 1


@pytest.mark.parametrize(
    "raw",
    [
        b"SMTP ready\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n bad: folded\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",  # then the server closes
    ],
)
async def test_malformed_or_truncated_answers_are_client_errors(raw: bytes) -> None:
    async with setup(lambda head: [raw], close_after=True) as (srv, client):
        with pytest.raises(aiohttp.ClientError):
            await get(client, srv.origin)
        # and the pool slot came back: the next request connects again
        with pytest.raises(aiohttp.ClientError):
            await get(client, srv.origin)
        assert client.open_connections(srv.origin) == 0


async def test_at_most_limit_connections_per_origin() -> None:
    async with setup(ok(), limit=3) as (srv, client):
        results = await asyncio.gather(*(get(client, srv.origin, f"/{i}") for i in range(20)))
        assert all(r[0] == 200 for r in results)
        assert srv.max_open <= 3
        assert client.open_connections(srv.origin) <= 3


async def test_an_unread_body_closes_the_connection_on_release() -> None:
    async with setup(ok(b"y" * 100)) as (srv, client):
        resp = await client.request("GET", srv.origin, "/", [], None)
        assert await resp.content.read(10) == b"y" * 10
        resp.release()
        await get(client, srv.origin)
        assert srv.connections == 2
        assert client.open_connections(srv.origin) == 1


async def test_cancelled_while_waiting_for_the_head_gives_the_slot_back() -> None:
    async with setup(lambda head: [], limit=1) as (srv, client):  # never answers
        task = asyncio.create_task(client.request("GET", srv.origin, "/", [], None))
        await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert client.open_connections(srv.origin) == 0


async def test_a_large_body_streams_with_flow_control() -> None:
    size = 8 * 1024 * 1024
    block = b"z" * 65536

    def answer(head: bytes) -> list[bytes]:
        return [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size, *([block] * (size // len(block)))]

    async with setup(answer) as (srv, client):
        resp = await client.request("GET", srv.origin, "/", [], None)
        total = 0
        async for chunk in resp.content.iter_any():
            total += len(chunk)
            await asyncio.sleep(0)  # a slow reader
        resp.release()
        assert total == size
        assert await get(client, srv.origin) is not None
        assert srv.connections == 1


async def test_through_a_forward_proxy_the_target_is_absolute() -> None:
    srv = await Scripted(ok()).start()
    client = UpstreamClient(f"http://127.0.0.1:{srv.port}", 10)
    try:
        resp = await client.request("GET", "web-origin.ns.svc.cluster.local:8080", "/a?b=1", ["Host: x"], None)
        await resp.read()
        resp.release()
        assert srv.heads[0].startswith(b"GET http://web-origin.ns.svc.cluster.local:8080/a?b=1 HTTP/1.1\r\n")
    finally:
        await client.close()
        await srv.stop()


async def test_through_a_sidecar_the_listener_of_the_origins_port_gets_the_absolute_target() -> None:
    """A sidecar without capture listens on its address at each Service port: the origin's port picks it."""
    srv = await Scripted(ok()).start()
    client = UpstreamClient(None, 10, sidecar="127.0.0.1")
    try:
        resp = await client.request("GET", f"web-origin.ns.svc.cluster.local:{srv.port}", "/a", ["Host: x"], None)
        await resp.read()
        resp.release()
        assert srv.heads[0].startswith(f"GET http://web-origin.ns.svc.cluster.local:{srv.port}/a HTTP/1.1\r\n".encode())
    finally:
        await client.close()
        await srv.stop()


async def test_refused_connection_is_a_client_error() -> None:
    client = UpstreamClient(None, 10)
    try:
        with pytest.raises(aiohttp.ClientConnectionError):
            await client.request("GET", "127.0.0.1:1", "/", [], None)
        assert client.open_connections("127.0.0.1:1") == 0
    finally:
        await client.close()


def test_upstream_broken_is_an_aiohttp_client_error() -> None:
    assert issubclass(UpstreamBroken, aiohttp.ClientError)
