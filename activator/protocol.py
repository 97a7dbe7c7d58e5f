"""The proxy listener's HTTP connections: aiohttp's, with its own answers as JSON and bodies left encoded;
a connection that opens with HTTP/2's preface is handed to the HTTP/2 protocol instead.

aiohttp answers a request it cannot parse (bad request line, malformed or oversized headers, too
many headers) with a ``text/plain`` 400 and an error-level traceback in the log. Here such a request
gets the activator's usual ``{"error", "detail"}`` body, 431 when a limit was hit (what Envoy
answers for headers over its limits), and a debug-level log line, so that a flood of bad input
cannot flood the log either. Request bodies are not decompressed: a proxy passes them on as sent.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.http_parser import HttpRequestParserPy
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from activator.h2server import PREFACE, H2Server, Handler
from activator.trailers import TrailerRequestParser, TrailerStore

log = logging.getLogger(__name__)

DETAIL_MAX = 300
# A proxy passes request bodies on as they came; older aiohttp releases always decoded them.
_CAN_KEEP_ENCODING = "auto_decompress" in inspect.signature(RequestHandler.__init__).parameters
_PARSER_QUEUE = "max_msg_queue_size" in inspect.signature(HttpRequestParserPy.__init__).parameters


def describe(exc: BaseException | None, max_line: int, max_field: int) -> tuple[int, str, str]:
    """(status, error, detail) for what the parser refused."""
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else None
        if limit == max_line and max_line != max_field:
            what = f"the request line is longer than {max_line} bytes (--max-line-size)"
        elif limit == max_field and max_line != max_field:
            what = f"a header field is longer than {max_field} bytes (--max-field-size)"
        else:
            what = f"the request line or a header field is longer than {limit} bytes"
            what += " (--max-line-size, --max-field-size)"
        return 431, "request header fields too large", what
    message = getattr(exc, "message", None) or (str(exc) if exc is not None else "")
    if isinstance(exc, HttpProcessingError) and "too many headers" in message.lower():
        return 431, "request header fields too large", "more header fields than --max-headers allows"
    return 400, "malformed request", " ".join(message.split())[:DETAIL_MAX] or "the request could not be parsed"


def raw_answer(status: int, error: str, detail: str, retry_after: bool = False) -> bytes:
    """A whole HTTP/1.1 answer that closes the connection, for when no request was parsed to answer."""
    body = json.dumps({"error": error, "detail": detail}).encode()
    head = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "Content-Type: application/json; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if retry_after:
        head.append("Retry-After: 1")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class JsonErrorHandler(RequestHandler):
    """One connection of the proxy listener: aiohttp's, with JSON error answers, a deadline for the first
    request's headers, and a place in the listener's connection count."""

    __slots__ = ("_counted", "_header_timer", "_sniff", "header_timeout", "on_rejected", "owner", "trailers")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        owner: JsonErrorServer = self.owner
        self._counted = False
        self._header_timer: asyncio.TimerHandle | None = None
        if owner.max_connections and owner.open_connections >= owner.max_connections:
            # Refused before anything is read: a clear answer, then the connection goes.
            transport.write(  # type: ignore[attr-defined]
                raw_answer(
                    503,
                    "too many connections",
                    f"the activator has {owner.max_connections} open connections (--max-connections)",
                    retry_after=True,
                )
            )
            transport.close()
            if owner.on_refused is not None:
                owner.on_refused("too_many")
            return
        owner.open_connections += 1
        self._counted = True
        self._sniff: bytes | None = b"" if owner.h2_handler is not None else None
        super().connection_made(transport)
        if self.header_timeout > 0:
            self._header_timer = asyncio.get_running_loop().call_later(self.header_timeout, self._headers_late)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if self._counted:
            self._counted = False
            self.owner.open_connections -= 1
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._sniff is not None:
            data = self._sniff + data
            if len(data) < len(PREFACE) and PREFACE.startswith(data):
                self._sniff = data  # could still be HTTP/2's preface
                return
            self._sniff = None
            if data.startswith(PREFACE):
                self._to_h2(data)
                return
        super().data_received(data)
        if self._header_timer is not None and (self._messages or self._request_count):
            self._header_timer.cancel()  # a request arrived; between requests the keep-alive timeout rules
            self._header_timer = None

    def _to_h2(self, data: bytes) -> None:
        """The client spoke HTTP/2 with prior knowledge (as Envoy does to a cleartext HTTP/2 upstream): the
        connection moves to an HTTP/2 protocol and aiohttp's handler lets go of it without closing it."""
        owner: JsonErrorServer = self.owner
        transport = self.transport
        assert transport is not None and owner.h2_handler is not None
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._counted = False  # the count moves with the connection
        self.transport = None
        RequestHandler.connection_lost(self, None)
        proto = H2Server(owner.h2_handler, owner.h2_max_streams, owner.h2_idle_timeout, owner.h2_lost)
        owner.h2_connections.add(proto)
        transport.set_protocol(proto)
        proto.connection_made(transport)
        proto.data_received(data)

    def _headers_late(self) -> None:
        """The first request's headers did not arrive in time: 408, and the connection goes."""
        self._header_timer = None
        if self._messages or self._request_count or self.transport is None:
            return
        self.transport.write(
            raw_answer(
                408,
                "request header timeout",
                f"the request's headers did not arrive within {self.header_timeout:g}s (--header-timeout)",
            )
        )
        log.debug("closed a connection whose request headers were late")
        if self.owner.on_refused is not None:
            self.owner.on_refused("header_timeout")
        self.force_close()  # closes the transport too

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            # Part of a response is out already: only closing the connection tells the client.
            raise ConnectionError("the response was already started; cannot send an error instead")
        if status == 400:
            status, err, detail = describe(exc, self.max_line_size, self.max_field_size)
            log.debug("refused an unparsable request from %s: %s", request.remote, detail)
            if self.on_rejected is not None:
                self.on_rejected()
        else:
            if status >= 500:
                log.error("request from %s failed", request.remote, exc_info=exc)
            try:
                err = HTTPStatus(status).phrase.lower()
            except ValueError:
                err = "error"
            detail = "the activator failed to handle the request" if status >= 500 else (message or err)
        resp = web.json_response({"error": err, "detail": detail}, status=status)
        resp.force_close()
        return resp

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """A body the client broke off or garbled is the client's problem, already answered: debug level."""
        exc = kw.get("exc_info")
        if isinstance(exc, RequestPayloadError | ConnectionError):
            log.debug("request body from a client failed: %r", exc)
            return
        super().log_exception(*args, **kw)


