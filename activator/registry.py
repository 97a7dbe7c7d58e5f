"""ElastiServices in memory: hold settings, readiness and origin address, kept current by list+watch.

The hold logic subscribes to changes, so a status update that says "ready" releases held requests
the moment the watch event arrives; nothing polls.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from activator.routing import Key
from activator.static import StaticResponse
from activator.static import parse as parse_static
from elasti_istio import duration
from elasti_istio.kube import Kube
from elasti_istio.kube.informer import Informer
from elasti_istio.resources import ELASTISERVICES

log = logging.getLogger(__name__)

DEFAULT_HOLD_TIMEOUT = 60.0
DEFAULT_RETRY_INTERVAL = 0.1
DEFAULT_QUEUE_LIMIT = 1000
RELIST_SECONDS = 300.0

Listener = Callable[[Key, "Target | None"], None]


@dataclass(frozen=True, slots=True)
class WakeFailure:
    """The controller's ``WakeFailed=True`` condition; equal values are the same failure."""

    reason: str
    message: str
    since: str


@dataclass(frozen=True, slots=True)
class Target:
    """What the activator needs to know about one ElastiService."""

    namespace: str
    name: str
    hold_timeout: float = DEFAULT_HOLD_TIMEOUT
    retry_interval: float = DEFAULT_RETRY_INTERVAL
    queue_limit: int = DEFAULT_QUEUE_LIMIT
    ready: bool = False
    base_url: str | None = None  # http://<origin>.<ns>.svc.<domain>:<port>
    authority: str | None = None  # <origin>.<ns>.svc.<domain>:<port>, the upstream Host
    wake_failure: WakeFailure | None = None
    static: tuple[StaticResponse, ...] = ()
    ports: tuple[int, ...] = ()  # every port of the origin Service (it mirrors the public one)
    service_hosts: frozenset[str] = frozenset()  # the public Service's names: svc, svc.ns, svc.ns.svc, FQDN

    @property
    def key(self) -> Key:
        return self.namespace, self.name

    def port_for(self, header_port: int | None, host: str) -> int | None:
        """The origin port a request goes to, when not the default one: the port its route named (in the
        header), else the port it was sent to when it was sent to the public Service by name (a mesh
        route without a port uses the port of the listener it came in on); None for the default."""
        if header_port is not None:
            return header_port
        name, colon, port = host.rpartition(":")
        if colon and port.isdigit() and name.lower().rstrip(".") in self.service_hosts and int(port) in self.ports:
            return int(port)
        return None

    def at_port(self, port: int) -> Target:
        """The same target, forwarded to another port of its origin Service."""
        if self.authority is None or self.authority.endswith(f":{port}"):
            return self
        host = self.authority.rpartition(":")[0]
        return replace(self, base_url=f"http://{host}:{port}", authority=f"{host}:{port}")

    @property
    def forwardable(self) -> bool:
        """Ready by status and with an origin to forward to."""
        return self.ready and self.base_url is not None


def target_from(obj: dict[str, Any], cluster_domain: str = "cluster.local") -> Target:
    """Reads an ElastiService; values the server would have refused fall back to the defaults, with a warning."""
    meta = obj.get("metadata") or {}
    ns, name = meta.get("namespace") or "", meta.get("name") or ""
    spec_act = (obj.get("spec") or {}).get("activator") or {}
    status = obj.get("status") or {}
    hold = _duration(spec_act.get("holdTimeout"), DEFAULT_HOLD_TIMEOUT, ns, name, "holdTimeout")
    retry = _duration(spec_act.get("retryInterval"), DEFAULT_RETRY_INTERVAL, ns, name, "retryInterval")
    limit = spec_act.get("queueLimit", DEFAULT_QUEUE_LIMIT)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        log.warning(
            "%s/%s: spec.activator.queueLimit %r is not a positive integer; using %d",
            ns,
            name,
            limit,
            DEFAULT_QUEUE_LIMIT,
        )
        limit = DEFAULT_QUEUE_LIMIT
    ready_replicas = status.get("readyReplicas")
    ready = isinstance(ready_replicas, int) and ready_replicas >= 1
    origin = status.get("origin") or {}
    service, port = origin.get("service"), origin.get("port")
    base_url = authority = None
    if isinstance(service, str) and service and isinstance(port, int) and 0 < port < 65536:
        authority = f"{service}.{ns}.svc.{cluster_domain}:{port}"
        base_url = f"http://{authority}"
    failure = None
    for cond in status.get("conditions") or []:
        if isinstance(cond, dict) and cond.get("type") == "WakeFailed" and cond.get("status") == "True":
            failure = WakeFailure(
                str(cond.get("reason") or ""), str(cond.get("message") or ""), str(cond.get("lastTransitionTime") or "")
            )
    static = parse_static(spec_act.get("staticResponses"), f"{ns}/{name}")
    raw_ports = origin.get("ports")
    ports = tuple(p for p in (raw_ports if isinstance(raw_ports, list) else []) if isinstance(p, int) and 0 < p < 65536)
    svc = (obj.get("spec") or {}).get("service")
    hosts = (
        frozenset({svc, f"{svc}.{ns}", f"{svc}.{ns}.svc", f"{svc}.{ns}.svc.{cluster_domain}"})
        if isinstance(svc, str) and svc
        else frozenset()
    )
    return Target(ns, name, hold, max(retry, 0.001), limit, ready, base_url, authority, failure, static, ports, hosts)


