"""A lean HTTP/1.1 client for forwarding: pooled keep-alive connections, one parse of each response head.

aiohttp's client costs about twice what the rest of a forwarded request does (building a
``ClientRequest``, proxy and cookie handling, timers, header merging): this client does only what a
forwarding proxy needs. It sends requests whose body is in memory, absent, or streamed (written with
flow control while the response head is awaited, so that an early answer, the mesh's 503 while the
body is still on its way, is read rather than lost to a write error), and streams responses of any
framing (Content-Length, chunked, until close) with flow control; websockets keep aiohttp's client.

Its response has the small part of :class:`aiohttp.ClientResponse` that the forwarder uses
(``status``, ``reason``, ``headers``, ``content_length``, ``content.read/iter_any/at_eof``,
``read()``, ``release()``) and its failures are :class:`aiohttp.ClientError`, so both clients are
handled alike.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Callable

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from activator.trailers import encode

MAX_HEAD = 64 * 1024  # response status line and headers; also the trailer section
MAX_TRAILERS = 100  # trailer fields kept of one response
HIGH_WATER = 256 * 1024  # buffered body bytes above which reading from the upstream pauses
IDEMPOTENT = frozenset(("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"))


class UpstreamBroken(aiohttp.ClientPayloadError):
    """The upstream connection failed or sent something that is not HTTP/1.1."""


class StaleConnection(UpstreamBroken):
    """A reused keep-alive connection was closed before any byte of the response came back."""


class _Conn(asyncio.Protocol):
    """One upstream connection: parses responses as the bytes arrive, for one request at a time."""

    __slots__ = (
        "_body_left",
        "_body_waiter",
        "_buf",
        "_chunk_state",
        "_closed",
        "_eof",
        "_head",
        "_head_request",
        "_head_waiter",
        "_mode",
        "_paused",
        "_pending",
        "_pending_size",
        "_trailer_bytes",
        "_write_resumed",
        "error",
        "got_data",
        "idle_timer",
        "keep_alive",
        "origin",
        "trailers",
        "transport",
        "writer",
    )

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self._closed = False
        self.error: BaseException | None = None
        self.writer: asyncio.Task[None] | None = None  # a streamed request body still being written
        self._write_resumed: asyncio.Future[None] | None = None  # set while the transport asks to wait
        self._reset()

    def _reset(self) -> None:
        self._buf = bytearray()
        self._head: tuple[int, str, CIMultiDict[str], bool] | None = None
        self._head_waiter: asyncio.Future[None] | None = None
        self._body_waiter: asyncio.Future[None] | None = None
        self._pending: collections.deque[bytes] = collections.deque()
        self._pending_size = 0
        self._mode = ""  # "", "length", "chunked", "close", "none"
        self._body_left = 0
        self._chunk_state = 0  # chunked: 0 size line, 1 data, 2 CRLF after data, 3 trailers
        self.trailers: list[tuple[str, str]] = []  # a chunked response's trailer fields, once at its end
        self._trailer_bytes = 0
        self._eof = False
        self._paused = False
        self._head_request = False
        self.got_data = False
        self.keep_alive = True

    # ---- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_data = True
        try:
            if self._head is None:
                self._buf += data
                self._parse_head()
            else:
                self._feed_body(data)
        except UpstreamBroken as exc:
            self._fail(exc)
            if self.transport is not None:
                self.transport.abort()

    def eof_received(self) -> bool | None:
        if self._head is not None and self._mode == "close" and not self._eof:
            self._eof = True
            self.keep_alive = False
            self._wake_body()
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._closed = True
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        if self._head is not None and self._mode == "close" and not self._eof and exc is None:
            self._eof = True
            self._wake_body()
            return
        if not self._eof or self._head is None:
            cls = StaleConnection if not self.got_data else UpstreamBroken
            self._fail(cls(f"upstream connection closed{f': {exc}' if exc else ''}"))

    def pause_writing(self) -> None:
        if self._write_resumed is None:
            self._write_resumed = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        waiter, self._write_resumed = self._write_resumed, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def write_body(
        self, body: AsyncIterator[bytes], chunked: bool, trailers: Callable[[], list[tuple[str, str]]] | None = None
    ) -> None:
        """Writes a streamed request body, waiting whenever the transport's buffer is full. Stops when the
        connection goes (an early answer and close); a body that fails (the client's) aborts the
        connection, so that the upstream never takes a truncated body for a whole one. A chunked body
        ends with the fields ``trailers`` gives once the body is through."""
        try:
            async for piece in body:
                if self._closed or self.transport is None or self.transport.is_closing():
                    return
                if piece:
                    self.transport.write(b"%x\r\n%b\r\n" % (len(piece), piece) if chunked else piece)
                waiter = self._write_resumed
                if waiter is not None:
                    await asyncio.shield(waiter)
            if chunked and not self._closed and self.transport is not None and not self.transport.is_closing():
                self.transport.write(b"0\r\n" + encode(trailers() if trailers is not None else ()) + b"\r\n")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail(UpstreamBroken(f"the request body failed: {exc!r}"))
            if self.transport is not None:
                self.transport.abort()

    # ---- parsing ---------------------------------------------------------------------------------
    def _parse_head(self) -> None:
        while self._head is None:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > MAX_HEAD:
                    raise UpstreamBroken("upstream response head too large")
                return
            raw = bytes(self._buf[:end])
            del self._buf[: end + 4]
            lines = raw.split(b"\r\n")
            parts = lines[0].split(b" ", 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3 or not parts[1].isdigit():
                raise UpstreamBroken(f"not an HTTP/1.x response: {lines[0][:80]!r}")
            status = int(parts[1])
            reason = parts[2].decode("latin-1") if len(parts) > 2 else ""
            headers: CIMultiDict[str] = CIMultiDict()
            for line in lines[1:]:
                name, sep, value = line.partition(b":")
                if not sep or not name or name[0] in b" \t" or name.strip() != name:
                    raise UpstreamBroken(f"malformed upstream header line {line[:80]!r}")
                headers.add(name.decode("latin-1"), value.strip(b" \t").decode("utf-8", "surrogateescape"))
            if 100 <= status < 200:
                if status == 101:
                    raise UpstreamBroken("unexpected 101 Switching Protocols")
                continue  # 100 Continue, 103 Early Hints: the final response follows
            http10 = parts[0] == b"HTTP/1.0"
            conn = headers.get("Connection", "").lower()
            keep = ("keep-alive" in conn) if http10 else ("close" not in conn)
            self._head = (status, reason, headers, keep)
            self.keep_alive = keep
            self._choose_framing(status, headers)
            rest = bytes(self._buf)
            self._buf = bytearray()
            waiter = self._head_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            if rest:
                self._feed_body(rest)

    def _choose_framing(self, status: int, headers: CIMultiDict[str]) -> None:
        if self._head_request or status in (204, 304):
            self._mode = "none"
            self._eof = True
            return
        te = headers.getall("Transfer-Encoding", [])
        if te:
            if te[-1].split(",")[-1].strip().lower() != "chunked":
                self._mode = "close"  # RFC 9112 6.3: not chunked last: read until the connection closes
                self.keep_alive = False
                return
            self._mode = "chunked"
            return
        lengths = headers.getall("Content-Length", [])
        if lengths:
            values = {v.strip() for lv in lengths for v in lv.split(",")}
            if len(values) != 1 or not next(iter(values)).isdigit():
                raise UpstreamBroken(f"invalid upstream Content-Length {lengths!r}")
            self._mode = "length"
            self._body_left = int(next(iter(values)))
            if self._body_left == 0:
                self._eof = True
            return
        self._mode = "close"
        self.keep_alive = False

    def _feed_body(self, data: bytes) -> None:
        if self._eof:
            if data.strip():
                # Bytes after a complete response: the connection cannot be trusted any more.
                self.keep_alive = False
            return
        if self._mode == "length":
            if len(data) >= self._body_left:
                extra = len(data) > self._body_left
                self._push(data[: self._body_left])
                self._body_left = 0
                self._eof = True
                if extra:
                    self.keep_alive = False
            else:
                self._body_left -= len(data)
                self._push(data)
        elif self._mode == "chunked":
            self._buf += data
            self._parse_chunks()
        else:  # "close"
            self._push(data)
        self._wake_body()

    def _parse_chunks(self) -> None:
        buf = self._buf
        while buf and not self._eof:
            if self._chunk_state == 0:
                nl = buf.find(b"\r\n")
                if nl < 0:
                    if len(buf) > 4096:
                        raise UpstreamBroken("upstream chunk size line too long")
                    return
                size_text = bytes(buf[:nl]).split(b";", 1)[0].strip()
                del buf[: nl + 2]
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise UpstreamBroken(f"invalid upstream chunk size {size_text[:20]!r}") from None
                if size < 0:
                    raise UpstreamBroken("invalid upstream chunk size")
                if size == 0:
                    self._chunk_state = 3
                else:
                    self._body_left = size
                    self._chunk_state = 1
            elif self._chunk_state == 1:
                take = min(self._body_left, len(buf))
                self._push(bytes(buf[:take]))
                del buf[:take]
                self._body_left -= take
                if self._body_left == 0:
                    self._chunk_state = 2
            elif self._chunk_state == 2:
                if len(buf) < 2:
                    return
                if buf[:2] != b"\r\n":
                    raise UpstreamBroken("missing CRLF after an upstream chunk")
                del buf[:2]
                self._chunk_state = 0
            else:  # the trailer section, up to an empty line
                nl = buf.find(b"\r\n")
                if nl < 0:
                    if len(buf) > MAX_HEAD:
                        raise UpstreamBroken("upstream trailers too large")
                    return
                line = bytes(buf[:nl])
                del buf[: nl + 2]
                if not line:
                    self._eof = True
                    if buf:
                        self.keep_alive = False
                    continue
                # Kept up to the bounds; a line that is no field (or beyond them) is left out, the body stands.
                self._trailer_bytes += len(line)
                name, sep, value = line.partition(b":")
                if sep and name and name.strip() == name and self._trailer_bytes <= MAX_HEAD:
                    if len(self.trailers) < MAX_TRAILERS:
                        self.trailers.append(
                            (name.decode("latin-1"), value.strip(b" \t").decode("utf-8", "surrogateescape"))
                        )

    def _push(self, data: bytes) -> None:
        if not data:
            return
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def _wake_body(self) -> None:
        w = self._body_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        for w in (self._head_waiter, self._body_waiter):
            if w is not None and not w.done():
                w.set_exception(exc)

    # ---- the consumer side -----------------------------------------------------------------------
    @property
    def usable(self) -> bool:
        return not self._closed and self.error is None and self.keep_alive and self.transport is not None

    def start(self, data: bytes, head_request: bool) -> None:
        self._reset()
        self.writer = None
        self._head_request = head_request
        assert self.transport is not None
        self.transport.write(data)

    async def head(self) -> tuple[int, str, CIMultiDict[str], bool]:
        if self._head is None:
            if self.error is not None:
                raise self.error
            self._head_waiter = asyncio.get_running_loop().create_future()
            await self._head_waiter
        assert self._head is not None
        return self._head

    def at_eof(self) -> bool:
        return self._eof and not self._pending

    @property
    def complete(self) -> bool:
        return self._eof and self.error is None

    async def chunk(self, limit: int = -1) -> bytes:
        """The next body bytes (at most ``limit`` when positive); b"" at the end."""
        while not self._pending:
            if self._eof:
                return b""
            if self.error is not None:
                raise self.error
            self._body_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._body_waiter
            finally:
                self._body_waiter = None
        data = self._pending.popleft()
        if 0 < limit < len(data):
            self._pending.appendleft(data[limit:])
            data = data[:limit]
        self._pending_size -= len(data)
        if self._paused and self._pending_size <= HIGH_WATER // 4 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    def close(self) -> None:
        self._closed = True
        if self.writer is not None and not self.writer.done():
            self.writer.cancel()
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        if self.transport is not None:
            self.transport.abort()


class Content:
    """The body of a :class:`Response` as a stream (the subset of aiohttp's ``StreamReader`` in use)."""

    __slots__ = ("_conn",)

    def __init__(self, conn: _Conn) -> None:
        self._conn = conn

    def at_eof(self) -> bool:
        return self._conn.at_eof()

    async def read(self, n: int = -1) -> bytes:
        if n < 0:
            parts = []
            while chunk := await self._conn.chunk():
                parts.append(chunk)
            return b"".join(parts)
        return await self._conn.chunk(n)

    async def iter_any(self) -> AsyncIterator[bytes]:
        while chunk := await self._conn.chunk():
            yield chunk


class Response:
    """One upstream response; :meth:`release` gives the connection back when the body was read to its end."""

    __slots__ = ("_client", "_conn", "content", "headers", "reason", "status")

    def __init__(
        self, client: UpstreamClient, conn: _Conn, status: int, reason: str, headers: CIMultiDict[str]
    ) -> None:
        self._client = client
        self._conn: _Conn | None = conn
        self.status = status
        self.reason = reason
        self.headers = CIMultiDictProxy(headers)
        self.content = Content(conn)

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    @property
    def trailers(self) -> list[tuple[str, str]]:
        """The trailer fields of a chunked response, once its body was read to the end (else none)."""
        conn = self._conn
        return conn.trailers if conn is not None and conn.at_eof() else []

    async def read(self) -> bytes:
        return await self.content.read()

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            body_sent = conn.writer is None or conn.writer.done()
            self._client._done(conn, reuse=body_sent and conn.complete and conn.keep_alive and conn.at_eof())

    def __del__(self) -> None:
        conn = self._conn
        if conn is not None:  # dropped without release: never leak a slot of the pool
            self._conn = None
            conn.close()
            self._client._forget(conn)
            self._client._wake_one(conn.origin)


class UpstreamClient:
    """Requests to origins (``http://host:port``), directly, through one HTTP forward proxy, or through a
    sidecar that listens at each origin's port on its own address (``sidecar``).

    At most ``limit_per_origin`` connections are open per origin; further requests wait for one to
    come back. Idle connections are kept ``keepalive_timeout`` seconds.
    """

    def __init__(
        self,
        proxy: str | None,
        limit_per_origin: int,
        *,
        connect_timeout: float = 10.0,
        keepalive_timeout: float = 30.0,
        sidecar: str | None = None,
    ) -> None:
        self.sidecar = sidecar
        self.proxy: tuple[str, int] | None = None
        if proxy:
            url = URL(proxy)
            if url.scheme != "http" or not url.host:
                raise ValueError(f"upstream proxy must be an http:// URL, got {proxy!r}")
            self.proxy = (url.host, url.port or 80)
        self.limit = limit_per_origin
        self.connect_timeout = connect_timeout
        self.keepalive_timeout = keepalive_timeout
        self._idle: dict[str, list[_Conn]] = {}
        self._open: dict[str, int] = {}
        self._waiters: dict[str, collections.deque[asyncio.Future[None]]] = {}
        self._all: set[_Conn] = set()
        self._closed = False

    async def request(
        self,
        method: str,
        origin: str,
        target: str,
        head: list[str],
        body: bytes | AsyncIterator[bytes] | None,
        length: int | None = None,
        trailers: Callable[[], list[tuple[str, str]]] | None = None,
    ) -> Response:
        """Sends one request to ``origin`` (``host:port``).

        ``target`` is the origin-form path and query; ``head`` the header lines without framing
        headers (Content-Length is set here from ``body``; a streamed body is sent with ``length`` as
        its Content-Length, or chunked when that is None, on a new connection). ``trailers`` gives the
        fields of the trailer section once the body is through: a body in memory with any is sent
        chunked, a streamed chunked one ends with them.
        """
        proxied = self.proxy is not None or self.sidecar is not None
        line = f"{method} http://{origin}{target} HTTP/1.1" if proxied else f"{method} {target} HTTP/1.1"
        stream = body if body is not None and not isinstance(body, bytes | bytearray) else None
        fields = trailers() if trailers is not None and stream is None and body is not None else None
        if stream is not None:
            head = [*head, f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"]
        elif fields:
            head = [*head, "Transfer-Encoding: chunked"]
        elif body is not None:
            head = [*head, f"Content-Length: {len(body)}"]
        data = ("\r\n".join((line, *head)) + "\r\n\r\n").encode("utf-8", "surrogateescape")
        if fields:
            data += (b"%x\r\n%b\r\n" % (len(body), body) if body else b"") + b"0\r\n" + encode(fields) + b"\r\n"  # type: ignore[arg-type]
        elif body and stream is None:
            data += body  # type: ignore[operator]
        head_request = method == "HEAD"
        conn, reused = await self._acquire(origin, fresh=stream is not None)
        try:
            conn.start(data, head_request)
            if stream is not None:
                conn.writer = asyncio.create_task(conn.write_body(stream, length is None, trailers))
            try:
                status, reason, headers, _ = await conn.head()
            except StaleConnection:
                if stream is not None or not reused or method not in IDEMPOTENT:
                    raise
                # The server closed an idle connection as it was reused: nothing reached it, send again.
                self._done(conn, reuse=False)
                conn, reused = await self._acquire(origin, fresh=True)
                conn.start(data, head_request)
                status, reason, headers, _ = await conn.head()
        except BaseException:
            self._done(conn, reuse=False)
            raise
        return Response(self, conn, status, reason, headers)

    def _take_idle(self, origin: str) -> _Conn | None:
        """The most recently used idle connection still usable; unusable ones are dropped on the way."""
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if conn.idle_timer is not None:
                conn.idle_timer.cancel()
                conn.idle_timer = None
            if conn.usable:
                return conn
            self._forget(conn)
        return None

    async def _acquire(self, origin: str, fresh: bool = False) -> tuple[_Conn, bool]:
        if self._closed:
            raise aiohttp.ClientConnectionError("upstream client closed")
        idle = self._idle.get(origin)
        if not fresh and (conn := self._take_idle(origin)) is not None:
            return conn, True
        if fresh and idle and self._open.get(origin, 0) >= self.limit:
            spare = idle.pop(0)  # make room for the new connection rather than wait for an idle one to expire
            spare.close()
            self._forget(spare)
        while self._open.get(origin, 0) >= self.limit:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            waiters = self._waiters.setdefault(origin, collections.deque())
            waiters.append(fut)
            try:
                await fut
            except BaseException:
                with contextlib.suppress(ValueError):
                    waiters.remove(fut)
                if fut.done() and not fut.cancelled():
                    self._wake_one(origin)  # pass the turn on
                raise
            if not fresh and (conn := self._take_idle(origin)) is not None:
                return conn, True
        self._open[origin] = self._open.get(origin, 0) + 1
        try:
            conn = await self._connect(origin)
        except BaseException:
            self._open[origin] -= 1
            self._wake_one(origin)
            raise
        self._all.add(conn)
        return conn, False

    async def _connect(self, origin: str) -> _Conn:
        if self.proxy is not None:
            host, port = self.proxy
        else:
            host, _, p = origin.rpartition(":")
            host, port = host.strip("[]"), int(p)
            if self.sidecar is not None:
                host = self.sidecar
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(lambda: _Conn(origin), host, port)
        except TimeoutError as exc:
            raise aiohttp.ServerTimeoutError(f"connecting to {host}:{port} timed out") from exc
        except OSError as exc:
            raise aiohttp.ClientConnectionError(f"cannot connect to {host}:{port}: {exc}") from exc
        return conn

    def _done(self, conn: _Conn, reuse: bool) -> None:
        origin = conn.origin
        if reuse and conn.usable and not self._closed:
            conn.idle_timer = asyncio.get_running_loop().call_later(self.keepalive_timeout, self._expire, conn)
            self._idle.setdefault(origin, []).append(conn)
        else:
            conn.close()
            self._forget(conn)
        self._wake_one(origin)

    def _forget(self, conn: _Conn) -> None:
        if conn in self._all:
            self._all.discard(conn)
            self._open[conn.origin] -= 1

    def _expire(self, conn: _Conn) -> None:
        idle = self._idle.get(conn.origin)
        if idle and conn in idle:
            idle.remove(conn)
            conn.close()
            self._forget(conn)

    def _wake_one(self, origin: str) -> None:
        waiters = self._waiters.get(origin)
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                break
        if waiters is not None and not waiters:
            self._waiters.pop(origin, None)

    def open_connections(self, origin: str) -> int:
        return self._open.get(origin, 0)

    async def close(self) -> None:
        self._closed = True
        for conn in list(self._all):
            conn.close()
        self._all.clear()
        self._idle.clear()
        self._open.clear()
        for waiters in self._waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(aiohttp.ClientConnectionError("upstream client closed"))
        self._waiters.clear()
