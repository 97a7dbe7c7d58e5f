"""Bad input against the activator over real sockets: malformed and oversized headers, odd elasti-service
values, invalid UTF-8, bodies that are too large or too slow. Every one gets a clear 4xx with a JSON body
and the activator keeps serving well-formed requests.

The activator runs in-process (a hand-fed registry, the backend behind a forward proxy standing in for
the sidecar, see ``test_activator_proxy``) on its own event loop in a thread, so that the requests can be
written byte by byte with plain blocking sockets — most of them are requests no HTTP client would send.
The raw client, the strategies and the oracles here are also used by the fuzz run against the real
``elasti-istio activator`` process (``tests/cluster/test_badinput_activator.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import hashlib
import json
import re
import select
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from activator.app import Activator
from activator.config import Config, add_flags
from tests.activator_stubs import WakeEndpoint
from tests.unit.test_activator_proxy import NS, Env

# Small limits, so that both sides of each are cheap to reach.
LIMITS = dict(
    max_line_size=4096,
    max_field_size=2048,
    max_headers=32,
    max_body_size=256 * 1024,
    request_body_timeout=1.5,
    retry_body_limit=64 * 1024,
)
KNOWN = f"{NS}/details"
COLD = f"{NS}/cold"  # known, never ready: requests for it are held


# --- a raw HTTP/1.1 client ---------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names; the last value wins
    body: bytes
    closed: bool = False  # the reply says the connection ends with it
    interim: list[int] = field(default_factory=list)  # 1xx answers before it

    def json(self) -> Any:
        return json.loads(self.body)

    def is_own_error(self) -> bool:
        """An answer the activator made itself: ``{"error", "detail"}`` as JSON."""
        if not self.headers.get("content-type", "").startswith("application/json"):
            return False
        try:
            doc = self.json()
        except ValueError:
            return False
        return isinstance(doc, dict) and isinstance(doc.get("error"), str) and isinstance(doc.get("detail"), str)


class NoReply(AssertionError):
    pass


def _read_reply(sock: socket.socket, head_only_body: bool, deadline: float) -> Reply:
    buf = b""
    interim: list[int] = []

    def more() -> bytes:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            return sock.recv(65536)
        except ConnectionResetError:
            return b""

    while True:
        while b"\r\n\r\n" not in buf:
            chunk = more()
            if not chunk:
                raise NoReply(f"connection closed before a full response head: {buf[:200]!r}")
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        version, status = lines[0].split()[0], int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if 100 <= status < 200:
            interim.append(status)
            continue
        break
    length = headers.get("content-length")
    if head_only_body:
        body = b""
    elif length is not None:
        while len(buf) < int(length):
            chunk = more()
            if not chunk:
                break
            buf += chunk
        body, buf = buf[: int(length)], buf[int(length) :]
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            while b"\r\n" not in buf:
                buf += more() or b"0\r\n\r\n"
            size_line, _, buf = buf.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(buf) < size + 2:
                buf += more() or b"\r\n"
            body += buf[:size]
            buf = buf[size + 2 :]
            if size == 0:
                break
    else:
        while chunk := more():
            buf += chunk
        body = buf
    conn = headers.get("connection", "").lower()
    closed = conn == "close" or (version == "HTTP/1.0" and conn != "keep-alive")
    return Reply(status, headers, body, closed, interim)


def exchange(
    port: int,
    head: bytes,
    body: bytes = b"",
    *,
    drip: tuple[bytes, float, int] | None = None,
    head_request: bool = False,
    timeout: float = 30,
) -> Reply:
    """Writes ``head`` and ``body`` on a new connection (then ``drip``: a piece, a pause, a count, stopped as
    soon as an answer arrives) and reads one response. A server that answers early and closes is fine."""
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(head + body)
            if drip is not None:
                piece, pause, count = drip
                for _ in range(count):
                    readable, _, _ = select.select([sock], [], [], pause)
                    if readable:
                        break
                    sock.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return _read_reply(sock, head_request, deadline)


def request_head(
    method: str = "GET",
    target: str = "/echo",
    headers: list[tuple[str, str]] | list[tuple[bytes, bytes]] | None = None,
    *,
    service: str | None = KNOWN,
    close: bool = True,
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1".encode(), b"Host: details:9080"]
    if service is not None:
        lines.append(f"elasti-service: {service}".encode())
    for name, value in headers or []:
        n = name if isinstance(name, bytes) else name.encode()
        v = value if isinstance(value, bytes) else value.encode()
        lines.append(n + b": " + v)
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def well_formed(port: int) -> None:
    """The request any healthy activator must still answer normally: forwarded, echoed by the workload."""
    reply = exchange(port, request_head("GET", "/echo/still-serving?x=1"))
    assert reply.status == 200, reply
    assert reply.json()["target"] == "/echo/still-serving?x=1"


# --- strategies and oracles (also used against the real process) -------------------------------------

TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Names whose meaning the activator, the HTTP stack or the test relies on; a random header must not be one.
RESERVED = frozenset(
    (
        "host connection keep-alive proxy-connection proxy-authorization proxy-authenticate te trailer upgrade "
        "transfer-encoding content-length expect elasti-service x-forwarded-for x-forwarded-proto "
        "x-forwarded-host close content-type content-encoding content-location content-range etag "
        "max-forwards server user-agent date cookie authorization accept accept-encoding"
    ).split()
)
VALUE_BYTES = bytes([9, *range(0x20, 0x7F), *range(0x80, 0x100)])  # HTAB, SP, VCHAR, obs-text
CONTROL_BYTES = bytes([*range(0, 9), *range(0x0B, 0x0D), *range(0x0E, 0x20), 0x7F])  # no CR, no LF

valid_names = st.text(alphabet=TCHAR, min_size=1, max_size=40).filter(lambda n: n.lower() not in RESERVED)
long_names = st.text(alphabet="abcdefghij-", min_size=1000, max_size=2600).map(lambda n: "x" + n)
invalid_names = st.builds(
    lambda a, bad, b: a + bad + b,
    st.text(alphabet=TCHAR, max_size=10),
    st.sampled_from([" ", "(", ")", ",", "/", ";", "<", "=", ">", "?", "@", "[", "\\", "]", "{", "}", '"', "é"]),
    st.text(alphabet=TCHAR, max_size=10),
)
short_values = st.binary(max_size=60).map(lambda b: bytes(VALUE_BYTES[x % len(VALUE_BYTES)] for x in b))
utf8_values = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\x85\u2028\u2029"), max_size=40
).map(str.encode)
long_values = st.integers(1500, 2600).map(lambda n: b"v" * n)
control_values = st.builds(
    lambda a, c, b: a + bytes([c]) + b, short_values, st.sampled_from(CONTROL_BYTES), short_values
)


@st.composite
def header_sets(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    """Random header names, values, counts and sizes: mostly valid, some invalid, some over the limits."""
    n = draw(st.one_of(st.integers(0, 12), st.integers(25, 40)))
    out = []
    for _ in range(n):
        name = draw(st.one_of(valid_names, valid_names, valid_names, valid_names, long_names, invalid_names))
        value = draw(st.one_of(short_values, short_values, utf8_values, long_values, control_values))
        out.append((name.encode(), value))
    return out


def _valid_name(name: bytes) -> bool:
    return bool(name) and all(chr(c) in TCHAR for c in name)


def _valid_value(value: bytes) -> bool:
    return all(c in VALUE_BYTES for c in value)


def header_oracle(
    headers: list[tuple[bytes, bytes]], fixed: list[bytes], max_field: int, max_headers: int, lines_first: bool = False
) -> set[int]:
    """The statuses acceptable for a request whose headers are ``fixed`` (names), then ``headers``.

    The parser stops at the first violation; which one counts first can shift by a header (the count is
    checked when the next header starts, a length as it is read), so the violations within one header of
    the first are all acceptable: a bad character is 400, a field or count over the limits is 431. What
    counts towards --max-field-size is the parser's business near the limit: aiohttp's C parser adds the
    previous header's name to a name, and counts a value without its name when the name came in one piece.
    So a name or a value alone over the limit is a definite 431; a name with its value, or with the name
    before it, over the limit may be one. ``lines_first``: aiohttp's Python parser, which splits the whole
    head into lines (checking their length and count) before it reads a name, so a limit anywhere in the
    head wins over a bad character before it.
    """
    events: list[tuple[int, int]] = []  # (position, status); a negative status is "maybe"
    prev = len(fixed[-1]) if fixed else 0
    for i, (name, value) in enumerate(headers):
        pos = len(fixed) + i
        if not _valid_name(name) or not _valid_value(value):
            events.append((pos, 400))
        val = len(value.lstrip(b" \t"))
        if max(len(name), val) > max_field + 2:
            events.append((pos, 431))
        elif max(len(name), val, prev + len(name), len(name) + val) > max_field - 2:
            events.append((pos, -431))
        if pos + 1 > max_headers:
            events.append((pos, 431))
        prev = len(name)
    if lines_first and any(s == 431 for _, s in events):
        return {431}
    extra = {431} if lines_first and any(s == -431 for _, s in events) else set()
    return extra | _first_violation(events, headers)


def _first_violation(events: list[tuple[int, int]], headers: list[tuple[bytes, bytes]]) -> set[int]:
    definite = [e for e in events if e[1] > 0]
    if not definite:
        base = {200}
        if any(not _utf8(v) for _, v in headers):
            base = {400}
        return base | ({431} if events else set())
    first = min(p for p, _ in definite)
    return {abs(s) for p, s in events if p <= first + 1}


def _utf8(value: bytes) -> bool:
    try:
        value.decode()
    except UnicodeDecodeError:
        return False
    return True


def check_headers_reply(reply: Reply, headers: list[tuple[bytes, bytes]], expected: set[int]) -> None:
    assert reply.status in expected, (reply.status, reply.body[:300], expected)
    if reply.status != 200:
        assert reply.is_own_error(), reply
        return
    got: dict[str, list[str]] = {}
    for name, value in reply.json()["headers"]:
        got.setdefault(name.lower(), []).append(value)
    for name, value in headers:  # every header reached the workload unchanged (minus the optional whitespace)
        assert value.strip(b" \t").decode() in got.get(name.decode().lower(), []), (name, value, got)


_NS = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
SERVICE_NAMES = ["elasti-service", "Elasti-Service", "ELASTI-SERVICE", "eLaStI-sErViCe"]
service_values = st.one_of(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-./, \tABCZéø日/", max_size=30),
    st.sampled_from(
        [
            "",
            " ",
            "/",
            "//",
            "shop",
            "shop/",
            "/details",
            "a/b/c",
            "shop/details/",
            "Shop/details",
            "shop/Details",
            "shöp/details",
            "shop/détails",
            "shop /details",
            "shop/ details",
            "shop/details,shop/details",
            KNOWN,
            f" {KNOWN} ",
            f"\t{KNOWN}",
            "shop/nope",
            "other/details",
            "-shop/details",
            "shop/details-",
            "shop/.details",
            "shop/" + "a" * 254,
            "a" * 64 + "/x",
            "a" * 63 + "/details",
            "\u0000",
            "shop/\x7f",
        ]
    ),
    st.builds(lambda a, b: f"{a}/{b}", st.text("abc-.", min_size=1, max_size=70), st.text("abc-.", max_size=260)),
    st.text(max_size=20),
).map(lambda v: v.replace("\r", "").replace("\n", ""))  # a line break would end the header, not fill it
service_headers = st.lists(st.tuples(st.sampled_from(SERVICE_NAMES), service_values), min_size=1, max_size=3)


def service_oracle(values: list[str], known: set[str]) -> int:
    """What a request with these elasti-service values must get: 400, 404 or 200 (forwarded)."""
    raw = [v.encode() for v in values]
    if any(not _valid_value(r) for r in raw):
        return 400  # control characters: the parser refuses the request
    if len(values) != 1 or "," in values[0]:
        return 400
    value = values[0].strip(" \t")
    ns, sep, name = value.partition("/")
    if not sep or len(ns) > 63 or len(name) > 253 or not _NS.fullmatch(ns) or not _NAME.fullmatch(name):
        return 400
    return 200 if value in known else 404


printable_no_crlf = st.binary(max_size=80).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
request_lines = st.one_of(
    printable_no_crlf,
    st.builds(
        lambda m, t, v: m + b" " + t + b" " + v,
        st.one_of(
            st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"OPTIONS", b"DELETE", b"PATCH"]), printable_no_crlf
        ),
        st.one_of(st.sampled_from([b"/", b"/echo", b"*", b"http://details:9080/echo"]), printable_no_crlf),
        st.one_of(
            st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.9", b"http/1.1"]), printable_no_crlf
        ),
    ),
)


def check_request_line_reply(line: bytes, reply: Reply) -> None:
    """Whatever the request line, a 4xx made by the activator (never a 5xx, never silence)."""
    assert 400 <= reply.status < 500, (line, reply)
    if not line.startswith(b"HEAD "):
        assert reply.is_own_error(), (line, reply)


# --- the served activator ----------------------------------------------------------------------------


class Served:
    """An :class:`Env` (activator, proxy stand-in, backend, wake endpoint) on its own loop in a thread."""

    def __init__(self, **cfg: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.env: Env = self.run(Env(**cfg).start())
        self.do(lambda: self.env.put("details", ready=True))
        self.do(lambda: self.env.put("cold", hold_timeout="30s"))
        self.port = self.env.activator.proxy_address[1]

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def do(self, fn: Callable[[], Any]) -> Any:
        async def call() -> Any:
            return fn()

        return self.run(call())

    def pending(self, name: str) -> int:
        return int(self.do(lambda: self.env.pending_sync(NS, name)))

    def stop(self) -> None:
        self.run(self.env.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    s = Served(**LIMITS)
    try:
        yield s
    finally:
        s.stop()


def wait_until(probe: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


# --- malformed and oversized requests ----------------------------------------------------------------

LONG = "a" * 5000
PARSER_CASES = {
    "request line over --max-line-size": (f"GET /{LONG} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 431, "--max-line-size"),
    "header field over --max-field-size": (
        b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 3000 + b"\r\n\r\n",
        431,
        "--max-field-size",
    ),
    "header name over --max-field-size": (b"GET /echo HTTP/1.1\r\nHost: x\r\n" + b"N" * 3000 + b": 1\r\n\r\n", 431, ""),
    "more headers than --max-headers": (
        b"GET /echo HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(40)) + b"\r\n",
        431,
        "--max-headers",
    ),
    "TLS on the plain port": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32) + b"\r\n\r\n", 400, ""),
    "not HTTP at all": (b"hello there\r\n\r\n", 400, ""),
    "space in a header name": (b"GET /echo HTTP/1.1\r\nHost: x\r\nBad Name: 1\r\n\r\n", 400, ""),
    "NUL in a header value": (b"GET /echo HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n", 400, ""),
    "raw UTF-8 in the path": ("GET /caf\u00e9 HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 400, ""),
    "invalid UTF-8 in the path": (b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n", 400, ""),
    "invalid UTF-8 in the query": (b"GET /echo?q=\xc3 HTTP/1.1\r\nHost: x\r\n\r\n", 400, ""),
    "Content-Length and Transfer-Encoding": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc",
        400,
        "",
    ),
    "Content-Length not a number": (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1e3\r\n\r\n", 400, ""),
    "two Content-Lengths": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        400,
        "",
    ),
    "chunk size not hex": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        400,
        "",
    ),
    "folded header line": (b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n  continued\r\n\r\n", 400, ""),
}


@pytest.fixture(scope="module")
def served_python_parser() -> Iterator[Served]:
    """With --http1-trailers: aiohttp's Python parser reads the requests instead of its C one."""
    s = Served(**LIMITS, http1_trailers=True)
    try:
        yield s
    finally:
        s.stop()


