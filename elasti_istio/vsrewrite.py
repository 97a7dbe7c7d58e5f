"""VirtualService rewrite between serve mode and proxy mode: a pure function of the spec, no I/O.

Proxy mode moves the traffic share of a scaled-to-zero target to the activator, inside the same
``http[].route[]`` so that matches, retries, timeouts, rewrites, mirrors and every other field keep
applying; serve mode gives the share back exactly. Only ``spec.http[].route[]`` is ever changed.

Effective weights (how Istio >= 1.15 turns ``weight`` into traffic; ``effective_weights``):

* a route with ONE destination sends it all the traffic whatever its weight (pilot builds a plain
  cluster route and ignores the weight; the API documents "assumed to be 100"). Its effective weight
  is its own weight when that is a positive integer, else 100, so an absent or ``0`` weight is 100;
* in a route with TWO OR MORE destinations an absent weight is ``0``: the field is a proto3
  ``int32`` whose absence decodes as ``0``, pilot skips zero-weight destinations of a weighted route
  ("Ignore 0 weighted clusters if there are other clusters in the route") and Envoy splits the rest
  as ``weight / sum``; Istio's validation only asks that the sum be above 0 (the "== 100" rule was
  dropped in 1.15). Negative or non-integer weights (refused by Istio's validation) count as 0.

A route's total is the sum of its effective weights; proxy mode never changes it.

Restore data (``RestoreEntries``, stored by the caller in the ``RESTORE_ANNOTATION`` annotation): one
entry per route holding this target's activator destination, in document order, so that routes
inserted or deleted by someone else while in proxy mode do not misalign it. An entry is
``{"weights": [...], "others": [[i, w], ...]}``:

* ``weights``: the original weights of the target's destinations of that route, in order, ``None``
  where the field was absent;
* ``at``: where those destinations are in the route, with their host and subset, so that serve mode
  finds them again without having to know which subsets are the target's (its workload may be gone);
* ``others`` (left out when empty): the other destinations (neither the target's nor this target's
  activator), by their position ``i`` among those, whose weight proxy mode made explicit, with the
  original value ``w`` (``None`` when absent).

An entry may also be ``None``: the original of a route already in proxy mode was unknown, and serve
mode falls back as described in ``to_serve``.

Several targets may share one VirtualService (Bookinfo's reviews v1/v2/v3, one ElastiService each)
as long as their destinations are disjoint: each one sees the other's activator destination as just
another destination, and any interleaving of proxy and serve for them gives the original back.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

RESTORE_ANNOTATION = "elasti.truefoundry.com/original-routes"
HEADER = "elasti-service"
TOKEN_HEADER = "elasti-token"

RestoreEntry = dict[str, Any]
RestoreEntries = list[RestoreEntry | None]

_SINGLE_ROUTE_WEIGHT = 100


@dataclass(frozen=True)
class Target:
    """The destinations of one ElastiService, and the value of the header that names its queue."""

    namespace: str
    name: str
    service: str
    subsets: frozenset[str] = frozenset()
    whole_service: bool = True
    token: str | None = None  # the route token (:mod:`elasti_istio.routekey`) the activator destination sets

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class ActivatorRef:
    """Where proxy mode sends the target's share."""

    host: str
    port: int


# --- hosts and destinations -------------------------------------------------------------------


def _resolve(host: Any, vs_namespace: str | None, cluster_domain: str) -> tuple[str, str] | None:
    """(service, namespace) of a Kubernetes Service host, or None for anything else (external, wildcard)."""
    if not isinstance(host, str) or not host or "*" in host:
        return None
    parts = host.split(".")
    if any(not p for p in parts):
        return None
    if len(parts) == 1:
        return (host, vs_namespace) if vs_namespace else None
    if len(parts) == 2:
        return parts[0], parts[1]
    if parts[2] != "svc":
        return None
    if len(parts) == 3 or ".".join(parts[3:]) == cluster_domain:
        return parts[0], parts[1]
    return None