class JsonErrorServer(web.Server):
    """``web.Server`` whose connections answer parse errors with JSON (``on_rejected`` counts them), must
    send a request's headers within ``header_timeout`` seconds (0: no limit), and number at most
    ``max_connections`` (0: no limit; ``on_refused`` counts the ones turned away). With
    ``http1_trailers`` its HTTP/1.1 connections keep request trailers (``trailers`` of each connection,
    a :class:`TrailerStore`) until the request is answered."""

    def __init__(
        self,
        handler: Any,
        *,
        on_rejected: Callable[[], None] | None = None,
        on_refused: Callable[[str], None] | None = None,
        header_timeout: float = 0.0,
        max_connections: int = 0,
        h2_handler: Handler | None = None,
        h2_max_streams: int = 1000,
        http1_trailers: bool = False,
        **kwargs: Any,
    ) -> None:
        if _CAN_KEEP_ENCODING:
            kwargs.setdefault("auto_decompress", False)
        if http1_trailers:
            handler = _forgetting_trailers(handler)
        super().__init__(handler, **kwargs)
        self.http1_trailers = http1_trailers
        self.on_rejected = on_rejected
        self.on_refused = on_refused
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.open_connections = 0
        self.h2_handler = h2_handler
        self.h2_max_streams = h2_max_streams
        self.h2_idle_timeout = float(kwargs.get("keepalive_timeout", 75.0) or 0.0)
        self.h2_connections: set[H2Server] = set()

    def h2_lost(self, conn: H2Server) -> None:
        if conn in self.h2_connections:
            self.h2_connections.discard(conn)
            self.open_connections -= 1

    def pre_shutdown(self) -> None:
        super().pre_shutdown()
        for conn in self.h2_connections:
            conn._goaway()

    async def shutdown(self, timeout: float | None = None) -> None:
        """HTTP/1.1 and HTTP/2 connections finish what they are doing, side by side, within ``timeout``."""
        h2_done = [conn.shutdown(timeout if timeout is not None else 15.0) for conn in list(self.h2_connections)]
        await asyncio.gather(super().shutdown(timeout), *h2_done)

    def __call__(self) -> RequestHandler:
        proto = JsonErrorHandler(self, loop=self._loop, **self._kwargs)
        proto.on_rejected = self.on_rejected
        proto.owner = self
        proto.header_timeout = self.header_timeout
        proto.trailers = None
        if self.http1_trailers:
            store = proto.trailers = TrailerStore()
            extra = {"max_msg_queue_size": getattr(proto, "_max_msg_queue_size", 0)} if _PARSER_QUEUE else {}
            proto._parser = TrailerRequestParser(
                proto,
                self._loop,
                proto._read_bufsize,
                max_line_size=proto.max_line_size,
                max_field_size=proto.max_field_size,
                # It counts the request line and the empty line that ends the head too; the C one does not.
                max_headers=proto.max_headers + 2,
                payload_exception=RequestPayloadError,
                auto_decompress=False,
                store=store,
                **extra,
            )
        return proto


def _forgetting_trailers(handler: Any) -> Any:
    """The request handler, after which the request's trailers (if any came) are dropped."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        try:
            return await handler(request)
        finally:
            store = getattr(request.protocol, "trailers", None)
            if store is not None:
                store.discard(request.content)

    return handle
