"""Properties of the VirtualService rewrite over generated specs that Istio would accept."""

from __future__ import annotations

import copy
import itertools
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from elasti_istio.vsrewrite import (
    HEADER,
    RESTORE_ANNOTATION,
    ActivatorRef,
    Target,
    effective_weights,
    matches,
    read_restore,
    route_total,
    to_proxy,
    to_serve,
    write_restore,
)

SETTINGS = settings(max_examples=300, deadline=None)
ACT = ActivatorRef("elasti-activator.elasti-system.svc.cluster.local", 8012)

MATCHING_HOSTS = ["reviews", "reviews.bookinfo", "reviews.bookinfo.svc", "reviews.bookinfo.svc.cluster.local"]
OTHER_HOSTS = [
    "reviews.other",
    "reviews.other.svc.cluster.local",
    "ratings",
    "ratings.bookinfo.svc.cluster.local",
    "reviews.bookinfo.svc.other.domain",
    "httpbin.org",
    "*.example.com",
]

WHOLE = Target("bookinfo", "reviews", "reviews")
V1 = Target("bookinfo", "reviews-v1", "reviews", frozenset({"v1"}), whole_service=False)
V2 = Target("bookinfo", "reviews-v2", "reviews", frozenset({"v2"}), whole_service=False)
V3_AND_WHOLE = Target("bookinfo", "reviews-v3", "reviews", frozenset({"v3"}), whole_service=True)
V12 = Target("bookinfo", "reviews-old", "reviews", frozenset({"v1", "v2"}), whole_service=False)
TARGETS = [WHOLE, V1, V2, V3_AND_WHOLE, V12]
DISJOINT_PAIRS = [(V1, V2), (WHOLE, V1), (V12, V3_AND_WHOLE), (V2, V3_AND_WHOLE)]

names = st.sampled_from(["x-a", "x-b", "x-user", HEADER, "Elasti-Service"])
values = st.text("abc/-", max_size=4)
header_ops = st.fixed_dictionaries(
    {},
    optional={
        "set": st.dictionaries(names, values, max_size=2),
        "add": st.dictionaries(names, values, max_size=2),
        "remove": st.lists(names, max_size=2, unique=True),
    },
)
headers = st.fixed_dictionaries({}, optional={"request": header_ops, "response": header_ops})

weights = st.one_of(st.none(), st.just(0), st.integers(1, 100))


@st.composite
def destinations(draw: st.DrawFn) -> dict:
    if draw(st.integers(0, 15)) == 0:  # another ElastiService's activator destination
        return {
            "destination": {"host": ACT.host, "port": {"number": ACT.port}},
            "weight": draw(st.integers(1, 100)),
            "headers": {"request": {"set": {HEADER: "bookinfo/ratings"}}},
        }
    dest: dict[str, Any] = {"host": draw(st.sampled_from(MATCHING_HOSTS * 3 + OTHER_HOSTS))}
    subset = draw(st.sampled_from([None, None, "v1", "v2", "v3"]))
    if subset:
        dest["subset"] = subset
    if draw(st.integers(0, 3)) == 0:
        dest["port"] = {"number": draw(st.sampled_from([9080, 8080]))}
    out: dict[str, Any] = {"destination": dest}
    w = draw(weights)
    if w is not None:
        out["weight"] = w
    if draw(st.integers(0, 3)) == 0:
        out["headers"] = draw(headers)
    return out


@st.composite
def routes(draw: st.DrawFn) -> list[dict]:
    route = draw(st.lists(destinations(), min_size=1, max_size=4))
    if len(route) > 1 and not any(isinstance(d.get("weight"), int) and d["weight"] > 0 for d in route):
        route[draw(st.integers(0, len(route) - 1))]["weight"] = draw(st.integers(1, 100))  # Istio: total > 0
    return route


http_matches = st.lists(
    st.one_of(
        st.fixed_dictionaries({"uri": st.fixed_dictionaries({"prefix": st.sampled_from(["/", "/api", "/v2"])})}),
        st.fixed_dictionaries({"headers": st.just({"end-user": {"exact": "jason"}})}),
    ),
    min_size=1,
    max_size=2,
)


@st.composite
def http_rules(draw: st.DrawFn) -> dict:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return {"match": draw(http_matches), "redirect": {"uri": "/moved"}}
    if kind == 1:
        return {"directResponse": {"status": 503}}
    rule = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "name": st.sampled_from(["primary", "canary"]),
                "match": http_matches,
                "retries": st.fixed_dictionaries(
                    {"attempts": st.integers(1, 5)}, optional={"perTryTimeout": st.sampled_from(["1s", "250ms"])}
                ),
                "timeout": st.sampled_from(["5s", "1.5s", "100ms", "1m"]),
                "mirror": st.fixed_dictionaries({"host": st.sampled_from(MATCHING_HOSTS + OTHER_HOSTS)}),
                "mirrorPercentage": st.fixed_dictionaries({"value": st.floats(0, 100)}),
                "headers": headers,
                "rewrite": st.just({"uri": "/"}),
            },
        )
    )
    rule["route"] = draw(routes())
    return rule