def matches(
    dest_host: str, dest_subset: str | None, vs_namespace: str, target: Target, cluster_domain: str = "cluster.local"
) -> bool:
    """Whether a destination (host resolved against the VirtualService's namespace) is one of the target's."""
    if _resolve(dest_host, vs_namespace, cluster_domain) != (target.service, target.namespace):
        return False
    if dest_subset:
        return dest_subset in target.subsets
    return target.whole_service


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _dest_matches(entry: dict, vs_namespace: str, target: Target, cluster_domain: str) -> bool:
    dest = entry.get("destination")
    if not isinstance(dest, dict):
        return False
    subset = dest.get("subset")
    return matches(dest.get("host"), subset if isinstance(subset, str) else None, vs_namespace, target, cluster_domain)


def _header_value(headers: Any, name: str) -> Any:
    request = headers.get("request") if isinstance(headers, dict) else None
    values = request.get("set") if isinstance(request, dict) else None
    if not isinstance(values, dict):
        return None
    for key, value in values.items():
        if isinstance(key, str) and key.lower() == name:
            return value
    return None


def _activator_value(entry: dict, activator: ActivatorRef, vs_namespace: str | None, cluster_domain: str) -> str | None:
    """The ``elasti-service`` value an activator destination (the activator host in any form) sets; None
    for any other destination."""
    dest = entry.get("destination")
    if not isinstance(dest, dict):
        return None
    host = dest.get("host")
    if host != activator.host:
        resolved = _resolve(host, vs_namespace, cluster_domain)
        if resolved is None or resolved != _resolve(activator.host, vs_namespace, cluster_domain):
            return None
    value = _header_value(entry.get("headers"), HEADER)
    return value if isinstance(value, str) else None


def _is_own_activator(
    entry: dict, target: Target, activator: ActivatorRef, vs_namespace: str | None, cluster_domain: str
) -> bool:
    """This target's activator destination: the activator host in any form, and our header `set` to the target."""
    value = _activator_value(entry, activator, vs_namespace, cluster_domain)
    return value is not None and value.partition(":")[0] == target.key


def _port_of(dest: dict) -> int | None:
    port = (dest.get("destination") or {}).get("port") if isinstance(dest.get("destination"), dict) else None
    number = port.get("number") if isinstance(port, dict) else None
    return number if _is_int(number) and 0 < number < 65536 else None


def _http_routes(spec: Any) -> Iterator[tuple[dict, list[dict]]]:
    """(http rule, its route list) for every rule whose route is a list of destination objects."""
    http = spec.get("http") if isinstance(spec, dict) else None
    if not isinstance(http, list):
        return
    for rule in http:
        if not isinstance(rule, dict):
            continue
        route = rule.get("route")
        if isinstance(route, list) and route and all(isinstance(d, dict) for d in route):
            yield rule, route


# --- weights ----------------------------------------------------------------------------------


def effective_weights(route: list[dict]) -> list[int]:
    """The weight Istio gives each destination of one ``http[].route`` (see the module docstring)."""
    weights = [d.get("weight") for d in route]
    if len(weights) == 1:
        w = weights[0]
        return [w if _is_int(w) and w > 0 else _SINGLE_ROUTE_WEIGHT]
    return [w if _is_int(w) and w > 0 else 0 for w in weights]


def route_total(route: list[dict]) -> int:
    """Sum of the effective weights: the quantity proxy mode keeps unchanged."""
    return sum(effective_weights(route))


# --- queries ----------------------------------------------------------------------------------


def routes_to(spec: dict, vs_namespace: str, target: Target, cluster_domain: str = "cluster.local") -> bool:
    """Whether some ``http[].route[]`` destination is one of the target's (zero weight included)."""
    return any(_dest_matches(d, vs_namespace, target, cluster_domain) for _, route in _http_routes(spec) for d in route)


def target_destinations(
    spec: dict, vs_namespace: str, target: Target, cluster_domain: str = "cluster.local"
) -> frozenset[tuple[str, str, str]]:
    """``(service namespace, service, subset or "")`` of every ``http[].route[]`` destination that is one of
    the target's: what two ElastiServices must not both claim in one VirtualService."""
    out = set()
    for _, route in _http_routes(spec):
        for entry in route:
            if _dest_matches(entry, vs_namespace, target, cluster_domain):
                subset = entry["destination"].get("subset")
                out.add((target.namespace, target.service, subset if isinstance(subset, str) else ""))
    return frozenset(out)


