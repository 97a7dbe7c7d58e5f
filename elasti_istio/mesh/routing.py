"""Istio's HTTP routing semantics as pure functions: hosts, VirtualService matches, weights, subsets, header edits.

No I/O here, so that the rules can be unit-tested on their own and so that routing a request costs a
few dictionary lookups and string comparisons. Tables are compiled once per configuration change.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import re
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any

log = logging.getLogger(__name__)

MESH = "mesh"
_WARNED: set[tuple[str, str]] = set()  # VirtualServices already reported as refused by Istio's rules
DEFAULT_DOMAIN = "cluster.local"


# ---- hosts ---------------------------------------------------------------------------------------


def split_authority(authority: str) -> tuple[str, int | None]:
    """``host[:port]`` (``[v6]:port`` too) → lower-case host and port; a bad port counts as none."""
    a = authority.strip()
    if a.startswith("["):
        end = a.find("]")
        host, rest = (a[1:end], a[end + 1 :]) if end > 0 else (a, "")
        port_s = rest[1:] if rest.startswith(":") else ""
    else:
        host, sep, port_s = a.rpartition(":")
        if not sep or host.count(":"):  # no port, or a bare IPv6 address
            host, port_s = a, ""
    port = int(port_s) if port_s.isdigit() and 0 < int(port_s) < 65536 else None
    return host.lower().rstrip("."), port


def _is_ip(host: str) -> bool:
    if not (host[:1].isdigit() or ":" in host):
        return False  # cheap answer for names, which is nearly every request
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def canonical_host(host: str, namespace: str | None, domain: str = DEFAULT_DOMAIN) -> str:
    """The fully qualified form Kubernetes DNS would give ``host`` from ``namespace``.

    ``name`` → ``name.<namespace>.svc.<domain>`` (unchanged without a namespace), ``name.ns`` and
    ``name.ns.svc`` are completed; wildcards, IPs and other names are left as they are.
    """
    h = host.lower().rstrip(".")
    if not h or h.startswith("*") or _is_ip(h):
        return h
    parts = h.split(".")
    if len(parts) == 1:
        return f"{h}.{namespace}.svc.{domain}" if namespace else h
    if len(parts) == 2:
        return f"{h}.svc.{domain}"
    if len(parts) == 3 and parts[2] == "svc":
        return f"{h}.{domain}"
    return h


def service_of(fqdn: str, domain: str = DEFAULT_DOMAIN) -> tuple[str, str] | None:
    """``name.ns.svc.<domain>`` → ``(ns, name)``; anything else is not a Kubernetes Service."""
    suffix = f".svc.{domain}"
    if not fqdn.endswith(suffix):
        return None
    parts = fqdn[: -len(suffix)].split(".")
    if len(parts) != 2 or not all(parts):
        return None
    return parts[1], parts[0]


def host_matches(pattern: str, host: str) -> bool:
    """Envoy domain matching for one pattern: exact, ``*`` or a ``*.suffix`` / ``*suffix`` wildcard."""
    if pattern == "*":
        return True
    if pattern.startswith("*"):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return pattern == host


def _more_specific(a: str, b: str) -> str | None:
    """The intersection of two host patterns when one contains the other (Gateway server hosts, VS hosts)."""
    if host_matches(a, b):
        return b
    if host_matches(b, a):
        return a
    return None


class HostTable:
    """Envoy's virtual-host lookup: exact names first, then the longest wildcard suffix, then ``*``."""

    def __init__(self) -> None:
        self.exact: dict[str, list[HttpRoute]] = {}
        self.wild: dict[str, list[HttpRoute]] = {}
        self._suffixes: list[str] = []

    def add(self, host: str, routes: list[HttpRoute]) -> None:
        if host.startswith("*"):
            self.wild.setdefault(host, []).extend(routes)
            self._suffixes = sorted(self.wild, key=len, reverse=True)
        else:
            self.exact.setdefault(host, []).extend(routes)

    def get(self, host: str) -> list[HttpRoute] | None:
        found = self.exact.get(host)
        if found is not None:
            return found
        for pattern in self._suffixes:
            if host_matches(pattern, host):
                return self.wild[pattern]
        return None

    def __bool__(self) -> bool:
        return bool(self.exact or self.wild)


