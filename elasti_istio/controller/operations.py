"""What the controller does besides reconciling: wake (asked by the activators, or by annotation), sleep
(asked, or idle triggers all below their thresholds) and the deletion of an ElastiService (its
finalizer). Each takes the ElastiService's lock, like a reconcile; the annotations are acted on within
a reconcile, which holds it already."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Any

from elasti_istio.controller import conditions as C
from elasti_istio.controller import decide, metrics, requested, triggers
from elasti_istio.controller import spec as es_spec
from elasti_istio.controller.base import FINALIZER, ORIGIN_GRACE, Base, log
from elasti_istio.controller.indexes import Key, es_key, split_key
from elasti_istio.controller.workloads import WORKLOAD_RESOURCES
from elasti_istio.controller.world import Blocked, Resolved
from elasti_istio.kube import KubeError
from elasti_istio.kube.client import retry_on_conflict
from elasti_istio.resources import ANN_WAKE_REQUESTED, ELASTISERVICES, SERVICES

WAKE_CAUSES = {
    "activator": "a request arrived for the sleeping target",
    "cli": "asked to wake (elasti-istio wake)",
    "annotation": f"asked to wake (annotation {ANN_WAKE_REQUESTED})",
}
# A refusal by the API server that retrying does not change (the others are retried).
REFUSED_STATUSES = (403, 404, 409, 422)
# In a scale-down the controller makes, the last part of --route-settle-seconds (a quarter, at most this)
# runs after the activators were told the target has no ready replica: their watches' delay.
ACTIVATOR_NOTICE = 0.5


class Operations(Base):
    """Part of :class:`~elasti_istio.controller.reconciler.Reconciler`."""

    async def sleep(self, namespace: str, name: str, reason: str, why: str) -> str:
        """Routes to the activator first, then the target to zero (never the other way round). Not when
        the activator is unavailable, outside the enabledPeriod, when the routes use a port whose
        protocol the activator cannot carry, or when an earlier ElastiService claims its destinations (the
        routes would stay in serve mode, and requests fail)."""
        async with self.lock(es_key(namespace, name)):
            return await self._sleep(namespace, name, reason, why)

    async def _sleep(self, namespace: str, name: str, reason: str, why: str) -> str:
        key = es_key(namespace, name)
        es = await self.kube.get_or_none(ELASTISERVICES, name, namespace)
        if es is None:
            raise LookupError(f"ElastiService {namespace}/{name} not found")
        world = await self.observe(es)
        if world.blocked is not None:
            raise world.blocked
        r = world.r
        assert r is not None
        if not self.activator_available[0]:
            raise Blocked(
                C.ACTIVATOR,
                "ActivatorUnavailable",
                f"not scaling {r.workload_kind} {r.state.name} to zero: {self.activator_available[2]}",
            )
        if r.state.at_zero:
            return "ScaledToZero"
        rec = self.mem[key]
        waking = decide.waking_refuses_sleep(
            rec.waking, r.state, rec.last_wake, r.spec.hold_timeout, dt.datetime.now(dt.UTC)
        )
        if waking is not None:
            raise Blocked(C.WAKE_FAILED, "Waking", waking)
        allowed = decide.period_allows(r.spec, dt.datetime.now(dt.UTC))
        if allowed is False or isinstance(allowed, str):
            raise Blocked(
                C.ALLOWED,
                "OutsideEnabledPeriod" if allowed is False else "InvalidSchedule",
                "scale to zero is not allowed now (enabledPeriod)",
            )
        routing_now = decide.classify(world)[0]
        carried, message = decide.protocol_rules(world, routing_now)
        if not carried:
            raise Blocked(C.PROTOCOL, "UnsupportedProtocol", f"not scaling to zero: {message}")
        _, conflict = decide.conflict_rules(world, world.conditions, decide.claims(world, routing_now))
        if conflict is not None:
            raise Blocked(C.CONFLICT, conflict[0], f"not scaling to zero: {conflict[1]}")
        routing = [vk for vk in sorted(self.idx.bound_vs(key))]
        self.mem[key].sleeping = True
        try:
            switched = False
            for vk in routing:
                switched = await self.switch_vs(vk, r.target_for(vk[0]), "proxy", key) or switched
            settle = self.cfg.route_settle_seconds
            notice = min(ACTIVATOR_NOTICE, settle / 4)
            if switched and settle > notice:
                # istiod sends one push for the route change and the endpoint removal when they come within
                # its debounce of each other, endpoints before routes: for a moment Envoy would route to a
                # Service with no endpoint ("no healthy upstream"). The routes go out in a push of their own.
                await asyncio.sleep(settle - notice)
            # The activators forward to a ready target themselves. A request crossing a stopping pod's close
            # of its idle connection fails with a reset, and may have reached the pod, so it cannot be sent
            # again: they are told first that it has no ready replica, and hold from then on.
            await self.patch_status(es, {"readyReplicas": 0})
            if notice:
                await asyncio.sleep(notice)
            await self.pause_keda_at_zero(r)
            res = WORKLOAD_RESOURCES[r.workload_kind]
            await self.kube.patch(res, r.state.name, {"spec": {"replicas": 0}}, namespace, sub="scale")
        except BaseException:
            self.mem[key].sleeping = False
            self.requeue(key)
            raise
        self.mem[key].sleeping = False
        self.recorder.emit(
            es,
            "Normal",
            reason,
            f"{why}: routes moved to the activator, then {r.workload_kind} {r.state.name} scaled to 0",
        )
        log.info("%s: %s: %s %s scaled to 0", key, reason, r.workload_kind, r.state.name)
        self.requeue(key)
        return "ScalingToZero"

    async def act_on_requests(self, es: dict[str, Any]) -> bool:
        """Wakes and sleeps asked for by annotation (:mod:`requested`), under the lock the caller holds: the
        outcome goes to the status and an Event, then the annotation is removed. A refusal is an outcome
        too; a passing failure (the API server's) raises and is retried with the annotation left in place.
        True when there was something to act on."""
        asks = requested.pending(es)
        if not asks:
            return False
        meta = es["metadata"]
        ns, name = meta["namespace"], meta["name"]
        key = es_key(ns, name)
        records: dict[str, Any] = {}
        for ask in asks:
            result, posted = await self._requested(ask, ns, name)
            records[requested.STATUS_FIELDS[ask.action]] = requested.record(ask, result, C.now_iso())
            note = requested.notice(ask, result, posted)
            if note is not None:
                self.recorder.emit(es, note.type, note.reason, note.message)
            level = log.info if result.done else log.warning
            level("%s: %s: %s: %s", key, ask.why, result.reason, result.message)
        await self.patch_status(es, records)
        await self._clear_requests(ns, name, asks)
        return True

    async def _requested(self, ask: requested.Ask, ns: str, name: str) -> tuple[requested.Result, bool]:
        """(what came of it, whether the operation posted its own Event)."""
        if ask.dropped:
            return requested.conflicting(), False
        try:
            if ask.action == requested.WAKE:
                phase, scaled = await self._wake(ns, name, ask.by)
                return requested.done(ask, phase, scaled), scaled
            phase = await self._sleep(ns, name, "ScaledToZeroOnRequest", ask.why)
            slept = phase == "ScalingToZero"
            return requested.done(ask, phase, slept), slept
        except Blocked as exc:
            return requested.refused(exc.reason, exc.message), False
        except KubeError as exc:
            if exc.status not in REFUSED_STATUSES:
                raise
            return requested.refused("ScaleRefused", f"the target cannot be scaled: {exc.message}"), False

    async def _clear_requests(self, ns: str, name: str, asks: list[requested.Ask]) -> None:
        """Removes the annotations acted on, each only while it still holds the value acted on."""

        async def clear() -> None:
            cur = await self.kube.get_or_none(ELASTISERVICES, name, ns)
            if cur is None:
                return
            ann = cur["metadata"].get("annotations") or {}
            drop = {a.annotation: None for a in asks if ann.get(a.annotation) == a.token}
            if drop:
                meta = {"annotations": drop, "resourceVersion": cur["metadata"]["resourceVersion"]}
                await self.kube.patch(ELASTISERVICES, name, {"metadata": meta}, ns)

        await retry_on_conflict(clear)

    async def consider_idle(self, key: Key) -> None:
        """Evaluates the idle triggers of one ElastiService; sleeps it when all agree it is idle."""
        ns, name = split_key(key)
        es = await self.kube.get_or_none(ELASTISERVICES, name, ns)
        if es is None or es["metadata"].get("deletionTimestamp"):
            return
        try:
            spec = es_spec.parse(es)
        except es_spec.SpecError:
            return
        if not spec.triggers:
            return
        status = es.get("status") or {}
        if status.get("phase") != "Serving" or status.get("mode") != "serve":
            return
        results = [await triggers.evaluate(self.http, t, allow=self.cfg.trigger_allow) for t in spec.triggers]
        healthy = all(x.healthy for x in results)
        idle = healthy and all(x.idle for x in results)
        if not healthy:
            state = (
                False,
                "MetricsUnavailable",
                "; ".join(x.message for x in results if not x.healthy) + ": never scaled down on missing metrics",
            )
        else:
            state = (True, "Idle" if idle else "Busy", "; ".join(x.message for x in results))
        rec = self.mem[key]
        previous, rec.triggers = rec.triggers, state
        metrics.IDLE_CHECKS.labels(ns, name, "error" if not healthy else "idle" if idle else "busy").inc()
        if previous is None or previous[:2] != state[:2]:
            self.requeue(key)
        if not idle:
            return
        awake = C.parse_time(status.get("awakeSince") or status.get("lastWakeTime") or "")
        if awake is None or (dt.datetime.now(dt.UTC) - awake).total_seconds() < spec.cooldown:
            return
        try:
            await self.sleep(ns, name, "ScaledToZeroWhenIdle", "every trigger was below its threshold")
        except (Blocked, LookupError, KubeError) as exc:
            log.info("%s: idle, but not scaled down: %s", key, exc)

    async def finalize(self, es: dict[str, Any]) -> float | None:
        """Deleting an ElastiService loses no request. In proxy mode the target is woken and the routes stay
        on the activator (which holds and then forwards through the origin Service) until the target has
        a ready replica listed in the Service's EndpointSlices, at most ``holdTimeout`` after the deletion
        began; then the routes are restored, the origin Service is kept ``ORIGIN_GRACE`` seconds more for
        the forwards in flight, and the finalizer goes."""
        meta = es["metadata"]
        key = es_key(meta["namespace"], meta["name"])
        if FINALIZER not in (meta.get("finalizers") or []):
            return None
        try:
            r = await self.resolve(es)
        except Blocked:
            r = None
        if self.mem[key].conflict_refused:
            r = None  # an ElastiService created earlier manages the target: it is not woken for this one
        waiting = r is not None and (es.get("status") or {}).get("mode") == "proxy" and self.activator_available[0]
        if r is not None and waiting:
            wait = await self._hold_while_deleted(es, r)
            if wait is not None:
                return wait
        restored = await self.restore_all(key, es, r)
        if r is not None and r.state.at_zero:
            await self._wake_on_delete(es, r)
        if waiting:
            rec = self.mem[key]
            if rec.finalize_restored is None:
                rec.finalize_restored = time.monotonic()
            grace = ORIGIN_GRACE - (time.monotonic() - rec.finalize_restored)
            if grace > 0:
                return grace  # forwards of released requests still use the origin Service
        await self.kube.delete(SERVICES, es_spec.origin_service_name(meta["name"]), meta["namespace"])
        self.recorder.emit(
            es, "Normal", "Finalized", f"restored {len(restored)} VirtualService(s) and removed the origin Service"
        )
        await self.recorder.flush(2.0)
        await self._drop_finalizer(meta["namespace"], meta["name"])
        log.info("%s: finalized", key)
        self.forget(key)
        return None

    async def _wake_on_delete(self, es: dict[str, Any], r: Resolved) -> None:
        await self.scale_up(
            es, r, reason="WokenOnDelete", why="the ElastiService is being deleted, so its target is woken"
        )

    async def _hold_while_deleted(self, es: dict[str, Any], r: Resolved) -> float | None:
        """While the routes of a deleted ElastiService stay on the activator (:func:`decide.deletion_rules`):
        seconds until it looks again, or None once they may go back."""
        began = C.parse_time(es["metadata"].get("deletionTimestamp") or "") or dt.datetime.now(dt.UTC)
        left = r.spec.hold_timeout - (dt.datetime.now(dt.UTC) - began).total_seconds()
        ready = (es.get("status") or {}).get("readyReplicas")
        step = decide.deletion_rules(r.state, ready, left, None)
        if step.wake:
            await self._wake_on_delete(es, r)
        if step.release_ready is not None:
            await self.patch_status(es, {"readyReplicas": step.release_ready})
            ready = step.release_ready
        if step.look_at_endpoints:
            listed = await self.endpoints_listed(r.spec.key, r)
            step = decide.deletion_rules(r.state, ready, left, listed)
        if step.unready_restore:
            self.recorder.emit(
                es,
                "Warning",
                "RestoredWithoutReadyReplica",
                f"{r.workload_kind} {r.state.name} had no ready replica within holdTimeout "
                f"({r.spec.hold_timeout:g}s) of the deletion: routes restored to the Service; the "
                "activator answered the requests it held 504",
            )
        return step.wait

    async def _drop_finalizer(self, namespace: str, name: str) -> None:
        async def drop() -> None:
            cur = await self.kube.get_or_none(ELASTISERVICES, name, namespace)
            if cur is None:
                return
            fins = [f for f in cur["metadata"].get("finalizers") or [] if f != FINALIZER]
            await self.kube.patch(
                ELASTISERVICES,
                name,
                {"metadata": {"finalizers": fins or None, "resourceVersion": cur["metadata"]["resourceVersion"]}},
                namespace,
            )

        await retry_on_conflict(drop)

    async def wake(self, namespace: str, name: str, by: str = "activator") -> str:
        """Scales the target up if it is below minTargetReplicas; returns the resulting phase.

        Raises LookupError when the ElastiService does not exist and Blocked/KubeError when the target
        cannot be woken (a condition and an Event say so too).
        """
        async with self.lock(es_key(namespace, name)):
            return (await self._wake(namespace, name, by))[0]

    async def _wake(self, namespace: str, name: str, by: str) -> tuple[str, bool]:
        """(the resulting phase, whether the target was scaled)."""
        key = es_key(namespace, name)
        es = await self.kube.get_or_none(ELASTISERVICES, name, namespace)
        if es is None:
            metrics.WAKES.labels("", "", "not_found").inc()  # never a label value taken from the request
            raise LookupError(f"ElastiService {namespace}/{name} not found")
        try:
            r = await self.resolve(es)
        except Blocked as blk:
            self.mem[key].wake_failure = (blk.reason, blk.message)
            metrics.WAKES.labels(namespace, name, "failed").inc()
            asyncio.get_running_loop().call_soon(self.requeue, key)
            raise
        self.mem[key].wake_failure = None
        paused = self.owner_paused(r)
        if paused:
            metrics.WAKES.labels(namespace, name, "failed").inc()
            asyncio.get_running_loop().call_soon(self.requeue, key)
            raise Blocked(C.WAKE_FAILED, "PausedByOwner", paused)
        try:
            why = WAKE_CAUSES.get(by, WAKE_CAUSES["activator"])
            scaled = await self.scale_up(es, r, reason="Woken", why=why)
        except KubeError:
            metrics.WAKES.labels(namespace, name, "failed").inc()
            asyncio.get_running_loop().call_soon(self.requeue, key)
            raise
        metrics.WAKES.labels(namespace, name, "scaled" if scaled else "already_awake").inc()
        if scaled:
            self.saw_target_event(key, time.monotonic())
        self.requeue(key)
        if scaled or r.state.ready == 0:
            return "ScalingUp", scaled
        return "Serving", False