def route_timeouts(
    spec: dict, vs_namespace: str, target: Target, cluster_domain: str = "cluster.local"
) -> list[tuple[str, str]]:
    """``(field, duration)`` of the ``timeout`` and ``retries.perTryTimeout`` of the http rules that carry
    one of the target's destinations: Envoy ends a held request at whichever comes first."""
    out = []
    for rule, route in _http_routes(spec):
        if not any(_dest_matches(d, vs_namespace, target, cluster_domain) for d in route):
            continue
        timeout = rule.get("timeout")
        if isinstance(timeout, str):
            out.append(("timeout", timeout))
        retries = rule.get("retries")
        per_try = retries.get("perTryTimeout") if isinstance(retries, dict) else None
        if isinstance(per_try, str):
            out.append(("retries.perTryTimeout", per_try))
    return out


def target_ports(
    spec: dict, vs_namespace: str, target: Target, cluster_domain: str = "cluster.local"
) -> set[int | None]:
    """The Service ports the target's destinations name in the http routes, zero weight included;
    ``None`` for a route that gives the activator no port (a destination names none, or they name
    several): its requests go to the ElastiService's port, or the one they came in on."""
    out: set[int | None] = set()
    for _, route in _http_routes(spec):
        ports = {_port_of(d) for d in route if _dest_matches(d, vs_namespace, target, cluster_domain)}
        out |= ports
        if len(ports) > 1:
            out.add(None)
    return out


def is_proxied(
    spec: dict,
    target: Target,
    activator: ActivatorRef,
    vs_namespace: str | None = None,
    cluster_domain: str = "cluster.local",
) -> bool:
    """Whether some route holds this target's activator destination.

    Without ``vs_namespace`` a short activator host only matches when written exactly as ``activator.host``.
    """
    return any(
        _is_own_activator(d, target, activator, vs_namespace, cluster_domain)
        for _, route in _http_routes(spec)
        for d in route
    )


# --- proxy mode -------------------------------------------------------------------------------


def _activator_destination(
    target: Target, activator: ActivatorRef, weight: int, source_headers: Any, port: int | None = None
) -> dict:
    """The activator destination; the header is `set` (never `add`) so that a client cannot choose the queue.
    Its value is ``<namespace>/<name>``, with ``:<port>`` when the target's destination named the Service
    port the route chose (the activator forwards there); with a route key, ``elasti-token`` is set too."""
    ours = {HEADER, TOKEN_HEADER}
    headers = copy.deepcopy(source_headers) if isinstance(source_headers, dict) else {}
    request = headers.get("request")
    request = request if isinstance(request, dict) else {}
    for op in ("set", "add"):
        values = request.get(op)
        if isinstance(values, dict):
            values = {k: v for k, v in values.items() if not (isinstance(k, str) and k.lower() in ours)}
            if values or op == "set":
                request[op] = values
            else:
                del request[op]
    remove = request.get("remove")
    if isinstance(remove, list):
        remove = [h for h in remove if not (isinstance(h, str) and h.lower() in ours)]
        if remove:
            request["remove"] = remove
        else:
            del request["remove"]
    values = request.get("set")
    if not isinstance(values, dict):
        values = {}
    values[HEADER] = target.key if port is None else f"{target.key}:{port}"
    if target.token:
        values[TOKEN_HEADER] = target.token
    request["set"] = values
    headers["request"] = request
    return {
        "destination": {"host": activator.host, "port": {"number": activator.port}},
        "weight": weight,
        "headers": headers,
    }


