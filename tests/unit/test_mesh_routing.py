"""Istio routing rules of the mesh stand-in, without any I/O."""

from __future__ import annotations

import collections
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from elasti_istio.mesh import routing
from elasti_istio.mesh.routing import (
    Destination,
    HeaderOps,
    RequestInfo,
    RouteTable,
    canonical_host,
    decide,
    parse_duration,
    pick_weighted,
    split_authority,
)

MESH = frozenset({"mesh"})


def vs(
    name: str,
    ns: str,
    hosts: list[str],
    http: list[dict[str, Any]],
    gateways: list[str] | None = None,
    created: str = "2024-01-01T00:00:00Z",
) -> dict[str, Any]:
    spec: dict[str, Any] = {"hosts": hosts, "http": http}
    if gateways is not None:
        spec["gateways"] = gateways
    return {"metadata": {"name": name, "namespace": ns, "creationTimestamp": created}, "spec": spec}


def req(
    host: str,
    path: str = "/",
    *,
    headers: dict[str, str] | None = None,
    ns: str | None = "bookinfo",
    gateways: frozenset[str] = MESH,
    method: str = "GET",
    port: int | None = 9080,
) -> RequestInfo:
    return RequestInfo(
        method=method,
        path=path,
        headers=CIMultiDict(headers or {}),
        host=host,
        port=port,
        gateways=gateways,
        source_namespace=ns,
    )


def route_to(host: str, subset: str | None = None, weight: int | None = None, **extra: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"destination": {"host": host}}
    if subset:
        d["destination"]["subset"] = subset
    if weight is not None:
        d["weight"] = weight
    d.update(extra)
    return d


def first(r: float = 0.0) -> Any:
    return lambda: r


# ---- hosts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authority", "expected"),
    [
        ("details:9080", ("details", 9080)),
        ("Details.Bookinfo", ("details.bookinfo", None)),
        ("[::1]:80", ("::1", 80)),
        ("::1", ("::1", None)),
        ("host:notaport", ("host", None)),
        ("example.com.:8080", ("example.com", 8080)),
    ],
)
def test_split_authority(authority: str, expected: tuple[str, int | None]) -> None:
    assert split_authority(authority) == expected


@pytest.mark.parametrize(
    ("host", "ns", "expected"),
    [
        ("details", "bookinfo", "details.bookinfo.svc.cluster.local"),
        ("details", None, "details"),
        ("details.other", "bookinfo", "details.other.svc.cluster.local"),
        ("details.other.svc", "bookinfo", "details.other.svc.cluster.local"),
        ("details.other.svc.cluster.local", "bookinfo", "details.other.svc.cluster.local"),
        ("bookinfo.example.org", "bookinfo", "bookinfo.example.org"),
        ("*", "bookinfo", "*"),
        ("*.example.org", "bookinfo", "*.example.org"),
        ("10.0.0.1", "bookinfo", "10.0.0.1"),
    ],
)
def test_canonical_host(host: str, ns: str | None, expected: str) -> None:
    assert canonical_host(host, ns) == expected


def test_service_of() -> None:
    assert routing.service_of("details.bookinfo.svc.cluster.local") == ("bookinfo", "details")
    assert routing.service_of("details.bookinfo.svc.corp", "corp") == ("bookinfo", "details")
    assert routing.service_of("a.b.c.svc.cluster.local") is None
    assert routing.service_of("example.org") is None


def test_short_and_long_forms_reach_the_same_virtualservice() -> None:
    table = RouteTable.build([vs("details", "bookinfo", ["details"], [{"route": [route_to("details")]}])], MESH)
    for host in ("details", "details.bookinfo", "details.bookinfo.svc", "details.bookinfo.svc.cluster.local"):
        d = decide(table, req(host), first())
        assert d.route is not None and d.destination is not None, host
        assert d.destination.host == "details.bookinfo.svc.cluster.local"
        assert d.destination.service == ("bookinfo", "details")
    # From another namespace a short name is another service; the long forms still match.
    assert decide(table, req("details", ns="other"), first()).route is None
    assert decide(table, req("details.bookinfo", ns="other"), first()).route is not None