def _duration(value: Any, default: float, ns: str, name: str, field: str) -> float:
    if value is None:
        return default
    try:
        return duration.parse(str(value))
    except ValueError:
        log.warning("%s/%s: spec.activator.%s %r is not a duration; using %ss", ns, name, field, value, default)
        return default


class Registry:
    """The ElastiServices this activator knows, by (namespace, name)."""

    def __init__(self, cluster_domain: str = "cluster.local") -> None:
        self.cluster_domain = cluster_domain
        self.targets: dict[Key, Target] = {}
        self._listeners: list[Listener] = []
        self._informers: list[Informer] = []
        self._synced = False

    def get(self, key: Key) -> Target | None:
        return self.targets.get(key)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    @property
    def synced(self) -> bool:
        """True once every informer has completed its first list (or :meth:`mark_synced` was called)."""
        if self._informers:
            return all(inf.synced.is_set() for inf in self._informers)
        return self._synced

    def mark_synced(self) -> None:
        """For a registry fed by hand (tests): there is nothing more to list."""
        self._synced = True

    async def wait_synced(self, timeout: float) -> bool:
        if self.synced:
            return True
        waits = [asyncio.ensure_future(inf.synced.wait()) for inf in self._informers]
        if not waits:
            return False
        try:
            await asyncio.wait_for(asyncio.gather(*waits), timeout)
        except TimeoutError:
            return False
        finally:
            for w in waits:
                w.cancel()
        return True

    def apply(self, etype: str, obj: dict[str, Any]) -> None:
        """An informer event (also usable directly): updates the target and tells the listeners."""
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace") or "", meta.get("name") or "")
        if etype == "DELETED":
            if self.targets.pop(key, None) is not None:
                log.info("%s/%s: ElastiService deleted", *key)
                self._tell(key, None)
            return
        target = target_from(obj, self.cluster_domain)
        old = self.targets.get(key)
        if old == target:
            return
        self.targets[key] = target
        if old is None or old.ready != target.ready or old.base_url != target.base_url:
            log.info("%s/%s: ready=%s origin=%s", *key, target.ready, target.authority)
        self._tell(key, target)

    def mark_ready(self, key: Key) -> None:
        """The controller answered a wake saying the workload has a ready replica: the target counts
        as ready now, ahead of the status event that will say so too (any later event decides)."""
        target = self.targets.get(key)
        if target is None or target.ready or target.base_url is None:
            return
        self.targets[key] = ready = replace(target, ready=True)
        log.info("%s/%s: ready=True (the controller's wake answer) origin=%s", *key, target.authority)
        self._tell(key, ready)

    def _tell(self, key: Key, target: Target | None) -> None:
        for listener in self._listeners:
            try:
                listener(key, target)
            except Exception:
                log.exception("%s/%s: listener failed", *key)

    def start(self, kube: Kube, namespaces: tuple[str, ...] = ()) -> None:
        """One informer per namespace, or one for the whole cluster."""
        for ns in namespaces or (None,):
            inf = Informer(
                kube,
                ELASTISERVICES,
                self.apply,
                namespace=ns,
                relist_seconds=RELIST_SECONDS,
                name=f"elastiservices/{ns or '*'}",
            )
            self._informers.append(inf)
            inf.start()

    async def stop(self) -> None:
        for inf in self._informers:
            await inf.stop()