def to_proxy(
    spec: dict,
    vs_namespace: str,
    target: Target,
    activator: ActivatorRef,
    restore: RestoreEntries | None = None,
    cluster_domain: str = "cluster.local",
) -> tuple[dict, RestoreEntries]:
    """Proxy mode: the target's share of every http route goes to one activator destination appended to it.

    The target's destinations stay in place with weight 0 and the activator destination gets the sum of
    their effective weights; every other destination of a rewritten route gets its effective weight
    written out, so each rewritten route carries explicit integer weights with an unchanged total. When
    exactly one of the target's destinations carried traffic, its ``headers`` are copied onto the
    activator destination, so that its header operations still apply on the way through the activator.
    Routes that carry no share of the target are left alone. Routes that already hold this target's
    activator destination are left alone too (applying proxy mode twice changes nothing) and keep their
    entry from ``restore``, or ``None`` when it has none.

    Returns the new spec and the restore entries of every route now in proxy mode, in document order.
    """
    out = copy.deepcopy(spec)
    prior = list(restore) if isinstance(restore, list) else []
    carried = 0
    entries: RestoreEntries = []
    for _, route in _http_routes(out):
        if any(_is_own_activator(d, target, activator, vs_namespace, cluster_domain) for d in route):
            entries.append(copy.deepcopy(prior[carried]) if carried < len(prior) else None)
            carried += 1
            continue
        matched = {i for i, d in enumerate(route) if _dest_matches(d, vs_namespace, target, cluster_domain)}
        eff = effective_weights(route)
        share = sum(eff[i] for i in matched)
        if share <= 0:
            continue
        live = [i for i in sorted(matched) if eff[i] > 0]
        source_headers = route[live[0]].get("headers") if len(live) == 1 else None
        ports = {_port_of(route[i]) for i in live}
        port = ports.pop() if len(ports) == 1 else None
        entry: RestoreEntry = {
            "weights": [copy.deepcopy(route[i].get("weight")) for i in sorted(matched)],
            "at": [[i, _dest_id(route[i])] for i in sorted(matched)],
        }
        others: list[list[Any]] = []
        position = 0
        for i, d in enumerate(route):
            if i in matched:
                d["weight"] = 0
                continue
            w = d.get("weight")
            if not (_is_int(w) and w == eff[i]):
                others.append([position, copy.deepcopy(w)])
                d["weight"] = eff[i]
            position += 1
        if others:
            entry["others"] = others
        route.append(_activator_destination(target, activator, share, source_headers, port))
        _order_trailing_activators(route, activator, vs_namespace, cluster_domain)
        entries.append(entry)
    return out, entries


def _order_trailing_activators(
    route: list[dict], activator: ActivatorRef, vs_namespace: str, cluster_domain: str
) -> None:
    """Sorts the activator destinations at the end of a route by their header value. Several targets of
    one route each append theirs; in one order, whatever order they were switched in, bringing one of
    them back to serve mode and proxying it again (a reconcile in proxy mode) is a fixed point."""
    start = len(route)
    while start > 0 and _activator_value(route[start - 1], activator, vs_namespace, cluster_domain) is not None:
        start -= 1
    route[start:] = sorted(route[start:], key=lambda d: str(_header_value(d.get("headers"), HEADER)))


# --- serve mode -------------------------------------------------------------------------------


def _set_weight(dest: dict, weight: Any) -> None:
    if weight is None:
        dest.pop("weight", None)
    else:
        dest["weight"] = copy.deepcopy(weight)


def _split(total: int, parts: int) -> list[int]:
    base, rest = divmod(total, parts)
    return [base + (1 if i < rest else 0) for i in range(parts)]


def _current(dest: dict) -> int:
    w = dest.get("weight")
    return w if _is_int(w) and w > 0 else 0


def _written_zero(dest: dict) -> bool:
    w = dest.get("weight")
    return _is_int(w) and w == 0


def _fallback_destination(target: Target, cluster_domain: str) -> dict | None:
    host = f"{target.service}.{target.namespace}.svc.{cluster_domain}"
    if target.whole_service:
        return {"destination": {"host": host}}
    if len(target.subsets) == 1:
        return {"destination": {"host": host, "subset": next(iter(target.subsets))}}
    return None


