"""Which ElastiService a request is for: the ``elasti-service: <namespace>/<name>[:<port>]`` header the mesh sets."""

from __future__ import annotations

import re
from dataclasses import dataclass

from elasti_istio.resources import HEADER

Key = tuple[str, str]

_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a request cannot be routed: answered 400 at once."""

    error: str
    detail: str


Routed = tuple[Key, int | None]  # (namespace, name), and the Service port the route chose when it named one


def route(values: list[str]) -> Routed | Rejection:
    """The ElastiService (and port) named by the header values of one request, or why there is none:
    ``<namespace>/<name>`` or ``<namespace>/<name>:<port>``."""
    if not values:
        return Rejection(
            "missing elasti-service header",
            f"the {HEADER} header (<namespace>/<name>) is set by the VirtualService in proxy mode; "
            "this request did not come through one",
        )
    if len(values) > 1 or "," in values[0]:
        return Rejection(
            "duplicate elasti-service header",
            f"the {HEADER} header must appear once with one <namespace>/<name> value",
        )
    value = values[0].strip()
    ns, sep, rest = value.partition("/")
    name, colon, port_text = rest.partition(":")
    port = int(port_text) if port_text.isdigit() and len(port_text) <= 5 else 0
    if (
        not sep
        or len(ns) > 63
        or len(name) > 253
        or _NAMESPACE.fullmatch(ns) is None
        or _NAME.fullmatch(name) is None
        or (colon and not 0 < port < 65536)
    ):
        return Rejection(
            "malformed elasti-service header",
            f"expected <namespace>/<name> or <namespace>/<name>:<port> (lower-case DNS names), got {value[:300]!r}",
        )
    return (ns, name), (port if colon else None)
