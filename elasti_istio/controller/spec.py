"""Reading an ElastiService: pure functions, no I/O."""

from __future__ import annotations

import dataclasses
import hashlib
import urllib.parse
from typing import Any

from elasti_istio import duration
from elasti_istio.kube.client import Resource
from elasti_istio.resources import DEPLOYMENTS, REPLICASETS, ROLLOUTS, SCALEDOBJECTS, STATEFULSETS

KINDS: dict[str, Resource] = {
    "Deployment": DEPLOYMENTS,
    "StatefulSet": STATEFULSETS,
    "ReplicaSet": REPLICASETS,
    "Rollout": ROLLOUTS,
    "ScaledObject": SCALEDOBJECTS,
}
DEFAULT_API_VERSION = {k: r.api_version for k, r in KINDS.items()}
# KubeElasti's spelling of scaleTargetRef.kind (the resource's plural), accepted as the kind it names.
PLURAL_KINDS = {"deployments": "Deployment", "statefulsets": "StatefulSet", "rollouts": "Rollout"}
TRIGGER_METADATA = ("serverAddress", "query", "threshold")


def normalize_kind(kind: str) -> str:
    """``deployments`` -> ``Deployment``; a kind already in our spelling (or unknown) is unchanged."""
    return PLURAL_KINDS.get(kind, kind)


def ignored_fields(obj: dict[str, Any]) -> list[str]:
    """Fields the API server keeps but the controller does not use (KubeElasti's trigger metadata
    beyond serverAddress, query and threshold, e.g. ``uptimeFilter``), as ``spec.triggers[0].metadata.x``."""
    out: list[str] = []
    for i, t in enumerate((obj.get("spec") or {}).get("triggers") or []):
        md = (t or {}).get("metadata") if isinstance(t, dict) else None
        if isinstance(md, dict):
            out.extend(f"spec.triggers[{i}].metadata.{k}" for k in md if k not in TRIGGER_METADATA)
    return out


def check_server_address(address: str) -> str | None:
    """Why a Prometheus address may not be used (None: it may): http or https with a host, and no
    userinfo, query or fragment (a ``?x=`` would swallow the query path the controller appends)."""
    try:
        parts = urllib.parse.urlsplit(address)
        port = parts.port
    except ValueError as exc:
        return f"not a valid URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return f"{address!r} must start with http:// or https://"
    if not parts.hostname:
        return f"{address!r} has no host"
    if "@" in parts.netloc:
        return "credentials in the address are not allowed"
    if parts.query or parts.fragment or address.rstrip().endswith(("?", "#")):
        return "a query or fragment in the address is not allowed"
    if port is not None and not 0 < port < 65536:
        return f"port {port} is out of range"
    return None


