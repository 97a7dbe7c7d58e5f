"""Which Service ports the activator carries: the port's protocol as Istio reads it (``ConvertProtocol``
in istio.io/istio pkg/config/kube/conversion.go), one row per rule."""

from __future__ import annotations

from typing import Any

import pytest

from elasti_istio.controller import protocols
from elasti_istio.controller.protocols import DETECTED, PortProtocol
from elasti_istio.vsrewrite import Target, target_ports


def port(name: str | None = None, number: int = 8080, app: str | None = None, proto: str | None = None) -> dict:
    p: dict[str, Any] = {"port": number}
    if name is not None:
        p["name"] = name
    if app is not None:
        p["appProtocol"] = app
    if proto is not None:
        p["protocol"] = proto
    return p


ROWS = [
    # (what, Service port, carried, protocol)
    # carried: what Istio routes as HTTP, or detects
    ("http", port("http"), True, "HTTP"),
    ("http with a suffix", port("http-web"), True, "HTTP"),
    ("http and an empty suffix", port("http-"), True, "HTTP"),
    ("http2", port("http2"), True, "HTTP2"),
    ("http2 with a suffix", port("http2-api"), True, "HTTP2"),
    ("grpc", port("grpc"), True, "GRPC"),
    ("grpc with a suffix", port("grpc-api"), True, "GRPC"),
    ("grpc-web", port("grpc-web"), True, "GRPC-Web"),
    ("grpc-web with a suffix", port("grpc-web-api"), True, "GRPC-Web"),
    ("grpc-web is a prefix, not a word", port("grpc-webapi"), True, "GRPC-Web"),
    ("http_proxy", port("http_proxy"), True, "HTTP_PROXY"),
    ("no name: detected", port(), True, DETECTED),
    ("an unknown name: detected", port("web"), True, DETECTED),
    ("a name that only starts like http: detected", port("httpx"), True, DETECTED),
    ("h2c is no Istio port name: detected", port("h2c"), True, DETECTED),
    ("protocol TCP is the default", port("http", proto="TCP"), True, "HTTP"),
    ("appProtocol kubernetes.io/h2c", port(app="kubernetes.io/h2c"), True, "HTTP2"),
    ("appProtocol kubernetes.io/ws", port(app="kubernetes.io/ws"), True, "HTTP"),
    ("appProtocol h2c: detected", port(app="h2c"), True, DETECTED),
    ("appProtocol in upper case", port(app="HTTP"), True, "HTTP"),
    ("appProtocol grpc-web in any case", port(app="GRPC-WEB"), True, "GRPC-Web"),
    ("appProtocol http2", port(app="http2"), True, "HTTP2"),
    ("kubernetes.io names match exactly: else detected", port(app="Kubernetes.io/WSS"), True, DETECTED),
    # refused: TLS, raw TCP, UDP, SCTP
    ("https", port("https"), False, "HTTPS"),
    ("https with a suffix", port("https-admin"), False, "HTTPS"),
    ("tls", port("tls"), False, "TLS"),
    ("tcp", port("tcp"), False, "TCP"),
    ("tcp with a suffix", port("tcp-db"), False, "TCP"),
    ("mongo", port("mongo"), False, "Mongo"),
    ("mysql", port("mysql-main"), False, "MySQL"),
    ("redis", port("redis"), False, "Redis"),
    ("udp by name", port("udp-dns"), False, "UDP"),
    ("appProtocol kubernetes.io/wss", port("http", app="kubernetes.io/wss"), False, "HTTPS"),
    ("appProtocol https in any case", port(app="HTTPS"), False, "HTTPS"),
    ("appProtocol redis in any case", port(app="Redis"), False, "Redis"),
    ("protocol UDP, whatever the name", port("http", proto="UDP"), False, "UDP"),
    ("protocol UDP, whatever the appProtocol", port(app="kubernetes.io/h2c", proto="UDP"), False, "UDP"),
    ("protocol SCTP", port("http", proto="SCTP"), False, "SCTP"),
    # well-known ports are TCP unless named
    ("unnamed SMTP port", port(number=25), False, "TCP"),
    ("unnamed DNS port", port(number=53), False, "TCP"),
    ("unnamed MySQL port", port(number=3306), False, "TCP"),
    ("unnamed MongoDB port", port(number=27017), False, "TCP"),
    ("an unknown name on a well-known port", port("db", number=3306), False, "TCP"),
    ("a known name on a well-known port", port("http", number=3306), True, "HTTP"),
    # appProtocol, when set, is read instead of the name
    ("appProtocol http over a tcp name", port("tcp-db", app="http"), True, "HTTP"),
    ("appProtocol tcp over an http name", port("http", app="tcp"), False, "TCP"),
    ("appProtocol kubernetes.io/h2c over an https name", port("https", app="kubernetes.io/h2c"), True, "HTTP2"),
    ("an unknown appProtocol hides the name", port("tcp-db", app="example.com/custom"), True, DETECTED),
]