def test_destination_hosts_resolve_in_the_virtualservice_namespace() -> None:
    table = RouteTable.build(
        [vs("r", "bookinfo", ["reviews.bookinfo.svc.cluster.local"], [{"route": [route_to("reviews-v2")]}])], MESH
    )
    d = decide(table, req("reviews", ns="bookinfo"), first())
    assert d.destination is not None and d.destination.host == "reviews-v2.bookinfo.svc.cluster.local"


def test_exact_host_beats_wildcards_and_the_longest_wildcard_wins() -> None:
    table = RouteTable.build(
        [
            vs("any", "ns", ["*"], [{"route": [route_to("any")]}], gateways=["gw"]),
            vs("wide", "ns", ["*.example.org"], [{"route": [route_to("wide")]}], gateways=["gw"]),
            vs("narrow", "ns", ["*.api.example.org"], [{"route": [route_to("narrow")]}], gateways=["gw"]),
            vs("exact", "ns", ["v1.api.example.org"], [{"route": [route_to("exact")]}], gateways=["gw"]),
        ],
        {"ns/gw": [("*", "*")]},
    )
    gw = frozenset({"ns/gw"})

    def dest(host: str) -> str:
        d = decide(table, req(host, ns=None, gateways=gw), first())
        assert d.destination is not None
        return d.destination.host.split(".")[0]

    assert dest("v1.api.example.org") == "exact"
    assert dest("v2.api.example.org") == "narrow"
    assert dest("www.example.org") == "wide"
    assert dest("example.com") == "any"


# ---- gateways ------------------------------------------------------------------------------------


def test_gateways_field_separates_sidecars_from_ingress() -> None:
    items = [
        vs("mesh-only", "bookinfo", ["reviews"], [{"route": [route_to("reviews", "v1")]}]),
        vs("edge", "bookinfo", ["*"], [{"route": [route_to("productpage")]}], gateways=["bookinfo-gateway"]),
        vs("both", "bookinfo", ["ratings"], [{"route": [route_to("ratings")]}], gateways=["mesh", "bookinfo-gateway"]),
    ]
    mesh = RouteTable.build(items, MESH)
    ingress = RouteTable.build(items, {"bookinfo/bookinfo-gateway": [("*", "*")]})
    assert decide(mesh, req("reviews"), first()).route is not None
    assert decide(mesh, req("ratings"), first()).route is not None
    # "*" is only on the gateway: a sidecar sends an unknown-to-VS host straight to its Service.
    d = decide(mesh, req("productpage"), first())
    assert d.route is None and d.destination is not None and d.destination.service == ("bookinfo", "productpage")
    gw = frozenset({"bookinfo/bookinfo-gateway"})
    d = decide(ingress, req("anything.example", ns=None, gateways=gw), first())
    assert d.destination is not None and d.destination.host == "productpage.bookinfo.svc.cluster.local"
    d = decide(ingress, req("ratings.bookinfo.svc.cluster.local", ns=None, gateways=gw), first())
    assert d.destination is not None and d.destination.host == "ratings.bookinfo.svc.cluster.local"


def test_ingress_never_falls_back_to_services() -> None:
    table = RouteTable.build([], {"ns/gw": [("*", "*")]})
    assert decide(table, req("details.bookinfo.svc.cluster.local", gateways=frozenset({"ns/gw"})), first()).no_route


def test_gateway_in_another_namespace_and_server_hosts() -> None:
    items = [
        vs("a", "team", ["shop.example.org", "other.example.org"], [{"route": [route_to("shop")]}], ["infra/public"]),
        vs("b", "team", ["*"], [{"route": [route_to("fallback")]}], ["infra/public"]),
    ]
    table = RouteTable.build(items, {"infra/public": [("*", "shop.example.org"), ("team", "*.team.example")]})
    gw = frozenset({"infra/public"})
    d = decide(table, req("shop.example.org", ns=None, gateways=gw), first())
    assert d.destination is not None and d.destination.host == "shop.team.svc.cluster.local"
    # Not admitted by any server of the Gateway.
    assert decide(table, req("other.example.org", ns=None, gateways=gw), first()).no_route
    # VirtualService "*" narrowed to the server's "*.team.example".
    d = decide(table, req("x.team.example", ns=None, gateways=gw), first())
    assert d.destination is not None and d.destination.host == "fallback.team.svc.cluster.local"
    assert decide(table, req("elsewhere.example", ns=None, gateways=gw), first()).no_route


