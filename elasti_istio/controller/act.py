"""The writes of a reconcile, as its plan orders them: the origin Service, the VirtualServices (each
switch a JSON Patch with a resourceVersion test, so an edit made meanwhile is never overwritten), the
early readyReplicas and the status (a merge patch of what changed since it was read)."""

from __future__ import annotations

import time
from typing import Any

from elasti_istio import vsrewrite
from elasti_istio.controller import metrics, vspatch
from elasti_istio.controller.base import MANAGED_LABEL, Base, log
from elasti_istio.controller.indexes import Key, split_key
from elasti_istio.controller.workloads import origin_selector
from elasti_istio.controller.world import Outcome, Plan, Resolved, World
from elasti_istio.kube import KubeError
from elasti_istio.kube.client import JSON_PATCH, retry_on_conflict
from elasti_istio.resources import ELASTISERVICES, GROUP, SERVICES, VIRTUALSERVICES


class Act(Base):
    """Part of :class:`~elasti_istio.controller.reconciler.Reconciler`."""

    async def act(self, w: World, plan: Plan, begun: float) -> Outcome:
        """The plan's writes, in order: routes for a blocked ElastiService back to serve; else the origin
        Service, stale routes back to serve, an expired KEDA hold lifted, a wake, readyReplicas (the
        activators release on it) and then the routes."""
        es, key, rec = w.es, w.key, self.mem[w.key]
        rec.protocol_refused = plan.protocol_refused  # the early switch to proxy mode must not undo it
        rec.conflict_refused = plan.conflict_refused is not None
        if plan.restore_all:
            await self.restore_all(key, es)
            return Outcome(memory=rec.snapshot())
        r = w.r
        assert r is not None
        if plan.ensure_origin:
            await self.ensure_origin_service(es, r)
        for vk in plan.serve_stale:
            await self.switch_vs(vk, r.target_for(vk[0]), "serve", key)
        if plan.lift_keda_hold:
            await self.unpause_keda(r)
        requeue = None
        if plan.scale_up is not None:
            requeue = await self._act_scale_up(es, r, plan.scale_up)
        if plan.endpoints_wait_over:
            rec.endpoints_wait = None
        if plan.release_ready is not None:
            await self.patch_status(es, {"readyReplicas": plan.release_ready})
        changed = False
        for vk in plan.routing:
            changed |= await self.switch_vs(vk, r.target_for(vk[0]), plan.desired, key)
        changed = self._time_switch(w, plan, begun, changed)
        if changed:
            log.info("%s: VirtualServices switched to %s mode", key, plan.desired)
        return Outcome(memory=rec.snapshot(), changed=changed, requeue=requeue)

    async def _act_scale_up(self, es: dict[str, Any], r: Resolved, up: Any) -> float | None:
        """A wake the rules asked for; fail-open wakes share a token bucket (the seconds until the next
        one may go are returned as the requeue)."""
        if up.rate_limited:
            wait = self.fail_open_bucket.take()
            if wait > 0.0:
                metrics.FAIL_OPEN_DEFERRED.labels(r.spec.namespace, r.spec.name).inc()
                self.recorder.emit(
                    es,
                    "Warning",
                    "FailOpenRateLimited",
                    f"the activator is unavailable and many targets are being woken: wakes are limited to "
                    f"{self.cfg.fail_open_wakes_per_second:g}/s (burst {self.cfg.fail_open_burst}); "
                    f"{r.state.kind} {r.state.name} is woken in about {wait:.1f}s",
                )
                return wait
        await self.scale_up(es, r, reason=up.reason, why=up.why)
        return None

    def _time_switch(self, w: World, plan: Plan, begun: float, changed: bool) -> bool:
        """The switch latency metric: from the target event this switch answers (one this reconcile saw,
        as it came before the reads, or one the switch came after) to the switch. A later event is left
        for the next reconcile. An early switch (:meth:`proxy_at_once`) counts as this one's."""
        rec, r = self.mem[w.key], w.r
        assert r is not None
        switched_at = time.monotonic()
        early, rec.switched_early = rec.switched_early, None
        if early is not None and plan.desired == "proxy" and not changed:
            changed, switched_at = True, early
        started = rec.event_time
        if started is not None and (started <= begun or (changed and started <= switched_at)):
            rec.event_time = None
        else:
            started = None
        if changed and started is not None:
            metrics.SWITCH_SECONDS.labels(r.spec.namespace, r.spec.name, plan.desired).observe(switched_at - started)
        return changed

    async def write_status(self, es: dict[str, Any], old: dict[str, Any], new: dict[str, Any]) -> None:
        """A merge patch of the fields that changed since ``old`` was read: a field another writer (the
        early readyReplicas write) changed meanwhile is left alone unless this reconcile changes it too;
        that write's own watch event makes the next reconcile start from it."""
        new = {k: v for k, v in new.items() if v is not None}
        patch: dict[str, Any] = {k: v for k, v in new.items() if old.get(k) != v}
        for k, v in old.items():
            if k not in new and v is not None:
                patch[k] = None
        if patch:
            await self.patch_status(es, patch)

    async def patch_status(self, es: dict[str, Any], patch: dict[str, Any]) -> None:
        meta = es["metadata"]
        try:
            await self.kube.patch(ELASTISERVICES, meta["name"], {"status": patch}, meta["namespace"], sub="status")
        except KubeError as exc:
            if not exc.not_found:
                raise

    async def switch_vs(
        self,
        vk: tuple[str, str],
        target: vsrewrite.Target,
        mode: str,
        key: Key,
        cached: dict[str, Any] | None = None,
    ) -> bool:
        """Puts one VirtualService in ``mode`` for this target; True when it had to change.

        An edit made by someone else while in proxy mode is kept: the current spec is first brought
        back to serve mode with the stored restore data, then proxied again.
        """
        vns, vname = vk
        changed = False
        # A copy already at hand (the watched one, or the one read to explain a refusal) saves a read; a
        # stale one is refused by the resourceVersion test and read again.
        first = [cached]
        final: list[dict[str, Any]] = []  # the VirtualService as this switch left it

        async def attempt() -> None:
            nonlocal changed
            final.clear()
            vs = first.pop() if first else None
            if vs is None:
                vs = await self.kube.get_or_none(VIRTUALSERVICES, vname, vns)
            if vs is None:
                return
            meta = vs["metadata"]
            ann = dict(meta.get("annotations") or {})
            entries = vsrewrite.read_restore(ann).get(key)
            spec = vs.get("spec") or {}
            base = vsrewrite.to_serve(spec, vns, target, self.activator, entries, self.cfg.cluster_domain)
            if mode == "proxy":
                new, new_entries = vsrewrite.to_proxy(base, vns, target, self.activator, None, self.cfg.cluster_domain)
            else:
                new, new_entries = base, None
            value = vsrewrite.write_restore(ann, key, new_entries if new_entries else None)
            ops = vspatch.build(vs, new, value)
            if ops is None:
                final.append(vs)
                return
            try:
                final.append(await self.kube.patch(VIRTUALSERVICES, vname, ops, vns, content_type=JSON_PATCH))
            except KubeError as exc:
                # A failed resourceVersion test is a 422 like any invalid patch: tell them apart by reading.
                if exc.status == 422:
                    fresh = await self.kube.get_or_none(VIRTUALSERVICES, vname, vns)
                    if fresh is None or fresh["metadata"]["resourceVersion"] != meta["resourceVersion"]:
                        first.append(fresh)  # the retry starts from it
                        raise KubeError(409, "Conflict", f"VirtualService {vns}/{vname} changed meanwhile") from exc
                raise
            changed = True

        await retry_on_conflict(attempt)
        if mode == "serve" and final and (release := vspatch.release_http(final[0])):
            # Its routes are the user's again: a GitOps tool's server-side apply must not conflict with us.
            try:
                await self.kube.patch(VIRTUALSERVICES, vname, release, vns, content_type=JSON_PATCH)
            except KubeError as exc:  # a concurrent write: the next reconcile in serve mode tries again
                log.debug("%s: giving up ownership of %s/%s spec.http failed: %s", key, vns, vname, exc)
        return changed

    async def restore_all(self, key: Key, es: dict[str, Any], r: Resolved | None = None) -> set[tuple[str, str]]:
        """Serve mode on every VirtualService this ElastiService may have touched."""
        ns, name = split_key(key)
        targets: dict[str, vsrewrite.Target] = {}
        if r is not None:
            target, targets = r.target, r.targets
        else:
            cached = self.mem[key].routing
            svc = (es.get("spec") or {}).get("service", "")
            target = cached[1][0] if cached else vsrewrite.Target(namespace=ns, name=name, service=svc)
            targets = cached[1][2] if cached else {}
        touched = self.idx.bound_vs(key) | self.idx.vs_with_restore(key)
        for vk in sorted(touched):
            await self.switch_vs(vk, targets.get(vk[0], target), "serve", key)
        return touched

    async def ensure_origin_service(self, es: dict[str, Any], r: Resolved) -> None:
        ns = r.spec.namespace
        svc_spec = r.service.get("spec") or {}
        selector = origin_selector(r.state, svc_spec.get("selector") or {}, r.subset_labels)
        ports = []
        for p in svc_spec.get("ports") or []:
            port = {k: p[k] for k in ("name", "port", "targetPort", "protocol", "appProtocol") if k in p}
            ports.append(port)
        meta = es["metadata"]
        desired_meta = {
            "name": r.origin_name,
            "namespace": ns,
            "labels": {"app.kubernetes.io/managed-by": "elasti-istio", MANAGED_LABEL: meta["name"]},
            "ownerReferences": [
                {
                    "apiVersion": es.get("apiVersion", f"{GROUP}/v1alpha1"),
                    "kind": "ElastiService",
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        }

        async def attempt() -> None:
            current = await self.kube.get_or_none(SERVICES, r.origin_name, ns)
            if current is None:
                body = {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": desired_meta,
                    "spec": {"type": "ClusterIP", "selector": selector, "ports": ports},
                }
                try:
                    await self.kube.create(SERVICES, body, ns)
                    log.info("%s/%s: created origin Service %s", ns, meta["name"], r.origin_name)
                except KubeError as exc:
                    if exc.status != 409:
                        raise
                    raise KubeError(409, "Conflict", "created concurrently") from exc
                return
            cur_spec = current.get("spec") or {}
            cur_ports = [
                {k: p[k] for k in ("name", "port", "targetPort", "protocol", "appProtocol") if k in p}
                for p in cur_spec.get("ports") or []
            ]
            if cur_spec.get("selector") == selector and cur_ports == ports:
                return
            body = dict(current)
            body["spec"] = dict(cur_spec, selector=selector, ports=ports)
            await self.kube.replace(SERVICES, r.origin_name, body, ns)
            log.info("%s/%s: origin Service %s follows the public Service", ns, meta["name"], r.origin_name)

        await retry_on_conflict(attempt)