# ---- compiled VirtualService pieces --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StringMatch:
    """Istio's StringMatch; an empty one (``{}``) only asks that the value be present."""

    kind: str  # exact | prefix | regex | present
    value: str = ""
    regex: re.Pattern[str] | None = None

    @classmethod
    def parse(cls, spec: Mapping[str, Any] | None) -> StringMatch | None:
        if spec is None:
            return None
        for kind in ("exact", "prefix", "regex"):
            if kind in spec and spec[kind] is not None:
                value = str(spec[kind])
                return cls(kind, value, re.compile(value) if kind == "regex" else None)
        return cls("present")

    def test(self, value: str | None, *, ignore_case: bool = False) -> bool:
        if value is None:
            return False
        if self.kind == "present":
            return True
        v, want = (value.lower(), self.value.lower()) if ignore_case else (value, self.value)
        if self.kind == "exact":
            return v == want
        if self.kind == "prefix":
            return v.startswith(want)
        assert self.regex is not None
        return self.regex.fullmatch(value) is not None  # Envoy's RE2 matches the whole string


@dataclasses.dataclass(frozen=True)
class HeaderOps:
    """``headers.request`` / ``headers.response`` of Istio: remove, then set (replace), then add (append)."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    @classmethod
    def parse(cls, spec: Mapping[str, Any] | None) -> HeaderOps:
        if not spec:
            return EMPTY_OPS
        return cls(
            tuple((str(k).lower(), str(v)) for k, v in (spec.get("set") or {}).items()),
            tuple((str(k).lower(), str(v)) for k, v in (spec.get("add") or {}).items()),
            tuple(str(k).lower() for k in spec.get("remove") or []),
        )

    def __bool__(self) -> bool:
        return bool(self.set or self.add or self.remove)

    def apply(self, headers: MutableMapping[str, str]) -> None:
        """Edits a case-insensitive multi-dict (``multidict.CIMultiDict``) in place."""
        for name in self.remove:
            popall = getattr(headers, "popall", None)
            if popall is not None:
                popall(name, None)
            else:
                headers.pop(name, None)
        for name, value in self.set:
            headers[name] = value  # CIMultiDict: replaces every value
        for name, value in self.add:
            add = getattr(headers, "add", None)
            if add is not None:
                add(name, value)
            else:
                headers[name] = value


EMPTY_OPS = HeaderOps()


@dataclasses.dataclass(frozen=True)
class RequestInfo:
    """What routing may look at: the request line and headers, and who sent it (never client-chosen)."""

    method: str
    path: str  # path and query, as sent
    headers: Mapping[str, str]  # case-insensitive
    host: str  # lower case, without port
    port: int | None
    gateways: frozenset[str]  # {"mesh"} for sidecars, {"ns/name", ...} for an ingress
    source_namespace: str | None = None
    source_labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    scheme: str = "http"

    @property
    def path_only(self) -> str:
        return self.path.split("?", 1)[0]

    @property
    def query(self) -> dict[str, str]:
        q = self.path.split("?", 1)[1] if "?" in self.path else ""
        out: dict[str, str] = {}
        for part in q.split("&"):
            if part:
                k, _, v = part.partition("=")
                out.setdefault(k, v)
        return out


@dataclasses.dataclass(frozen=True)
class Match:
    """One ``http[].match[]`` entry: every condition in it must hold."""

    uri: StringMatch | None = None
    ignore_uri_case: bool = False
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: tuple[tuple[str, StringMatch], ...] = ()
    without_headers: tuple[tuple[str, StringMatch], ...] = ()
    query: tuple[tuple[str, StringMatch], ...] = ()
    port: int | None = None
    gateways: frozenset[str] | None = None
    source_namespace: str | None = None
    source_labels: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, spec: Mapping[str, Any], vs_namespace: str) -> Match:
        def pairs(d: Mapping[str, Any] | None, lower: bool = True) -> tuple[tuple[str, StringMatch], ...]:
            out = []
            for k, v in (d or {}).items():
                sm = StringMatch.parse(v or {})
                assert sm is not None
                out.append((str(k).lower() if lower else str(k), sm))
            return tuple(out)

        gws = spec.get("gateways")
        return cls(
            uri=StringMatch.parse(spec.get("uri")),
            ignore_uri_case=bool(spec.get("ignoreUriCase")),
            scheme=StringMatch.parse(spec.get("scheme")),
            method=StringMatch.parse(spec.get("method")),
            authority=StringMatch.parse(spec.get("authority")),
            headers=pairs(spec.get("headers")),
            without_headers=pairs(spec.get("withoutHeaders")),
            query=pairs(spec.get("queryParams"), lower=False),
            port=int(spec["port"]) if spec.get("port") else None,
            gateways=frozenset(resolve_gateway(g, vs_namespace) for g in gws) if gws else None,
            source_namespace=spec.get("sourceNamespace") or None,
            source_labels=tuple((str(k), str(v)) for k, v in (spec.get("sourceLabels") or {}).items()),
        )

    def test(self, req: RequestInfo) -> bool:
        if self.gateways is not None and not (self.gateways & req.gateways):
            return False
        if self.port is not None and req.port != self.port:
            return False
        if self.source_namespace is not None and req.source_namespace != self.source_namespace:
            return False
        for k, v in self.source_labels:
            if req.source_labels.get(k) != v:
                return False
        if self.uri is not None:
            # Envoy: prefix looks at the whole :path, exact and regex at the path without its query.
            target = req.path if self.uri.kind == "prefix" else req.path_only
            if not self.uri.test(target, ignore_case=self.ignore_uri_case):
                return False
        if self.method is not None and not self.method.test(req.method):
            return False
        if self.scheme is not None and not self.scheme.test(req.scheme):
            return False
        if self.authority is not None:
            authority = req.headers.get("host") or req.host
            if not self.authority.test(authority):
                return False
        for name, sm in self.headers:
            if not sm.test(req.headers.get(name)):
                return False
        for name, sm in self.without_headers:
            if sm.test(req.headers.get(name)):
                return False
        if self.query:
            q = req.query
            for name, sm in self.query:
                if not sm.test(q.get(name)):
                    return False
        return True


@dataclasses.dataclass(frozen=True)
class Destination:
    host: str  # fully qualified
    subset: str | None
    port: int | None
    weight: int
    request_headers: HeaderOps = EMPTY_OPS
    response_headers: HeaderOps = EMPTY_OPS
    service: tuple[str, str] | None = None  # (namespace, name) when the host is a Kubernetes Service


@dataclasses.dataclass(frozen=True)
class HttpRoute:
    """One ``http[]`` entry of a VirtualService, compiled."""

    vs_namespace: str
    vs_name: str
    name: str
    matches: tuple[Match, ...]
    destinations: tuple[Destination, ...]
    timeout: float | None = None
    rewrite_uri: str | None = None
    rewrite_authority: str | None = None
    request_headers: HeaderOps = EMPTY_OPS
    response_headers: HeaderOps = EMPTY_OPS

    def match(self, req: RequestInfo) -> Match | None:
        """The first match that holds (an absent ``match`` list matches everything), or None."""
        if not self.matches:
            return ANY_MATCH
        for m in self.matches:
            if m.test(req):
                return m
        return None


ANY_MATCH = Match()


def parse_duration(value: Any) -> float | None:
    """``"1.5s"``, ``"500ms"``, ``"1m30s"`` → seconds; absent or zero → None (no timeout)."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        return float(value) or None
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
    total = 0.0
    pos = 0
    s = str(value).strip()
    for m in re.finditer(r"([0-9]*\.?[0-9]+)(ms|us|µs|ns|h|m|s)", s):
        if m.start() != pos:
            raise ValueError(f"bad duration {value!r}")
        total += float(m.group(1)) * units[m.group(2)]
        pos = m.end()
    if pos != len(s) or not s:
        raise ValueError(f"bad duration {value!r}")
    return total or None


