"""gRPC as it looks on the wire: deadlines, status codes, trailers-only answers, the mesh's own replies.

A gRPC client reads an answer from ``grpc-status`` and ``grpc-message``, not from the HTTP status, so
the activator's refusals to a gRPC call are HTTP 200 with those two in a trailers-only response
(the status mapping is the one gRPC documents for HTTP errors, with the activator's own cases made
precise: a hold that ran out is ``DEADLINE_EXCEEDED``, an unknown ElastiService ``NOT_FOUND``).
"""

from __future__ import annotations

import json
import urllib.parse
from enum import IntEnum

from activator import headerpolicy

GRPC_CONTENT_TYPE = b"application/grpc"
UPSTREAM_TIME = headerpolicy.UPSTREAM_TIME.encode()


class Code(IntEnum):
    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


# The activator's refusals by HTTP status.
_BY_STATUS = {
    400: Code.INTERNAL,  # a request the mesh should never have sent (no routing header...)
    403: Code.PERMISSION_DENIED,
    404: Code.NOT_FOUND,
    408: Code.DEADLINE_EXCEEDED,
    413: Code.RESOURCE_EXHAUSTED,
    431: Code.RESOURCE_EXHAUSTED,
    502: Code.UNAVAILABLE,
    503: Code.UNAVAILABLE,
    504: Code.DEADLINE_EXCEEDED,
}

_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def is_grpc(content_type: bytes | None) -> bool:
    """``application/grpc`` and its ``+proto``/``+json``/``;`` variants (not grpc-web: that is plain HTTP)."""
    if not content_type:
        return False
    ct = content_type.lower()
    return ct == GRPC_CONTENT_TYPE or ct.startswith((GRPC_CONTENT_TYPE + b"+", GRPC_CONTENT_TYPE + b";"))


def timeout_seconds(value: bytes | None) -> float | None:
    """``grpc-timeout`` (at most 8 digits and a unit) in seconds; None when absent or malformed (ignored,
    as gRPC servers do)."""
    if not value or len(value) < 2 or len(value) > 9:
        return None
    digits, unit = value[:-1], value[-1:]
    if not digits.isdigit() or unit not in _UNITS:
        return None
    return int(digits) * _UNITS[unit]


def code_for(status: int) -> Code:
    return _BY_STATUS.get(status, Code.UNAVAILABLE if status >= 500 else Code.UNKNOWN)


def encode_message(text: str) -> bytes:
    """``grpc-message`` is percent-encoded UTF-8 (space and printable ASCII but ``%`` left as they are)."""
    return urllib.parse.quote(text, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode("ascii")


def decode_message(raw: bytes) -> str:
    return urllib.parse.unquote(raw.decode("latin-1"))


def refusal(status: int, error: str, detail: str, retry_after: bool = False) -> list[tuple[bytes, bytes]]:
    """A trailers-only gRPC answer: the refusal's status and words, and the JSON the HTTP form carries
    (``elasti-error``) so the two forms say the same."""
    code = code_for(status)
    headers = [
        (b":status", b"200"),
        (b"content-type", GRPC_CONTENT_TYPE),
        (b"grpc-status", str(int(code)).encode()),
        (b"grpc-message", encode_message(f"{error}: {detail}")),
        (b"elasti-error", json.dumps({"error": error, "detail": detail, "status": status}).encode()),
    ]
    if retry_after:
        headers.append((b"retry-after", b"1"))
    return headers


def mesh_not_ready(headers: list[tuple[bytes, bytes]]) -> bool:
    """Envoy's local reply to a gRPC call when no upstream was reached ("no healthy upstream", or the
    connect failed): trailers-only, ``UNAVAILABLE``, and without ``x-envoy-upstream-service-time`` (a
    workload relaying such a status from a dependency carries it, and is never taken for the mesh)."""
    status = message = None
    for name, value in headers:
        if name == UPSTREAM_TIME:
            return False
        if name == b"grpc-status":
            status = value
        elif name == b"grpc-message":
            message = value
    if status != b"14" or message is None:
        return False
    text = decode_message(message)
    return text.startswith("no healthy upstream") or (
        text.startswith("upstream connect error") and "connection failure" in text
    )