@pytest.mark.parametrize("parser", ["c", "python"])
@pytest.mark.parametrize("case", list(PARSER_CASES))
def test_unparsable_requests_get_a_json_4xx(request: pytest.FixtureRequest, case: str, parser: str) -> None:
    """The same answers whichever of aiohttp's parsers reads the request."""
    served: Served = request.getfixturevalue("served" if parser == "c" else "served_python_parser")
    data, status, mention = PARSER_CASES[case]
    if b"elasti-service" not in data:
        data = data.replace(b"Host: x\r\n", f"Host: x\r\nelasti-service: {KNOWN}\r\n".encode(), 1)
    reply = exchange(served.port, data)
    assert reply.status == status, reply
    assert reply.is_own_error(), reply
    assert mention in reply.json()["detail"]
    assert reply.closed
    well_formed(served.port)


@pytest.mark.parametrize("parser", ["c", "python"])
def test_exactly_max_headers_fields_are_taken_one_more_is_not(request: pytest.FixtureRequest, parser: str) -> None:
    served: Served = request.getfixturevalue("served" if parser == "c" else "served_python_parser")
    n = int(LIMITS["max_headers"])
    for count, status in ((n, 200), (n + 1, 431)):
        fields = b"".join(b"X-%d: 1\r\n" % i for i in range(count - 3))  # with Host, elasti-service, Connection
        data = b"GET /echo HTTP/1.1\r\nHost: x\r\nelasti-service: " + KNOWN.encode() + b"\r\n" + fields
        reply = exchange(served.port, data + b"Connection: close\r\n\r\n")
        assert reply.status == status, (count, reply)