def _serve_route(
    route: list[dict],
    entry: Any,
    vs_namespace: str,
    target: Target,
    activator: ActivatorRef,
    cluster_domain: str,
) -> list[dict]:
    own = [_is_own_activator(d, target, activator, vs_namespace, cluster_domain) for d in route]
    share = sum(_current(d) for d, is_own in zip(route, own, strict=True) if is_own)
    rest = [d for d, is_own in zip(route, own, strict=True) if not is_own]
    entry = entry if isinstance(entry, dict) else {}
    positions = _recorded_positions(entry, rest)
    if positions is None:
        positions = [j for j, d in enumerate(rest) if _dest_matches(d, vs_namespace, target, cluster_domain)]
    matched = [rest[j] for j in positions]
    others = [d for j, d in enumerate(rest) if j not in positions]
    weights = entry.get("weights")
    if isinstance(weights, list) and matched and len(weights) == len(matched):
        for dest, original in zip(matched, weights, strict=True):
            # A weight someone changed while in proxy mode is theirs to keep.
            if _written_zero(dest):
                _set_weight(dest, original)
    elif matched:
        for dest, part in zip(matched, _split(share, len(matched)), strict=True):
            dest["weight"] = _current(dest) + part
    elif others:
        if not any(_current(d) for d in others) and share > 0:
            for dest, part in zip(others, _split(share, len(others)), strict=True):
                dest["weight"] = part
    else:
        replacement = _fallback_destination(target, cluster_domain)
        if replacement is None:
            return route
        rest = [replacement]
    recorded = entry.get("others")
    if isinstance(recorded, list):
        for item in recorded:
            if not (isinstance(item, list) and len(item) == 2 and _is_int(item[0])):
                continue
            position, original = item
            if 0 <= position < len(others) and _written_zero(others[position]):
                _set_weight(others[position], original)
    return rest


def _dest_id(entry: dict) -> list[Any]:
    dest = entry.get("destination") if isinstance(entry.get("destination"), dict) else {}
    return [dest.get("host"), dest.get("subset")]


def _recorded_positions(entry: dict, rest: list[dict]) -> list[int] | None:
    """The target's destinations as proxy mode recorded them (position and host/subset), when they are
    still where they were. Serve mode then needs no knowledge of which subsets are the target's, so a
    target that has disappeared meanwhile is still restored exactly."""
    at = entry.get("at")
    if not isinstance(at, list) or not at:
        return None
    out: list[int] = []
    for item in at:
        if not (isinstance(item, list) and len(item) == 2 and _is_int(item[0])):
            return None
        j, ident = item
        if not 0 <= j < len(rest) or j in out or _dest_id(rest[j]) != ident:
            return None
        out.append(j)
    return out


def to_serve(
    spec: dict,
    vs_namespace: str,
    target: Target,
    activator: ActivatorRef,
    restore: RestoreEntries | None,
    cluster_domain: str = "cluster.local",
) -> dict:
    """Serve mode: every route holding this target's activator destination gets its original weights back.

    Routes are paired with ``restore`` entries in document order. With a matching entry the activator
    destination is removed and the weights come back exactly (absent where they were absent), except
    that a destination whose weight is no longer the 0 proxy mode wrote keeps the value someone gave it.
    When the entry is missing or does not fit the route (the VirtualService was edited by hand), the
    activator's weight goes back to the target's destinations, split as evenly as integers allow; with
    none left, to the other destinations if they would otherwise carry nothing; with no destination
    left at all, the route points at the target's Service (whole, or its only subset), or keeps the
    activator when the target names several subsets and there is no telling which one. Routes without
    this target's activator destination are untouched, so applying serve mode twice changes nothing.
    """
    out = copy.deepcopy(spec)
    entries = list(restore) if isinstance(restore, list) else []
    index = 0
    for rule, route in _http_routes(out):
        if not any(_is_own_activator(d, target, activator, vs_namespace, cluster_domain) for d in route):
            continue
        entry = entries[index] if index < len(entries) else None
        index += 1
        rule["route"] = _serve_route(route, entry, vs_namespace, target, activator, cluster_domain)
    return out


# --- the restore annotation -------------------------------------------------------------------


def read_restore(annotations: dict[str, str] | None) -> dict[str, RestoreEntries]:
    """The restore entries of every target, by ``Target.key``; anything unreadable reads as nothing."""
    raw = (annotations or {}).get(RESTORE_ANNOTATION)
    if not isinstance(raw, str):
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, list)}


def write_restore(annotations: dict[str, str] | None, key: str, entries: RestoreEntries | None) -> str | None:
    """The annotation value with ``key`` set to ``entries`` (dropped when None or empty); None when nothing is left.

    The value is compact JSON with sorted keys, so that rewriting the same data is no change at all.
    """
    data = read_restore(annotations)
    if entries:
        data[key] = entries
    else:
        data.pop(key, None)
    if not data:
        return None
    return json.dumps(data, separators=(",", ":"), sort_keys=True)