def test_selected_gateways_by_selector_or_name() -> None:
    gws = [
        {
            "metadata": {"name": "bookinfo-gateway", "namespace": "bookinfo"},
            "spec": {"selector": {"istio": "ingressgateway"}, "servers": [{"hosts": ["*"]}]},
        },
        {
            "metadata": {"name": "private", "namespace": "infra"},
            "spec": {"selector": {"istio": "private-gateway"}, "servers": [{"hosts": ["./internal.example"]}]},
        },
    ]
    played = routing.selected_gateways(gws, {"istio": "ingressgateway"})
    assert played == {"bookinfo/bookinfo-gateway": [("*", "*")]}
    played = routing.selected_gateways(gws, {}, ["infra/private"])
    assert played == {"infra/private": [("infra", "internal.example")]}
    assert routing.selected_gateways(gws, {}, ["private"]).keys() == {"infra/private"}


def test_virtualservices_for_one_host_merge_oldest_first() -> None:
    newer = vs("newer", "ns", ["*"], [{"route": [route_to("new")]}], ["gw"], created="2024-02-01T00:00:00Z")
    older = vs(
        "older",
        "ns",
        ["*"],
        [{"match": [{"uri": {"prefix": "/old"}}], "route": [route_to("old")]}],
        ["gw"],
        created="2024-01-01T00:00:00Z",
    )
    table = RouteTable.build([newer, older], {"ns/gw": [("*", "*")]})
    gw = frozenset({"ns/gw"})

    def dest(path: str) -> str:
        d = decide(table, req("h", path, gateways=gw, ns=None), first())
        assert d.destination is not None
        return d.destination.host.split(".")[0]

    assert dest("/old/x") == "old"
    assert dest("/other") == "new"


# ---- matches -------------------------------------------------------------------------------------


def table_with(matches: list[dict[str, Any]]) -> RouteTable:
    return RouteTable.build(
        [
            vs(
                "svc",
                "bookinfo",
                ["svc"],
                [{"match": matches, "route": [route_to("matched")]}, {"route": [route_to("default")]}],
            )
        ],
        MESH,
    )


def landed(table: RouteTable, r: RequestInfo) -> str:
    d = decide(table, r, first())
    assert d.destination is not None
    return d.destination.host.split(".")[0]


@pytest.mark.parametrize(
    ("match", "path", "hit"),
    [
        ({"uri": {"exact": "/productpage"}}, "/productpage", True),
        ({"uri": {"exact": "/productpage"}}, "/productpage?u=1", True),  # exact ignores the query
        ({"uri": {"exact": "/productpage"}}, "/productpage/x", False),
        ({"uri": {"prefix": "/static"}}, "/static/css/a.css", True),
        ({"uri": {"prefix": "/static"}}, "/STATIC/a", False),
        ({"uri": {"prefix": "/static"}, "ignoreUriCase": True}, "/STATIC/a", True),
        ({"uri": {"regex": "/api/v[0-9]+/products"}}, "/api/v1/products", True),
        ({"uri": {"regex": "/api/v[0-9]+"}}, "/api/v1/products", False),  # a regex must match the whole path
        ({"uri": {"prefix": "/a"}, "method": {"exact": "POST"}}, "/a", False),
        ({"queryParams": {"u": {"exact": "test"}}}, "/p?u=test", True),
        ({"queryParams": {"u": {"exact": "test"}}}, "/p?u=normal", False),
    ],
)
def test_uri_method_and_query_matches(match: dict[str, Any], path: str, hit: bool) -> None:
    assert landed(table_with([match]), req("svc", path)) == ("matched" if hit else "default")