@pytest.mark.parametrize(("what", "p", "carried", "protocol"), ROWS, ids=[r[0] for r in ROWS])
def test_classify(what: str, p: dict[str, Any], carried: bool, protocol: str) -> None:
    assert protocols.classify(p) == PortProtocol(carried, protocol), what


# Istio's own cases (pilot/pkg/serviceregistry/kube/conversion_test.go TestConvertProtocol, and
# pkg/config/kube/conversion_test.go): (port, name, appProtocol, protocol, what Istio reads).
ISTIO_CASES = [
    (8888, "", None, "TCP", DETECTED),
    (25, "", None, "TCP", "TCP"),
    (53, "", None, "TCP", "TCP"),
    (3306, "", None, "TCP", "TCP"),
    (27017, "", None, "TCP", "TCP"),
    (8888, "http", None, "TCP", "HTTP"),
    (8888, "http-test", None, "TCP", "HTTP"),
    (8888, "http", None, "UDP", "UDP"),
    (8888, "httptest", None, "TCP", DETECTED),
    (25, "httptest", None, "TCP", "TCP"),
    (53, "httptest", None, "TCP", "TCP"),
    (3306, "httptest", None, "TCP", "TCP"),
    (27017, "httptest", None, "TCP", "TCP"),
    (8888, "https", None, "TCP", "HTTPS"),
    (8888, "https-test", None, "TCP", "HTTPS"),
    (8888, "http2", None, "TCP", "HTTP2"),
    (8888, "http2-test", None, "TCP", "HTTP2"),
    (8888, "grpc", None, "TCP", "GRPC"),
    (8888, "grpc-test", None, "TCP", "GRPC"),
    (8888, "grpc-web", None, "TCP", "GRPC-Web"),
    (8888, "grpc-web-test", None, "TCP", "GRPC-Web"),
    (8888, "mongo", None, "TCP", "Mongo"),
    (8888, "mongo-test", None, "TCP", "Mongo"),
    (8888, "redis", None, "TCP", "Redis"),
    (8888, "redis-test", None, "TCP", "Redis"),
    (8888, "mysql", None, "TCP", "MySQL"),
    (8888, "mysql-test", None, "TCP", "MySQL"),
    (8888, "tcp", "http", "TCP", "HTTP"),
    (8888, "http-something", "https", "TCP", "HTTPS"),
    (8888, "something-httpx", "https", "TCP", "HTTPS"),
    (8888, "grpcweb-x", None, "TCP", DETECTED),
    (3306, "random-name", None, "TCP", "TCP"),
    (3306, "random-name", "kubernetes.io/h2c", "TCP", "HTTP2"),
]


@pytest.mark.parametrize(("number", "name", "app", "proto", "expected"), ISTIO_CASES)
@pytest.mark.parametrize("case", [str.lower, str.upper])
def test_istios_own_cases(number: int, name: str, app: str | None, proto: str, expected: str, case: Any) -> None:
    """Istio runs its table with the names in lower and in upper case."""
    assert protocols.istio_protocol(port(case(name) or None, number, app, proto)) == expected


@pytest.mark.parametrize(
    ("p", "basis"),
    [
        (port("tcp-db"), "name tcp-db"),
        (port("http", app="kubernetes.io/wss"), "appProtocol kubernetes.io/wss"),
        (port("dns", proto="UDP"), "protocol UDP"),
        (port(number=3306), "no name"),
    ],
)
def test_basis_names_what_the_protocol_was_read_from(p: dict[str, Any], basis: str) -> None:
    assert protocols.basis(p) == basis


TARGET = Target("shop", "db", "db")


def http(*dests: dict[str, Any]) -> dict[str, Any]:
    return {"http": [{"route": list(dests)}]}


def dest(host: str = "db", number: int | None = None, weight: int | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {"destination": {"host": host}}
    if number is not None:
        d["destination"]["port"] = {"number": number}
    if weight is not None:
        d["weight"] = weight
    return d


@pytest.mark.parametrize(
    ("spec", "ports"),
    [
        (http(dest()), {None}),
        (http(dest(number=5432)), {5432}),
        (http(dest(number=5432, weight=0), dest("other", number=80, weight=100)), {5432}),  # zero weight too
        (http(dest(number=80, weight=50), dest(number=5432, weight=50)), {80, 5432, None}),  # the header names none
        (http(dest("other", number=5432)), set()),
        ({"tcp": [{"route": [{"destination": {"host": "db", "port": {"number": 5432}}}]}]}, set()),
    ],
)
def test_target_ports(spec: dict[str, Any], ports: set[int | None]) -> None:
    assert target_ports(spec, "shop", TARGET) == ports
