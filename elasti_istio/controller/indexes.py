"""Which ElastiServices an event on another object concerns: in-memory indexes fed by watch events.

The indexes only decide what to reconcile; a reconcile always reads the objects it acts on from the
API server, so an index that lags a little costs a reconcile, never a wrong write.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any

from elasti_istio.controller import spec as es_spec
from elasti_istio.controller.workloads import serves
from elasti_istio.resources import ANN_BIND, ANN_ORIGINAL_ROUTES

Key = str  # "namespace/name" of an ElastiService
ObjKey = tuple[str, str]  # (namespace, name)
# A route destination an ElastiService switches: (VirtualService namespace, name, Service namespace,
# Service, subset or "").
Claim = tuple[str, str, str, str, str]
Order = tuple[str, str]  # (creationTimestamp, key): the first created keeps a destination claimed twice


def es_key(namespace: str, name: str) -> Key:
    return f"{namespace}/{name}"


def split_key(key: Key) -> ObjKey:
    ns, _, name = key.partition("/")
    return ns, name


def _restore_keys(annotations: dict[str, str]) -> set[Key]:
    import json

    raw = annotations.get(ANN_ORIGINAL_ROUTES)
    if not raw:
        return set()
    try:
        doc = json.loads(raw)
    except ValueError:
        return set()
    return {k for k in doc if isinstance(k, str)} if isinstance(doc, dict) else set()


@dataclasses.dataclass
class Indexes:
    # ElastiService key -> what it refers to
    es_service: dict[Key, ObjKey] = dataclasses.field(default_factory=dict)
    es_targets: dict[Key, set[tuple[str, str, str]]] = dataclasses.field(default_factory=dict)  # (ns, kind, name)
    es_vs: dict[Key, set[ObjKey]] = dataclasses.field(default_factory=dict)  # from spec.virtualServices
    es_triggers: set[Key] = dataclasses.field(default_factory=set)  # ElastiServices with idle triggers
    # VirtualService -> ElastiServices that bind it by annotation / that have restore data on it
    vs_annotated: dict[ObjKey, set[Key]] = dataclasses.field(default_factory=dict)
    vs_restore: dict[ObjKey, set[Key]] = dataclasses.field(default_factory=dict)
    vs_rv: dict[ObjKey, int] = dataclasses.field(default_factory=dict)
    vs_objects: dict[ObjKey, dict[str, Any]] = dataclasses.field(default_factory=dict)  # as last seen
    # namespace -> ElastiServices in it
    by_namespace: dict[str, set[Key]] = dataclasses.field(default_factory=lambda: defaultdict(set))
    # namespace -> bumped when DestinationRules or workloads change (invalidates cached subset analysis)
    routing_generation: dict[str, int] = dataclasses.field(default_factory=lambda: defaultdict(int))
    # (ns, kind, name) -> (pod template labels, whether it serves): what the subset analysis depends on
    workload_routing: dict[tuple[str, str, str], tuple[tuple[tuple[str, str], ...], bool]] = dataclasses.field(
        default_factory=dict
    )
    # ElastiService key -> the route destinations its last reconcile found to be its target's
    es_claims: dict[Key, tuple[Order, frozenset[Claim]]] = dataclasses.field(default_factory=dict)

    # ---- ElastiServices ----------------------------------------------------------------------
    def update_es(self, obj: dict[str, Any], deleted: bool = False) -> Key:
        meta = obj.get("metadata") or {}
        ns, name = meta.get("namespace", ""), meta.get("name", "")
        key = es_key(ns, name)
        if deleted:
            self.forget_es(key)
            return key
        self.by_namespace[ns].add(key)
        spec = obj.get("spec") or {}
        self.es_service[key] = (ns, spec.get("service", ""))
        ref = spec.get("scaleTargetRef") or {}
        targets = self.es_targets.setdefault(key, set())
        before = set(targets)
        # Keep resolved targets (a ScaledObject's workload) added by the reconciler; refresh the declared one.
        targets.add((ns, es_spec.normalize_kind(ref.get("kind", "")), ref.get("name", "")))
        autoscaler = spec.get("autoscaler") or {}
        if autoscaler.get("type") == "keda" and autoscaler.get("name"):
            targets.add((ns, "ScaledObject", autoscaler["name"]))
        if targets != before:
            self.bump_routing(ns)  # who owns a shared Service depends on which workloads are targets
        self.es_vs[key] = {es_spec.parse_vs_ref(v, ns) for v in spec.get("virtualServices") or []}
        if spec.get("triggers"):
            self.es_triggers.add(key)
        else:
            self.es_triggers.discard(key)
        return key

    def with_triggers(self) -> set[Key]:
        return set(self.es_triggers)

    def set_resolved_targets(self, key: Key, targets: set[tuple[str, str, str]]) -> None:
        if self.es_targets.get(key) != targets:
            self.bump_routing(split_key(key)[0])
        self.es_targets[key] = set(targets)

    def forget_es(self, key: Key) -> None:
        ns, _ = split_key(key)
        self.bump_routing(ns)
        self.es_service.pop(key, None)
        self.es_targets.pop(key, None)
        self.es_vs.pop(key, None)
        self.es_triggers.discard(key)
        self.by_namespace.get(ns, set()).discard(key)

    def all_es(self) -> set[Key]:
        return {k for keys in self.by_namespace.values() for k in keys}

    # ---- what an event concerns --------------------------------------------------------------
    def for_target(self, namespace: str, kind: str, name: str) -> set[Key]:
        t = (namespace, kind, name)
        return {k for k in self.by_namespace.get(namespace, set()) if t in self.es_targets.get(k, set())}

    def for_service(self, namespace: str, name: str) -> set[Key]:
        return {k for k in self.by_namespace.get(namespace, set()) if self.es_service.get(k) == (namespace, name)}

    def update_vs(self, obj: dict[str, Any], deleted: bool = False) -> set[Key]:
        """Records a VirtualService's bindings; returns every ElastiService concerned (before and after)."""
        meta = obj.get("metadata") or {}
        vk = (meta.get("namespace", ""), meta.get("name", ""))
        rv_raw = meta.get("resourceVersion") or "0"
        rv = int(rv_raw) if str(rv_raw).isdigit() else 0
        if not deleted and rv and self.vs_rv.get(vk, 0) > rv:
            return set()  # older than what we have (a seed listing racing a watch event)
        before = self.vs_annotated.get(vk, set()) | self.vs_restore.get(vk, set())
        if deleted:
            self.vs_annotated.pop(vk, None)
            self.vs_restore.pop(vk, None)
            self.vs_rv.pop(vk, None)
            self.vs_objects.pop(vk, None)
            after: set[Key] = set()
        else:
            ann = meta.get("annotations") or {}
            bound = {es_key(ns, n) for ns, n in es_spec.parse_binding_annotation(ann.get(ANN_BIND), vk[0])}
            self.vs_annotated[vk] = bound
            self.vs_restore[vk] = _restore_keys(ann)
            self.vs_rv[vk] = rv
            self.vs_objects[vk] = obj
            after = bound | self.vs_restore[vk]
        listed = {k for k, refs in self.es_vs.items() if vk in refs}
        return before | after | listed

    def bound_vs(self, key: Key) -> set[ObjKey]:
        return set(self.es_vs.get(key, set())) | {vk for vk, keys in self.vs_annotated.items() if key in keys}

    def vs_with_restore(self, key: Key) -> set[ObjKey]:
        return {vk for vk, keys in self.vs_restore.items() if key in keys}

    # ---- routing inputs ----------------------------------------------------------------------
    def bump_routing(self, namespace: str) -> None:
        self.routing_generation[namespace] += 1

    def update_workload(self, namespace: str, kind: str, obj: dict[str, Any], deleted: bool = False) -> bool:
        """Tracks pod template labels and whether the workload serves; True when either changed (the
        subset analysis, and who owns a Service shared by several workloads, must be redone)."""
        name = (obj.get("metadata") or {}).get("name", "")
        wk = (namespace, kind, name)
        if deleted:
            changed = self.workload_routing.pop(wk, None) is not None
        else:
            labels = ((obj.get("spec") or {}).get("template") or {}).get("metadata", {}).get("labels") or {}
            seen = (tuple(sorted(labels.items())), serves(obj))
            changed = self.workload_routing.get(wk) != seen
            self.workload_routing[wk] = seen
        if changed:
            self.bump_routing(namespace)
        return changed

    # ---- destinations claimed by two ElastiServices ----------------------------------------------
    def set_claims(self, key: Key, order: Order, claims: frozenset[Claim]) -> set[Key]:
        """Records what ``key`` claims; returns the other ElastiServices that shared a destination with it
        before or share one now, when that changed (they are reconciled again to say so)."""
        before = self.es_claims.get(key)
        if claims:
            self.es_claims[key] = (order, claims)
        else:
            self.es_claims.pop(key, None)
        if (before or (order, frozenset()))[1] == claims:
            return set()
        return self._sharing(key, claims | (before[1] if before else frozenset()))

    def drop_claims(self, key: Key) -> set[Key]:
        """Forgets what ``key`` claimed; returns the ElastiServices that shared a destination with it."""
        before = self.es_claims.pop(key, None)
        return self._sharing(key, before[1]) if before else set()

    def rivals(self, key: Key, vss: set[ObjKey] | frozenset[ObjKey]) -> dict[Key, tuple[Order, frozenset[Claim]]]:
        """The other ElastiServices that claim a destination in one of ``vss``, with what they claim."""
        return {k: v for k, v in self.es_claims.items() if k != key and any(c[:2] in vss for c in v[1])}

    def _sharing(self, key: Key, claims: frozenset[Claim]) -> set[Key]:
        return {k for k, (_, theirs) in self.es_claims.items() if k != key and theirs & claims}

    def elastic_targets(self, namespace: str) -> set[tuple[str, str]]:
        """(kind, name) of every workload an ElastiService of the namespace scales."""
        return {
            (kind, name)
            for key in self.by_namespace.get(namespace, set())
            for ns, kind, name in self.es_targets.get(key, set())
            if ns == namespace
        }