def test_unparsable_requests_are_counted_not_logged_as_errors(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    before = served.run(served.env.metric("elasti_activator_requests_total", namespace="", name="", outcome="rejected"))
    with caplog.at_level("INFO"):
        for data, _, _ in list(PARSER_CASES.values())[:5]:
            exchange(served.port, data)
    after = served.run(served.env.metric("elasti_activator_requests_total", namespace="", name="", outcome="rejected"))
    assert after == before + 5
    assert not [r for r in caplog.records if r.levelno >= 30], [r.getMessage() for r in caplog.records]


def test_invalid_utf8_in_a_header_is_refused_not_altered(served: Served) -> None:
    """The forwarding client would drop the bytes that are not UTF-8: the workload would see another value."""
    hits = served.do(lambda: served.env.state["hits"]["echo"])
    for value in (b"a\xffb", b"\xc3", b"\xed\xa0\x80", b"caf\xe9"):
        reply = exchange(served.port, request_head(headers=[(b"X-Raw", value)]))
        assert reply.status == 400 and reply.is_own_error(), reply
        assert reply.json() == {
            "error": "invalid request",
            "detail": "the value of the 'X-Raw' header is not valid UTF-8",
        }
    reply = exchange(served.port, request_head(service=None, headers=[(b"elasti-service", b"shop/d\xe9tails")]))
    assert reply.status == 400 and "not valid UTF-8" in reply.json()["detail"]
    assert served.do(lambda: served.env.state["hits"]["echo"]) == hits  # none reached the workload
    # Valid UTF-8 beyond ASCII goes through byte for byte.
    value = "caf\u00e9 \u65e5\u672c \U0001f600"
    reply = exchange(served.port, request_head(headers=[("X-Text", value)]))
    assert reply.status == 200
    assert ["X-Text", value] in reply.json()["headers"]


@pytest.mark.parametrize(
    ("headers", "status", "err"),
    [
        ([], 400, "missing elasti-service header"),
        ([("elasti_service", KNOWN)], 400, "missing elasti-service header"),
        ([("elasti-service", "")], 400, "malformed elasti-service header"),
        ([("elasti-service", "   ")], 400, "malformed elasti-service header"),
        ([("elasti-service", "shop")], 400, "malformed elasti-service header"),
        ([("elasti-service", "/details")], 400, "malformed elasti-service header"),
        ([("elasti-service", "shop/")], 400, "malformed elasti-service header"),
        ([("elasti-service", "a/b/c")], 400, "malformed elasti-service header"),
        ([("elasti-service", "Shop/Details")], 400, "malformed elasti-service header"),
        ([("elasti-service", "sh\u00f6p/details")], 400, "malformed elasti-service header"),
        ([("elasti-service", "shop /details")], 400, "malformed elasti-service header"),
        ([("elasti-service", "shop/" + "d" * 1500)], 400, "malformed elasti-service header"),
        ([("elasti-service", "s" * 64 + "/details")], 400, "malformed elasti-service header"),
        ([("elasti-service", f"{KNOWN},{KNOWN}")], 400, "duplicate elasti-service header"),
        ([("elasti-service", KNOWN), ("Elasti-Service", KNOWN)], 400, "duplicate elasti-service header"),
        ([("elasti-service", KNOWN), ("elasti-service", COLD)], 400, "duplicate elasti-service header"),
        ([("elasti-service", "shop/nope")], 404, "unknown ElastiService"),
        ([("elasti-service", "nope/details")], 404, "unknown ElastiService"),
        ([("ELASTI-SERVICE", KNOWN)], 200, None),
        ([("eLaStI-sErViCe", f"  {KNOWN}\t")], 200, None),
    ],
)
def test_odd_elasti_service_values(
    served: Served, headers: list[tuple[str, str]], status: int, err: str | None
) -> None:
    reply = exchange(served.port, request_head(service=None, headers=headers))
    assert reply.status == status, reply
    if err is None:
        assert reply.json()["target"] == "/echo"
    else:
        assert reply.is_own_error() and reply.json()["error"] == err
        assert len(reply.json()["detail"]) < 500  # a very long value is not echoed back whole


# --- request body size -------------------------------------------------------------------------------


def test_content_length_over_the_limit_is_refused_up_front(served: Served) -> None:
    """413 before anything is held, woken or read: the client that asked for 100-continue never sends it."""
    over = LIMITS["max_body_size"] + 1
    wakes = served.do(lambda: len(served.env.wake.calls))
    for service in (KNOWN, COLD):
        head = request_head(
            "POST", "/echo", [("Content-Length", str(over)), ("Expect", "100-continue")], service=service
        )
        reply = exchange(served.port, head)
        assert reply.status == 413 and reply.interim == [], reply
        assert reply.json() == {
            "error": "request body too large",
            "detail": f"Content-Length {over} is larger than {LIMITS['max_body_size']} bytes (--max-body-size)",
        }
        assert reply.closed
    assert served.pending("cold") == 0
    assert served.do(lambda: len(served.env.wake.calls)) == wakes
    # At the limit exactly: forwarded whole.
    body = b"z" * LIMITS["max_body_size"]
    reply = exchange(served.port, request_head("POST", "/echo", [("Content-Length", str(len(body)))]), body)
    assert reply.status == 200 and reply.json()["sha256"] == hashlib.sha256(body).hexdigest()


def _chunked(data: bytes, size: int = 8192) -> bytes:
    out = b"".join(b"%x\r\n%s\r\n" % (len(data[i : i + size]), data[i : i + size]) for i in range(0, len(data), size))
    return out + b"0\r\n\r\n"


@pytest.mark.parametrize("size", [100 * 1024, 2 * 1024 * 1024])
def test_chunked_body_over_the_limit_is_cut_off(served: Served, size: int) -> None:
    """Counted as it streams: past the limit the upload stops with 413, whether it was still being kept for a
    retry or already on its way to the workload; the workload never gets a complete request."""
    limit = LIMITS["max_body_size"]
    head = request_head("POST", "/echo", [("Transfer-Encoding", "chunked")])
    if size < limit:
        reply = exchange(served.port, head, _chunked(b"q" * size))
        assert reply.status == 200 and reply.json()["length"] == size
        return
    reply = exchange(served.port, head, _chunked(b"q" * size, 64 * 1024))
    assert reply.status == 413, reply
    assert reply.json()["detail"] == f"the request body is larger than {limit} bytes (--max-body-size)"
    well_formed(served.port)


# --- request body timeout ----------------------------------------------------------------------------


def test_dripping_body_gets_408_and_frees_its_slot(served: Served) -> None:
    """Late traffic (target ready): the body must be complete within --request-body-timeout of its start."""
    head = request_head("POST", "/echo", [("Content-Length", "1000")])
    reply = exchange(served.port, head, b"x", drip=(b"x", 0.25, 120))  # would take 30s and never complete
    assert reply.status == 408, reply
    assert reply.json() == {
        "error": "request body timeout",
        "detail": "the request body was not complete within 1.5s (--request-body-timeout)",
    }
    assert reply.closed
    well_formed(served.port)


def test_dripping_chunked_body_of_a_held_request(served: Served) -> None:
    """Held first (its body is not read while the target is down), then released: the timeout applies from
    the release, the 408 frees the queue slot, and nothing half-sent reaches the workload."""
    served.do(lambda: served.env.put("slow", hold_timeout="30s"))
    head = request_head("POST", "/echo", [("Transfer-Encoding", "chunked")], service=f"{NS}/slow")
    hits = served.do(lambda: served.env.state["hits"]["echo"])
    result: list[Reply] = []
    t = threading.Thread(
        target=lambda: result.append(exchange(served.port, head, b"1\r\na\r\n", drip=(b"1\r\na\r\n", 0.3, 300)))
    )
    t.start()
    wait_until(lambda: served.pending("slow") == 1)
    served.do(lambda: served.env.put("slow", ready=True))
    t.join(60)
    assert result and result[0].status == 408, result
    assert served.pending("slow") == 0
    assert served.do(lambda: served.env.state["hits"]["echo"]) == hits  # buffered for a retry, never sent
    well_formed(served.port)


def test_many_drippers_do_not_stop_others(served: Served) -> None:
    """While 30 clients drip, a well-formed request is answered as usual; each dripper gets its 408."""
    head = request_head("POST", "/echo", [("Content-Length", "5000")])
    results: list[Reply] = []
    threads = [
        threading.Thread(target=lambda: results.append(exchange(served.port, head, b"y", drip=(b"y", 0.2, 400))))
        for _ in range(30)
    ]
    for t in threads:
        t.start()
    well_formed(served.port)
    for t in threads:
        t.join(60)
    assert [r.status for r in results] == [408] * 30


async def test_slow_upload_within_the_timeout_is_forwarded() -> None:
    """A client slower than the default drip but finishing in time is served like any other."""
    e = await Env(request_body_timeout=30.0, retry_body_limit=1024).start()
    try:
        e.put("details", ready=True)
        port = e.activator.proxy_address[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        pieces = [bytes([65 + i]) * 3000 for i in range(8)]
        writer.write(request_head("POST", "/echo", [("Content-Length", str(3000 * 8))]))
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.25)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        assert head.startswith(b"HTTP/1.1 200")
        body = json.loads(await asyncio.wait_for(reader.read(), 30))
        assert body["length"] == 24000 and body["sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest()
        writer.close()
    finally:
        await e.stop()


# --- bodies pass through as sent -------------------------------------------------------------------------


class CaptureProxy:
    """A forward proxy that records the exact bytes of each request body it receives and answers 200."""

    def __init__(self) -> None:
        self.bodies: list[tuple[dict[str, str], bytes]] = []
        self.port = 0

    async def start(self) -> CaptureProxy:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        headers = {}
        for line in head.decode("latin-1").split("\r\n")[1:]:
            if ":" in line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        else:
            body = b""
            while True:
                size = int((await reader.readline()).split(b";")[0], 16)
                body += (await reader.readexactly(size + 2))[:size]
                if size == 0:
                    break
        self.bodies.append((headers, body))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()


async def test_encoded_request_bodies_are_passed_on_as_sent() -> None:
    """A gzip (or garbled "gzip") body reaches the workload byte for byte: the activator decodes nothing."""
    proxy = await CaptureProxy().start()
    wake = await WakeEndpoint().start()
    act = Activator(
        Config(
            listen=("127.0.0.1", 0),
            admin_listen=("127.0.0.1", 0),
            controller_url=wake.url,
            upstream_proxy=f"http://127.0.0.1:{proxy.port}",
        ),
        _registry_with_details(),
    )
    await act.start()
    try:
        port = act.proxy_address[1]
        for body in (gzip.compress(b"compressed " * 500), b"not gzip at all"):
            head = request_head("POST", "/echo", [("Content-Encoding", "gzip"), ("Content-Length", str(len(body)))])
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head + body)
            assert (await asyncio.wait_for(reader.read(), 30)).startswith(b"HTTP/1.1 200")
            writer.close()
            headers, seen = proxy.bodies[-1]
            assert seen == body and headers["content-encoding"] == "gzip"
    finally:
        await act.close()
        await wake.stop()
        await proxy.stop()


def _registry_with_details() -> Any:
    from activator.registry import Registry
    from tests.activator_stubs import elastiservice

    reg = Registry()
    reg.mark_synced()
    reg.apply("ADDED", elastiservice(NS, "details", ready=True, origin=("details-elasti-origin", 9080)))
    return reg


async def test_retry_limit_above_one_mebibyte_keeps_the_body() -> None:
    """A body under --retry-body-limit is kept whole for a retry whatever the limit (it is not capped at the
    1 MiB aiohttp puts on ``request.read()``)."""
    e = await Env(retry_body_limit=4 * 1024 * 1024).start()
    try:
        e.put("details", ready=True)
        payload = bytes(range(256)) * 8192  # 2 MiB
        async with e.client.post(e.url + "/echo", data=payload, headers={"elasti-service": KNOWN}) as r:
            assert r.status == 200, await r.read()
            echoed = await r.json()
        assert echoed["length"] == len(payload) and echoed["sha256"] == hashlib.sha256(payload).hexdigest()
    finally:
        await e.stop()


# --- flags -------------------------------------------------------------------------------------------


def test_limit_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ELASTI_MAX_BODY_SIZE", "1000")
    p = argparse.ArgumentParser()
    add_flags(p)
    cfg = Config.from_args(p.parse_args(["--request-body-timeout", "5", "--max-headers", "64"]))
    assert (cfg.max_body_size, cfg.request_body_timeout, cfg.max_headers) == (1000, 5.0, 64)
    assert (cfg.max_line_size, cfg.max_field_size) == (65536, 65536)
    assert Config.from_args(p.parse_args(["--max-body-size", "0"])).max_body_size == 0  # no limit
    for bad in (["--max-body-size", "-1"], ["--request-body-timeout", "-1"], ["--max-field-size", "10"]):
        with pytest.raises(SystemExit):
            Config.from_args(p.parse_args(bad))
    helptext = p.format_help()
    for flag in ("--max-body-size", "--request-body-timeout", "--max-line-size", "--max-field-size", "--max-headers"):
        assert flag in helptext


# --- hypothesis: random input against the running activator ------------------------------------------

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)