@st.composite
def specs(draw: st.DrawFn) -> dict:
    spec: dict[str, Any] = {"hosts": ["reviews"], "http": draw(st.lists(http_rules(), min_size=1, max_size=4))}
    if draw(st.booleans()):
        spec["gateways"] = ["mesh"]
    if draw(st.booleans()):
        spec["tcp"] = [{"match": [{"port": 31400}], "route": draw(routes())}]
    if draw(st.booleans()):
        spec["tls"] = [{"match": [{"port": 443, "sniHosts": ["reviews"]}], "route": draw(routes())}]
    if draw(st.booleans()):
        spec["exportTo"] = ["."]
    return spec


vs_namespaces = st.sampled_from(["bookinfo", "bookinfo", "bookinfo", "other"])


# --- helpers ------------------------------------------------------------------------------------


def is_ours(d: dict, target: Target) -> bool:
    return (
        d["destination"]["host"] == ACT.host
        and str(d.get("headers", {}).get("request", {}).get("set", {}).get(HEADER)).partition(":")[0] == target.key
    )


def matched(d: dict, vs_ns: str, target: Target) -> bool:
    return matches(d["destination"]["host"], d["destination"].get("subset"), vs_ns, target)


def share(route: list[dict], vs_ns: str, target: Target) -> int:
    return sum(w for d, w in zip(route, effective_weights(route), strict=True) if matched(d, vs_ns, target))


def without_routes(spec: dict) -> dict:
    out = copy.deepcopy(spec)
    for rule in out["http"]:
        rule.pop("route", None)
    return out


def strip_weights(route: list[dict]) -> list[dict]:
    return [{k: v for k, v in d.items() if k != "weight"} for d in route]


# --- properties ---------------------------------------------------------------------------------


@SETTINGS
@given(specs(), vs_namespaces, st.sampled_from(TARGETS))
def test_serve_after_proxy_is_the_original(spec: dict, vs_ns: str, target: Target) -> None:
    frozen = copy.deepcopy(spec)
    proxied, entries = to_proxy(spec, vs_ns, target, ACT)
    assert spec == frozen
    assert json.loads(json.dumps(proxied)) == proxied
    assert to_serve(proxied, vs_ns, target, ACT, entries) == spec
    assert proxied == to_proxy(spec, vs_ns, target, ACT)[0]
    saved = read_restore({RESTORE_ANNOTATION: write_restore(None, target.key, entries) or ""}).get(target.key, [])
    assert saved == entries
    assert to_serve(proxied, vs_ns, target, ACT, saved) == spec


@SETTINGS
@given(specs(), vs_namespaces, st.sampled_from(TARGETS))
def test_each_mode_is_idempotent(spec: dict, vs_ns: str, target: Target) -> None:
    proxied, entries = to_proxy(spec, vs_ns, target, ACT)
    assert to_proxy(proxied, vs_ns, target, ACT, entries) == (proxied, entries)
    served = to_serve(proxied, vs_ns, target, ACT, entries)
    assert to_serve(served, vs_ns, target, ACT, entries) == served
    assert to_serve(spec, vs_ns, target, ACT, entries) == spec
    fallback = to_serve(proxied, vs_ns, target, ACT, None)
    assert to_serve(fallback, vs_ns, target, ACT, None) == fallback


@SETTINGS
@given(specs(), vs_namespaces, st.sampled_from(TARGETS))
def test_only_http_routes_change(spec: dict, vs_ns: str, target: Target) -> None:
    proxied, _ = to_proxy(spec, vs_ns, target, ACT)
    assert without_routes(proxied) == without_routes(spec)
    for before, after in zip(spec["http"], proxied["http"], strict=True):
        if "route" not in before:
            assert "route" not in after
            continue
        ours = [d for d in after["route"] if is_ours(d, target)]
        assert strip_weights([d for d in after["route"] if not is_ours(d, target)]) == strip_weights(before["route"])
        if share(before["route"], vs_ns, target) == 0:
            assert after == before
        else:
            assert len(ours) == 1 and after["route"][-1] is ours[0]


