"""What a scale target says about itself, and which pods and subsets are its: pure functions."""

from __future__ import annotations

import dataclasses
from typing import Any

from elasti_istio.kube.client import Resource
from elasti_istio.resources import DEPLOYMENTS, REPLICASETS, ROLLOUTS, STATEFULSETS

WORKLOAD_RESOURCES: dict[str, Resource] = {
    "Deployment": DEPLOYMENTS,
    "StatefulSet": STATEFULSETS,
    "ReplicaSet": REPLICASETS,
    "Rollout": ROLLOUTS,
}


@dataclasses.dataclass(frozen=True)
class WorkloadState:
    kind: str
    name: str
    replicas: int  # desired (spec.replicas; absent means 1, as the API server defaults it)
    ready: int
    current: int  # pods the workload controller still counts
    template_labels: dict[str, str]
    match_labels: dict[str, str]
    has_expressions: bool
    stuck: tuple[str, str] | None  # (reason, message) when the workload says it cannot progress

    @property
    def at_zero(self) -> bool:
        return self.replicas == 0

    @property
    def routable(self) -> int:
        """The ready replicas the activators may forward to (``status.readyReplicas``): none once the
        target is scaled to zero, while its workload still counts the pods that are stopping."""
        return 0 if self.at_zero else self.ready


def workload_state(kind: str, obj: dict[str, Any]) -> WorkloadState:
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    selector = spec.get("selector") or {}
    if isinstance(selector, str):  # the scale subresource's string form; not used for workloads
        selector = {}
    template = spec.get("template") or {}
    labels = dict((template.get("metadata") or {}).get("labels") or {})
    replicas = spec.get("replicas")
    return WorkloadState(
        kind=kind,
        name=(obj.get("metadata") or {}).get("name", ""),
        replicas=1 if replicas is None else int(replicas),
        ready=int(status.get("readyReplicas") or 0),
        current=int(status.get("replicas") or 0),
        template_labels=labels,
        match_labels=dict(selector.get("matchLabels") or {}),
        has_expressions=bool(selector.get("matchExpressions")),
        stuck=stuck_reason(kind, obj),
    )


def stuck_reason(kind: str, obj: dict[str, Any]) -> tuple[str, str] | None:
    """Why the workload says it cannot reach its replicas: a Deployment (or Rollout) reporting
    ``Progressing=False`` (a rollout past its deadline), or ``ReplicaFailure=True`` (pods cannot be
    created: quota, admission, a missing ServiceAccount)."""
    name = obj["metadata"]["name"]
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("status") == "False":
            reason = cond.get("reason") or "NotProgressing"
            return "TargetNotProgressing", f"{kind} {name} is not progressing ({reason}): {cond.get('message', '')}"
        if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
            return "TargetReplicaFailure", f"{kind} {name} cannot create pods: {cond.get('message', '')}"
    return None


def scaled_object_target(so: dict[str, Any]) -> tuple[str, str, str]:
    """(kind, apiVersion, name) of the workload a KEDA ScaledObject scales."""
    ref = (so.get("spec") or {}).get("scaleTargetRef") or {}
    kind = ref.get("kind") or "Deployment"
    api_version = ref.get("apiVersion") or ("argoproj.io/v1alpha1" if kind == "Rollout" else "apps/v1")
    return kind, api_version, ref.get("name", "")


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def target_subsets(
    destination_rules: list[dict[str, Any]], host_matches: Any, template_labels: dict[str, str]
) -> tuple[frozenset[str], dict[str, dict[str, str]]]:
    """Subsets (of DestinationRules whose host is the Service) whose labels select the target's pods.

    ``host_matches(host, dr_namespace)`` tells whether a DestinationRule host is the Service.
    Returns the subset names and their labels.
    """
    names: set[str] = set()
    labels: dict[str, dict[str, str]] = {}
    for dr in destination_rules:
        spec = dr.get("spec") or {}
        if not host_matches(spec.get("host", ""), dr["metadata"].get("namespace", "")):
            continue
        for subset in spec.get("subsets") or []:
            sl = subset.get("labels") or {}
            if sl and all(template_labels.get(k) == v for k, v in sl.items()):
                names.add(subset["name"])
                labels[subset["name"]] = dict(sl)
    return frozenset(names), labels


