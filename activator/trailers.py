"""HTTP/1.1 trailers (``--http1-trailers``): the fields after a chunked body, kept both ways.

aiohttp's C parser drops a request's trailer section and its response writer ends every chunked
body with an empty one. With the option on, the proxy listener parses HTTP/1.1 requests with
aiohttp's pure-Python parser, which reads the trailer section with the same checks and limits as
the header section; :class:`TrailerRequestParser` keeps what it read, per request body, in the
connection's :class:`TrailerStore`. The Python parser costs more CPU per request than the C one
(``make bench`` measures it), hence an option; the mesh's sidecars drop HTTP/1.1 trailers anyway
unless Envoy's ``enable_trailers`` is set for them.

Trailer fields that frame, route or authenticate a message, or that only make sense for one hop,
never cross (RFC 9110 6.5.1): a trailer cannot change what the header section already decided.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import InvalidURLError
from aiohttp.http_parser import HeadersParser, HttpRequestParserPy

from activator.headerpolicy import REQUEST_DROP

log = logging.getLogger(__name__)

Fields = list[tuple[str, str]]

# Never passed on as a trailer field, in either direction (REQUEST_DROP has the hop-by-hop ones).
TRAILER_DROP = REQUEST_DROP | {
    "content-length",
    "content-encoding",
    "content-type",
    "content-range",
    "authorization",
    "cache-control",
    "max-forwards",
    "set-cookie",
    "cookie",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
}
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def forwardable(fields: Iterable[tuple[str, str]], named: frozenset[str] = frozenset()) -> Fields:
    """The trailer fields that go on: not in :data:`TRAILER_DROP` nor named by ``Connection`` (``named``),
    with a token for a name and no control character in the value (a field that cannot be written
    as it came is left out, with a debug line)."""
    out: Fields = []
    for name, value in fields:
        lname = name.lower()
        if lname in TRAILER_DROP or lname in named:
            continue
        if not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value):
            log.debug("left out a trailer field that cannot be written as it came: %r", name[:60])
            continue
        out.append((name, value.strip(" \t")))
    return out


def encode(fields: Iterable[tuple[str, str]]) -> bytes:
    """The trailer section's field lines (each ending in CRLF; the empty line that ends it not included)."""
    return "".join(f"{k}: {v}\r\n" for k, v in fields).encode("utf-8", "surrogateescape")


# Trailer sections one connection keeps at once. aiohttp parses at most 32 requests ahead of the one
# being handled; the rest are those of requests answered before their body was read, whose body
# aiohttp drains afterwards: older than any that is still wanted, so they go first.
KEPT_PER_CONNECTION = 64


class TrailerStore:
    """The trailers read on one connection, per request body, until its request is answered.

    Keyed by the body's stream object: HTTP/1.1 pipelining can have the next requests parsed, trailers
    and all, while the first is still being handled. At most :data:`KEPT_PER_CONNECTION`, newest kept.
    """

    __slots__ = ("_by_body",)

    def __init__(self) -> None:
        self._by_body: dict[int, tuple[object, Fields]] = {}

    def put(self, body: object, fields: Fields) -> None:
        self._by_body[id(body)] = (body, fields)
        if len(self._by_body) > KEPT_PER_CONNECTION:
            del self._by_body[next(iter(self._by_body))]

    def get(self, body: object) -> Fields:
        entry = self._by_body.get(id(body))
        return entry[1] if entry is not None and entry[0] is body else []

    def discard(self, body: object) -> None:
        entry = self._by_body.get(id(body))
        if entry is not None and entry[0] is body:
            del self._by_body[id(body)]

    def __len__(self) -> int:
        return len(self._by_body)


class _Capture:
    """aiohttp's header-section parser, which its payload parser also uses for a trailer section: the
    fields parsed outside a message head are kept for the body being read."""

    __slots__ = ("_inner", "_owner")

    def __init__(self, inner: HeadersParser, owner: TrailerRequestParser) -> None:
        self._inner = inner
        self._owner = owner

    def parse_headers(self, lines: list[bytes]) -> Any:
        parsed = self._inner.parse_headers(lines)
        if not self._owner.in_head:
            self._owner.got_trailers(parsed[1])
        return parsed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class TrailerRequestParser(HttpRequestParserPy):  # type: ignore[misc,valid-type]
    """aiohttp's pure-Python request parser, keeping each chunked body's trailer section in ``store``."""

    def __init__(self, *args: Any, store: TrailerStore, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.store = store
        self.in_head = False
        self._headers_parser = _Capture(self._headers_parser, self)

    def parse_message(self, lines: list[bytes]) -> Any:
        if not lines[0].isascii():
            # The C parser (llhttp) refuses a request line that is not ASCII; this one would take it.
            raise InvalidURLError(f"Invalid char in request line: {lines[0][:100]!r}")
        self.in_head = True
        try:
            return super().parse_message(lines)
        finally:
            self.in_head = False

    def got_trailers(self, raw: Iterable[tuple[bytes, bytes]]) -> None:
        body = getattr(getattr(self, "_payload_parser", None), "payload", None)
        fields = [(k.decode("latin-1"), v.decode("utf-8", "surrogateescape")) for k, v in raw]
        if body is not None and fields:
            self.store.put(body, fields)


def parser_keeps_trailers() -> bool:
    """Whether this aiohttp's Python parser hands a trailer section to :class:`TrailerRequestParser`
    (releases that skip the section unparsed cannot carry request trailers)."""

    class _Quiet:
        transport = None

        def __getattr__(self, name: str) -> Any:
            return lambda *a, **k: None

    store = TrailerStore()
    loop = asyncio.new_event_loop()  # only handed to the body stream it makes; never run
    try:
        parser = TrailerRequestParser(_Quiet(), loop, 2**16, store=store)
        messages, _, _ = parser.feed_data(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\nX-Check: 1\r\n\r\n"
        )
    except Exception:
        return False
    finally:
        loop.close()
    return bool(messages) and store.get(messages[0][1]) == [("X-Check", "1")]


async def end_chunked(request: web.BaseRequest, fields: Fields) -> None:
    """Ends the request's chunked response with ``fields`` in its trailer section (nothing when it is
    not chunked, as to an HTTP/1.0 client). The caller still calls ``write_eof``, which then has
    nothing left to write."""
    writer = request.writer
    if not fields or not getattr(writer, "chunked", False):
        return
    writer.chunked = False  # type: ignore[attr-defined]  # the last chunk is written here, with the fields
    await writer.write(b"0\r\n" + encode(fields) + b"\r\n")