@pytest.mark.parametrize(
    ("match", "headers", "hit"),
    [
        ({"headers": {"end-user": {"exact": "jason"}}}, {"end-user": "jason"}, True),
        ({"headers": {"end-user": {"exact": "jason"}}}, {"End-User": "jason"}, True),
        ({"headers": {"end-user": {"exact": "jason"}}}, {"end-user": "Jason"}, False),
        ({"headers": {"end-user": {"exact": "jason"}}}, {}, False),
        ({"headers": {"x-canary": {"prefix": "yes"}}}, {"x-canary": "yes-please"}, True),
        ({"headers": {"x-canary": {"regex": "v[12]"}}}, {"x-canary": "v2"}, True),
        ({"headers": {"x-canary": {"regex": "v[12]"}}}, {"x-canary": "v22"}, False),
        ({"headers": {"x-canary": {}}}, {"x-canary": ""}, True),  # {} asks for presence only
        ({"withoutHeaders": {"x-canary": {}}}, {"x-canary": "1"}, False),
        ({"withoutHeaders": {"x-canary": {}}}, {}, True),
        ({"headers": {"a": {"exact": "1"}, "b": {"exact": "2"}}}, {"a": "1"}, False),  # all conditions hold
    ],
)
def test_header_matches(match: dict[str, Any], headers: dict[str, str], hit: bool) -> None:
    assert landed(table_with([match]), req("svc", headers=headers)) == ("matched" if hit else "default")


def test_match_blocks_are_alternatives_and_first_route_wins() -> None:
    table = table_with([{"uri": {"exact": "/a"}}, {"headers": {"x": {"exact": "1"}}}])
    assert landed(table, req("svc", "/a")) == "matched"
    assert landed(table, req("svc", "/b", headers={"x": "1"})) == "matched"
    assert landed(table, req("svc", "/b")) == "default"


def test_no_matching_route_is_no_route() -> None:
    table = RouteTable.build(
        [vs("svc", "bookinfo", ["svc"], [{"match": [{"uri": {"prefix": "/x"}}], "route": [route_to("svc")]}])], MESH
    )
    assert decide(table, req("svc", "/y"), first()).no_route


def test_match_on_port_and_source_namespace() -> None:
    table = table_with([{"port": 8080, "sourceNamespace": "bookinfo"}])
    assert landed(table, req("svc", port=8080)) == "matched"
    assert landed(table, req("svc", port=9080)) == "default"
    assert landed(table, req("svc.bookinfo", port=8080, ns="other")) == "default"


# ---- weights -------------------------------------------------------------------------------------


def dests(*weights: int) -> tuple[Destination, ...]:
    return tuple(Destination(f"d{i}", None, None, w) for i, w in enumerate(weights))


def test_a_single_destination_takes_everything_whatever_its_weight() -> None:
    one = dests(0)
    assert all(pick_weighted(one, r / 10) == one[0] for r in range(10))


def test_weights_are_proportions_of_their_sum_and_absent_means_zero() -> None:
    ds = dests(80, 20, 0)
    n = 1000
    counts = collections.Counter(pick_weighted(ds, (i + 0.5) / n) for i in range(n))
    assert counts == {ds[0]: 800, ds[1]: 200}
    ds = dests(1, 3)
    counts = collections.Counter(pick_weighted(ds, (i + 0.5) / n) for i in range(n))
    assert counts == {ds[0]: 250, ds[1]: 750}


def test_all_zero_weights_pick_nothing() -> None:
    assert pick_weighted(dests(0, 0), 0.5) is None
    assert pick_weighted((), 0.5) is None


@given(st.lists(st.integers(min_value=0, max_value=100), min_size=2, max_size=6), st.floats(0, 0.999999))
def test_weighted_pick_never_chooses_a_zero_weight(weights: list[int], r: float) -> None:
    ds = dests(*weights)
    got = pick_weighted(ds, r)
    if sum(weights) == 0:
        assert got is None
    else:
        assert got is not None and got.weight > 0


def test_absent_weights_in_a_virtualservice() -> None:
    table = RouteTable.build(
        [vs("r", "bookinfo", ["reviews"], [{"route": [route_to("reviews", "v1"), route_to("reviews", "v2", 10)]}])],
        MESH,
    )
    picks = {decide(table, req("reviews"), first(r / 20)).destination.subset for r in range(20)}  # type: ignore[union-attr]
    assert picks == {"v2"}


