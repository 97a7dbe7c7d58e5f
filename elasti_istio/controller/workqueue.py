"""A keyed work queue like client-go's: a key is never processed by two workers at once, a key dirtied
while it is processed runs again afterwards, and failures are retried with per-key backoff."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class WorkQueue:
    def __init__(
        self,
        process: Callable[[str], Awaitable[float | None]],
        workers: int = 8,
        base_delay: float = 0.2,
        max_delay: float = 30.0,
    ) -> None:
        """``process(key)`` returns seconds after which to run the key again, or None."""
        self._process = process
        self._workers = workers
        self._base, self._max = base_delay, max_delay
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self._active: set[str] = set()
        self._dirty: set[str] = set()
        self._failures: dict[str, int] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.enabled = asyncio.Event()

    def add(self, key: str) -> None:
        if key in self._active:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)

    def add_after(self, key: str, delay: float) -> None:
        loop = asyncio.get_running_loop()
        old = self._timers.get(key)
        when = loop.time() + delay
        if old is not None:
            if old.when() <= when:
                return
            old.cancel()
        self._timers[key] = loop.call_at(when, self._fire, key)

    def _fire(self, key: str) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def forget(self, key: str) -> None:
        self._failures.pop(key, None)
        timer = self._timers.pop(key, None)
        if timer:
            timer.cancel()

    def __len__(self) -> int:
        return len(self._queued)

    def start(self) -> None:
        for i in range(self._workers):
            self._tasks.append(asyncio.create_task(self._worker(), name=f"reconcile-worker-{i}"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    async def _worker(self) -> None:
        while True:
            await self.enabled.wait()
            key = await self._queue.get()
            self._queued.discard(key)
            if not self.enabled.is_set():
                self._queued.add(key)
                self._queue.put_nowait(key)
                continue
            self._active.add(key)
            try:
                again = await self._process(key)
                self._failures.pop(key, None)
                if again is not None:
                    self.add_after(key, again)
            except asyncio.CancelledError:
                raise
            except Exception:
                n = self._failures.get(key, 0) + 1
                self._failures[key] = n
                delay = min(self._base * 2 ** (n - 1), self._max)
                log.exception("reconcile of %s failed (attempt %d); retrying in %.1fs", key, n, delay)
                self.add_after(key, delay)
            finally:
                self._active.discard(key)
                if key in self._dirty:
                    self._dirty.discard(key)
                    self.add(key)