@SETTINGS
@given(specs(), vs_namespaces, st.sampled_from(TARGETS))
def test_proxy_mode_weights(spec: dict, vs_ns: str, target: Target) -> None:
    proxied, entries = to_proxy(spec, vs_ns, target, ACT)
    assert len(entries) == sum(any(is_ours(d, target) for d in r.get("route", [])) for r in proxied["http"])
    for before, after in zip(spec["http"], proxied["http"], strict=True):
        if "route" not in after:
            continue
        route = after["route"]
        assert share(route, vs_ns, target) == 0  # nothing reaches the target any more
        if not any(is_ours(d, target) for d in route):
            continue
        w = [d.get("weight") for d in route]
        assert all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in w), w
        assert sum(w) > 0
        assert route_total(route) == route_total(before["route"])
        assert route[-1]["weight"] == share(before["route"], vs_ns, target)
        for d, e in zip(route, effective_weights(before["route"]), strict=False):
            assert d["weight"] == (0 if matched(d, vs_ns, target) else e)


@SETTINGS
@given(specs(), vs_namespaces, st.sampled_from(TARGETS))
def test_header_is_set_and_never_added_or_removed(spec: dict, vs_ns: str, target: Target) -> None:
    proxied, _ = to_proxy(spec, vs_ns, target, ACT)
    for rule in proxied["http"]:
        for d in rule.get("route", []):
            if not is_ours(d, target):
                continue
            request = d["headers"]["request"]
            assert [k for k in request["set"] if k.lower() == HEADER] == [HEADER]
            assert all(k.lower() != HEADER for k in request.get("add", {}))
            assert all(k.lower() != HEADER for k in request.get("remove", []))
            assert d["destination"] == {"host": ACT.host, "port": {"number": ACT.port}}


def valid_orders(a: Target, b: Target) -> list[tuple[tuple[Target, str], ...]]:
    ops = [(t, m) for t in (a, b) for m in ("proxy", "serve")]
    return [
        order
        for order in itertools.permutations(ops)
        if all(order.index((t, "proxy")) < order.index((t, "serve")) for t in (a, b))
    ]


@SETTINGS
@given(specs(), vs_namespaces, st.sampled_from(DISJOINT_PAIRS))
def test_two_targets_restore_in_every_interleaving(spec: dict, vs_ns: str, pair: tuple[Target, Target]) -> None:
    for order in valid_orders(*pair):
        current, saved, proxied = spec, {}, set()
        for target, mode in order:
            if mode == "proxy":
                current, saved[target.key] = to_proxy(current, vs_ns, target, ACT, saved.get(target.key))
                proxied.add(target)
            else:
                current = to_serve(current, vs_ns, target, ACT, saved.pop(target.key))
                proxied.discard(target)
            for t in proxied:
                assert all(share(r["route"], vs_ns, t) == 0 for r in current["http"] if "route" in r)
            assert all(route_total(r["route"]) > 0 for r in current["http"] if "route" in r)
        assert current == spec, order


@SETTINGS
@given(specs(), vs_namespaces, st.sampled_from(TARGETS), st.integers(1, 9))
def test_edits_in_proxy_mode_become_the_new_original(spec: dict, vs_ns: str, target: Target, attempts: int) -> None:
    proxied, entries = to_proxy(spec, vs_ns, target, ACT)
    # The original applied again: served as it is, then proxied afresh.
    assert to_serve(spec, vs_ns, target, ACT, entries) == spec
    assert to_proxy(to_serve(spec, vs_ns, target, ACT, entries), vs_ns, target, ACT, entries) == (proxied, entries)
    # Unrelated fields edited and a rule added: they survive serve and the next proxy.
    edited = copy.deepcopy(proxied)
    expected = copy.deepcopy(spec)
    for doc in (edited, expected):
        for rule in doc["http"]:
            rule["retries"] = {"attempts": attempts}
        doc["http"].insert(0, {"match": [{"uri": {"prefix": "/new"}}], "route": [{"destination": {"host": "x"}}]})
    served = to_serve(edited, vs_ns, target, ACT, entries)
    assert served == expected
    again, entries2 = to_proxy(served, vs_ns, target, ACT)
    assert without_routes(again) == without_routes(expected)
    assert to_serve(again, vs_ns, target, ACT, entries2) == expected


@SETTINGS
@given(specs(), vs_namespaces, st.sampled_from(TARGETS))
def test_serve_needs_only_the_service_to_restore(spec: dict, vs_ns: str, target: Target) -> None:
    """With the restore data, serve mode restores exactly even when the target's subsets are unknown."""
    proxied, entries = to_proxy(spec, vs_ns, target, ACT)
    vague = Target(target.namespace, target.name, target.service)
    assert to_serve(proxied, vs_ns, vague, ACT, entries) == spec