def _report(record_property: Callable[[str, object], None], what: str, n: int) -> None:
    record_property(f"{what}_cases", n)
    print(f"\n{what}: {n} cases tried")


@pytest.mark.parametrize("parser", ["c", "python"])
def test_fuzz_headers(
    request: pytest.FixtureRequest, parser: str, record_property: Callable[[str, object], None]
) -> None:
    served: Served = request.getfixturevalue("served" if parser == "c" else "served_python_parser")
    count = [0]

    @FUZZ
    @given(header_sets())
    def one(headers: list[tuple[bytes, bytes]]) -> None:
        count[0] += 1
        reply = exchange(served.port, request_head(headers=headers))
        # Host and elasti-service come first, Connection: close last.
        expected = header_oracle(
            [*headers, (b"Connection", b"close")],
            [b"Host", b"elasti-service"],
            LIMITS["max_field_size"],
            LIMITS["max_headers"],
            lines_first=parser == "python",
        )
        check_headers_reply(reply, headers, expected)

    one()
    well_formed(served.port)
    _report(record_property, "random headers", count[0])


def test_fuzz_elasti_service_values(served: Served, record_property: Callable[[str, object], None]) -> None:
    count = [0]

    @FUZZ
    @given(service_headers)
    def one(headers: list[tuple[str, str]]) -> None:
        count[0] += 1
        raw = [(n.encode(), v.encode()) for n, v in headers]
        reply = exchange(served.port, request_head(service=None, headers=raw))
        expected = service_oracle([v for _, v in headers], {KNOWN})
        assert reply.status == expected, (headers, reply)
        if expected != 200:
            assert reply.is_own_error(), reply

    one()
    well_formed(served.port)
    _report(record_property, "elasti-service values", count[0])