def resolve_gateway(name: str, vs_namespace: str) -> str:
    """``mesh`` stays; ``name`` means the Gateway in the VirtualService's namespace; ``ns/name`` as is."""
    if name == MESH or "/" in name:
        return name
    return f"{vs_namespace}/{name}"


def compile_http_route(spec: Mapping[str, Any], vs_namespace: str, vs_name: str, index: int, domain: str) -> HttpRoute:
    route_list = spec.get("route") or []
    dests = []
    for d in route_list:
        dst = d.get("destination") or {}
        host = canonical_host(str(dst.get("host") or ""), vs_namespace, domain)
        port = (dst.get("port") or {}).get("number")
        w = d.get("weight")
        dests.append(
            Destination(
                host=host,
                subset=dst.get("subset") or None,
                port=int(port) if port else None,
                weight=int(w) if w is not None else 0,
                request_headers=HeaderOps.parse((d.get("headers") or {}).get("request")),
                response_headers=HeaderOps.parse((d.get("headers") or {}).get("response")),
                service=service_of(host, domain),
            )
        )
    rewrite = spec.get("rewrite") or {}
    return HttpRoute(
        vs_namespace=vs_namespace,
        vs_name=vs_name,
        name=str(spec.get("name") or f"{vs_namespace}/{vs_name}#{index}"),
        matches=tuple(Match.parse(m, vs_namespace) for m in spec.get("match") or []),
        destinations=tuple(dests),
        timeout=parse_duration(spec.get("timeout")),
        rewrite_uri=rewrite.get("uri"),
        rewrite_authority=rewrite.get("authority"),
        request_headers=HeaderOps.parse((spec.get("headers") or {}).get("request")),
        response_headers=HeaderOps.parse((spec.get("headers") or {}).get("response")),
    )


