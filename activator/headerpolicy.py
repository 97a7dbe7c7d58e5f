"""Which header fields the activator passes on, one policy for HTTP/1.1 and HTTP/2.

Hop-by-hop fields (RFC 9110 7.6.1) and those a ``Connection`` field names never cross the activator;
on requests neither do the fields it sets itself (Host, or ``:authority`` over HTTP/2), ``Expect``
(it reads the body itself) and the routing fields the mesh added for it. HTTP/2 differs only where
the protocol does (RFC 9113 8.2.2): ``te: trailers`` is how a gRPC client says it takes trailers,
and ``Trailer`` is not connection-specific there.
"""

from __future__ import annotations

from multidict import CIMultiDict

from elasti_istio.resources import HEADER, TOKEN_HEADER

HOP_BY_HOP = frozenset(
    (
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    )
)
RESPONSE_DROP = HOP_BY_HOP
# Set by Envoy on answers that came from an upstream; its own replies ("no healthy upstream") lack it.
UPSTREAM_TIME = "x-envoy-upstream-service-time"
REQUEST_DROP = HOP_BY_HOP | {"expect", "host", HEADER.lower(), TOKEN_HEADER.lower()}
# Where trailers are carried (HTTP/2; HTTP/1.1 with --http1-trailers): ``Trailer`` goes on, and ``TE``
# as far as it says ``trailers`` (te_trailers_only, h2_request_keeps).
REQUEST_DROP_KEEPING_TRAILERS = REQUEST_DROP - {"te", "trailer"}
RESPONSE_DROP_KEEPING_TRAILERS = RESPONSE_DROP - {"trailer"}
# The same over HTTP/2, as the byte strings h2 gives.
H2_REQUEST_DROP = frozenset(n.encode() for n in REQUEST_DROP_KEEPING_TRAILERS)
H2_RESPONSE_DROP = frozenset(n.encode() for n in RESPONSE_DROP - {"te", "trailer"})


def connection_tokens(value: str | None) -> frozenset[str]:
    """The field names a ``Connection`` field lists (they are hop-by-hop too), lowercased."""
    if not value:
        return frozenset()
    return frozenset(t.strip().lower() for t in value.split(",") if t.strip())


def te_trailers_only(headers: CIMultiDict[str]) -> None:
    """``TE`` goes on only as ``trailers`` (a transfer coding the activator would have to undo never does)."""
    values = headers.popall("TE", [])
    if any(t.strip().lower() == "trailers" for v in values for t in v.split(",")):
        headers["TE"] = "trailers"


def h2_request_keeps(name: bytes, value: bytes, named: frozenset[str]) -> bool:
    """Whether an HTTP/2 request field goes on to the origin; ``named``: :func:`connection_tokens`."""
    if name in H2_REQUEST_DROP or (named and name.decode("latin-1") in named):
        return False
    return name != b"te" or value.strip().lower() == b"trailers"
