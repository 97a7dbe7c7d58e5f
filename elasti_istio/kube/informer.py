"""List-then-watch into an in-memory store, the way client-go's informers do.

Re-lists on 410 Gone, reconnects with backoff when the API server is unreachable, and re-lists in
full every ``relist_seconds`` so that a watch broken silently (a proxy dropping it, say) still
converges.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from elasti_istio.kube.client import Gone, Kube, KubeError, Resource

log = logging.getLogger(__name__)

Key = tuple[str, str]
Handler = Callable[[str, dict[str, Any]], Awaitable[None] | None]


def key_of(obj: dict[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return meta.get("namespace") or "", meta.get("name") or ""


class Informer:
    def __init__(
        self,
        kube: Kube,
        res: Resource,
        handler: Handler | None = None,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        relist_seconds: float = 300.0,
        watch_timeout: int = 240,
        name: str | None = None,
    ) -> None:
        self.kube = kube
        self.res = res
        self.handler = handler
        self.namespace = namespace
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.relist_seconds = relist_seconds
        self.watch_timeout = watch_timeout
        self.name = name or res.plural
        self.store: dict[Key, dict[str, Any]] = {}
        self.synced = asyncio.Event()
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.store.get((namespace, name))

    def items(self) -> list[dict[str, Any]]:
        return list(self.store.values())

    def start(self) -> asyncio.Task[None]:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name=f"informer-{self.name}")
        return self._task

    def cancel(self) -> None:
        """Stops the informer without waiting for it (from synchronous code)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _emit(self, etype: str, obj: dict[str, Any]) -> None:
        if self.handler is None:
            return
        try:
            result = self.handler(etype, obj)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("%s: handler failed on %s %s/%s", self.name, etype, *key_of(obj))

    async def _relist(self) -> str:
        params: dict[str, Any] = {}
        if self.label_selector:
            params["labelSelector"] = self.label_selector
        if self.field_selector:
            params["fieldSelector"] = self.field_selector
        listed = await self.kube.list(self.res, self.namespace, **params)
        items = listed.get("items") or []
        kind = self.res.kind
        fresh: dict[Key, dict[str, Any]] = {}
        for item in items:
            if kind:
                item.setdefault("kind", kind)
                item.setdefault("apiVersion", self.res.api_version)
            fresh[key_of(item)] = item
        old = self.store
        self.store = dict(fresh)
        for k, obj in old.items():
            if k not in fresh:
                await self._emit("DELETED", obj)
        for k, obj in fresh.items():
            prev = old.get(k)
            if prev is None:
                await self._emit("ADDED", obj)
            elif (prev.get("metadata") or {}).get("resourceVersion") != (obj.get("metadata") or {}).get(
                "resourceVersion"
            ):
                await self._emit("MODIFIED", obj)
        self.synced.set()
        return (listed.get("metadata") or {}).get("resourceVersion") or ""

    async def run(self) -> None:
        backoff = 0.2
        rv = ""
        while True:
            try:
                rv = await self._relist()
                listed_at = time.monotonic()
                self.last_error = None
                backoff = 0.2
                while time.monotonic() - listed_at < self.relist_seconds:
                    params: dict[str, Any] = {}
                    if self.label_selector:
                        params["labelSelector"] = self.label_selector
                    if self.field_selector:
                        params["fieldSelector"] = self.field_selector
                    timeout = max(1, min(self.watch_timeout, int(self.relist_seconds)))
                    async for etype, obj in self.kube.watch(
                        self.res, self.namespace, resource_version=rv, timeout_seconds=timeout, **params
                    ):
                        meta = obj.get("metadata") or {}
                        if meta.get("resourceVersion"):
                            rv = meta["resourceVersion"]
                        if etype == "BOOKMARK":
                            continue
                        if self.res.kind:
                            obj.setdefault("kind", self.res.kind)
                            obj.setdefault("apiVersion", self.res.api_version)
                        k = key_of(obj)
                        if etype == "DELETED":
                            self.store.pop(k, None)
                        else:
                            self.store[k] = obj
                        await self._emit(etype, obj)
            except asyncio.CancelledError:
                raise
            except Gone:
                log.debug("%s: watch expired (410), re-listing", self.name)
                continue
            except (TimeoutError, KubeError, aiohttp.ClientError, OSError, ValueError) as exc:
                self.last_error = str(exc) or type(exc).__name__
                log.warning("%s: list/watch failed (%s); retrying in %.1fs", self.name, self.last_error, backoff)
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 10.0)