def _created(obj: Mapping[str, Any]) -> tuple[str, str, str]:
    meta = obj.get("metadata") or {}
    return meta.get("creationTimestamp") or "", meta.get("namespace") or "", meta.get("name") or ""


def gateway_key(gw: Mapping[str, Any]) -> str:
    meta = gw.get("metadata") or {}
    return f"{meta.get('namespace') or ''}/{meta.get('name') or ''}"


def selected_gateways(
    gateways: Iterable[Mapping[str, Any]], labels: Mapping[str, str], names: Iterable[str] = ()
) -> dict[str, list[tuple[str, str]]]:
    """Gateways an ingress plays: those whose selector its labels satisfy, plus any named explicitly.

    Returns ``{"ns/name": [(server-host namespace, host pattern), ...]}``.
    """
    wanted = set(names)
    out: dict[str, list[tuple[str, str]]] = {}
    for gw in gateways:
        key = gateway_key(gw)
        spec = gw.get("spec") or {}
        selector = spec.get("selector") or {}
        by_name = key in wanted or key.split("/", 1)[1] in wanted
        by_selector = bool(labels) and bool(selector) and all(labels.get(k) == v for k, v in selector.items())
        if not (by_name or by_selector):
            continue
        gw_ns = key.split("/", 1)[0]
        hosts: list[tuple[str, str]] = []
        for server in spec.get("servers") or []:
            for h in server.get("hosts") or []:
                ns, sep, host = str(h).rpartition("/")
                if not sep:
                    ns = "*"
                elif ns == ".":
                    ns = gw_ns
                hosts.append((ns, host.lower()))
        out[key] = hosts
    return out


