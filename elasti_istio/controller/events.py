"""Kubernetes Events on ElastiServices, posted in the background so a slow write never delays a switch.

Repeats of the same reason and message within a few minutes increase ``count`` instead of creating a
new Event, as kubelet and the controllers do. An Event's name is derived from its object, type, reason and
message; one posted ``once`` is not posted again while it exists (a restarted controller finds it).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import time
from typing import Any

from elasti_istio.kube import Kube, KubeError
from elasti_istio.resources import EVENTS

log = logging.getLogger(__name__)
COMPONENT = "elasti-controller"


class Recorder:
    def __init__(self, kube: Kube, host: str = "") -> None:
        self.kube = kube
        self.host = host
        self._recent: dict[str, tuple[float, int]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def emit(self, obj: dict[str, Any], etype: str, reason: str, message: str, *, once: bool = False) -> None:
        task = asyncio.create_task(self._post(obj, etype, reason, message, once))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def flush(self, timeout: float = 5.0) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    async def _post(self, obj: dict[str, Any], etype: str, reason: str, message: str, once: bool = False) -> None:
        meta = obj.get("metadata") or {}
        ns = meta.get("namespace") or "default"
        digest = hashlib.sha256(f"{meta.get('uid')}|{etype}|{reason}|{message}".encode()).hexdigest()[:10]
        name = f"{meta.get('name')}.{digest}"
        t = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        recent = self._recent.get(name)
        mono = time.monotonic()
        if len(self._recent) > 4096:
            self._recent = {k: v for k, v in self._recent.items() if mono - v[0] < 600}
        try:
            if once and (recent or await self.kube.get_or_none(EVENTS, name, ns) is not None):
                self._recent[name] = recent or (mono, 1)
                return
            if recent and mono - recent[0] < 600:
                count = recent[1] + 1
                await self.kube.patch(EVENTS, name, {"count": count, "lastTimestamp": t}, ns)
                self._recent[name] = (mono, count)
                return
            body = {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"name": name, "namespace": ns},
                "involvedObject": {
                    "apiVersion": obj.get("apiVersion"),
                    "kind": obj.get("kind"),
                    "name": meta.get("name"),
                    "namespace": ns,
                    "uid": meta.get("uid"),
                    "resourceVersion": meta.get("resourceVersion"),
                },
                "type": etype,
                "reason": reason,
                "message": message[:1024],
                "source": {"component": COMPONENT, "host": self.host},
                "reportingComponent": COMPONENT,
                "reportingInstance": self.host or COMPONENT,
                "firstTimestamp": t,
                "lastTimestamp": t,
                "count": 1,
            }
            try:
                await self.kube.create(EVENTS, body, ns)
                self._recent[name] = (mono, 1)
            except KubeError as exc:
                if exc.status != 409:
                    raise
                current = await self.kube.get(EVENTS, name, ns)
                count = int(current.get("count") or 1) + 1
                await self.kube.patch(EVENTS, name, {"count": count, "lastTimestamp": t}, ns)
                self._recent[name] = (mono, count)
        except (KubeError, OSError) as exc:
            log.warning("could not post event %s on %s/%s: %s", reason, ns, meta.get("name"), exc)