class SpecError(ValueError):
    """The ElastiService asks for something that cannot work; the message says what."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclasses.dataclass(frozen=True)
class TargetRef:
    kind: str
    name: str
    api_version: str

    @property
    def resource(self) -> Resource:
        return KINDS[self.kind]

    def describe(self) -> str:
        return f"{self.kind} {self.name}"


@dataclasses.dataclass(frozen=True)
class Trigger:
    server: str
    query: str
    threshold: float


@dataclasses.dataclass(frozen=True)
class EnabledPeriod:
    schedule: str
    duration: float


@dataclasses.dataclass(frozen=True)
class ElastiSpec:
    namespace: str
    name: str
    service: str
    port: int | str | None
    target: TargetRef
    virtual_services: tuple[tuple[str, str], ...]
    min_replicas: int
    autoscaler_type: str | None
    autoscaler_name: str | None
    hold_timeout: float
    wake_hold_seconds: float = 120.0
    cooldown: float = 300.0
    triggers: tuple[Trigger, ...] = ()
    enabled_period: EnabledPeriod | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def parse(obj: dict[str, Any]) -> ElastiSpec:
    meta = obj.get("metadata") or {}
    ns, name = meta.get("namespace", ""), meta.get("name", "")
    spec = obj.get("spec") or {}
    ref = spec.get("scaleTargetRef") or {}
    kind = normalize_kind(ref.get("kind", ""))
    if kind not in KINDS:
        raise SpecError("UnsupportedKind", f"scaleTargetRef.kind {kind!r} is not one of {', '.join(KINDS)}")
    api_version = ref.get("apiVersion") or DEFAULT_API_VERSION[kind]
    expected_group = KINDS[kind].group
    group = api_version.split("/", 1)[0] if "/" in api_version else ""
    if group != expected_group:
        raise SpecError(
            "UnsupportedKind",
            f"scaleTargetRef apiVersion {api_version!r} does not serve kind {kind} (expected {expected_group}/...)",
        )
    activator = spec.get("activator") or {}
    try:
        hold = duration.parse(str(activator.get("holdTimeout", "60s")))
    except ValueError as exc:
        raise SpecError("InvalidSpec", f"activator.holdTimeout: {exc}") from exc
    autoscaler = spec.get("autoscaler") or {}
    triggers = []
    for i, t in enumerate(spec.get("triggers") or []):
        md = t.get("metadata") or {}
        if t.get("type") != "prometheus":
            raise SpecError("InvalidTrigger", f"triggers[{i}].type {t.get('type')!r} is not supported (prometheus)")
        try:
            threshold = float(md.get("threshold", ""))
        except ValueError as exc:
            raise SpecError("InvalidTrigger", f"triggers[{i}].metadata.threshold is not a number") from exc
        if not md.get("serverAddress") or not md.get("query"):
            raise SpecError("InvalidTrigger", f"triggers[{i}] needs metadata.serverAddress and metadata.query")
        bad = check_server_address(str(md["serverAddress"]))
        if bad is not None:
            raise SpecError("InvalidTrigger", f"triggers[{i}].metadata.serverAddress: {bad}")
        triggers.append(Trigger(str(md["serverAddress"]).rstrip("/"), str(md["query"]), threshold))
    period = None
    if spec.get("enabledPeriod"):
        ep = spec["enabledPeriod"]
        try:
            period = EnabledPeriod(str(ep.get("schedule", "")), duration.parse(str(ep.get("duration", ""))))
        except ValueError as exc:
            raise SpecError("InvalidSchedule", f"enabledPeriod.duration: {exc}") from exc
    return ElastiSpec(
        namespace=ns,
        name=name,
        service=spec.get("service", ""),
        port=spec.get("port"),
        target=TargetRef(kind=kind, name=ref.get("name", ""), api_version=api_version),
        virtual_services=tuple(parse_vs_ref(v, ns) for v in spec.get("virtualServices") or []),
        min_replicas=max(1, int(spec.get("minTargetReplicas") or 1)),
        autoscaler_type=autoscaler.get("type"),
        autoscaler_name=autoscaler.get("name"),
        hold_timeout=hold,
        wake_hold_seconds=float(autoscaler.get("wakeHoldSeconds", 120)),
        cooldown=float(spec.get("cooldownPeriod", 300)),
        triggers=tuple(triggers),
        enabled_period=period,
    )


def parse_vs_ref(ref: str, default_ns: str) -> tuple[str, str]:
    """``name`` or ``namespace/name`` -> (namespace, name)."""
    ns, sep, name = ref.strip().partition("/")
    return (ns, name) if sep else (default_ns, ns)


def parse_binding_annotation(value: str | None, vs_namespace: str) -> set[tuple[str, str]]:
    """The VirtualService annotation ``elasti.truefoundry.com/elastiservice``: ``a, ns/b`` -> {(ns, a), ...}."""
    out: set[tuple[str, str]] = set()
    for part in (value or "").split(","):
        part = part.strip()
        if part:
            ns, name = parse_vs_ref(part, vs_namespace)
            if ns and name:
                out.add((ns, name))
    return out


def origin_service_name(es_name: str) -> str:
    """``<name>-elasti-origin``, truncated with a short hash when longer than a DNS label allows."""
    full = f"{es_name}-elasti-origin"
    if len(full) <= 63:
        return full
    digest = hashlib.sha256(es_name.encode()).hexdigest()[:8]
    return f"{full[: 63 - 9].rstrip('-')}-{digest}"