@pytest.mark.parametrize("parser", ["c", "python"])
def test_fuzz_request_lines(
    request: pytest.FixtureRequest, parser: str, record_property: Callable[[str, object], None]
) -> None:
    served: Served = request.getfixturevalue("served" if parser == "c" else "served_python_parser")
    count = [0]

    @FUZZ
    @given(request_lines)
    def one(line: bytes) -> None:
        count[0] += 1
        data = line + b"\r\nHost: x\r\nConnection: close\r\n\r\n"
        reply = exchange(served.port, data, head_request=line.startswith(b"HEAD "))
        check_request_line_reply(line, reply)

    one()
    well_formed(served.port)
    _report(record_property, "random request lines", count[0])


def test_limit_named_in_the_answer() -> None:
    """With equal line and field limits the parser cannot tell which was hit: the answer names both."""
    from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

    from activator.protocol import describe

    assert (
        describe(LineTooLong(b"x", 100), 100, 200)[2] == "the request line is longer than 100 bytes (--max-line-size)"
    )
    assert describe(LineTooLong(b"x", 200), 100, 200)[2] == "a header field is longer than 200 bytes (--max-field-size)"
    assert "--max-line-size, --max-field-size" in describe(LineTooLong(b"x", 100), 100, 100)[2]
    assert describe(BadHttpMessage("Too many headers received"), 1, 1)[0] == 431
    assert describe(BadHttpMessage("Invalid header token:\n\n  b'a b'\n  ^"), 1, 1) == (
        400,
        "malformed request",
        "Invalid header token: b'a b' ^",
    )


def test_sidecar_address_flag_and_its_exclusivity() -> None:
    from activator.forward import Forwarder
    from activator.registry import Target

    p = argparse.ArgumentParser()
    add_flags(p)
    cfg = Config.from_args(p.parse_args(["--sidecar-address", "10.1.64.7"]))
    assert (cfg.sidecar_address, cfg.upstream_proxy) == ("10.1.64.7", None)
    with pytest.raises(SystemExit):
        Config.from_args(p.parse_args(["--sidecar-address", "10.1.64.7", "--upstream-proxy", "http://p:3128"]))
    assert "--sidecar-address" in p.format_help()
    target = Target("ns", "web", authority="web-elasti-origin.ns.svc.cluster.local:9090")
    fwd = Forwarder(None, None, True, sidecar="10.1.64.7")  # type: ignore[arg-type]
    assert fwd.proxy_for(target) == "http://10.1.64.7:9090"  # the sidecar's listener for the origin's port
    assert Forwarder(None, "http://p:3128", True).proxy_for(target) == "http://p:3128"  # type: ignore[arg-type]
