"""The wake endpoint the activator calls: ``POST /v1/wake`` with ``{"namespace", "name", "wait"}``.

Concurrent and repeated wakes of one ElastiService share a single scale call; keys are namespace
qualified, so equal names in two namespaces never wait for each other. With ``wait`` (seconds) the
answer comes when the target has a ready replica (``"ready": true``), or when ``wait`` is over: the
caller learns of it as soon as the controller does, without the status write and its watch event
in between.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from elasti_istio.controller.world import Blocked
from elasti_istio.kube import KubeError

log = logging.getLogger("elasti.wake")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
MAX_WAIT = 60.0  # seconds a wake may wait for the target's first ready replica
WAKERS = ("activator", "cli")  # who asks for a wake (``"by"``; the activator when absent): the Event says so


def error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


class TokenFile:
    """A bearer token kept in a file, re-read when the file changes (a mounted Secret rotates by
    swapping a symlink, so the path's stat is checked on every request). An unreadable or empty file
    keeps the token last read. Until the file has given one, the token passed to
    :meth:`use_until_read` is used: a Secret just created through the API reaches its mount (an
    optional Secret volume) a minute or so later."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[float, int, int] | None = None
        self._token: str | None = None
        self._fallback: str | None = None
        self._unreadable = False  # said in the log once per spell

    def use_until_read(self, token: str) -> None:
        if self._token is None:
            self._fallback = token or None

    def current(self) -> str | None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime, st.st_size, st.st_ino)
            if stamp != self._stamp:
                token = Path(self.path).read_text().strip()
                self._stamp = stamp
                if token:
                    self._token, self._fallback = token, None
            self._unreadable = False
        except OSError as exc:
            if not self._unreadable:
                self._unreadable = True
                log.warning("wake token file %s unreadable: %s", self.path, exc)
        return self._token or self._fallback

    def allows(self, header: str | None) -> bool:
        token = self.current()
        if not token or not header:
            return False
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


class Waker:
    """``POST /v1/wake`` (the activator) and ``POST /v1/sleep`` (people and tools: the same path as the idle
    scale-down, routes first, then zero)."""

    def __init__(
        self,
        wake: Callable[[str, str, str], Awaitable[str]],
        is_leader: Callable[[], bool],
        token_file: str | None = None,
        sleep: Callable[[str, str], Awaitable[str]] | None = None,
    ) -> None:
        self._wake = wake
        self._sleep = sleep
        self._is_leader = is_leader
        self._inflight: dict[str, asyncio.Future[str]] = {}
        self._token = TokenFile(token_file) if token_file else None
        self._ready_waiters: dict[str, set[asyncio.Future[int]]] = {}

    def use_token_until_read(self, token: str) -> None:
        """The token to require while the token file has none (see :class:`TokenFile`)."""
        if self._token is not None:
            self._token.use_until_read(token)

    def ready(self, namespace: str, name: str, replicas: int) -> int:
        """The target just got a first ready replica: answers the wakes waiting for it (how many)."""
        answered = 0
        for fut in self._ready_waiters.pop(f"{namespace}/{name}", ()):
            if not fut.done():
                fut.set_result(replicas)
                answered += 1
        return answered

    async def wake_and_wait(self, namespace: str, name: str, wait: float, by: str = "activator") -> dict[str, Any]:
        """The answer's phase and readiness; the waiter is registered before the wake, so a ready
        replica seen at any point after it is not missed."""
        key = f"{namespace}/{name}"
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        waiters = self._ready_waiters.setdefault(key, set())
        waiters.add(fut)
        try:
            phase = await self.wake(namespace, name, by)
            if phase != "ScalingUp":
                return {"phase": phase, "ready": phase == "Serving"}
            if fut.done() or wait > 0:
                try:
                    replicas = await asyncio.wait_for(asyncio.shield(fut), wait)
                    return {"phase": "Serving", "ready": True, "readyReplicas": replicas}
                except TimeoutError:
                    pass
            return {"phase": phase, "ready": False}
        finally:
            waiters.discard(fut)
            if not waiters and self._ready_waiters.get(key) is waiters:
                del self._ready_waiters[key]

    async def wake(self, namespace: str, name: str, by: str = "activator") -> str:
        """Concurrent wakes of one ElastiService share one call (the first one's ``by`` is recorded)."""
        key = f"{namespace}/{name}"
        fut = self._inflight.get(key)
        if fut is None:
            fut = asyncio.ensure_future(self._wake(namespace, name, by))
            self._inflight[key] = fut
            fut.add_done_callback(lambda _f: self._inflight.pop(key, None))
        return await asyncio.shield(fut)

    async def handle(self, request: web.Request) -> web.Response:
        return await self._handle(request, self.wake_and_wait)

    async def handle_sleep(self, request: web.Request) -> web.Response:
        sleep = self._sleep
        if sleep is None:
            return error(404, "sleep is not served here")

        async def action(ns: str, name: str, _wait: float, _by: str) -> dict[str, Any]:
            return {"phase": await sleep(ns, name)}

        return await self._handle(request, action)

    async def _handle(
        self, request: web.Request, action: Callable[[str, str, float, str], Awaitable[dict[str, Any]]]
    ) -> web.Response:
        if self._token is not None and not self._token.allows(request.headers.get("Authorization")):
            return web.json_response(
                {"error": "a valid bearer token is required (the activator's --wake-token-file)"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="elasti-wake"'},
            )
        if not self._is_leader():
            return error(503, "this controller replica is not the leader; retry", retry=True)
        try:
            body = json.loads(await request.read() or b"null")
        except ValueError:
            return error(400, 'the body must be JSON: {"namespace": ..., "name": ...}')
        if not isinstance(body, dict):
            return error(400, "the body must be a JSON object with namespace and name")
        ns, name = body.get("namespace"), body.get("name")
        bad = [f for f, v in (("namespace", ns), ("name", name)) if not isinstance(v, str) or not _NAME.match(v)]
        if bad:
            return error(400, f"missing or invalid {' and '.join(bad)}: expected Kubernetes object names")
        wait = body.get("wait", 0)
        if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 <= wait <= MAX_WAIT:
            return error(400, f"wait must be a number of seconds from 0 to {MAX_WAIT:g}")
        by = body.get("by", "activator")
        if by not in WAKERS:
            return error(400, f"by must be one of {', '.join(WAKERS)}")
        try:
            answer = await action(ns, name, float(wait), by)
        except LookupError as exc:
            return error(404, str(exc), namespace=ns, name=name)
        except Blocked as exc:
            return error(409, exc.message, reason=exc.reason, namespace=ns, name=name)
        except KubeError as exc:
            if exc.status in (403, 404, 409, 422):
                return error(
                    409, f"the target cannot be scaled: {exc.message}", reason="ScaleRefused", namespace=ns, name=name
                )
            log.warning("%s %s/%s failed: %s", request.path, ns, name, exc)
            return error(503, f"the API server failed: {exc.message}", retry=True)
        except (TimeoutError, OSError) as exc:
            log.warning("%s %s/%s failed: %s", request.path, ns, name, exc)
            return error(503, f"the API server is unreachable: {exc}", retry=True)
        return web.json_response({"namespace": ns, "name": name, **answer}, status=202)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_post("/v1/wake", self.handle)
        app.router.add_post("/v1/sleep", self.handle_sleep)
        return app
