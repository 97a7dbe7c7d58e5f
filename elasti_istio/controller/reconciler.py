"""Reconciles one ElastiService: reads the target, Service, DestinationRules and VirtualServices from
the API server, decides the routing mode, applies it, and writes a status that tells the truth.

Everything it decides is derived from the cluster (the VirtualServices carry their own restore data),
so a controller restarted at any point converges without memory of what it was doing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import time
from typing import Any

import aiohttp

from elasti_istio import duration, routekey, vsrewrite
from elasti_istio.controller import conditions as C
from elasti_istio.controller import metrics, schedule, triggers, vspatch
from elasti_istio.controller import spec as es_spec
from elasti_istio.controller.config import ControllerConfig
from elasti_istio.controller.drlookup import rules_for
from elasti_istio.controller.events import Recorder
from elasti_istio.controller.indexes import Indexes, Key, es_key, split_key
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
from elasti_istio.kube import Kube, KubeError
from elasti_istio.kube.client import JSON_PATCH, retry_on_conflict
from elasti_istio.resources import (
    ANN_BIND,
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

log = logging.getLogger("elasti.controller")

FINALIZER = f"{GROUP}/finalizer"
KEDA_PAUSED_REPLICAS = "autoscaling.keda.sh/paused-replicas"
KEDA_PAUSED = "autoscaling.keda.sh/paused"
PAUSED_BY_US = f"{GROUP}/paused-keda"
HOLD_UNTIL = f"{GROUP}/wake-hold-until"
MANAGED_LABEL = f"{GROUP}/elastiservice"
# Before routes go back to a woken target: how often its Service's EndpointSlices are looked at, and
# for how long at most (seconds).
ENDPOINTS_POLL = 0.05
ENDPOINTS_WAIT = 10.0
# After a deleted ElastiService's routes are restored: how long its origin Service stays for the
# forwards of requests the activators released (seconds).
ORIGIN_GRACE = 2.0


def keda_owner_pause(so: dict[str, Any] | None) -> str | None:
    """The pause annotations of a ScaledObject its owner set (not this controller), as ``k=v`` text; None
    when it is not paused, or paused by this controller."""
    ann = ((so or {}).get("metadata") or {}).get("annotations") or {}
    if PAUSED_BY_US in ann:
        return None
    found = [f"{k}={ann[k]}" for k in (KEDA_PAUSED_REPLICAS, KEDA_PAUSED) if k in ann]
    if KEDA_PAUSED in ann and KEDA_PAUSED_REPLICAS not in ann and str(ann[KEDA_PAUSED]).lower() != "true":
        return None  # "paused: false" is KEDA's way to unpause
    return ", ".join(found) or None


class Blocked(Exception):
    """The ElastiService cannot be acted on as it stands; a condition says why."""

    def __init__(self, ctype: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.ctype, self.reason, self.message = ctype, reason, message


@dataclasses.dataclass
class Resolved:
    """What a reconcile found out about an ElastiService's world."""

    spec: es_spec.ElastiSpec
    workload_kind: str
    workload: dict[str, Any]
    state: WorkloadState
    scaled_object: dict[str, Any] | None
    service: dict[str, Any]
    origin_name: str
    origin_port: int
    target: vsrewrite.Target  # as a VirtualService in the ElastiService's namespace sees it
    subset_labels: dict[str, dict[str, str]]
    targets: dict[str, vsrewrite.Target] = dataclasses.field(default_factory=dict)  # by VirtualService namespace

    def target_for(self, vs_namespace: str) -> vsrewrite.Target:
        """The target as routes in ``vs_namespace`` see it: their subsets come from the DestinationRules
        Istio applies for a client there."""
        return self.targets.get(vs_namespace, self.target)


