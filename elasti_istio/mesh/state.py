"""What the mesh knows about the cluster: watched objects, indexes over them and the compiled route tables.

Every watch event bumps a generation counter; route tables and endpoint lists are rebuilt lazily
from the informer stores on the next request after a change, so a change applies to the very next
request and steady traffic costs dictionary lookups only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
from collections.abc import Mapping
from typing import Any

from elasti_istio.kube import Kube, KubeError, Resource
from elasti_istio.kube.informer import Informer
from elasti_istio.mesh import routing
from elasti_istio.mesh.routing import Destination, Endpoint, RouteTable
from elasti_istio.resources import (
    DESTINATIONRULES,
    ENDPOINTSLICES_V1,
    ENDPOINTSLICES_V1BETA1,
    PODS,
    SERVICES,
    VIRTUALSERVICES,
)

log = logging.getLogger("elasti.mesh")

GATEWAYS = Resource("networking.istio.io", "v1beta1", "gateways", kind="Gateway")
SERVICE_NAME_LABEL = "kubernetes.io/service-name"


async def endpointslice_resource(kube: Kube) -> Resource:
    """discovery.k8s.io/v1 where the server serves it (1.21+), else v1beta1."""
    try:
        return ENDPOINTSLICES_V1 if await kube.serves(ENDPOINTSLICES_V1) else ENDPOINTSLICES_V1BETA1
    except KubeError:
        return ENDPOINTSLICES_V1BETA1


@dataclasses.dataclass(frozen=True)
class Upstream:
    """A cluster in Envoy's terms: one Service port, narrowed to a subset's pod labels."""

    service: tuple[str, str]
    port_name: str
    labels: dict[str, str] | None

    @property
    def key(self) -> tuple[Any, ...]:
        return (*self.service, self.port_name, tuple(sorted((self.labels or {}).items())))


class MeshState:
    def __init__(
        self,
        kube: Kube,
        *,
        domain: str = routing.DEFAULT_DOMAIN,
        gateway_labels: Mapping[str, str] | None = None,
        gateway_names: tuple[str, ...] = (),
        default_namespace: str = "default",
        removal_delay: float = 0.0,
    ) -> None:
        self.kube = kube
        self.removal_delay = removal_delay
        self._slice_seq: dict[tuple[str, str], int] = {}  # (namespace, slice name) -> latest event number
        self._seq = itertools.count(1)
        self.domain = domain
        self.gateway_labels = dict(gateway_labels or {})
        self.gateway_names = gateway_names
        self.default_namespace = default_namespace
        self.config_gen = 0
        self.endpoint_gen = 0
        self._tables: dict[str, tuple[int, RouteTable]] = {}
        self._slices: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        self._pod_by_ip: dict[str, tuple[str, str]] = {}
        self._ep_cache: dict[tuple[Any, ...], list[Endpoint]] = {}
        self._ep_cache_gen = (-1, -1)
        self._rr: dict[tuple[Any, ...], itertools.count[int]] = {}
        self._subsets: dict[tuple[str, str, str | None], dict[str, str] | None] = {}
        self._subset_gen = -1
        self.virtualservices = Informer(kube, VIRTUALSERVICES, self._config_changed, name="virtualservices")
        self.destinationrules = Informer(kube, DESTINATIONRULES, self._config_changed, name="destinationrules")
        self.gateways = Informer(kube, GATEWAYS, self._config_changed, name="gateways")
        self.services = Informer(kube, SERVICES, self._endpoints_changed, name="services")
        self.pods = Informer(kube, PODS, self._pod_event, name="pods")
        self.endpointslices: Informer | None = None

    @property
    def informers(self) -> list[Informer]:
        base = [self.virtualservices, self.destinationrules, self.gateways, self.services, self.pods]
        return base + ([self.endpointslices] if self.endpointslices else [])

    async def start(self) -> None:
        res = await endpointslice_resource(self.kube)
        log.info("endpoints from %s EndpointSlices", res.api_version)
        self.endpointslices = Informer(self.kube, res, self._slice_event, name="endpointslices")
        for inf in self.informers:
            inf.start()

    async def stop(self) -> None:
        await asyncio.gather(*(inf.stop() for inf in self.informers), return_exceptions=True)

    def synced(self) -> bool:
        return self.endpointslices is not None and all(inf.synced.is_set() for inf in self.informers)

    async def wait_synced(self) -> None:
        while self.endpointslices is None:
            await asyncio.sleep(0.05)
        await asyncio.gather(*(inf.synced.wait() for inf in self.informers))

    # ---- events --------------------------------------------------------------------------------
    def _config_changed(self, etype: str, obj: dict[str, Any]) -> None:
        self.config_gen += 1
        self.endpoint_gen += 1  # DestinationRule subsets narrow endpoint lists

    def _endpoints_changed(self, etype: str, obj: dict[str, Any]) -> None:
        self.endpoint_gen += 1

    def _slice_event(self, etype: str, obj: dict[str, Any]) -> None:
        """Endpoints that go away reach the proxies ``removal_delay`` later, as istiod's debounce delays
        its pushes to Envoy; new endpoints apply at once. A later event for the same slice wins."""
        meta = obj.get("metadata") or {}
        name = (meta.get("namespace") or "", meta.get("name") or "")
        seq = next(self._seq)
        self._slice_seq[name] = seq
        svc = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
        old = (self._slices.get((name[0], svc)) or {}).get(name[1]) if svc else None
        new = None if etype == "DELETED" else obj
        if self.removal_delay > 0 and _ready_addresses(old) - _ready_addresses(new):
            asyncio.get_running_loop().call_later(self.removal_delay, self._apply_if_latest, name, seq, etype, obj)
            return
        self._apply_slice(etype, obj)

    def _apply_if_latest(self, name: tuple[str, str], seq: int, etype: str, obj: dict[str, Any]) -> None:
        if self._slice_seq.get(name) == seq:
            self._apply_slice(etype, obj)

    def _apply_slice(self, etype: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        if etype == "DELETED":
            self._slice_seq.pop((meta.get("namespace") or "", meta.get("name") or ""), None)
        svc = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
        if svc:
            key = (meta.get("namespace") or "", svc)
            if etype == "DELETED":
                bucket = self._slices.get(key)
                if bucket is not None:
                    bucket.pop(meta.get("name") or "", None)
                    if not bucket:
                        del self._slices[key]
            else:
                self._slices.setdefault(key, {})[meta.get("name") or ""] = obj
        self.endpoint_gen += 1

    def _pod_event(self, etype: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace") or "", meta.get("name") or "")
        ip = (obj.get("status") or {}).get("podIP")
        if etype == "DELETED":
            if ip and self._pod_by_ip.get(ip) == key:
                del self._pod_by_ip[ip]
        elif ip:
            self._pod_by_ip[ip] = key
        self.endpoint_gen += 1

    # ---- queries -------------------------------------------------------------------------------
    def table(self, role: str) -> RouteTable:
        """The route table of ``"mesh"`` (sidecars) or ``"ingress"``, rebuilt after a config change."""
        cached = self._tables.get(role)
        if cached is not None and cached[0] == self.config_gen:
            return cached[1]
        gen = self.config_gen
        vss = self.virtualservices.items()
        if role == "ingress":
            played = routing.selected_gateways(self.gateways.items(), self.gateway_labels, self.gateway_names)
            table = RouteTable.build(vss, played, self.domain)
        else:
            table = RouteTable.build(vss, frozenset({routing.MESH}), self.domain)
        self._tables[role] = (gen, table)
        return table

    def service(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.services.get(namespace, name)

    def pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.pods.get(namespace, name)

    def pod_by_ip(self, ip: str | None) -> dict[str, Any] | None:
        key = self._pod_by_ip.get(ip or "")
        return self.pods.get(*key) if key else None

    def _pod_labels(self, namespace: str, name: str) -> Mapping[str, str] | None:
        pod = self.pods.get(namespace, name)
        return None if pod is None else (pod.get("metadata") or {}).get("labels") or {}

    def subset_labels(self, fqdn: str, subset: str, source_namespace: str | None) -> dict[str, str] | None:
        if self._subset_gen != self.config_gen:
            self._subsets.clear()
            self._subset_gen = self.config_gen
        key = (fqdn, subset, source_namespace)
        if key not in self._subsets:
            rule = routing.destination_rule_for(self.destinationrules.items(), fqdn, source_namespace, self.domain)
            self._subsets[key] = routing.subset_labels(rule, subset)
        return self._subsets[key]

    def endpoints(self, namespace: str, name: str, port_name: str, labels: Mapping[str, str] | None) -> list[Endpoint]:
        gens = (self.endpoint_gen, self.config_gen)
        if gens != self._ep_cache_gen:
            self._ep_cache.clear()
            self._ep_cache_gen = gens
        key = (namespace, name, port_name, tuple(sorted((labels or {}).items())))
        found = self._ep_cache.get(key)
        if found is None:
            slices = (self._slices.get((namespace, name)) or {}).values()
            found = routing.slice_endpoints(slices, port_name, self._pod_labels, labels)
            self._ep_cache[key] = found
        return found

    def upstream(self, dest: Destination, req_port: int | None, source_ns: str | None) -> Upstream | str:
        """Where a destination sends (Service port and subset labels), or the response flag that says
        why it cannot: ``NC`` (no Service, port or subset) as Envoy reports a missing cluster."""
        service = self.service(*dest.service) if dest.service else None
        if service is None or dest.service is None:
            return "NC"
        port = routing.target_port(service, dest.port or req_port)
        if port is None:
            return "NC"
        labels: dict[str, str] | None = None
        if dest.subset:
            labels = self.subset_labels(dest.host, dest.subset, source_ns)
            if labels is None:
                return "NC"
        return Upstream(dest.service, port[1], labels)

    def next_index(self, key: tuple[Any, ...]) -> int:
        """Round-robin position for a cluster (Service port and subset)."""
        counter = self._rr.get(key)
        if counter is None:
            counter = self._rr[key] = itertools.count()
        return next(counter)


def _ready_addresses(slice_obj: dict[str, Any] | None) -> set[str]:
    if not slice_obj:
        return set()
    return {
        str(addr)
        for ep in slice_obj.get("endpoints") or []
        if (ep.get("conditions") or {}).get("ready") is not False
        for addr in ep.get("addresses") or []
    }