# ---- headers, timeouts, rewrites -----------------------------------------------------------------


def test_header_ops_remove_then_set_then_add() -> None:
    h: CIMultiDict[str] = CIMultiDict([("elasti-service", "evil/one"), ("elasti-service", "evil/two"), ("x-drop", "1")])
    ops = HeaderOps.parse(
        {"set": {"elasti-service": "bookinfo/details"}, "add": {"x-extra": "a"}, "remove": ["x-drop", "absent"]}
    )
    ops.apply(h)
    assert h.getall("elasti-service") == ["bookinfo/details"]  # set replaces what a client sent
    assert h.getall("x-extra") == ["a"]
    assert "x-drop" not in h
    HeaderOps.parse({"add": {"x-extra": "b"}}).apply(h)
    assert h.getall("x-extra") == ["a", "b"]


def test_destination_and_route_header_ops_are_compiled() -> None:
    table = RouteTable.build(
        [
            vs(
                "d",
                "bookinfo",
                ["details"],
                [
                    {
                        "headers": {"response": {"set": {"x-route": "1"}}},
                        "route": [
                            route_to("details", headers={"request": {"set": {"elasti-service": "bookinfo/details"}}})
                        ],
                        "timeout": "1.5s",
                    }
                ],
            )
        ],
        MESH,
    )
    d = decide(table, req("details"), first())
    assert d.destination is not None and d.route is not None
    assert d.destination.request_headers.set == (("elasti-service", "bookinfo/details"),)
    assert d.route.response_headers.set == (("x-route", "1"),)
    assert d.route.timeout == 1.5


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("1s", 1.0), ("0.5s", 0.5), ("250ms", 0.25), ("1m30s", 90.0), ("1h", 3600.0), ("0s", None), (None, None)],
)
def test_parse_duration(value: str | None, seconds: float | None) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("bad", ["1", "s", "1x", "1s junk"])
def test_parse_duration_rejects_garbage(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_broken_route_is_skipped_not_fatal() -> None:
    table = RouteTable.build(
        [
            vs(
                "svc",
                "bookinfo",
                ["svc"],
                [{"match": [{"uri": {"regex": "("}}], "route": [route_to("bad")]}, {"route": [route_to("good")]}],
            )
        ],
        MESH,
    )
    assert landed(table, req("svc")) == "good"


@pytest.mark.parametrize(
    ("match", "rewrite", "path", "expected"),
    [
        ({"uri": {"prefix": "/api"}}, "/v2", "/api/items?x=1", "/v2/items?x=1"),
        ({"uri": {"exact": "/old"}}, "/new", "/old?q", "/new?q"),
        (None, "/base/", "/x", "/base/x"),
    ],
)
def test_rewrite_uri(match: dict[str, Any] | None, rewrite: str, path: str, expected: str) -> None:
    http: dict[str, Any] = {"rewrite": {"uri": rewrite}, "route": [route_to("svc")]}
    if match:
        http["match"] = [match]
    table = RouteTable.build([vs("svc", "bookinfo", ["svc"], [http])], MESH)
    d = decide(table, req("svc", path), first())
    assert d.route is not None
    assert routing.rewrite_path(path, d.route, d.match) == expected


# ---- subsets and endpoints -----------------------------------------------------------------------


def dr(name: str, ns: str, host: str, subsets: dict[str, dict[str, str]], created: str = "2024-01-01") -> dict:
    return {
        "metadata": {"name": name, "namespace": ns, "creationTimestamp": created},
        "spec": {"host": host, "subsets": [{"name": k, "labels": v} for k, v in subsets.items()]},
    }


def test_destination_rule_lookup_prefers_client_then_service_namespace() -> None:
    fqdn = "reviews.bookinfo.svc.cluster.local"
    rules = [
        dr("svc-ns", "bookinfo", "reviews", {"v1": {"version": "v1"}}),
        dr("client-ns", "frontend", "reviews.bookinfo.svc.cluster.local", {"v1": {"version": "blue"}}),
        dr("wild", "bookinfo", "*.bookinfo.svc.cluster.local", {"v1": {"version": "wild"}}),
        dr("unrelated", "bookinfo", "ratings", {"v1": {"version": "x"}}),
    ]
    assert routing.subset_labels(routing.destination_rule_for(rules, fqdn, "frontend"), "v1") == {"version": "blue"}
    assert routing.subset_labels(routing.destination_rule_for(rules, fqdn, "bookinfo"), "v1") == {"version": "v1"}
    assert routing.subset_labels(routing.destination_rule_for(rules, fqdn, None), "v2") is None
    assert routing.destination_rule_for(rules, "details.bookinfo.svc.cluster.local", None)["metadata"]["name"] == "wild"
    assert routing.destination_rule_for(rules, "x.other.svc.cluster.local", None) is None


def endpoint_slice(ports: list[dict[str, Any]], endpoints: list[dict[str, Any]]) -> dict[str, Any]:
    return {"ports": ports, "endpoints": endpoints}


def ep(ip: str, pod: str, ready: bool | None = True) -> dict[str, Any]:
    e: dict[str, Any] = {"addresses": [ip], "targetRef": {"kind": "Pod", "namespace": "ns", "name": pod}}
    if ready is not None:
        e["conditions"] = {"ready": ready}
    return e


def test_slice_endpoints_ready_port_and_subset() -> None:
    labels = {"p1": {"version": "v1"}, "p2": {"version": "v2"}, "p3": {"version": "v1"}}
    slices = [
        endpoint_slice(
            [{"name": "http", "port": 9080}, {"name": "metrics", "port": 15090}],
            [
                ep("127.0.0.1", "p1"),
                ep("127.0.0.2", "p2"),
                ep("127.0.0.3", "p3", ready=False),
                ep("127.0.0.4", "p4", None),
            ],
        ),
        endpoint_slice([{"name": "other", "port": 1}], [ep("127.0.0.9", "p1")]),
    ]
    got = routing.slice_endpoints(slices, "http", lambda ns, name: labels.get(name), None)
    assert [(e.ip, e.port) for e in got] == [("127.0.0.1", 9080), ("127.0.0.2", 9080), ("127.0.0.4", 9080)]
    got = routing.slice_endpoints(slices, "http", lambda ns, name: labels.get(name), {"version": "v1"})
    assert [e.ip for e in got] == ["127.0.0.1"]  # p3 is not ready, p4 is unknown
    assert routing.slice_endpoints(slices, "metrics", lambda ns, name: None, None)[0].port == 15090


def test_target_port() -> None:
    svc = {"spec": {"ports": [{"name": "http", "port": 80}, {"name": "grpc", "port": 9000}]}}
    assert routing.target_port(svc, 9000) == (9000, "grpc")
    assert routing.target_port(svc, 1234) == (80, "http")
    assert routing.target_port(svc, None) == (80, "http")
    assert routing.target_port({"spec": {"ports": [{"port": 9080}]}}, None) == (9080, "")
    assert routing.target_port({"spec": {}}, 80) is None


def test_workload_of() -> None:
    pod = {
        "metadata": {
            "name": "reviews-v2-6c46b5dfcf-l6kt6",
            "labels": {"pod-template-hash": "6c46b5dfcf"},
            "ownerReferences": [{"kind": "ReplicaSet", "name": "reviews-v2-6c46b5dfcf"}],
        }
    }
    assert routing.workload_of(pod) == "reviews-v2"
    assert (
        routing.workload_of({"metadata": {"name": "db-0", "ownerReferences": [{"kind": "StatefulSet", "name": "db"}]}})
        == "db"
    )
    assert routing.workload_of({"metadata": {"name": "bare"}}) == "bare"


def test_a_bare_wildcard_host_is_refused_for_the_mesh_as_istio_refuses_it() -> None:
    from elasti_istio.mesh.routing import MESH, RouteTable

    catch_all = {
        "metadata": {"namespace": "other", "name": "all", "creationTimestamp": "2020-01-01T00:00:00Z"},
        "spec": {"hosts": ["*"], "http": [{"route": [{"destination": {"host": "elsewhere"}}]}]},
    }
    table = RouteTable.build([catch_all], frozenset({MESH}))
    assert table.lookup("productpage.bookinfo.svc.cluster.local", "bookinfo") is None
