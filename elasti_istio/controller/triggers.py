"""Idle triggers: Prometheus queries whose value below a threshold means "no traffic".

The address comes from the ElastiService, which a tenant writes; the controller fetches it with its own
network position. So redirects are never followed, an allow-list (``--trigger-allow``) can pin the
addresses to the cluster's Prometheus, and nothing the server answers goes into the status or Events
the tenant reads: a status code and a fixed message only (the detail goes to the controller's log).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import math
import urllib.parse
from typing import Any

import aiohttp

from elasti_istio.controller.spec import Trigger

log = logging.getLogger("elasti.controller")


@dataclasses.dataclass(frozen=True)
class Allow:
    """Prometheus addresses the controller may query: host names, and networks for IP-literal hosts.
    Empty: any address the spec accepts."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.hosts or self.networks)


def parse_allow(text: str) -> Allow:
    """``host,host,10.0.0.0/8,...``; raises ValueError on a malformed network."""
    hosts, networks = set(), []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        if "/" in item or _is_ip(item):
            networks.append(ipaddress.ip_network(item, strict=False))
        else:
            hosts.add(item.lower().rstrip("."))
    return Allow(frozenset(hosts), tuple(networks))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def allowed(address: str, allow: Allow) -> bool:
    """Whether the address's host is on the list: a listed host name exactly, or an IP address inside a
    listed network (a host name is never resolved to be matched against networks)."""
    if not allow:
        return True
    host = (urllib.parse.urlsplit(address).hostname or "").lower().rstrip(".")
    if host in allow.hosts:
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(ip in net for net in allow.networks)


@dataclasses.dataclass(frozen=True)
class TriggerResult:
    healthy: bool
    idle: bool
    message: str


def value_of(doc: dict[str, Any]) -> float:
    """The value of a Prometheus instant-query answer: the sum of a vector (no series means 0, as
    KEDA treats it), or a scalar. Raises ValueError on anything else."""
    if doc.get("status") != "success":
        raise ValueError("the query failed (Prometheus answered status error)")
    data = doc.get("data") or {}
    kind, result = data.get("resultType"), data.get("result")
    if kind == "vector":
        total = 0.0
        for sample in result or []:
            total += float(sample["value"][1])
        value = total
    elif kind == "scalar":
        value = float(result[1])
    else:
        raise ValueError(f"unsupported result type {kind!r} (use a query that returns a vector or a scalar)")
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"the query returned {value}")
    return value


async def evaluate(
    session: aiohttp.ClientSession, trigger: Trigger, timeout: float = 5.0, allow: Allow | None = None
) -> TriggerResult:
    where = f"{trigger.server} ({trigger.query})"
    if allow is not None and not allowed(trigger.server, allow):
        return TriggerResult(
            False, False, f"Prometheus {trigger.server} is not on the controller's --trigger-allow list"
        )
    try:
        async with session.get(
            f"{trigger.server}/api/v1/query",
            params={"query": trigger.query},
            timeout=aiohttp.ClientTimeout(total=timeout),
            allow_redirects=False,
        ) as resp:
            if resp.status != 200:
                log.warning("Prometheus %s answered %d: %r", where, resp.status, (await resp.content.read(300)))
                return TriggerResult(False, False, f"Prometheus {where} answered {resp.status}")
            doc = await resp.json(content_type=None)
        value = value_of(doc)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return TriggerResult(False, False, f"Prometheus {where} unreachable: {type(exc).__name__}")
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        log.warning("Prometheus %s: unusable answer: %s", where, exc)
        return TriggerResult(False, False, f"Prometheus {where}: the answer is not a usable query result")
    idle = value < trigger.threshold
    return TriggerResult(True, idle, f"{where} = {value:g} ({'below' if idle else 'not below'} {trigger.threshold:g})")
