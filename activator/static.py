"""``spec.activator.staticResponses``: answers the activator gives itself while the target sleeps, so that
uptime checks and health probes do not wake a service. Pure: parsing and matching, first match wins."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# RFC 9110 5.1 and 5.5: a field name is a token; a value has no control character but tab, and no
# whitespace at either end. The answer is sent over HTTP/1.1 and HTTP/2 as it stands.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE = re.compile(r"[^\x00-\x08\x0a-\x1f\x7f]*")
# Set by the activator itself (the length) or meaningless in an answer it writes whole.
_NOT_SETTABLE = frozenset(
    ("content-length", "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "trailer")
)


def response_header(name: object, value: object) -> tuple[str, str]:
    """One configured answer header, checked; ValueError says what is wrong with it."""
    name, value = str(name), str(value).strip(" \t")
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"header name {name!r} is not a token")
    if name.lower() in _NOT_SETTABLE:
        raise ValueError(f"header {name!r} is set by the activator or not allowed in an answer")
    if not _VALUE.fullmatch(value):
        raise ValueError(f"header {name!r} has a control character in its value")
    return name, value


@dataclass(frozen=True, slots=True)
class StaticResponse:
    method: str | None
    path_exact: str | None
    path_prefix: str | None
    headers: tuple[tuple[str, str], ...]  # lower-case name, exact value
    status: int
    body: str
    response_headers: tuple[tuple[str, str], ...]
    wake: bool

    def answer_headers(self) -> list[tuple[str, str]]:
        """The headers of the answer besides its length: the configured ones, and a plain-text type unless
        they name one (what aiohttp gives a text body over HTTP/1.1)."""
        out = list(self.response_headers)
        if not any(k.lower() == "content-type" for k, _ in out):
            out.append(("Content-Type", "text/plain; charset=utf-8"))
        return out

    def matches(self, method: str, path: str, headers: Mapping[str, str]) -> bool:
        if self.method is not None and method.upper() != self.method:
            return False
        if self.path_exact is not None and path != self.path_exact:
            return False
        if self.path_prefix is not None and not path.startswith(self.path_prefix):
            return False
        return all(headers.get(name) == value for name, value in self.headers)


def parse(items: Any, where: str = "") -> tuple[StaticResponse, ...]:
    """Entries the server's schema would have refused are skipped with a warning."""
    out: list[StaticResponse] = []
    for i, item in enumerate(items if isinstance(items, list) else []):
        try:
            match = item.get("match") or {}
            path = match.get("path") or {}
            response = item["response"]
            status = int(response.get("status", 200))
            if not 100 <= status <= 599:
                raise ValueError(f"status {status}")
            out.append(
                StaticResponse(
                    method=str(match["method"]).upper() if match.get("method") else None,
                    path_exact=str(path["exact"]) if path.get("exact") is not None else None,
                    path_prefix=str(path["prefix"]) if path.get("prefix") is not None else None,
                    headers=tuple((str(k).lower(), str(v)) for k, v in (match.get("headers") or {}).items()),
                    status=status,
                    body=str(response.get("body") or ""),
                    response_headers=tuple(response_header(k, v) for k, v in (response.get("headers") or {}).items()),
                    wake=bool(item.get("wake", False)),
                )
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            log.warning("%s: staticResponses[%d] ignored: %s", where, i, exc)
    return tuple(out)


def first_match(
    responses: tuple[StaticResponse, ...], method: str, path: str, headers: Mapping[str, str]
) -> StaticResponse | None:
    lowered = {k.lower(): v for k, v in headers.items()} if responses else {}
    for r in responses:
        if r.matches(method, path, lowered):
            return r
    return None
