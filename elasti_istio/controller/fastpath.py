"""Two named shortcuts around the reconcile, for the moments where every read counts: routes to the
activator the instant a target is seen going to zero, and readyReplicas the instant it has a first ready
replica. Neither decides anything new; the full reconcile that follows checks everything."""

from __future__ import annotations

import asyncio
import time

from elasti_istio.controller.base import Base, log
from elasti_istio.controller.indexes import Key, split_key
from elasti_istio.kube import KubeError
from elasti_istio.resources import ELASTISERVICES


class FastPath(Base):
    """Part of :class:`~elasti_istio.controller.reconciler.Reconciler`."""

    async def proxy_at_once(self, key: Key) -> None:
        """A named shortcut: routes a target just seen going to 0 replicas to the activator before anything
        else is read. It decides nothing new (the target at zero means proxy mode, :func:`decide.desired_mode`).

        Kubernetes takes the target's pods out of the endpoints within tens of milliseconds of that
        same event, and a request routed to the Service meanwhile finds none ("no healthy
        upstream"); the full reconcile, several reads later, would lose that race. This uses what is
        known from the last reconcile (the routing target, and whether it kept the routes in serve mode
        for a port the activator cannot carry or for destinations an earlier ElastiService claims) and
        the indexes (the bound VirtualServices); the full
        reconcile that follows checks everything and corrects the rest.
        """
        rec = self.mem[key]
        rec.went_to_zero = False
        cached = rec.routing
        if cached is None or rec.protocol_refused or rec.conflict_refused or not self.activator_available[0]:
            return
        target, _labels, targets = cached[1]
        for vk in sorted(self.idx.bound_vs(key)):
            try:
                vs_target = targets.get(vk[0], target)
                if await self.switch_vs(vk, vs_target, "proxy", key, cached=self.idx.vs_objects.get(vk)):
                    rec.switched_early = time.monotonic()
            except Exception as exc:  # the full reconcile retries with fresh data
                log.debug("%s: early switch of %s/%s failed: %s", key, vk[0], vk[1], exc)

    async def release_at_once(self, key: Key, ready: int, delay: float = 0.0) -> None:
        """A named shortcut: tells the activators that a target just got its first ready replica, before
        anything else is read: they release the held requests on ``status.readyReplicas``, and every read
        the full reconcile makes first would be added to each held request's wait. The full reconcile
        that follows checks everything and writes the rest of the status."""
        ns, name = split_key(key)
        if delay:
            await asyncio.sleep(delay)
        try:
            await self.kube.patch(ELASTISERVICES, name, {"status": {"readyReplicas": ready}}, ns, sub="status")
        except (KubeError, OSError) as exc:  # the full reconcile writes it too
            log.debug("%s: early readyReplicas write failed: %s", key, exc)
            self.requeue(key)
