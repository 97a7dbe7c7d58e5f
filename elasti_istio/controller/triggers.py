"""Idle triggers: Prometheus queries whose value below a threshold means "no traffic"."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import aiohttp

from elasti_istio.controller.spec import Trigger


@dataclasses.dataclass(frozen=True)
class TriggerResult:
    healthy: bool
    idle: bool
    message: str


def value_of(doc: dict[str, Any]) -> float:
    """The value of a Prometheus instant-query answer: the sum of a vector (no series means 0, as
    KEDA treats it), or a scalar. Raises ValueError on anything else."""
    if doc.get("status") != "success":
        raise ValueError(f"query failed: {doc.get('errorType', '')} {doc.get('error', '')}".strip())
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


async def evaluate(session: aiohttp.ClientSession, trigger: Trigger, timeout: float = 5.0) -> TriggerResult:
    where = f"{trigger.server} ({trigger.query})"
    try:
        async with session.get(
            f"{trigger.server}/api/v1/query",
            params={"query": trigger.query},
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as resp:
            if resp.status != 200:
                text = (await resp.text())[:300]
                return TriggerResult(False, False, f"Prometheus {where} answered {resp.status}: {text}")
            doc = await resp.json(content_type=None)
        value = value_of(doc)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return TriggerResult(False, False, f"Prometheus {where} unreachable: {exc or type(exc).__name__}")
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        return TriggerResult(False, False, f"Prometheus {where}: {exc}")
    idle = value < trigger.threshold
    return TriggerResult(True, idle, f"{where} = {value:g} ({'below' if idle else 'not below'} {trigger.threshold:g})")
