"""Telling the controller to wake a workload: ``POST <controller>/v1/wake {"namespace", "name", "wait"}``.

Retried with backoff while the controller is unreachable or answers 5xx; a 4xx is final (a refusal,
409 for example, fails the cycle's held requests). With ``wait`` the controller answers when the
workload has a ready replica (``"ready": true``) or the wait is over. The caller cancels the task
when the wake cycle ends another way (target ready, nothing held).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from activator.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WakeResult:
    """``accepted``, ``ready`` (accepted, and the workload has a ready replica), ``not_found`` or
    ``refused``, with the controller's reason and message."""

    result: str
    reason: str = ""
    message: str = ""


class WakeNotifier:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        controller_url: str,
        metrics: Metrics,
        *,
        token_file: str | None = None,
        wait: float = 0.0,
        attempt_timeout: float = 5.0,
        backoff: float = 0.1,
        max_backoff: float = 5.0,
    ) -> None:
        self.session = session
        self.url = controller_url.rstrip("/") + "/v1/wake"
        self.metrics = metrics
        self.token_file = token_file
        self.wait = wait
        self.attempt_timeout = attempt_timeout
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._token = ""  # the token last read

    def _headers(self) -> dict[str, str] | None:
        """A bearer token read per call, so that a rotated (projected) token file is picked up; an
        unreadable or empty file keeps the token last read. None while the file has given none yet (an
        optional Secret volume fills a minute or so after the Secret is created): the call would only
        be refused, so it waits."""
        if not self.token_file:
            return {}
        try:
            token = Path(self.token_file).read_text().strip()
        except OSError as exc:
            log.warning("wake token file %s unreadable: %s", self.token_file, exc)
            token = ""
        self._token = token or self._token
        return {"Authorization": f"Bearer {self._token}"} if self._token else None

    async def notify(self, namespace: str, name: str) -> WakeResult:
        """The controller's final answer; unreachable or 5xx (``error``) is retried until cancelled."""
        delay = self.backoff
        body: dict[str, object] = {"namespace": namespace, "name": name}
        if self.wait > 0:
            body["wait"] = self.wait
        while True:
            headers = self._headers()
            try:
                if headers is None:
                    raise _NotYet(f"wake token file {self.token_file} not loaded yet")
                async with self.session.post(
                    self.url,
                    json=body,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=self.attempt_timeout + self.wait),
                ) as resp:
                    text = (await resp.read())[:2000].decode("utf-8", "replace")
                    if resp.status < 300:
                        self.metrics.wake(namespace, name, "accepted")
                        log.info("%s/%s: wake requested (%d %s)", namespace, name, resp.status, text.strip())
                        return WakeResult("ready" if _says_ready(text) else "accepted")
                    reason, message = _explain(text, resp.status)
                    if resp.status == 404:
                        self.metrics.wake(namespace, name, "not_found")
                        log.warning("%s/%s: controller does not know this ElastiService: %s", namespace, name, message)
                        return WakeResult("not_found", reason, message)
                    if resp.status < 500:
                        self.metrics.wake(namespace, name, "refused")
                        log.warning(
                            "%s/%s: controller refused the wake (%d): %s", namespace, name, resp.status, message
                        )
                        return WakeResult("refused", reason, message)
                    problem = f"{resp.status}: {message}"
            except (aiohttp.ClientError, TimeoutError, OSError, _NotYet) as exc:
                problem = str(exc) or type(exc).__name__
            self.metrics.wake(namespace, name, "error")
            log.warning("%s/%s: wake request failed (%s); retrying in %.1fs", namespace, name, problem, delay)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, self.max_backoff)


class _NotYet(Exception):
    """A wake call not sent yet: retried like one that failed."""


def _says_ready(text: str) -> bool:
    try:
        body = json.loads(text)
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("ready") is True


def _explain(text: str, status: int) -> tuple[str, str]:
    """The controller's JSON error (``reason``, ``error``/``message``), or the raw text."""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        message = body.get("error") or body.get("message") or text
        return str(body.get("reason") or ""), str(message)
    return "", text.strip() or f"HTTP {status}"
