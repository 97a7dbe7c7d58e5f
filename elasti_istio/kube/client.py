"""Async Kubernetes API calls over one aiohttp session."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp

from elasti_istio.kube.config import KubeConnection

log = logging.getLogger(__name__)

MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"


@dataclasses.dataclass(frozen=True)
class Resource:
    """A REST resource: ``group`` is empty for the core API."""

    group: str
    version: str
    plural: str
    namespaced: bool = True
    kind: str = ""

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{name}"
            if sub:
                base += f"/{sub}"
        return base


class KubeError(Exception):
    """An API call answered with an error status; ``reason`` and ``message`` are the server's."""

    def __init__(self, status: int, reason: str, message: str, body: Any = None) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.body = body

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409


class Gone(KubeError):
    """410: the resourceVersion a watch started from is too old; re-list."""


class Kube:
    """A thin asyncio client: JSON in, JSON out, errors as :class:`KubeError`."""

    def __init__(self, conn: KubeConnection, *, user_agent: str = "elasti-istio", limit: int = 100) -> None:
        self.conn = conn
        self._user_agent = user_agent
        self._limit = limit
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self.conn.ssl_context(), limit=self._limit)
            self._session = aiohttp.ClientSession(
                base_url=None, connector=connector, headers={"User-Agent": self._user_agent}
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Kube:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _headers(self, content_type: str | None = None) -> dict[str, str]:
        h = {"Accept": "application/json"}
        token = await self.conn.bearer_async()
        if token:
            h["Authorization"] = f"Bearer {token}"
        if content_type:
            h["Content-Type"] = content_type
        return h

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
        timeout: float = 30.0,
    ) -> Any:
        data = None if body is None else json.dumps(body)
        for attempt in range(2):
            async with self.session.request(
                method,
                self.conn.server + path,
                data=data,
                params=_params(params),
                headers=await self._headers(content_type if data is not None else None),
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                text = await resp.text()
                if resp.status == 401 and attempt == 0 and self.conn.refreshable:
                    self.conn.invalidate()  # an expired or rotated credential: once more with a fresh one
                    continue
                if resp.status >= 400:
                    raise _error(resp.status, text)
                return json.loads(text) if text else None
        raise AssertionError("unreachable")

    async def get(self, res: Resource, name: str, namespace: str | None = None, sub: str | None = None) -> Any:
        return await self.request("GET", res.path(namespace, name, sub))

    async def get_or_none(self, res: Resource, name: str, namespace: str | None = None) -> Any:
        try:
            return await self.get(res, name, namespace)
        except KubeError as exc:
            if exc.not_found:
                return None
            raise

    async def serves(self, res: Resource) -> bool:
        """Whether the server serves ``res`` (API discovery); False when its group/version is unknown."""
        try:
            doc = await self.request("GET", res.path().rsplit("/", 1)[0])
        except KubeError as exc:
            if exc.not_found:
                return False
            raise
        return any(r.get("name") == res.plural for r in (doc or {}).get("resources") or [])

    async def list(self, res: Resource, namespace: str | None = None, **params: Any) -> Any:
        return await self.request("GET", res.path(namespace), params=params)

    async def create(
        self,
        res: Resource,
        obj: Mapping[str, Any],
        namespace: str | None = None,
        sub: str | None = None,
        name: str | None = None,
    ) -> Any:
        return await self.request("POST", res.path(namespace, name, sub), body=obj)

    async def replace(
        self, res: Resource, name: str, obj: Mapping[str, Any], namespace: str | None = None, sub: str | None = None
    ) -> Any:
        return await self.request("PUT", res.path(namespace, name, sub), body=obj)

    async def patch(
        self,
        res: Resource,
        name: str,
        patch: Any,
        namespace: str | None = None,
        sub: str | None = None,
        content_type: str = MERGE,
    ) -> Any:
        return await self.request("PATCH", res.path(namespace, name, sub), body=patch, content_type=content_type)

    async def delete(
        self,
        res: Resource,
        name: str,
        namespace: str | None = None,
        *,
        grace_seconds: int | None = None,
        propagation: str | None = None,
        missing_ok: bool = True,
    ) -> Any:
        body: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if grace_seconds is not None:
            body["gracePeriodSeconds"] = grace_seconds
        if propagation:
            body["propagationPolicy"] = propagation
        try:
            return await self.request("DELETE", res.path(namespace, name), body=body)
        except KubeError as exc:
            if missing_ok and exc.not_found:
                return None
            raise

    async def watch(
        self,
        res: Resource,
        namespace: str | None = None,
        *,
        resource_version: str | None = None,
        timeout_seconds: int = 300,
        **params: Any,
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Yields ``(type, object)``; raises :class:`Gone` on 410 so the caller re-lists."""
        q = dict(params, watch="true", allowWatchBookmarks="true", timeoutSeconds=timeout_seconds)
        if resource_version:
            q["resourceVersion"] = resource_version
        async with self.session.get(
            self.conn.server + res.path(namespace),
            params=_params(q),
            headers=await self._headers(),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=timeout_seconds + 30),
        ) as resp:
            if resp.status == 401:
                self.conn.invalidate()  # the caller's next watch starts with a fresh credential
            if resp.status >= 400:
                raise _error(resp.status, await resp.text())
            buf = b""
            async for chunk in resp.content.iter_any():
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    etype, obj = event.get("type"), event.get("object") or {}
                    if etype == "ERROR":
                        raise _error(int(obj.get("code") or 500), json.dumps(obj))
                    yield etype, obj


def _params(params: Mapping[str, Any] | None) -> dict[str, str] | None:
    if not params:
        return None
    out = {}
    for k, v in params.items():
        if v is None:
            continue
        out[k] = ("true" if v else "false") if isinstance(v, bool) else str(v)
    return out


def _error(status: int, text: str) -> KubeError:
    reason, message, body = "", text.strip()[:500], None
    try:
        body = json.loads(text)
        reason = body.get("reason", "") or ""
        message = body.get("message", message) or message
    except (ValueError, AttributeError):
        pass
    cls = Gone if status == 410 else KubeError
    return cls(status, reason, message, body)


async def retry_on_conflict(fn: Any, *, attempts: int = 8) -> Any:
    """Runs ``fn`` (an async callable that re-reads what it changes) again on 409 Conflict."""
    for i in range(attempts):
        try:
            return await fn()
        except KubeError as exc:
            if not exc.conflict or i == attempts - 1:
                raise
            await asyncio.sleep(min(0.05 * 2**i, 1.0))
    raise AssertionError("unreachable")
