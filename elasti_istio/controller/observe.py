"""The reads of a reconcile (:meth:`Observe.observe` gathers them into a :class:`World`): the target
through its ScaledObject, the Service and its port, the destinations that are the target's (DestinationRules
as Istio applies them), the bound VirtualServices, and what only matters at times (pods of a target at
zero still terminating; a woken target in its Service's EndpointSlices). No writes, except to the
controller's memory (a cache of the routing target, the start of an EndpointSlice wait)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from typing import Any

from elasti_istio import vsrewrite
from elasti_istio.controller import conditions as C
from elasti_istio.controller import decide
from elasti_istio.controller import spec as es_spec
from elasti_istio.controller.base import ENDPOINTS_WAIT, Base, log
from elasti_istio.controller.drlookup import rules_for
from elasti_istio.controller.indexes import Key, es_key
from elasti_istio.controller.workloads import (
    WORKLOAD_RESOURCES,
    WorkloadState,
    origin_selector,
    owns_whole_service,
    scaled_object_target,
    target_subsets,
    workload_state,
)
from elasti_istio.controller.world import Blocked, Resolved, World
from elasti_istio.kube import KubeError
from elasti_istio.resources import (
    DEPLOYMENTS,
    DESTINATIONRULES,
    ENDPOINTSLICES_V1,
    PODS,
    REPLICASETS,
    SCALEDOBJECTS,
    SERVICES,
    STATEFULSETS,
    VIRTUALSERVICES,
)


class Observe(Base):
    """Part of :class:`~elasti_istio.controller.reconciler.Reconciler`."""

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
        rivals = self.idx.rivals(key, refs)
        world = dataclasses.replace(base, r=r, refs=refs, vss=vss, stale=stale, rivals=rivals)
        state = r.state
        if state.at_zero:
            selector = origin_selector(state, (r.service.get("spec") or {}).get("selector") or {}, r.subset_labels)
            world = dataclasses.replace(world, pods_left=await self.count_pods(r.spec.namespace, selector))
        elif state.ready >= 1 and world.activator[0] and not world.memory.sleeping:
            if decide.proxied(world, decide.classify(world)[0]):  # only then is the EndpointSlice awaited
                world = dataclasses.replace(world, endpoints_listed=await self.endpoints_listed(key, r))
        return world

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
