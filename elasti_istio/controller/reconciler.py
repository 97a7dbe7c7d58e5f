"""Reconciles one ElastiService in three steps: :meth:`Reconciler.observe` reads the target, Service,
DestinationRules and VirtualServices (every read, no write); :func:`decide.decide` says what to write
(pure); :meth:`Reconciler.act` writes it; then one status write and the Events of what changed
(:func:`decide.report`, pure).

Everything it decides is derived from the cluster (the VirtualServices carry their own restore data),
so a controller restarted at any point converges; what it keeps between reconciles is one record per
ElastiService (:mod:`memory`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from elasti_istio import routekey, vsrewrite
from elasti_istio.controller import conditions as C
from elasti_istio.controller import decide, metrics, triggers, vspatch
from elasti_istio.controller import spec as es_spec
from elasti_istio.controller.config import ControllerConfig
from elasti_istio.controller.drlookup import rules_for
from elasti_istio.controller.events import Recorder
from elasti_istio.controller.indexes import Indexes, Key, es_key, split_key
from elasti_istio.controller.memory import Memories
from elasti_istio.controller.ratelimit import TokenBucket
from elasti_istio.controller.workloads import (
    WORKLOAD_RESOURCES,
    WorkloadState,
    origin_selector,
    owns_whole_service,
    scaled_object_target,
    target_subsets,
    workload_state,
)
from elasti_istio.controller.world import (
    HOLD_UNTIL,
    KEDA_PAUSED,
    KEDA_PAUSED_REPLICAS,
    PAUSED_BY_US,
    Blocked,
    Outcome,
    Plan,
    Resolved,
    World,
    keda_owner_pause,
)
from elasti_istio.kube import Kube, KubeError
from elasti_istio.kube.client import JSON_PATCH, retry_on_conflict
from elasti_istio.resources import (
    DEPLOYMENTS,
    DESTINATIONRULES,
    ELASTISERVICES,
    ENDPOINTSLICES_V1,
    GROUP,
    PODS,
    REPLICASETS,
    SCALEDOBJECTS,
    SERVICES,
    STATEFULSETS,
    VIRTUALSERVICES,
)

__all__ = ["Blocked", "Reconciler", "Resolved", "keda_owner_pause"]

log = logging.getLogger("elasti.controller")

FINALIZER = f"{GROUP}/finalizer"
MANAGED_LABEL = f"{GROUP}/elastiservice"
# Before routes go back to a woken target: how often its Service's EndpointSlices are looked at, and
# for how long at most (seconds).
ENDPOINTS_POLL = decide.ENDPOINTS_POLL
ENDPOINTS_WAIT = 10.0
# After a deleted ElastiService's routes are restored: how long its origin Service stays for the
# forwards of requests the activators released (seconds).
ORIGIN_GRACE = 2.0


class Reconciler:
    def __init__(self, kube: Kube, cfg: ControllerConfig, indexes: Indexes, recorder: Recorder) -> None:
        self.kube = kube
        self.cfg = cfg
        self.idx = indexes
        self.recorder = recorder
        self.activator = vsrewrite.ActivatorRef(cfg.activator_host, cfg.activator_port)
        self.route_keys = routekey.KeyFile(cfg.route_key_file) if cfg.route_key_file else None
        self.activator_available: tuple[bool, str, str] = (True, "NotChecked", "")
        self.mem = Memories()
        # Wired by the operator: the work queue's ``add``, and the pod watches' ready-pod counts.
        self.requeue: Callable[[Key], None] = lambda key: None
        self.pod_ready: Mapping[Key, int] = {}
        self.endpoints_forbidden = False
        self._http: aiohttp.ClientSession | None = None
        self.fail_open_bucket = TokenBucket(cfg.fail_open_wakes_per_second, cfg.fail_open_burst)

    def lock(self, key: Key) -> asyncio.Lock:
        """One writer per ElastiService at a time (never two different ones): a reconcile, a wake and a
        sleep of it run one after the other, and each reads what it decides on after taking the lock, so
        no decision comes from reads older than the last write another one made."""
        return self.mem[key].lock

    def saw_target_event(self, key: Key, when: float) -> None:
        """A target event the next switch answers (the switch latency metric starts here)."""
        rec = self.mem[key]
        if rec.event_time is None:
            rec.event_time = when

    def saw_scale_to_zero(self, key: Key) -> None:
        """A watch event showed the target going to 0 replicas just now: the next reconcile switches first."""
        self.mem[key].went_to_zero = True

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession()
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    # ---- entry point -------------------------------------------------------------------------
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
            return await self._reconcile(es, begun)
        except Exception:
            metrics.RECONCILE_ERRORS.labels(ns, name).inc()
            raise

    async def proxy_at_once(self, key: Key) -> None:
        """A named shortcut: routes a target just seen going to 0 replicas to the activator before anything
        else is read. It decides nothing new (the target at zero means proxy mode, :func:`decide.desired_mode`).

        Kubernetes takes the target's pods out of the endpoints within tens of milliseconds of that
        same event, and a request routed to the Service meanwhile finds none ("no healthy
        upstream"); the full reconcile, several reads later, would lose that race. This uses what is
        known from the last reconcile (the routing target) and the indexes (the bound
        VirtualServices); the full reconcile that follows checks everything and corrects the rest.
        """
        rec = self.mem[key]
        rec.went_to_zero = False
        cached = rec.routing
        if cached is None or not self.activator_available[0]:
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

    def forget(self, key: Key) -> None:
        ns, name = split_key(key)
        self.idx.forget_es(key)
        self.mem.forget(key)
        metrics.forget(ns, name)

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

    # ---- resolution --------------------------------------------------------------------------
    async def resolve_workload(self, spec: es_spec.ElastiSpec) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
        ns = spec.namespace
        so = None
        kind, name = spec.target.kind, spec.target.name
        if kind == "ScaledObject":
            so = await self.kube.get_or_none(SCALEDOBJECTS, name, ns)
            if so is None:
                raise Blocked(C.TARGET_FOUND, "TargetNotFound", f"ScaledObject {name} not found in namespace {ns}")
            kind, _, name = scaled_object_target(so)
            if kind not in WORKLOAD_RESOURCES:
                raise Blocked(
                    C.TARGET_FOUND,
                    "UnsupportedKind",
                    f"ScaledObject {spec.target.name} scales a {kind}, which elasti-istio cannot wake",
                )
        elif spec.autoscaler_type == "keda" and spec.autoscaler_name:
            so = await self.kube.get_or_none(SCALEDOBJECTS, spec.autoscaler_name, ns)
        workload = await self.kube.get_or_none(WORKLOAD_RESOURCES[kind], name, ns)
        targets = {(ns, kind, name), (ns, spec.target.kind, spec.target.name)}
        if spec.autoscaler_type == "keda" and spec.autoscaler_name:
            targets.add((ns, "ScaledObject", spec.autoscaler_name))
        self.idx.set_resolved_targets(spec.key, targets)
        if workload is None:
            via = f" (scaled by ScaledObject {spec.target.name})" if spec.target.kind == "ScaledObject" else ""
            raise Blocked(C.TARGET_FOUND, "TargetNotFound", f"{kind} {name}{via} not found in namespace {ns}")
        return kind, workload, so

    async def resolve(self, es: dict[str, Any]) -> Resolved:
        try:
            spec = es_spec.parse(es)
        except es_spec.SpecError as exc:
            raise Blocked(C.TARGET_FOUND, exc.reason, exc.message) from exc
        kind, workload, so = await self.resolve_workload(spec)
        state = workload_state(kind, workload)
        seen = self.pod_ready.get(es_key(spec.namespace, spec.name), 0)
        if seen > state.ready and not state.at_zero:  # the pods are ahead of the workload's status
            state = dataclasses.replace(state, ready=seen)
        ns = spec.namespace
        service = await self.kube.get_or_none(SERVICES, spec.service, ns)
        if service is None:
            raise Blocked("ServiceFound", "ServiceNotFound", f"Service {spec.service} not found in namespace {ns}")
        ports = (service.get("spec") or {}).get("ports") or []
        if not ports:
            raise Blocked("ServiceFound", "ServiceHasNoPorts", f"Service {spec.service} has no ports")
        port = ports[0]
        if spec.port is not None:
            match = [p for p in ports if p.get("port") == spec.port or p.get("name") == spec.port]
            if not match:
                names = ", ".join(f"{p.get('name') or '-'}:{p.get('port')}" for p in ports)
                raise Blocked(
                    "ServiceFound", "PortNotFound", f"Service {spec.service} has no port {spec.port!r} (it has {names})"
                )
            port = match[0]
        target, subset_labels, targets = await self.routing_target(spec, state, service)
        return Resolved(
            spec=spec,
            workload_kind=kind,
            workload=workload,
            state=state,
            scaled_object=so,
            service=service,
            origin_name=es_spec.origin_service_name(spec.name),
            origin_port=int(port["port"]),
            target=target,
            subset_labels=subset_labels,
            targets=targets,
        )

    async def routing_target(
        self, spec: es_spec.ElastiSpec, state: WorkloadState, service: dict[str, Any]
    ) -> tuple[vsrewrite.Target, dict[str, dict[str, str]], dict[str, vsrewrite.Target]]:
        """Which destinations are the target's, per namespace of its bound VirtualServices: subsets (of
        the DestinationRules Istio applies there, :mod:`drlookup`) whose labels select its pods, and
        whether a destination without subset is all its own. Cached until DestinationRules or
        workloads change."""
        ns = spec.namespace
        root = self.cfg.istio_root_namespace
        vs_namespaces = sorted({vns for vns, _ in self.idx.bound_vs(spec.key)} | {ns})
        spaces = sorted({*vs_namespaces, root})
        labels_key = tuple(sorted(state.template_labels.items()))
        sel = (service.get("spec") or {}).get("selector") or {}
        gens = tuple(self.idx.routing_generation[s] for s in spaces)
        key_gen = self.route_keys.generation if self.route_keys is not None else 0
        cache_key = (gens, key_gen, tuple(spaces), labels_key, tuple(sorted(sel.items())), spec.service)
        rec = self.mem[spec.key]
        cached = rec.routing
        if cached and cached[0] == hash(cache_key):
            return cached[1]  # type: ignore[no-any-return]
        probe = vsrewrite.Target(namespace=ns, name=spec.name, service=spec.service, whole_service=True)
        rules: dict[str, list[dict[str, Any]]] = {}
        for space in spaces:
            try:
                rules[space] = (await self.kube.list(DESTINATIONRULES, space)).get("items") or []
            except KubeError as exc:
                if exc.status not in (403, 404) or space == ns:
                    raise
                rules[space] = []  # not readable with this install's RBAC: as if it had none
        workloads: list[tuple[str, dict[str, Any]]] = []
        for kind, res in (("Deployment", DEPLOYMENTS), ("StatefulSet", STATEFULSETS), ("ReplicaSet", REPLICASETS)):
            workloads.extend((kind, o) for o in (await self.kube.list(res, ns)).get("items") or [])
        whole = owns_whole_service(sel, state.kind, state.name, workloads, self.idx.elastic_targets(ns))

        def is_service(host: str, dr_ns: str) -> bool:
            return vsrewrite.matches(host, None, dr_ns, probe, self.cfg.cluster_domain)

        token = self.route_keys.token(ns, spec.name) if self.route_keys is not None else None
        targets: dict[str, vsrewrite.Target] = {}
        labels_by_ns: dict[str, dict[str, dict[str, str]]] = {}
        for vns in vs_namespaces:
            drs = rules_for(vns, ns, root, rules, is_service)
            subsets, labels_by_ns[vns] = target_subsets(drs, lambda _h, _n: True, state.template_labels)
            targets[vns] = vsrewrite.Target(
                namespace=ns, name=spec.name, service=spec.service, subsets=subsets, whole_service=whole, token=token
            )
        result = (targets[ns], labels_by_ns[ns], targets)
        rec.routing = (hash(cache_key), result)
        return result

    # ---- the reconcile: observe, decide, act, report --------------------------------------
    async def _reconcile(self, es: dict[str, Any], begun: float) -> float | None:
        """``begun``: when this reconcile started reading (see the switch timing in :meth:`act`)."""
        world = await self.observe(es)
        plan = decide.decide(world)
        outcome = await self.act(world, plan, begun)
        status, memory, events = decide.report(world, plan, outcome)
        self.mem[world.key].keep(memory)
        baseline = world.status
        if plan.release_ready is not None:
            baseline["readyReplicas"] = plan.release_ready  # written before the routes moved
        await self.write_status(es, baseline, status)
        for event in events:
            if event.type == "Warning":
                log.warning("%s: %s", world.key, event.message)
            self.recorder.emit(es, event.type, event.reason, event.message)
        old_phase = world.status.get("phase")
        if plan.phase is not None and plan.phase != old_phase and world.r is not None:
            metrics.TRANSITIONS.labels(world.r.spec.namespace, world.r.spec.name, plan.phase).inc()
            log.info("%s: phase %s -> %s", world.key, old_phase or "-", plan.phase)
        return decide.sooner(plan.requeue, outcome.requeue)

    async def observe(self, es: dict[str, Any]) -> World:
        """Every read a reconcile decides on; no write (the routing target is cached in memory)."""
        meta = es["metadata"]
        key = es_key(meta["namespace"], meta["name"])
        rec = self.mem[key]
        base = World(
            key=key,
            es=es,
            now=dt.datetime.now(dt.UTC),
            activator=self.activator_available,
            memory=rec.snapshot(),
            cluster_domain=self.cfg.cluster_domain,
            activator_ref=self.activator,
        )
        try:
            r = await self.resolve(es)
        except Blocked as blk:
            touched = frozenset(self.idx.bound_vs(key) | self.idx.vs_with_restore(key))
            return dataclasses.replace(base, blocked=blk, touched=touched)
        refs = frozenset(self.idx.bound_vs(key))
        vss: dict[tuple[str, str], dict[str, Any]] = {}
        for vns, vname in sorted(refs):
            vs = await self.kube.get_or_none(VIRTUALSERVICES, vname, vns)
            if vs is not None:
                vss[(vns, vname)] = vs
        stale = tuple(sorted(self.idx.vs_with_restore(key) - set(vss)))
        world = dataclasses.replace(base, r=r, refs=refs, vss=vss, stale=stale)
        state = r.state
        if state.at_zero:
            selector = origin_selector(state, (r.service.get("spec") or {}).get("selector") or {}, r.subset_labels)
            world = dataclasses.replace(world, pods_left=await self.count_pods(r.spec.namespace, selector))
        elif state.ready >= 1 and world.activator[0] and not world.memory.sleeping:
            if decide.proxied(world, decide.classify(world)[0]):  # only then is the EndpointSlice awaited
                world = dataclasses.replace(world, endpoints_listed=await self.endpoints_listed(key, r))
        return world

    async def act(self, w: World, plan: Plan, begun: float) -> Outcome:
        """The plan's writes, in order: routes for a blocked ElastiService back to serve; else the origin
        Service, stale routes back to serve, an expired KEDA hold lifted, a wake, readyReplicas (the
        activators release on it) and then the routes."""
        es, key, rec = w.es, w.key, self.mem[w.key]
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

    # ---- writes ------------------------------------------------------------------------------
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

    async def endpoints_listed(self, key: Key, r: Resolved) -> bool:
        """Whether the public Service's EndpointSlices list a ready endpoint that is a pod of the target.

        True also when they cannot be read (no permission: the switch then follows pod readiness
        alone) and once ``ENDPOINTS_WAIT`` has passed since the first look (a Service that does not
        select the target's pods must not keep its routes on the activator forever).
        """
        spec, state = r.spec, r.state
        rec = self.mem[key]
        if rec.endpoints_wait is None:
            rec.endpoints_wait = time.monotonic()
        since = rec.endpoints_wait
        if time.monotonic() - since > ENDPOINTS_WAIT:
            log.warning(
                "%s: no EndpointSlice of Service %s lists a ready pod of %s %s after %.0fs; routes go back anyway",
                key, spec.service, state.kind, state.name, ENDPOINTS_WAIT,
            )  # fmt: skip
            return True
        selector = origin_selector(state, (r.service.get("spec") or {}).get("selector") or {}, r.subset_labels)
        try:
            slices = await self.kube.list(
                ENDPOINTSLICES_V1, spec.namespace, labelSelector=f"kubernetes.io/service-name={spec.service}"
            )
            sel = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
            pods = await self.kube.list(PODS, spec.namespace, labelSelector=sel) if sel else {}
        except KubeError as exc:
            if exc.status != 403:
                raise
            if not self.endpoints_forbidden:
                self.endpoints_forbidden = True
                log.warning("cannot read EndpointSlices (%s): routes go back on pod readiness alone", exc.message)
            return True
        names = {p["metadata"]["name"] for p in pods.get("items") or []}
        for eps in slices.get("items") or []:
            for ep in eps.get("endpoints") or []:
                ref = ep.get("targetRef") or {}
                ready = (ep.get("conditions") or {}).get("ready")
                if ready is not False and ref.get("kind") == "Pod" and ref.get("name") in names:
                    return True
        return False

    async def count_pods(self, namespace: str, selector: dict[str, str]) -> int:
        if not selector:
            return 0
        sel = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        pods = await self.kube.list(PODS, namespace, labelSelector=sel)
        return len(pods.get("items") or [])

    # ---- waking ------------------------------------------------------------------------------
    async def scale_up(self, es: dict[str, Any], r: Resolved, reason: str, why: str) -> bool:
        """Scales the target to minTargetReplicas (never down); True when a scale call was made.

        A ScaledObject its owner paused below that (KEDA's pause: maintenance, or keeping a workload off)
        is left as it is and the target is not scaled (False; the ``WakeFailed`` condition says why)."""
        spec = r.spec
        key = spec.key
        if self.owner_paused(r):
            return False
        await self.unpause_keda(r)
        res = WORKLOAD_RESOURCES[r.workload_kind]
        if r.scaled_object is not None and r.state.at_zero:
            await self.hold_keda(r)
        name = r.state.name
        try:
            scale = await self.kube.get(res, name, spec.namespace, sub="scale")
            current = int((scale.get("spec") or {}).get("replicas") or 0)
            if current >= spec.min_replicas:
                return False
            await self.kube.patch(res, name, {"spec": {"replicas": spec.min_replicas}}, spec.namespace, sub="scale")
        except KubeError as exc:
            if exc.status < 500:  # refused, not a passing server failure
                msg = f"scaling {r.workload_kind} {name} to {spec.min_replicas} was refused: {exc.message}"
                self.mem[key].wake_failure = ("ScaleRefused", msg)
            raise
        rec = self.mem[key]
        rec.wake_failure, rec.waking, rec.last_wake = None, True, C.now_iso()
        self.recorder.emit(
            es, "Normal", reason, f"{why}: {r.workload_kind} {name} scaled {current} -> {spec.min_replicas}"
        )
        log.info("%s: %s: %s %s scaled %d -> %d", key, reason, r.workload_kind, name, current, spec.min_replicas)
        return True

    def owner_paused(self, r: Resolved) -> str | None:
        """Why the target may not be woken: its ScaledObject paused by its owner below minTargetReplicas
        (recorded as the wake's failure); None when it may."""
        owner_pause = keda_owner_pause(r.scaled_object)
        if owner_pause is None or r.state.replicas >= r.spec.min_replicas:
            return None
        so_name = ((r.scaled_object or {}).get("metadata") or {}).get("name", "")
        msg = (
            f"ScaledObject {so_name} is paused by its owner ({owner_pause}): {r.workload_kind} {r.state.name} "
            "is not woken and held requests are answered 503; remove the pause to let traffic wake it"
        )
        self.mem[r.spec.key].wake_failure = ("PausedByOwner", msg)
        return msg

    async def unpause_keda(self, r: Resolved) -> None:
        """Removes the KEDA pause annotations this controller set, so KEDA resumes from the woken count."""
        so = r.scaled_object
        if so is None:
            return
        ann = (so.get("metadata") or {}).get("annotations") or {}
        if PAUSED_BY_US not in ann:
            return
        patch = {
            "metadata": {
                "annotations": {KEDA_PAUSED_REPLICAS: None, KEDA_PAUSED: None, PAUSED_BY_US: None, HOLD_UNTIL: None}
            }
        }
        await self.kube.patch(SCALEDOBJECTS, so["metadata"]["name"], patch, r.spec.namespace)
        log.info("%s: removed the KEDA pause from ScaledObject %s", r.spec.key, so["metadata"]["name"])

    async def hold_keda(self, r: Resolved) -> None:
        """KEDA owns 1 -> 0 (``minReplicaCount: 0``): right after a wake its metrics are still empty and it
        would scale the target back to zero. Pause it at the woken count for ``wakeHoldSeconds``; the
        deadline lives on the ScaledObject so a restarted controller still lifts it."""
        so = r.scaled_object
        if so is None or int((so.get("spec") or {}).get("minReplicaCount") or 0) > 0:
            return
        if r.spec.wake_hold_seconds <= 0 or keda_owner_pause(so) is not None:
            return
        until = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=r.spec.wake_hold_seconds)
        patch = {
            "metadata": {
                "annotations": {
                    KEDA_PAUSED_REPLICAS: str(r.spec.min_replicas),
                    PAUSED_BY_US: "wake-hold",
                    HOLD_UNTIL: until.strftime("%Y-%m-%dT%H:%M:%SZ"),
                }
            }
        }
        await self.kube.patch(SCALEDOBJECTS, so["metadata"]["name"], patch, r.spec.namespace)
        log.info(
            "%s: ScaledObject %s paused at %d for %gs after the wake",
            r.spec.key,
            so["metadata"]["name"],
            r.spec.min_replicas,
            r.spec.wake_hold_seconds,
        )

    async def pause_keda_at_zero(self, r: Resolved) -> None:
        """elasti owns 1 -> 0 (``minReplicaCount`` >= 1): before its own scale-down it pauses KEDA at 0,
        which KEDA documents as pinning the target there; the wake removes the pause."""
        so = r.scaled_object
        if so is None or int((so.get("spec") or {}).get("minReplicaCount") or 0) == 0:
            return
        if keda_owner_pause(so) is not None:
            return  # the owner's pause is theirs: never rewritten, never removed
        patch = {"metadata": {"annotations": {KEDA_PAUSED_REPLICAS: "0", PAUSED_BY_US: "sleep", HOLD_UNTIL: None}}}
        await self.kube.patch(SCALEDOBJECTS, so["metadata"]["name"], patch, r.spec.namespace)

    # ---- scale-down by the controller ----------------------------------------------------------
    async def sleep(self, namespace: str, name: str, reason: str, why: str) -> str:
        """Routes to the activator first, then the target to zero (never the other way round)."""
        key = es_key(namespace, name)
        async with self.lock(key):
            es = await self.kube.get_or_none(ELASTISERVICES, name, namespace)
            if es is None:
                raise LookupError(f"ElastiService {namespace}/{name} not found")
            r = await self.resolve(es)
            if not self.activator_available[0]:
                raise Blocked(
                    C.ACTIVATOR,
                    "ActivatorUnavailable",
                    f"not scaling {r.workload_kind} {r.state.name} to zero: {self.activator_available[2]}",
                )
            if r.state.at_zero:
                return "ScaledToZero"
            allowed = decide.period_allows(r.spec, dt.datetime.now(dt.UTC))
            if allowed is False or isinstance(allowed, str):
                raise Blocked(
                    C.ALLOWED,
                    "OutsideEnabledPeriod" if allowed is False else "InvalidSchedule",
                    "scale to zero is not allowed now (enabledPeriod)",
                )
            routing = [vk for vk in sorted(self.idx.bound_vs(key))]
            self.mem[key].sleeping = True
            try:
                for vk in routing:
                    await self.switch_vs(vk, r.target_for(vk[0]), "proxy", key)
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

    # ---- deletion ----------------------------------------------------------------------------
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
        waiting = r is not None and (es.get("status") or {}).get("mode") == "proxy" and self.activator_available[0]
        if r is not None and waiting:
            began = C.parse_time(meta.get("deletionTimestamp") or "") or dt.datetime.now(dt.UTC)
            left = r.spec.hold_timeout - (dt.datetime.now(dt.UTC) - began).total_seconds()
            if r.state.at_zero and left > 0:
                await self.scale_up(
                    es, r, reason="WokenOnDelete", why="the ElastiService is being deleted, so its target is woken"
                )
                return min(0.5, left)
            if r.state.ready >= 1 and (es.get("status") or {}).get("readyReplicas") != r.state.ready:
                await self.patch_status(es, {"readyReplicas": r.state.ready})  # the activators release on it
            if left > 0 and r.state.ready == 0:
                return min(0.5, left)  # held requests wait, new ones are held too; pod events come sooner
            if left > 0 and not await self.endpoints_listed(key, r):
                return min(ENDPOINTS_POLL, left)
            if r.state.ready == 0:
                self.recorder.emit(
                    es,
                    "Warning",
                    "RestoredWithoutReadyReplica",
                    f"{r.workload_kind} {r.state.name} had no ready replica within holdTimeout "
                    f"({r.spec.hold_timeout:g}s) of the deletion: routes restored to the Service; the "
                    "activator answered the requests it held 504",
                )
        restored = await self.restore_all(key, es, r)
        if r is not None:
            if r.state.at_zero:
                await self.scale_up(
                    es, r, reason="WokenOnDelete", why="the ElastiService is being deleted, so its target is woken"
                )
        if waiting:
            rec = self.mem[key]
            if rec.finalize_restored is None:
                rec.finalize_restored = time.monotonic()
            since = rec.finalize_restored
            grace = ORIGIN_GRACE - (time.monotonic() - since)
            if grace > 0:
                return grace  # forwards of released requests still use the origin Service
        await self.kube.delete(SERVICES, es_spec.origin_service_name(meta["name"]), meta["namespace"])
        self.recorder.emit(
            es, "Normal", "Finalized", f"restored {len(restored)} VirtualService(s) and removed the origin Service"
        )
        await self.recorder.flush(2.0)

        async def drop() -> None:
            cur = await self.kube.get_or_none(ELASTISERVICES, meta["name"], meta["namespace"])
            if cur is None:
                return
            fins = [f for f in cur["metadata"].get("finalizers") or [] if f != FINALIZER]
            await self.kube.patch(
                ELASTISERVICES,
                meta["name"],
                {"metadata": {"finalizers": fins or None, "resourceVersion": cur["metadata"]["resourceVersion"]}},
                meta["namespace"],
            )

        await retry_on_conflict(drop)
        log.info("%s: finalized", key)
        self.forget(key)
        return None

    # ---- helpers for the wake server ---------------------------------------------------------
    async def wake(self, namespace: str, name: str) -> str:
        """Scales the target up if it is below minTargetReplicas; returns the resulting phase.

        Raises LookupError when the ElastiService does not exist and Blocked/KubeError when the target
        cannot be woken (a condition and an Event say so too).
        """
        async with self.lock(es_key(namespace, name)):
            return await self._wake(namespace, name)

    async def _wake(self, namespace: str, name: str) -> str:
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
            scaled = await self.scale_up(es, r, reason="Woken", why="a request arrived for the sleeping target")
        except KubeError:
            metrics.WAKES.labels(namespace, name, "failed").inc()
            asyncio.get_running_loop().call_soon(self.requeue, key)
            raise
        metrics.WAKES.labels(namespace, name, "scaled" if scaled else "already_awake").inc()
        if scaled:
            self.saw_target_event(key, time.monotonic())
        self.requeue(key)
        if scaled or r.state.ready == 0:
            return "ScalingUp"
        return "Serving"
