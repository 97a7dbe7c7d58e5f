"""Held requests, asyncio side: waiting for status changes and notifying the controller once per wake cycle.

:class:`~activator.queue.HoldQueues` decides; this module wakes the waiters of an ElastiService
when the registry reports a change for it and runs the wake notification of each cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from activator.metrics import Metrics, TargetMetrics
from activator.queue import Admission, Change, HoldQueues
from activator.registry import Registry, Target, WakeFailure
from activator.routing import Key
from activator.wake import WakeNotifier, WakeResult

log = logging.getLogger(__name__)


class Holds:
    def __init__(self, registry: Registry, notifier: WakeNotifier, metrics: Metrics, max_held: int) -> None:
        self.queues = HoldQueues(max_held)
        self.registry = registry
        self.notifier = notifier
        self.metrics = metrics
        metrics.max_held.set(max_held)
        self._waiters: dict[Key, set[asyncio.Future[None]]] = {}
        self._notify: dict[Key, asyncio.Task[WakeResult]] = {}
        self._probers: dict[Key, object] = {}  # the one held request per target retrying the mesh soon
        registry.subscribe(self._on_change)

    def pending(self, key: Key) -> int:
        return self.queues.pending(key)

    def admit(self, target: Target, tm: TargetMetrics) -> Admission:
        result = self.queues.admit(target.key, target.queue_limit)
        if result is Admission.ADMITTED:
            tm.held.inc()
            tm.queue_limit.set(target.queue_limit)  # the alert's denominator, as the queue used it
        return result

    def leave(self, key: Key, tm: TargetMetrics) -> None:
        """``tm`` is the request's own: after a deletion it is detached, so the count cannot go negative."""
        tm.held.dec()
        if self.queues.leave(key):
            self._cancel_notify(key)  # nobody waits any more: the cycle is over
        self.queues.prune(key)

    def failures(self, key: Key) -> int:
        return self.queues.failures(key)

    def failed_since(self, key: Key, mark: int) -> WakeFailure | None:
        return self.queues.failed_since(key, mark)

    def want_wake(self, target: Target) -> None:
        """A held request sees its target not ready: the first one of a cycle notifies the controller."""
        key = target.key
        if not self.queues.open_cycle(key, target.wake_failure):
            return
        log.info("%s/%s: wake cycle opened", *key)
        cycle = self.queues.cycle_id(key)
        task = asyncio.create_task(self.notifier.notify(*key), name=f"wake-{key[0]}/{key[1]}")
        self._notify[key] = task
        task.add_done_callback(lambda t, key=key, cycle=cycle: self._notify_done(key, cycle, t))

    def _notify_done(self, key: Key, cycle: int, task: asyncio.Task[WakeResult]) -> None:
        if self._notify.get(key) is task:
            del self._notify[key]
        if task.cancelled():
            return
        if task.exception() is not None:
            log.error("%s/%s: wake notification crashed: %r", *key, task.exception())
            return
        answer = task.result()
        if answer.result == "ready":
            self.registry.mark_ready(key)
            return
        # A refusal may leave an unchanged WakeFailed condition behind (it was True already), so the
        # answer itself fails the cycle's held requests rather than letting them run into holdTimeout.
        if answer.result == "refused":
            failure = WakeFailure(answer.reason or "WakeRefused", answer.message, "")
            if self.queues.fail_cycle(key, cycle, failure):
                log.warning("%s/%s: wake refused (%s); failing %d held", *key, answer.message, self.queues.pending(key))
                self._signal(key)

    def _cancel_notify(self, key: Key) -> None:
        task = self._notify.pop(key, None)
        if task is not None and not task.done():
            task.cancel()

    def probe(self, key: Key, request: object) -> bool:
        """A forward of ``request`` found no ready endpoint in the mesh: True when it is the target's
        prober (it retries soon, see ``retry_pause``); the others wait for the prober's success or
        ``retryInterval``, so a thousand released requests do not all retry every few milliseconds."""
        return self._probers.setdefault(key, request) is request

    def end_probe(self, key: Key, request: object) -> None:
        """``request`` stops probing: its forward reached the workload (the others go now), or it gave
        up (its client left, it timed out: another request takes its place)."""
        if self._probers.get(key) is request:
            del self._probers[key]
            self._signal(key)

    async def wait(self, key: Key, timeout: float) -> None:
        """Returns on the next change of ``key``'s ElastiService or after ``timeout`` seconds."""
        if timeout <= 0:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(key, set())
        waiters.add(fut)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await fut
        finally:
            waiters.discard(fut)
            if not waiters:
                self._waiters.pop(key, None)

    def wake_all(self) -> None:
        """Every waiter re-evaluates (used when draining starts)."""
        for key in list(self._waiters):
            self._signal(key)

    def _signal(self, key: Key) -> None:
        for fut in self._waiters.get(key, ()):
            if not fut.done():
                fut.set_result(None)

    def _on_change(self, key: Key, target: Target | None) -> None:
        if target is None:
            self.queues.forget(key)
            self._cancel_notify(key)
            self.metrics.forget(key)
        else:
            change = self.queues.observe(key, target.ready, target.wake_failure)
            if change is Change.READY:
                log.info("%s/%s: ready; releasing %d held", *key, self.queues.pending(key))
                self._cancel_notify(key)
            elif change is Change.FAILED:
                log.warning(
                    "%s/%s: wake failed (%s); failing %d held",
                    *key,
                    target.wake_failure.message if target.wake_failure else "",
                    self.queues.pending(key),
                )
                self._cancel_notify(key)
        self._signal(key)

    async def close(self) -> None:
        for key in list(self._notify):
            self._cancel_notify(key)
