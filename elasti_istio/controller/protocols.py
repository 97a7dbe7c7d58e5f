"""Which Service ports the activator can carry: a port's protocol read the way Istio reads it, and
whether the activator can hold and forward that traffic. Pure.

Istio (``pkg/config/kube/conversion.go`` ``ConvertProtocol``, ``pkg/config/protocol/instance.go``
``Parse``): a port with ``protocol: UDP`` is UDP; else ``appProtocol`` when it is set, else the port
name, is the protocol's name. Of ``appProtocol`` values, ``kubernetes.io/h2c``, ``kubernetes.io/ws``
and ``kubernetes.io/wss`` (matched exactly) are HTTP2, HTTP and HTTPS. Otherwise a name starting with
``grpc-web`` (any case) is GRPC-Web; else the part before the first ``-`` is looked up in any case
(``http``, ``http2``, ``https``, ``grpc``, ``tcp``, ``tls``, ``mongo``, ``mysql``, ``redis``, ``udp``,
``http_proxy``). An unknown name is detected from the traffic (sniffed), except on ports 25, 53, 3306
and 27017, which are TCP.

The activator speaks HTTP/1.1 (websockets included) and HTTP/2 cleartext (gRPC included): it carries
what Istio routes as HTTP and what it detects (a request on an ``http`` route of a detected port is
HTTP). TLS it cannot carry (the workload terminates it: the activator could neither hold nor replay
it), nor raw TCP or UDP, nor SCTP (which Istio reads like any other port, but is not TCP).
"""

from __future__ import annotations

from typing import Any, NamedTuple

DETECTED = "auto-detected"  # Istio's "UnsupportedProtocol": it sniffs the traffic
# protocol.Parse, on the lower-cased name.
ISTIO_NAMES = {
    "tcp": "TCP",
    "udp": "UDP",
    "grpc": "GRPC",
    "grpc-web": "GRPC-Web",
    "http": "HTTP",
    "http_proxy": "HTTP_PROXY",
    "http2": "HTTP2",
    "https": "HTTPS",
    "tls": "TLS",
    "mongo": "Mongo",
    "redis": "Redis",
    "mysql": "MySQL",
}
# Kubernetes' standard appProtocol values, as Istio maps them (exact match).
KUBERNETES_APP_PROTOCOLS = {"kubernetes.io/h2c": "HTTP2", "kubernetes.io/ws": "HTTP", "kubernetes.io/wss": "HTTPS"}
GRPC_WEB = "grpc-web"
WELL_KNOWN_TCP_PORTS = frozenset({25, 53, 3306, 27017})  # SMTP, DNS, MySQL, MongoDB: never sniffed
# Istio's IsHTTPOrSniffed: what an http route carries, and so the activator.
CARRIED = frozenset({"HTTP", "HTTP2", "HTTP_PROXY", "GRPC", "GRPC-Web", DETECTED})
CARRIED_TEXT = "HTTP/1.1, HTTP/2 cleartext (h2c), gRPC and websockets"


class PortProtocol(NamedTuple):
    carried: bool  # the activator can hold and forward its requests
    protocol: str  # Istio's name for it (HTTP, HTTP2, GRPC, TCP, HTTPS...), DETECTED, or SCTP


def istio_protocol(port: dict[str, Any]) -> str:
    """A Service port's protocol as Istio's ``ConvertProtocol`` reads it."""
    if port.get("protocol") == "UDP":
        return "UDP"
    name = str(port.get("name") or "")
    app = port.get("appProtocol")
    if app is not None:
        name = str(app)
        if name in KUBERNETES_APP_PROTOCOLS:
            return KUBERNETES_APP_PROTOCOLS[name]
    if name[: len(GRPC_WEB)].lower() == GRPC_WEB:
        return "GRPC-Web"
    found = ISTIO_NAMES.get(name.partition("-")[0].lower())
    if found is None:
        return "TCP" if port.get("port") in WELL_KNOWN_TCP_PORTS else DETECTED
    return found


def classify(port: dict[str, Any]) -> PortProtocol:
    """Whether the activator can carry a Service port's traffic, and its protocol."""
    if port.get("protocol") == "SCTP":
        return PortProtocol(False, "SCTP")
    protocol = istio_protocol(port)
    return PortProtocol(protocol in CARRIED, protocol)


def basis(port: dict[str, Any]) -> str:
    """What a port's protocol was read from, for a message."""
    if port.get("protocol") in ("UDP", "SCTP"):
        return f"protocol {port['protocol']}"
    if port.get("appProtocol") is not None:
        return f"appProtocol {port['appProtocol']}"
    if port.get("name"):
        return f"name {port['name']}"
    return "no name"