@dataclasses.dataclass
class RouteTable:
    """Routes one proxy applies: the sidecar's (``gateways={"mesh"}``) or an ingress gateway's."""

    gateways: frozenset[str]
    hosts: HostTable
    domain: str = DEFAULT_DOMAIN

    @classmethod
    def build(
        cls,
        virtualservices: Iterable[Mapping[str, Any]],
        gateways: frozenset[str] | Mapping[str, list[tuple[str, str]]],
        domain: str = DEFAULT_DOMAIN,
    ) -> RouteTable:
        """VirtualServices bound to ``gateways`` (oldest first, as Istio merges them) indexed by host.

        For an ingress, ``gateways`` maps each played Gateway to its server hosts, which narrow the
        VirtualService hosts the way Istio intersects them.
        """
        server_hosts = gateways if isinstance(gateways, Mapping) else None
        keys = frozenset(gateways)
        table = HostTable()
        for vs in sorted(virtualservices, key=_created):
            meta = vs.get("metadata") or {}
            ns, name = meta.get("namespace") or "default", meta.get("name") or ""
            spec = vs.get("spec") or {}
            bound = {resolve_gateway(g, ns) for g in spec.get("gateways") or [MESH]}
            served = bound & keys
            if not served:
                continue
            routes = []
            for i, http in enumerate(spec.get("http") or []):
                try:
                    routes.append(compile_http_route(http, ns, name, i, domain))
                except (re.error, ValueError, TypeError, AttributeError) as exc:
                    log.warning("virtualservice %s/%s: http[%d] ignored: %s", ns, name, i, exc)
            hosts = [canonical_host(str(h), ns, domain) for h in spec.get("hosts") or []]
            if MESH in served and "*" in hosts:
                # Istio's validation refuses a bare "*" host on a VirtualService bound to the mesh (it
                # would capture every sidecar's traffic); the CRD alone accepts it. Ignored, as Istio
                # would never have admitted it.
                if (ns, name) not in _WARNED:
                    _WARNED.add((ns, name))
                    log.warning("virtualservice %s/%s: host '*' is not allowed for the mesh; ignored", ns, name)
                continue
            if server_hosts is not None:
                admitted: set[str] = set()
                for gw in served:
                    for sns, pattern in server_hosts.get(gw, []):
                        if sns not in ("*", ns):
                            continue
                        for h in hosts:
                            both = _more_specific(canonical_host(pattern, None, domain), h)
                            if both is not None:
                                admitted.add(both)
                hosts = sorted(admitted)
            for h in dict.fromkeys(hosts):
                table.add(h, routes)
        return cls(keys, table, domain)

    def lookup(self, host: str, source_namespace: str | None) -> list[HttpRoute] | None:
        """Routes for a request host: its DNS-completed form first, then the name as written."""
        full = canonical_host(host, source_namespace, self.domain)
        found = self.hosts.get(full)
        if found is None and full != host:
            found = self.hosts.get(host)
        return found


# ---- decisions -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Decision:
    """Where a request goes. ``route`` is None for a host without a VirtualService (straight to its Service)."""

    destination: Destination | None
    route: HttpRoute | None = None
    match: Match | None = None

    @property
    def no_route(self) -> bool:
        return self.destination is None and self.route is None


NO_ROUTE = Decision(None)


def pick_weighted(destinations: tuple[Destination, ...], r: float) -> Destination | None:
    """Istio's weights: one destination takes everything; otherwise weight/sum, an absent weight being 0.

    ``r`` is uniform in [0, 1). None when every weight is 0 (Istio refuses such a route).
    """
    if not destinations:
        return None
    if len(destinations) == 1:
        return destinations[0]
    total = sum(max(d.weight, 0) for d in destinations)
    if total <= 0:
        return None
    x = r * total
    last = None
    for d in destinations:
        if d.weight <= 0:
            continue
        last = d
        if x < d.weight:
            return d
        x -= d.weight
    return last


def decide(table: RouteTable, req: RequestInfo, rand: Callable[[], float]) -> Decision:
    """Routes a request: the first matching ``http[]`` of the host's VirtualServices, then a weighted pick.

    On a sidecar a host without a VirtualService goes to its own Service; an ingress has no such
    fallback. A matching route whose weights are all 0 yields a Decision without destination
    but with the route, which the proxy answers with 503.
    """
    routes = table.lookup(req.host, req.source_namespace)
    if routes is None:
        if MESH not in table.gateways:
            return NO_ROUTE
        fqdn = canonical_host(req.host, req.source_namespace, table.domain)
        svc = service_of(fqdn, table.domain)
        if svc is None:
            return NO_ROUTE
        return Decision(Destination(fqdn, None, None, 100, service=svc))
    for route in routes:
        m = route.match(req)
        if m is None:
            continue
        return Decision(pick_weighted(route.destinations, rand()), route, m)
    return NO_ROUTE


def rewrite_path(path: str, route: HttpRoute, match: Match | None) -> str:
    """Istio ``rewrite.uri``: replaces the matched prefix (or the whole path for other matches)."""
    new = route.rewrite_uri
    if new is None:
        return path
    base, q, query = path.partition("?")
    if match is None or match.uri is None:
        prefix = "/"
        base = new + base[len(prefix) :] if base.startswith(prefix) else new + base
    elif match.uri.kind == "prefix":
        n = len(match.uri.value)
        base = new + base[n:]
    else:
        base = new
    return base + q + query