def serves(obj: dict[str, Any]) -> bool:
    """Whether a workload has, or is asked for, pods: ``spec.replicas`` above 0 (absent means 1) or ready
    replicas left (a scale to zero still draining)."""
    replicas = (obj.get("spec") or {}).get("replicas")
    return (1 if replicas is None else int(replicas)) > 0 or int(
        (obj.get("status") or {}).get("readyReplicas") or 0
    ) > 0


def owns_whole_service(
    service_selector: dict[str, str],
    target_kind: str,
    target_name: str,
    workloads: list[tuple[str, dict[str, Any]]],
    elastic: set[tuple[str, str]] | frozenset[tuple[str, str]] = frozenset(),
) -> bool:
    """True when a destination without a subset sends all its traffic to this target: no other workload
    the Service selects serves. Several targets of ElastiServices at zero behind one Service: the
    destination is the first one's, by (kind, name), so exactly one ElastiService switches it (waking
    any one of them serves the Service). ``elastic``: the (kind, name) of every ElastiService's target
    in the namespace."""
    for kind, obj in workloads:
        meta = obj.get("metadata") or {}
        name = meta.get("name", "")
        if kind == target_kind and name == target_name:
            continue
        if kind == "ReplicaSet" and meta.get("ownerReferences"):
            continue  # owned by a Deployment or Rollout, judged through its owner
        labels = ((obj.get("spec") or {}).get("template") or {}).get("metadata", {}).get("labels") or {}
        if not labels_match(service_selector, labels):
            continue
        if serves(obj) or ((kind, name) in elastic and (kind, name) < (target_kind, target_name)):
            return False
    return True


def origin_selector(
    state: WorkloadState, service_selector: dict[str, str], subset_labels: dict[str, dict[str, str]]
) -> dict[str, str]:
    """The origin Service's selector: the target's own pod selector; where that selector uses expressions
    (a Service cannot), the public Service's selector plus the labels of the target's subset, or plus the
    target's template labels when no subset names it."""
    if state.match_labels and not state.has_expressions:
        return dict(state.match_labels)
    sel = dict(service_selector)
    if subset_labels:
        for labels in subset_labels.values():
            sel.update(labels)
            break
    else:
        sel.update({k: v for k, v in state.template_labels.items() if k != "pod-template-hash"})
    return sel


def selector_string(selector: dict[str, Any]) -> str | None:
    """A LabelSelector in the ``labelSelector`` query form; None when it selects nothing (or everything)."""
    parts = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if not key:
            return None
        if op in ("In", "NotIn"):
            if not values:
                return None
            parts.append(f"{key} {op.lower()} ({','.join(sorted(values))})")
        elif op == "Exists":
            parts.append(key)
        elif op == "DoesNotExist":
            parts.append(f"!{key}")
        else:
            return None
    return ",".join(parts) or None


def pod_is_ready(pod: dict[str, Any]) -> bool:
    """Ready as endpoints count it: the Ready condition is True and the pod is not terminating."""
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    conds = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


def pod_of_target(pod: dict[str, Any], kind: str, name: str) -> bool:
    """Whether the pod's controller is the target (directly, or through its ReplicaSet for a Deployment
    or Rollout): selectors may overlap with other workloads, owner references do not."""
    meta = pod.get("metadata") or {}
    ref = next((r for r in meta.get("ownerReferences") or [] if r.get("controller")), None)
    if ref is None:
        return False
    if kind in ("Deployment", "Rollout"):
        rs_hash = (meta.get("labels") or {}).get("pod-template-hash")
        return ref.get("kind") == "ReplicaSet" and bool(rs_hash) and ref.get("name") == f"{name}-{rs_hash}"
    return ref.get("kind") == kind and ref.get("name") == name
