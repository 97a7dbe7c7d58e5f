"""Reconciles one ElastiService in three steps: :meth:`Reconciler.observe` reads the target, Service,
DestinationRules and VirtualServices (every read, no write); :func:`decide.decide` says what to write
(pure); :meth:`Reconciler.act` writes it; then one status write and the Events of what changed
(:func:`decide.report`, pure). A wake or sleep asked for by annotation (:mod:`requested`) is acted on
first, under the same lock.

Everything it decides is derived from the cluster (the VirtualServices carry their own restore data),
so a controller restarted at any point converges; what it keeps between reconciles is one record per
ElastiService (:mod:`memory`).
"""

from __future__ import annotations

import time
from typing import Any

from elasti_istio.controller import decide, metrics
from elasti_istio.controller.act import Act
from elasti_istio.controller.base import FINALIZER, log
from elasti_istio.controller.fastpath import FastPath
from elasti_istio.controller.indexes import Key, split_key
from elasti_istio.controller.observe import Observe
from elasti_istio.controller.operations import Operations
from elasti_istio.controller.scaling import Scaling
from elasti_istio.controller.world import Blocked, Resolved, keda_owner_pause
from elasti_istio.resources import ELASTISERVICES

__all__ = ["Blocked", "Reconciler", "Resolved", "keda_owner_pause"]


class Reconciler(FastPath, Observe, Act, Scaling, Operations):
    """Reconciles ElastiServices: :meth:`reconcile` is what the work queue calls."""

    async def reconcile(self, key: Key) -> float | None:
        async with self.lock(key):
            return await self._locked_reconcile(key)

    async def _locked_reconcile(self, key: Key) -> float | None:
        ns, name = split_key(key)
        begun = time.monotonic()
        try:
            if self.mem[key].went_to_zero:
                await self.proxy_at_once(key)
            es = await self.kube.get_or_none(ELASTISERVICES, name, ns)
            if es is None:
                self.forget(key)
                return None
            if es["metadata"].get("deletionTimestamp"):
                return await self.finalize(es)
            es = await self.ensure_finalizer(es)
            if await self.act_on_requests(es):
                return 0.0  # reconciled again at once, from what the request changed
            return await self._reconcile(es, begun)
        except Exception:
            metrics.RECONCILE_ERRORS.labels(ns, name).inc()
            raise

    async def ensure_finalizer(self, es: dict[str, Any]) -> dict[str, Any]:
        fins = es["metadata"].get("finalizers") or []
        if FINALIZER in fins:
            return es
        meta = es["metadata"]
        patched = await self.kube.patch(
            ELASTISERVICES,
            meta["name"],
            {"metadata": {"finalizers": [*fins, FINALIZER], "resourceVersion": meta["resourceVersion"]}},
            meta["namespace"],
        )
        return dict(patched)

    async def _reconcile(self, es: dict[str, Any], begun: float) -> float | None:
        """``begun``: when this reconcile started reading (see the switch timing in :meth:`act`)."""
        world = await self.observe(es)
        plan = decide.decide(world)
        outcome = await self.act(world, plan, begun)
        status, memory, events = decide.report(world, plan, outcome)
        self.mem[world.key].keep(memory)
        for rival in self.idx.set_claims(world.key, decide.order(world), plan.claims):
            self.requeue(rival)  # it shares a destination with this one now, or no longer: it says so
        baseline = world.status
        if plan.release_ready is not None:
            baseline["readyReplicas"] = plan.release_ready  # written before the routes moved
        await self.write_status(es, baseline, status)
        metrics.observe_status(*split_key(world.key), status)
        for event in events:
            if event.type == "Warning":
                log.warning("%s: %s", world.key, event.message)
            self.recorder.emit(es, event.type, event.reason, event.message)
        old_phase = world.status.get("phase")
        if plan.phase is not None and plan.phase != old_phase and world.r is not None:
            metrics.TRANSITIONS.labels(world.r.spec.namespace, world.r.spec.name, plan.phase).inc()
            log.info("%s: phase %s -> %s", world.key, old_phase or "-", plan.phase)
        return decide.sooner(plan.requeue, outcome.requeue)