# ---- subsets and endpoints -----------------------------------------------------------------------


def destination_rule_for(
    rules: Iterable[Mapping[str, Any]],
    fqdn: str,
    source_namespace: str | None,
    domain: str = DEFAULT_DOMAIN,
) -> Mapping[str, Any] | None:
    """The DestinationRule that applies to ``fqdn``: Istio looks in the client's namespace first, then
    the service's; an exact host beats a wildcard; the oldest wins a tie."""
    svc = service_of(fqdn, domain)
    svc_ns = svc[0] if svc else None
    best: tuple[int, int, tuple[str, str, str]] | None = None
    found = None
    for dr in rules:
        meta = dr.get("metadata") or {}
        ns = meta.get("namespace") or "default"
        host = canonical_host(str((dr.get("spec") or {}).get("host") or ""), ns, domain)
        if not host_matches(host, fqdn):
            continue
        where = 0 if ns == source_namespace else 1 if ns == svc_ns else 2
        exact = 0 if host == fqdn else 1
        rank = (where, exact, _created(dr))
        if best is None or rank < best:
            best, found = rank, dr
    return found


def subset_labels(rule: Mapping[str, Any] | None, subset: str) -> dict[str, str] | None:
    """Labels of a named subset; None when the rule or the subset does not exist."""
    if rule is None:
        return None
    for s in (rule.get("spec") or {}).get("subsets") or []:
        if s.get("name") == subset:
            return {str(k): str(v) for k, v in (s.get("labels") or {}).items()}
    return None


@dataclasses.dataclass(frozen=True)
class Endpoint:
    ip: str
    port: int
    pod: tuple[str, str] | None  # (namespace, name) from the EndpointSlice targetRef


def target_port(service: Mapping[str, Any], port: int | None) -> tuple[int, str] | None:
    """Chooses the Service port a request uses: the asked one when the Service has it, else its only
    (or first) port. Returns ``(port, name)``."""
    ports = (service.get("spec") or {}).get("ports") or []
    tcp = [p for p in ports if (p.get("protocol") or "TCP") == "TCP"]
    if not tcp:
        return None
    if port is not None:
        for p in tcp:
            if int(p.get("port") or 0) == port:
                return port, p.get("name") or ""
    p = tcp[0]
    return int(p["port"]), p.get("name") or ""


def slice_endpoints(
    slices: Iterable[Mapping[str, Any]],
    port_name: str,
    pod_labels: Callable[[str, str], Mapping[str, str] | None],
    labels: Mapping[str, str] | None,
) -> list[Endpoint]:
    """Ready endpoints of a Service port from its EndpointSlices, narrowed to pods carrying ``labels``.

    The EndpointSlice port with the Service port's name gives the target port; an absent ``ready``
    condition counts as ready, as the API defines it.
    """
    out: list[Endpoint] = []
    for s in slices:
        number = None
        for p in s.get("ports") or []:
            if (p.get("name") or "") == port_name and p.get("port"):
                number = int(p["port"])
                break
        if number is None:
            continue
        for ep in s.get("endpoints") or []:
            if (ep.get("conditions") or {}).get("ready") is False:
                continue
            ref = ep.get("targetRef") or {}
            pod = (ref.get("namespace") or "", ref.get("name") or "") if ref.get("kind") == "Pod" else None
            if labels:
                have = pod_labels(*pod) if pod else None
                if have is None or any(have.get(k) != v for k, v in labels.items()):
                    continue
            for addr in ep.get("addresses") or []:
                out.append(Endpoint(str(addr), number, pod))
    return out


def workload_of(pod: Mapping[str, Any]) -> str:
    """Istio's workload name: the Deployment behind a ReplicaSet, else the owner, else the pod."""
    meta = pod.get("metadata") or {}
    owners = meta.get("ownerReferences") or []
    labels = meta.get("labels") or {}
    if owners:
        owner = owners[0]
        name = str(owner.get("name") or "")
        h = labels.get("pod-template-hash")
        if owner.get("kind") == "ReplicaSet" and h and name.endswith("-" + h):
            return name[: -len(h) - 1]
        return name
    return str(meta.get("name") or "unknown")