class Reconciler:
    def __init__(self, kube: Kube, cfg: ControllerConfig, indexes: Indexes, recorder: Recorder) -> None:
        self.kube = kube
        self.cfg = cfg
        self.idx = indexes
        self.recorder = recorder
        self.activator = vsrewrite.ActivatorRef(cfg.activator_host, cfg.activator_port)
        self.route_keys = routekey.KeyFile(cfg.route_key_file) if cfg.route_key_file else None
        self.activator_available: tuple[bool, str, str] = (True, "NotChecked", "")
        self.event_time: dict[Key, float] = {}
        self.last_wake: dict[Key, str] = {}
        self.wake_failure: dict[Key, tuple[str, str]] = {}
        self.waking: set[Key] = set()
        # Targets a watch event showed going to 0 replicas, and when their routes were switched early.
        self.went_to_zero: set[Key] = set()
        self.pod_ready: dict[Key, int] = {}  # ready pods of waking targets, from the pod watches
        self.endpoints_wait: dict[Key, float] = {}  # since when routes wait for the target's endpoints
        self.finalize_restored: dict[Key, float] = {}  # a deleted ElastiService: when its routes were restored
        self.endpoints_forbidden = False
        self.switched_early: dict[Key, float] = {}
        self._routing_cache: dict[Key, tuple[int, Any]] = {}
        self._reported: dict[tuple[Key, str], tuple[str, str]] = {}
        self.sleeping: set[Key] = set()
        self.trigger_state: dict[Key, tuple[bool, str, str]] = {}
        self._locks: dict[Key, asyncio.Lock] = {}
        self._http: aiohttp.ClientSession | None = None
        self.fail_open_bucket = TokenBucket(cfg.fail_open_wakes_per_second, cfg.fail_open_burst)

    def lock(self, key: Key) -> asyncio.Lock:
        """One writer per ElastiService at a time (never two different ones): a reconcile, a wake and a
        sleep of it run one after the other, and each reads what it decides on after taking the lock, so
        no decision comes from reads older than the last write another one made."""
        lk = self._locks.get(key)
        if lk is None:
            lk = self._locks[key] = asyncio.Lock()
        return lk

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
            if key in self.went_to_zero:
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
        """Routes a target just seen going to 0 replicas to the activator before anything else is read.

        Kubernetes takes the target's pods out of the endpoints within tens of milliseconds of that
        same event, and a request routed to the Service meanwhile finds none ("no healthy
        upstream"); the full reconcile, several reads later, would lose that race. This uses what is
        known from the last reconcile (the routing target) and the indexes (the bound
        VirtualServices); the full reconcile that follows checks everything and corrects the rest.
        """
        self.went_to_zero.discard(key)
        cached = self._routing_cache.get(key)
        if cached is None or not self.activator_available[0]:
            return
        target, _labels, targets = cached[1]
        for vk in sorted(self.idx.bound_vs(key)):
            try:
                vs_target = targets.get(vk[0], target)
                if await self.switch_vs(vk, vs_target, "proxy", key, cached=self.idx.vs_objects.get(vk)):
                    self.switched_early[key] = time.monotonic()
            except Exception as exc:  # the full reconcile retries with fresh data
                log.debug("%s: early switch of %s/%s failed: %s", key, vk[0], vk[1], exc)

    async def release_at_once(self, key: Key, ready: int, delay: float = 0.0) -> None:
        """Tells the activators that a target just got its first ready replica, before anything else is
        read: they release the held requests on ``status.readyReplicas``, and every read the full
        reconcile makes first would be added to each held request's wait. The full reconcile that
        follows checks everything and writes the rest of the status."""
        ns, name = split_key(key)
        if delay:
            await asyncio.sleep(delay)
        try:
            await self.kube.patch(ELASTISERVICES, name, {"status": {"readyReplicas": ready}}, ns, sub="status")
        except (KubeError, OSError) as exc:  # the full reconcile writes it too
            log.debug("%s: early readyReplicas write failed: %s", key, exc)
            self._requeue(key)

    def forget(self, key: Key) -> None:
        ns, name = split_key(key)
        self.idx.forget_es(key)
        for d in (
            self.event_time,
            self.last_wake,
            self.wake_failure,
            self._routing_cache,
            self.trigger_state,
            self._locks,
            self.endpoints_wait,
            self.finalize_restored,
        ):
            d.pop(key, None)  # type: ignore[attr-defined]
        self.waking.discard(key)
        self.sleeping.discard(key)
        self.went_to_zero.discard(key)
        self.switched_early.pop(key, None)
        self._reported = {k: v for k, v in self._reported.items() if k[0] != key}
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
        cached = self._routing_cache.get(spec.key)
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
        self._routing_cache[spec.key] = (hash(cache_key), result)
        return result

    # ---- the reconcile -----------------------------------------------------------------------
    async def _reconcile(self, es: dict[str, Any], begun: float) -> float | None:
        """``begun``: when this reconcile started reading (see the switch timing below)."""
        meta = es["metadata"]
        key = es_key(meta["namespace"], meta["name"])
        status = dict(es.get("status") or {})
        conds: list[dict[str, Any]] = list(status.get("conditions") or [])
        requeue: float | None = None
        try:
            r = await self.resolve(es)
        except Blocked as blk:
            # Nothing can be woken or proxied: make sure no route points at the activator.
            restored = await self.restore_all(key, es)
            conds = self._problem(es, conds, blk.ctype, blk.reason, blk.message)
            if blk.ctype == "ServiceFound":
                conds = C.set_condition(conds, C.TARGET_FOUND, True, "TargetFound", "scale target found")
            conds = C.set_condition(conds, C.READY, False, blk.reason, blk.message)
            new_status = dict(
                status,
                mode="serve",
                conditions=conds,
                observedGeneration=meta.get("generation"),
                boundVirtualServices=sorted(f"{a}/{b}" for a, b in restored),
            )
            new_status.pop("origin", None)
            await self.write_status(es, status, new_status)
            return None

        spec, state = r.spec, r.state
        conds = C.set_condition(
            conds,
            C.TARGET_FOUND,
            True,
            "TargetFound",
            f"{r.workload_kind} {state.name}"
            + (f" via ScaledObject {spec.target.name}" if spec.target.kind == "ScaledObject" else ""),
        )
        conds = C.set_condition(
            conds, "ServiceFound", True, "ServiceFound", f"Service {spec.service}, port {r.origin_port}"
        )
        await self.ensure_origin_service(es, r)

        # Bound VirtualServices, read fresh.
        refs = self.idx.bound_vs(key)
        vss: dict[tuple[str, str], dict[str, Any]] = {}
        missing: list[str] = []
        for vns, vname in sorted(refs):
            vs = await self.kube.get_or_none(VIRTUALSERVICES, vname, vns)
            if vs is None:
                missing.append(f"{vns}/{vname}")
            else:
                vss[(vns, vname)] = vs
        # VirtualServices holding our restore data that are no longer bound go back to serve mode.
        for stale in sorted(self.idx.vs_with_restore(key) - set(vss)):
            await self.switch_vs(stale, r.target_for(stale[0]), "serve", key)

        routing = {
            k: v
            for k, v in vss.items()
            if vsrewrite.routes_to(v.get("spec") or {}, k[0], r.target_for(k[0]), self.cfg.cluster_domain)
            or vsrewrite.is_proxied(v.get("spec") or {}, r.target_for(k[0]), self.activator)
        }
        # A Service shared with other workloads, routed without a subset: bound, the destination just is not
        # this target's alone (it follows the workloads that serve it, or the first target at zero).
        shared = {
            k
            for k, v in vss.items()
            if k not in routing
            and vsrewrite.routes_to(
                v.get("spec") or {},
                k[0],
                dataclasses.replace(r.target_for(k[0]), whole_service=True),
                self.cfg.cluster_domain,
            )
        }
        no_route = sorted(f"{a}/{b}" for a, b in set(vss) - set(routing) - shared)
        if missing or no_route or not refs:
            parts = []
            if not refs:
                parts.append(
                    "no VirtualService is bound: list one in spec.virtualServices or annotate it "
                    f"{ANN_BIND}={spec.name}"
                )
            if missing:
                parts.append(f"VirtualService {', '.join(missing)} not found")
            if no_route:
                subset = (
                    f" subset {', '.join(sorted(r.target.subsets))}"
                    if r.target.subsets
                    else (
                        " (without a subset)"
                        if r.target.whole_service
                        else " (no DestinationRule subset selects the target's pods, and the Service also "
                        "selects other workloads)"
                    )
                )
                parts.append(
                    f"VirtualService {', '.join(no_route)} has no http route to Service {spec.service}{subset}"
                )
            reason = "VirtualServiceNotFound" if missing else "NoRouteToTarget" if no_route else "NoVirtualService"
            conds = self._problem(es, conds, C.VS_BOUND, reason, "; ".join(parts))
            requeue = 30.0 if missing else None
        else:
            conds = self._ok(
                es,
                conds,
                C.VS_BOUND,
                "Bound",
                f"{len(routing) + len(shared)} VirtualService(s): "
                + ", ".join(f"{a}/{b}" for a, b in sorted(set(routing) | shared))
                + (
                    f"; Service {spec.service} is shared with other workloads: its destinations without a subset "
                    "go to the activator only when none of them serves (then for the first target at zero, by "
                    "kind and name)"
                    if shared
                    else ""
                ),
            )

        # Route timeouts shorter than the hold time cut held requests.
        short = []
        for (vns, vname), vs in routing.items():
            for field, t in vsrewrite.route_timeouts(
                vs.get("spec") or {}, vns, r.target_for(vns), self.cfg.cluster_domain
            ):
                try:
                    secs = duration.parse_go(t)
                except ValueError:
                    continue
                if secs < spec.hold_timeout:
                    short.append(f"{vns}/{vname} has a route {field} of {t}")
        if short:
            conds = self._problem(
                es,
                conds,
                C.TIMEOUTS,
                "RouteTimeoutShorterThanHold",
                f"{'; '.join(short)}, shorter than activator.holdTimeout "
                f"({spec.hold_timeout:g}s): held requests are cut by the mesh first",
            )
        else:
            conds = C.set_condition(
                conds, C.TIMEOUTS, True, "Compatible", "no route timeout is shorter than the hold timeout"
            )

        # Fail open when the activator cannot take traffic.
        act_ok, act_reason, act_msg = self.activator_available
        if act_ok:
            conds = self._ok(es, conds, C.ACTIVATOR, act_reason, act_msg)
        else:
            conds = self._problem(es, conds, C.ACTIVATOR, act_reason, act_msg)

        # When scale to zero is allowed at all.
        allowed = self.period_allows(spec)
        if allowed is None:
            conds = C.set_condition(conds, C.ALLOWED, True, "Always", "no enabledPeriod: scale to zero at any time")
        elif isinstance(allowed, str):
            conds = self._problem(es, conds, C.ALLOWED, "InvalidSchedule", allowed)
        elif allowed:
            conds = C.set_condition(conds, C.ALLOWED, True, "InEnabledPeriod", "inside enabledPeriod")
        else:
            conds = C.set_condition(
                conds, C.ALLOWED, False, "OutsideEnabledPeriod", "outside enabledPeriod: the target is kept awake"
            )
        if spec.enabled_period is not None:
            requeue = min(requeue or 60.0, 60.0)
        if allowed is False and state.at_zero and act_ok:
            await self.scale_up(
                es, r, reason="OutsideEnabledPeriod", why="scale to zero is not allowed now (enabledPeriod)"
            )

        # KEDA: a wake hold that has run out is lifted, so that KEDA decides again.
        hold_left = await self.lift_expired_keda_hold(r)
        if hold_left:
            requeue = min(requeue or hold_left, hold_left)

        # Idle triggers, as last evaluated.
        if spec.triggers:
            ts = self.trigger_state.get(key)
            if ts is None:
                conds = C.set_condition(conds, C.TRIGGERS, True, "NotEvaluated", "triggers not evaluated yet")
            elif ts[0]:
                conds = self._ok(es, conds, C.TRIGGERS, ts[1], ts[2])
            else:
                conds = self._problem(es, conds, C.TRIGGERS, ts[1], ts[2])
        else:
            conds = [c for c in conds if c["type"] != C.TRIGGERS]

        proxied_now = any(
            vsrewrite.is_proxied(v.get("spec") or {}, r.target_for(k[0]), self.activator) for k, v in routing.items()
        )
        endpoints_listed = True
        if key in self.sleeping and act_ok:
            desired = "proxy"  # our own scale-down: routes go to the activator first
        elif not act_ok:
            desired = "serve"
            if state.at_zero:
                wait = self.fail_open_bucket.take()
                if wait == 0.0:
                    await self.scale_up(
                        es, r, reason="FailOpen", why="the activator is unavailable, so the target is woken"
                    )
                else:
                    metrics.FAIL_OPEN_DEFERRED.labels(spec.namespace, spec.name).inc()
                    self.recorder.emit(
                        es,
                        "Warning",
                        "FailOpenRateLimited",
                        f"the activator is unavailable and many targets are being woken: wakes are limited to "
                        f"{self.cfg.fail_open_wakes_per_second:g}/s (burst {self.cfg.fail_open_burst}); "
                        f"{state.kind} {state.name} is woken in about {wait:.1f}s",
                    )
                    requeue = min(requeue or wait, wait)
        elif state.at_zero:
            desired = "proxy"
        elif state.ready >= 1:
            desired = "serve"
            if proxied_now and not (endpoints_listed := await self.endpoints_listed(key, r)):
                # The mesh learns of a pod from the Service's EndpointSlices (through istiod's debounced
                # push): routes that went back before that would meet "no healthy upstream". Meanwhile
                # the activator forwards the traffic; bounded by ENDPOINTS_WAIT.
                desired = "proxy"
                requeue = min(requeue or ENDPOINTS_POLL, ENDPOINTS_POLL)
        else:
            desired = "proxy" if proxied_now else "serve"
        if desired == "serve":
            self.endpoints_wait.pop(key, None)

        # Release held requests as early as possible: readyReplicas first, routes after.
        if state.ready != status.get("readyReplicas") and state.ready >= 1 and proxied_now:
            await self.patch_status(es, {"readyReplicas": state.ready})
            status["readyReplicas"] = state.ready

        changed = False
        for vk in sorted(routing):
            changed |= await self.switch_vs(vk, r.target_for(vk[0]), desired, key)
        switched_at = time.monotonic()
        early = self.switched_early.pop(key, None)
        if early is not None and desired == "proxy" and not changed:
            changed, switched_at = True, early
        mode = desired if routing else "serve"
        if routing and desired == "proxy":
            # Truth from what the VirtualServices now say.
            mode = "proxy"
        # The target event this switch answers: one this reconcile saw (it came before the reads), or
        # one the switch came after. A later event is left for the next reconcile.
        started = self.event_time.get(key)
        if started is not None and (started <= begun or (changed and started <= switched_at)):
            del self.event_time[key]
        else:
            started = None
        if changed:
            if started is not None:
                metrics.SWITCH_SECONDS.labels(spec.namespace, spec.name, desired).observe(switched_at - started)
            n = len(routing)
            if desired == "proxy":
                self.recorder.emit(
                    es,
                    "Normal",
                    "SwitchedToProxy",
                    f"{state.kind} {state.name} is at 0 replicas: {n} VirtualService(s) route to the activator",
                )
            else:
                self.recorder.emit(
                    es,
                    "Normal",
                    "SwitchedToServe",
                    f"{n} VirtualService(s) route to Service {spec.service} again ({state.ready} ready replica(s))",
                )
            log.info("%s: VirtualServices switched to %s mode", key, desired)

        # Phase.
        pods_left = 0
        if state.at_zero:
            pods_left = await self.count_pods(
                spec.namespace,
                origin_selector(state, (r.service.get("spec") or {}).get("selector") or {}, r.subset_labels),
            )
            if pods_left or state.current:
                requeue = 1.0 if requeue is None else min(requeue, 1.0)
        phase = C.phase_for(state, pods_left)
        if phase == "Serving" and desired == "proxy" and not state.at_zero and not endpoints_listed:
            phase = "ScalingUp"  # ready, but the routes wait for the Service's EndpointSlice to list it

        # Wake outcome.
        failure = self.wake_failure.get(key)
        if failure and failure[0] == "PausedByOwner" and keda_owner_pause(r.scaled_object) is None:
            del self.wake_failure[key]  # the owner lifted the pause: traffic may wake it again
            failure = None
        if failure is None and state.stuck and state.replicas > 0 and state.ready == 0:
            failure = state.stuck
        if failure is not None:
            conds = self._problem(es, conds, C.WAKE_FAILED, failure[0], failure[1], positive=True)
        elif key in self.waking or C.get_condition(conds, C.WAKE_FAILED):
            if state.ready >= 1:
                self.waking.discard(key)
                conds = C.set_condition(
                    conds,
                    C.WAKE_FAILED,
                    False,
                    "Woken",
                    f"{state.kind} {state.name} has {state.ready} ready replica(s)",
                )
            else:
                conds = C.set_condition(
                    conds,
                    C.WAKE_FAILED,
                    False,
                    "Waking",
                    f"waiting for {state.kind} {state.name} to report a ready replica",
                )

        ready_problem = next(
            (c for c in conds if c["type"] in (C.VS_BOUND, C.ACTIVATOR) and c["status"] == "False"), None
        )
        if ready_problem:
            conds = C.set_condition(conds, C.READY, False, ready_problem["reason"], ready_problem["message"])
        else:
            conds = C.set_condition(
                conds,
                C.READY,
                True,
                "Proxying" if mode == "proxy" else "Serving",
                "requests are held by the activator while the target wakes"
                if mode == "proxy"
                else "routes go straight to the target",
            )

        new_status = dict(status)
        new_status.update(
            phase=phase,
            mode=mode,
            readyReplicas=state.ready,
            origin={
                "service": r.origin_name,
                "port": r.origin_port,
                "ports": sorted({int(p["port"]) for p in (r.service.get("spec") or {}).get("ports") or []}),
            },
            boundVirtualServices=sorted(f"{a}/{b}" for a, b in routing),
            observedGeneration=meta.get("generation"),
            conditions=conds,
        )
        if key in self.last_wake:
            new_status["lastWakeTime"] = self.last_wake[key]
        old_phase = status.get("phase")
        if phase != old_phase:
            if phase in ("ScalingToZero", "ScaledToZero") and old_phase not in ("ScalingToZero", "ScaledToZero"):
                new_status["lastScaledToZeroTime"] = C.now_iso()
            if phase == "Serving":
                new_status["awakeSince"] = C.now_iso()
        elif phase == "Serving" and not status.get("awakeSince"):
            new_status["awakeSince"] = C.now_iso()
        await self.write_status(es, status, new_status)
        if phase != old_phase:
            metrics.TRANSITIONS.labels(spec.namespace, spec.name, phase).inc()
            self.recorder.emit(es, "Normal", phase, self._phase_message(phase, state, pods_left))
            log.info("%s: phase %s -> %s", key, old_phase or "-", phase)
        return requeue

    @staticmethod
    def _phase_message(phase: str, state: WorkloadState, pods_left: int) -> str:
        target = f"{state.kind} {state.name}"
        return {
            "Serving": f"{target} has {state.ready} ready replica(s)",
            "ScalingUp": f"{target} is scaling up to {state.replicas} replica(s)",
            "ScalingToZero": f"{target} scaled to 0; {max(pods_left, state.current)} pod(s) still terminating",
            "ScaledToZero": f"{target} has no replica left",
        }[phase]

    def _problem(
        self,
        es: dict[str, Any],
        conds: list[dict[str, Any]],
        ctype: str,
        reason: str,
        message: str,
        positive: bool = False,
    ) -> list[dict[str, Any]]:
        """Sets a failing condition and emits a Warning Event when its reason or message is new."""
        key = es_key(es["metadata"]["namespace"], es["metadata"]["name"])
        if self._reported.get((key, ctype)) != (reason, message):
            self._reported[(key, ctype)] = (reason, message)
            self.recorder.emit(es, "Warning", reason, message)
            log.warning("%s: %s", key, message)
        return C.set_condition(conds, ctype, positive, reason, message)

    def _ok(
        self, es: dict[str, Any], conds: list[dict[str, Any]], ctype: str, reason: str, message: str
    ) -> list[dict[str, Any]]:
        key = es_key(es["metadata"]["namespace"], es["metadata"]["name"])
        self._reported.pop((key, ctype), None)
        return C.set_condition(conds, ctype, True, reason, message)

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
            cached = self._routing_cache.get(key)
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
        since = self.endpoints_wait.setdefault(key, time.monotonic())
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
                self.wake_failure[key] = ("ScaleRefused", msg)
            raise
        self.wake_failure.pop(key, None)
        self.waking.add(key)
        self.last_wake[key] = C.now_iso()
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
        self.wake_failure[r.spec.key] = ("PausedByOwner", msg)
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

    async def lift_expired_keda_hold(self, r: Resolved) -> float | None:
        """Removes a wake hold whose time has come; returns the seconds left of one still running."""
        so = r.scaled_object
        if so is None:
            return None
        ann = (so.get("metadata") or {}).get("annotations") or {}
        if ann.get(PAUSED_BY_US) != "wake-hold" or HOLD_UNTIL not in ann:
            return None
        until = C.parse_time(ann[HOLD_UNTIL])
        left = (until - dt.datetime.now(dt.UTC)).total_seconds() if until else 0.0
        if left > 0:
            return left + 0.5
        await self.unpause_keda(r)
        return None

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

    @staticmethod
    def period_allows(spec: es_spec.ElastiSpec) -> bool | str | None:
        """None: no enabledPeriod; True/False: inside/outside it; a string: why the schedule is invalid."""
        if spec.enabled_period is None:
            return None
        try:
            cron = schedule.parse_cron(spec.enabled_period.schedule)
        except schedule.CronError as exc:
            return f"enabledPeriod.schedule {spec.enabled_period.schedule!r}: {exc}; nothing is scaled by schedule"
        return schedule.in_period(cron, spec.enabled_period.duration, dt.datetime.now(dt.UTC))

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
            allowed = self.period_allows(r.spec)
            if allowed is False or isinstance(allowed, str):
                raise Blocked(
                    C.ALLOWED,
                    "OutsideEnabledPeriod" if allowed is False else "InvalidSchedule",
                    "scale to zero is not allowed now (enabledPeriod)",
                )
            routing = [vk for vk in sorted(self.idx.bound_vs(key))]
            self.sleeping.add(key)
            try:
                for vk in routing:
                    await self.switch_vs(vk, r.target_for(vk[0]), "proxy", key)
                await self.pause_keda_at_zero(r)
                res = WORKLOAD_RESOURCES[r.workload_kind]
                await self.kube.patch(res, r.state.name, {"spec": {"replicas": 0}}, namespace, sub="scale")
            except BaseException:
                self.sleeping.discard(key)
                self._requeue(key)
                raise
            self.sleeping.discard(key)
            self.recorder.emit(
                es,
                "Normal",
                reason,
                f"{why}: routes moved to the activator, then {r.workload_kind} {r.state.name} scaled to 0",
            )
            log.info("%s: %s: %s %s scaled to 0", key, reason, r.workload_kind, r.state.name)
            self._requeue(key)
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
        previous = self.trigger_state.get(key)
        self.trigger_state[key] = state
        metrics.IDLE_CHECKS.labels(ns, name, "error" if not healthy else "idle" if idle else "busy").inc()
        if previous is None or previous[:2] != state[:2]:
            self._requeue(key)
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
            since = self.finalize_restored.setdefault(key, time.monotonic())
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
            self.wake_failure[key] = (blk.reason, blk.message)
            metrics.WAKES.labels(namespace, name, "failed").inc()
            asyncio.get_running_loop().call_soon(self._requeue, key)
            raise
        self.wake_failure.pop(key, None)
        paused = self.owner_paused(r)
        if paused:
            metrics.WAKES.labels(namespace, name, "failed").inc()
            asyncio.get_running_loop().call_soon(self._requeue, key)
            raise Blocked(C.WAKE_FAILED, "PausedByOwner", paused)
        try:
            scaled = await self.scale_up(es, r, reason="Woken", why="a request arrived for the sleeping target")
        except KubeError:
            metrics.WAKES.labels(namespace, name, "failed").inc()
            asyncio.get_running_loop().call_soon(self._requeue, key)
            raise
        metrics.WAKES.labels(namespace, name, "scaled" if scaled else "already_awake").inc()
        if scaled:
            self.event_time.setdefault(key, time.monotonic())
        self._requeue(key)
        if scaled or r.state.ready == 0:
            return "ScalingUp"
        return "Serving"

    def _requeue(self, key: Key) -> None:
        """Set by the operator to the work queue's ``add``."""
