"""VirtualService rewrite on the Bookinfo manifests and hand-made edge cases."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from elasti_istio.vsrewrite import (
    HEADER,
    RESTORE_ANNOTATION,
    ActivatorRef,
    Target,
    effective_weights,
    is_proxied,
    matches,
    read_restore,
    route_timeouts,
    route_total,
    routes_to,
    to_proxy,
    to_serve,
    write_restore,
)


def without_at(entries: list) -> list:
    """Entries without the recorded positions, which tests of the weights need not spell out."""
    return [{k: v for k, v in e.items() if k != "at"} if isinstance(e, dict) else e for e in entries]


BOOKINFO = Path(__file__).resolve().parents[2] / "examples" / "bookinfo"
NS = "bookinfo"
ACT = ActivatorRef("elasti-activator.elasti-system.svc.cluster.local", 8012)


def load(name: str) -> list[dict]:
    with open(BOOKINFO / name) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def vs_spec(name: str, vs_name: str = "reviews") -> dict:
    return next(d["spec"] for d in load(name) if d["kind"] == "VirtualService" and d["metadata"]["name"] == vs_name)


def subsets_for(pod_labels: dict[str, str], host: str = "reviews") -> frozenset[str]:
    """DestinationRule subsets whose labels all appear on the target's pods."""
    rule = next(d for d in load("destination-rule-all.yaml") if d["spec"]["host"] == host)
    return frozenset(
        s["name"] for s in rule["spec"]["subsets"] if all(pod_labels.get(k) == v for k, v in s["labels"].items())
    )


def reviews(version: str) -> Target:
    subsets = subsets_for({"app": "reviews", "version": version})
    return Target(NS, f"reviews-{version}", "reviews", subsets, whole_service=False)


V1, V2, V3 = reviews("v1"), reviews("v2"), reviews("v3")
DETAILS = Target(NS, "details", "details")


def dest(host: str, subset: str | None = None, weight: int | None = None, **extra: Any) -> dict:
    d: dict[str, Any] = {"destination": {"host": host}}
    if subset:
        d["destination"]["subset"] = subset
    if weight is not None:
        d["weight"] = weight
    d.update(extra)
    return d


def activator_dests(spec: dict, target: Target) -> list[dict]:
    return [
        d
        for rule in spec.get("http", [])
        for d in rule.get("route", [])
        if d["destination"]["host"] == ACT.host
        and d.get("headers", {}).get("request", {}).get("set", {}).get(HEADER) == target.key
    ]


def test_subsets_come_from_the_destination_rule() -> None:
    assert V2.subsets == frozenset({"v2"})
    assert subsets_for({"app": "ratings", "version": "v2"}, "ratings") == frozenset({"v2"})


# --- host matching ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    ["details", "details.bookinfo", "details.bookinfo.svc", "details.bookinfo.svc.cluster.local"],
)
def test_every_service_host_form_matches(host: str) -> None:
    assert matches(host, None, NS, DETAILS)
    spec, entries = to_proxy({"hosts": ["details"], "http": [{"route": [dest(host)]}]}, NS, DETAILS, ACT)
    assert spec["http"][0]["route"][0]["weight"] == 0
    assert activator_dests(spec, DETAILS)[0]["weight"] == 100
    assert without_at(entries) == [{"weights": [None]}]


@pytest.mark.parametrize(
    ("host", "vs_ns"),
    [
        ("details", "other"),  # the short name resolves against the VirtualService's own namespace
        ("details.other", NS),
        ("details.other.svc", NS),
        ("details.other.svc.cluster.local", NS),
        ("details.bookinfo.svc.cluster.remote", NS),
        ("details.bookinfo.example", NS),
        ("details.example.com", NS),
        ("*.bookinfo.svc.cluster.local", NS),
        ("ratings", NS),
        ("", NS),
        ("details.bookinfo.svc.cluster.local.", NS),
    ],
)
def test_other_hosts_never_match(host: str, vs_ns: str) -> None:
    assert not matches(host, None, vs_ns, DETAILS)
    spec = {"hosts": ["details"], "http": [{"route": [dest(host)]}]}
    assert to_proxy(spec, vs_ns, DETAILS, ACT) == (spec, [])


def test_qualified_hosts_match_from_any_namespace_and_cluster_domain_counts() -> None:
    assert matches("details.bookinfo", None, "istio-system", DETAILS)
    assert matches("details.bookinfo.svc.corp.example", None, "x", DETAILS, cluster_domain="corp.example")
    assert not matches("details.bookinfo.svc.cluster.local", None, "x", DETAILS, cluster_domain="corp.example")


def test_subsets_decide_which_destinations_are_the_targets() -> None:
    assert matches("reviews", "v2", NS, V2)
    assert not matches("reviews", "v1", NS, V2)
    assert not matches("reviews", None, NS, V2)  # whole_service=False: the plain Service is not only reviews-v2
    whole = Target(NS, "reviews", "reviews")
    assert matches("reviews", None, NS, whole)
    assert not matches("reviews", "v1", NS, whole)
    both = Target(NS, "reviews", "reviews", frozenset({"v1"}), whole_service=True)
    assert matches("reviews", None, NS, both) and matches("reviews", "v1", NS, both)


# --- Bookinfo -----------------------------------------------------------------------------------


def test_all_v1_reviews_proxy_and_serve() -> None:
    original = vs_spec("virtual-service-all-v1.yaml")
    frozen = copy.deepcopy(original)
    spec, entries = to_proxy(original, NS, V1, ACT)
    assert original == frozen
    assert spec["http"][0]["route"] == [
        {"destination": {"host": "reviews", "subset": "v1"}, "weight": 0},
        {
            "destination": {"host": ACT.host, "port": {"number": 8012}},
            "weight": 100,
            "headers": {"request": {"set": {HEADER: "bookinfo/reviews-v1"}}},
        },
    ]
    assert without_at(entries) == [{"weights": [None]}]
    assert is_proxied(spec, V1, ACT) and not is_proxied(original, V1, ACT)
    assert not is_proxied(spec, V2, ACT)
    restored = to_serve(spec, NS, V1, ACT, entries)
    assert restored == original
    assert "weight" not in restored["http"][0]["route"][0]


def test_all_v1_other_virtual_services_untouched() -> None:
    for name in ("productpage", "ratings", "details"):
        spec = vs_spec("virtual-service-all-v1.yaml", name)
        assert to_proxy(spec, NS, V1, ACT) == (spec, [])


def test_80_20_moves_only_the_v2_share() -> None:
    original = vs_spec("virtual-service-reviews-80-20.yaml")
    spec, entries = to_proxy(original, NS, V2, ACT)
    route = spec["http"][0]["route"]
    assert [d.get("weight") for d in route] == [80, 0, 20]
    assert route_total(route) == route_total(original["http"][0]["route"]) == 100
    assert without_at(entries) == [{"weights": [20]}]
    assert to_serve(spec, NS, V2, ACT, entries) == original


def test_a_target_without_traffic_is_left_alone() -> None:
    original = vs_spec("virtual-service-reviews-50-v3.yaml")
    assert to_proxy(original, NS, V2, ACT) == (original, [])
    original = vs_spec("virtual-service-reviews-80-20.yaml")
    original["http"][0]["route"][1]["weight"] = 0
    assert to_proxy(original, NS, V2, ACT) == (original, [])


def test_jason_route_keeps_its_match_and_the_default_route_is_untouched() -> None:
    original = vs_spec("virtual-service-reviews-jason-v2-v3.yaml")
    spec, entries = to_proxy(original, NS, V2, ACT)
    assert spec["http"][0]["match"] == original["http"][0]["match"]
    assert [d.get("weight") for d in spec["http"][0]["route"]] == [0, 100]
    assert spec["http"][1] == original["http"][1]
    assert to_serve(spec, NS, V2, ACT, entries) == original
    spec3, entries3 = to_proxy(original, NS, V3, ACT)
    assert spec3["http"][0] == original["http"][0]
    assert activator_dests(spec3, V3)[0]["weight"] == 100
    assert without_at(entries3) == [{"weights": [None]}]
    assert to_serve(spec3, NS, V3, ACT, entries3) == original


@pytest.mark.parametrize(
    "name",
    ["virtual-service-reviews-80-20.yaml", "virtual-service-reviews-50-v3.yaml", "virtual-service-reviews-v2-v3.yaml"],
)
def test_three_reviews_targets_in_every_interleaving(name: str) -> None:
    original = vs_spec(name)
    targets = (V1, V2, V3)
    ops = [(t, mode) for t in targets for mode in ("proxy", "serve")]
    for order in itertools.permutations(ops):
        if any(order.index((t, "proxy")) > order.index((t, "serve")) for t in targets):
            continue
        spec, saved = original, {}
        for t, mode in order:
            if mode == "proxy":
                spec, saved[t.key] = to_proxy(spec, NS, t, ACT, saved.get(t.key))
                route = spec["http"][0]["route"]
                assert route_total(route) == 100
                assert all(isinstance(d["weight"], int) and d["weight"] >= 0 for d in route)
            else:
                spec = to_serve(spec, NS, t, ACT, saved.pop(t.key))
        assert spec == original, order


def test_the_other_targets_activator_is_not_part_of_the_share() -> None:
    original = vs_spec("virtual-service-reviews-v2-v3.yaml")
    spec, _ = to_proxy(original, NS, V2, ACT)
    spec, entries3 = to_proxy(spec, NS, V3, ACT)
    assert [d["weight"] for d in spec["http"][0]["route"]] == [0, 0, 50, 50]
    assert without_at(entries3) == [{"weights": [50]}]


# --- weights ------------------------------------------------------------------------------------


def test_effective_weights() -> None:
    assert effective_weights([dest("a")]) == [100]
    assert effective_weights([dest("a", weight=0)]) == [100]  # a lone destination takes everything
    assert effective_weights([dest("a", weight=30)]) == [30]
    assert effective_weights([dest("a"), dest("b", weight=40)]) == [0, 40]  # absent is 0 beside others
    assert effective_weights([dest("a", weight=-5), dest("b", weight=7)]) == [0, 7]


def test_absent_weight_beside_others_carries_no_share_and_comes_back_absent() -> None:
    original = {"hosts": ["reviews"], "http": [{"route": [dest("reviews", "v1"), dest("reviews", "v2", 100)]}]}
    assert to_proxy(original, NS, V1, ACT) == (original, [])
    spec, entries = to_proxy(original, NS, V2, ACT)
    assert [d["weight"] for d in spec["http"][0]["route"]] == [0, 0, 100]
    assert without_at(entries) == [{"weights": [100], "others": [[0, None]]}]
    assert to_serve(spec, NS, V2, ACT, entries) == original


def test_single_destination_with_own_weight_keeps_its_total() -> None:
    original = {"hosts": ["details"], "http": [{"route": [dest("details", weight=30)]}]}
    spec, entries = to_proxy(original, NS, DETAILS, ACT)
    assert [d["weight"] for d in spec["http"][0]["route"]] == [0, 30]
    assert to_serve(spec, NS, DETAILS, ACT, entries) == original
    zero = {"hosts": ["details"], "http": [{"route": [dest("details", weight=0)]}]}
    spec, entries = to_proxy(zero, NS, DETAILS, ACT)
    assert [d["weight"] for d in spec["http"][0]["route"]] == [0, 100]
    assert to_serve(spec, NS, DETAILS, ACT, entries) == zero


def test_several_destinations_of_the_target_in_one_route() -> None:
    original = {
        "hosts": ["details"],
        "http": [
            {
                "route": [
                    dest("details", weight=30, headers={"request": {"set": {"x-a": "1"}}}),
                    dest("details.bookinfo.svc.cluster.local", weight=20),
                    dest("httpbin.org", weight=50),
                ]
            }
        ],
    }
    spec, entries = to_proxy(original, NS, DETAILS, ACT)
    act = activator_dests(spec, DETAILS)
    assert [d["weight"] for d in spec["http"][0]["route"]] == [0, 0, 50, 50]
    assert act[0]["headers"] == {"request": {"set": {HEADER: "bookinfo/details"}}}  # two sources: no copy
    assert without_at(entries) == [{"weights": [30, 20]}]
    assert to_serve(spec, NS, DETAILS, ACT, entries) == original


# --- headers ------------------------------------------------------------------------------------


def test_header_is_set_never_added() -> None:
    spec, _ = to_proxy(vs_spec("virtual-service-reviews-80-20.yaml"), NS, V1, ACT)
    (act,) = activator_dests(spec, V1)
    assert act["headers"] == {"request": {"set": {HEADER: "bookinfo/reviews-v1"}}}


def test_headers_of_the_one_source_are_copied_and_ours_is_forced() -> None:
    headers = {
        "request": {
            "set": {"x-a": "1", "Elasti-Service": "evil/one"},
            "add": {"elasti-service": "evil/two", "x-b": "2"},
            "remove": ["ELASTI-SERVICE", "x-c"],
        },
        "response": {"set": {"x-r": "3"}},
    }
    original = {
        "hosts": ["details"],
        "http": [{"route": [dest("details", weight=70, headers=headers), dest("other", weight=30)]}],
    }
    frozen = copy.deepcopy(original)
    spec, entries = to_proxy(original, NS, DETAILS, ACT)
    assert original == frozen
    (act,) = activator_dests(spec, DETAILS)
    assert act["headers"] == {
        "request": {"set": {"x-a": "1", HEADER: "bookinfo/details"}, "add": {"x-b": "2"}, "remove": ["x-c"]},
        "response": {"set": {"x-r": "3"}},
    }
    assert spec["http"][0]["route"][0]["headers"] == headers
    act["headers"]["request"]["set"]["x-a"] = "changed"
    assert spec["http"][0]["route"][0]["headers"]["request"]["set"]["x-a"] == "1"  # a copy, not shared
    assert to_serve(spec, NS, DETAILS, ACT, entries) == original


def test_headers_that_only_named_our_header_leave_nothing_empty_behind() -> None:
    headers = {"request": {"add": {HEADER: "x"}, "remove": [HEADER]}}
    spec, _ = to_proxy({"http": [{"route": [dest("details", headers=headers)]}]}, NS, DETAILS, ACT)
    assert activator_dests(spec, DETAILS)[0]["headers"] == {"request": {"set": {HEADER: "bookinfo/details"}}}


# --- what is left alone -------------------------------------------------------------------------


def full_spec() -> dict:
    return {
        "hosts": ["reviews", "reviews.bookinfo.svc.cluster.local"],
        "gateways": ["mesh", "bookinfo/gw"],
        "exportTo": ["."],
        "x-unknown": {"kept": True},
        "http": [
            {
                "name": "api",
                "match": [{"uri": {"prefix": "/api"}, "headers": {"end-user": {"exact": "jason"}}}],
                "rewrite": {"uri": "/"},
                "retries": {"attempts": 3, "perTryTimeout": "2s", "retryOn": "5xx"},
                "timeout": "10s",
                "mirror": {"host": "reviews", "subset": "v3"},
                "mirrorPercentage": {"value": 12.5},
                "corsPolicy": {"allowOrigins": [{"exact": "https://x"}]},
                "fault": {"delay": {"percentage": {"value": 1.0}, "fixedDelay": "1s"}},
                "headers": {"request": {"set": {"x-route": "1"}}},
                "route": [
                    dest("reviews", "v2", 60, headers={"response": {"add": {"x-v": "2"}}}),
                    dest("reviews.other.svc.cluster.local", "v2", 40),
                ],
            },
            {"redirect": {"uri": "/elsewhere"}},
            {"directResponse": {"status": 503}},
            {"route": [dest("reviews", "v1")]},
        ],
        "tcp": [{"match": [{"port": 31400}], "route": [dest("reviews", "v2", 100)]}],
        "tls": [{"match": [{"sniHosts": ["reviews"]}], "route": [dest("reviews.bookinfo", "v2")]}],
    }


def test_everything_but_http_route_is_left_alone() -> None:
    original = full_spec()
    spec, entries = to_proxy(original, NS, V2, ACT)
    assert spec["tcp"] == original["tcp"] and spec["tls"] == original["tls"]
    for before, after in zip(original["http"], spec["http"], strict=True):
        assert {k: v for k, v in before.items() if k != "route"} == {k: v for k, v in after.items() if k != "route"}
    assert {k: v for k, v in spec.items() if k != "http"} == {k: v for k, v in original.items() if k != "http"}
    assert spec["http"][0]["route"][1] == original["http"][0]["route"][1]  # same short name, other namespace
    assert spec["http"][3] == original["http"][3]
    assert activator_dests(spec, V2)[0]["headers"]["response"] == {"add": {"x-v": "2"}}
    assert to_serve(spec, NS, V2, ACT, entries) == original


def test_a_per_try_timeout_cuts_held_requests_like_a_route_timeout() -> None:
    """Envoy ends each try at ``retries.perTryTimeout``: a held request as well, whatever ``timeout`` says."""
    spec = {
        "http": [
            {"route": [dest("reviews", "v2")], "timeout": "60s", "retries": {"attempts": 2, "perTryTimeout": "2s"}},
            {"route": [dest("reviews", "v2")], "retries": {"attempts": 3}},
        ]
    }
    assert route_timeouts(spec, NS, V2) == [("timeout", "60s"), ("retries.perTryTimeout", "2s")]


def test_the_port_a_route_chose_travels_in_the_header_value() -> None:
    """A multi-port Service: the activator forwards to the port of the target's destination in that route."""
    spec = {
        "hosts": ["web"],
        "http": [
            {"match": [{"port": 9090}], "route": [{"destination": {"host": "web", "port": {"number": 9090}}}]},
            {"route": [{"destination": {"host": "web"}}]},
        ],
    }
    web = Target(NS, "web", "web")
    proxied, entries = to_proxy(spec, NS, web, ACT)
    values = [r["route"][-1]["headers"]["request"]["set"][HEADER] for r in proxied["http"]]
    assert values == [f"{NS}/web:9090", f"{NS}/web"]
    assert is_proxied(proxied, web, ACT, NS)
    assert to_proxy(proxied, NS, web, ACT, entries)[0] == proxied  # idempotent
    assert to_serve(proxied, NS, web, ACT, entries) == spec
    # two live destinations of the target on different ports: no single port to name
    two = [{"destination": {"host": "web", "port": {"number": n}}, "weight": 50} for n in (8080, 9090)]
    proxied, _ = to_proxy({"http": [{"route": two}]}, NS, web, ACT)
    assert proxied["http"][0]["route"][-1]["headers"]["request"]["set"][HEADER] == f"{NS}/web"


def test_proxy_mode_again_is_a_fixed_point_with_several_targets_on_one_route() -> None:
    """What the controller does on every reconcile in proxy mode (serve with its restore data, then proxy)
    must give back the same spec when other targets of the route are proxied too, whatever order they
    were switched in: else each one's rewrite moves its activator destination behind the others' and
    they rewrite the VirtualService in turn forever."""
    spec = {"http": [{"route": [dest("reviews", "v1", 50), dest("reviews", "v2", 30), dest("reviews", "v3", 20)]}]}
    for order in ((V2, V3), (V3, V2), (V1, V3, V2)):
        current, entries = spec, {}
        for t in order:
            current, entries[t.name] = to_proxy(current, NS, t, ACT)
        for t in order:
            again, _ = to_proxy(to_serve(current, NS, t, ACT, entries[t.name]), NS, t, ACT)
            assert again == current, (order, t.name)


def test_queries() -> None:
    spec = full_spec()
    assert routes_to(spec, NS, V2) and routes_to(spec, NS, V1) and not routes_to(spec, NS, V3)
    assert not routes_to(spec, "other", V2)
    assert route_timeouts(spec, NS, V2) == [("timeout", "10s"), ("retries.perTryTimeout", "2s")]
    assert route_timeouts(spec, NS, V1) == []
    proxied, _ = to_proxy(spec, NS, V2, ACT)
    assert routes_to(proxied, NS, V2)  # still routed to, with weight 0
    assert route_timeouts(proxied, NS, V2) == [("timeout", "10s"), ("retries.perTryTimeout", "2s")]
    assert not routes_to({"http": [{"route": [dest(ACT.host)]}]}, "elasti-system", Target(NS, "a", "elasti-activator"))
    assert not routes_to({}, NS, V2) and not routes_to({"http": "junk"}, NS, V2)


# --- idempotence and the activator in other forms -----------------------------------------------


def test_applying_a_mode_twice_changes_nothing() -> None:
    original = full_spec()
    spec, entries = to_proxy(original, NS, V2, ACT)
    assert to_proxy(spec, NS, V2, ACT, entries) == (spec, entries)
    served = to_serve(spec, NS, V2, ACT, entries)
    assert to_serve(served, NS, V2, ACT, entries) == served == original
    assert to_serve(original, NS, V2, ACT, None) == original


@pytest.mark.parametrize(
    "host",
    [
        "elasti-activator.elasti-system",
        "elasti-activator.elasti-system.svc",
        "elasti-activator.elasti-system.svc.cluster.local",
    ],
)
def test_activator_in_any_host_form_is_recognised(host: str) -> None:
    ours = dest(host, weight=100, headers={"request": {"set": {HEADER: DETAILS.key}}})
    spec = {"http": [{"route": [dest("details", weight=0), ours]}]}
    assert is_proxied(spec, DETAILS, ACT)
    assert to_proxy(spec, NS, DETAILS, ACT, [{"weights": [None]}]) == (spec, [{"weights": [None]}])
    assert to_serve(spec, NS, DETAILS, ACT, [{"weights": [None]}]) == {"http": [{"route": [dest("details")]}]}


def test_activator_for_another_target_or_without_header_is_not_ours() -> None:
    theirs = dest(ACT.host, weight=50, headers={"request": {"set": {HEADER: "bookinfo/ratings"}}})
    added = dest(ACT.host, weight=50, headers={"request": {"add": {HEADER: DETAILS.key}}})
    for other in (theirs, added):
        spec = {"http": [{"route": [dest("details", weight=50), other]}]}
        assert not is_proxied(spec, DETAILS, ACT)
        proxied, _ = to_proxy(spec, NS, DETAILS, ACT)
        assert [d["weight"] for d in proxied["http"][0]["route"]] == [0, 50, 50]


def test_proxy_without_a_known_original_records_none() -> None:
    spec, _ = to_proxy(vs_spec("virtual-service-all-v1.yaml"), NS, V1, ACT)
    assert to_proxy(spec, NS, V1, ACT, None) == (spec, [None])


# --- edits while in proxy mode ------------------------------------------------------------------


def test_reapplied_original_is_proxied_afresh() -> None:
    original = vs_spec("virtual-service-reviews-jason-v2-v3.yaml")
    spec, entries = to_proxy(original, NS, V2, ACT)
    served = to_serve(original, NS, V2, ACT, entries)  # someone applied the manifest again
    assert served == original
    assert to_proxy(served, NS, V2, ACT, entries) == (spec, entries)


def test_unrelated_edits_survive_the_round_trip() -> None:
    original = vs_spec("virtual-service-reviews-jason-v2-v3.yaml")
    spec, entries = to_proxy(original, NS, V2, ACT)
    edited = copy.deepcopy(spec)
    edited["http"][0]["retries"] = {"attempts": 5}
    edited["http"].insert(0, {"match": [{"uri": {"prefix": "/new"}}], "route": [dest("reviews", "v2")]})
    edited["http"].append({"route": [dest("ratings")]})
    served = to_serve(edited, NS, V2, ACT, entries)
    expected = copy.deepcopy(original)
    expected["http"][0]["retries"] = {"attempts": 5}
    expected["http"].insert(0, edited["http"][0])
    expected["http"].append({"route": [dest("ratings")]})
    assert served == expected
    again, entries2 = to_proxy(served, NS, V2, ACT)
    assert len(entries2) == 2  # the new route to reviews-v2 is proxied too
    assert [d.get("weight") for d in again["http"][0]["route"]] == [0, 100]
    assert again["http"][1]["retries"] == {"attempts": 5}
    assert to_serve(again, NS, V2, ACT, entries2) == served


def test_a_weight_changed_in_proxy_mode_is_kept() -> None:
    original = vs_spec("virtual-service-reviews-80-20.yaml")
    spec, entries = to_proxy(original, NS, V2, ACT)
    spec["http"][0]["route"][1]["weight"] = 5
    served = to_serve(spec, NS, V2, ACT, entries)
    assert [d["weight"] for d in served["http"][0]["route"]] == [80, 5]


# --- fallback restore ---------------------------------------------------------------------------


def proxied_by_hand(*route: dict) -> dict:
    return {"hosts": ["details"], "http": [{"route": list(route)}]}


OURS = {"request": {"set": {HEADER: DETAILS.key}}}


@pytest.mark.parametrize("restore", [None, [], [None], [{"weights": [1, 2, 3]}], [{"weights": "junk"}], ["junk"]])
def test_fallback_splits_the_activator_weight_evenly(restore: Any) -> None:
    spec = proxied_by_hand(
        dest("details", weight=0),
        dest("details.bookinfo", weight=0),
        dest("ratings", weight=20),
        dest(ACT.host, weight=81, headers=OURS),
    )
    served = to_serve(spec, NS, DETAILS, ACT, restore)
    assert [d["weight"] for d in served["http"][0]["route"]] == [41, 40, 20]
    assert to_serve(served, NS, DETAILS, ACT, restore) == served


def test_fallback_with_no_target_destination_left() -> None:
    spec = proxied_by_hand(dest("ratings", weight=0), dest("reviews", weight=0), dest(ACT.host, weight=7, headers=OURS))
    assert [d["weight"] for d in to_serve(spec, NS, DETAILS, ACT, None)["http"][0]["route"]] == [4, 3]
    spec = proxied_by_hand(dest("ratings", weight=10), dest(ACT.host, weight=7, headers=OURS))
    assert to_serve(spec, NS, DETAILS, ACT, None) == proxied_by_hand(dest("ratings", weight=10))
    spec = proxied_by_hand(dest(ACT.host, weight=100, headers=OURS))
    assert to_serve(spec, NS, DETAILS, ACT, None) == proxied_by_hand(dest("details.bookinfo.svc.cluster.local"))
    spec = {"http": [{"route": [dest(ACT.host, weight=100, headers={"request": {"set": {HEADER: V2.key}}})]}]}
    served = to_serve(spec, NS, V2, ACT, None)
    assert served == {"http": [{"route": [dest("reviews.bookinfo.svc.cluster.local", "v2")]}]}
    several = Target(NS, "reviews-old", "reviews", frozenset({"v1", "v2"}), whole_service=False)
    spec = {"http": [{"route": [dest(ACT.host, weight=100, headers={"request": {"set": {HEADER: several.key}}})]}]}
    assert to_serve(spec, NS, several, ACT, None) == spec  # no telling which subset


def test_entries_pair_with_proxied_routes_in_order() -> None:
    original = {
        "http": [
            {"match": [{"uri": {"prefix": "/a"}}], "route": [dest("details", weight=30), dest("x", weight=70)]},
            {"route": [dest("details")]},
        ]
    }
    spec, entries = to_proxy(original, NS, DETAILS, ACT)
    assert without_at(entries) == [{"weights": [30]}, {"weights": [None]}]
    spec["http"].insert(1, {"route": [dest("y")]})  # someone inserts a route in between
    served = to_serve(spec, NS, DETAILS, ACT, entries)
    assert served["http"][0] == original["http"][0] and served["http"][2] == original["http"][1]


# --- the annotation -----------------------------------------------------------------------------


def test_restore_annotation_round_trip_for_several_targets() -> None:
    assert read_restore(None) == {} and read_restore({}) == {}
    value = write_restore(None, V1.key, [{"weights": [None]}])
    assert value == '{"bookinfo/reviews-v1":[{"weights":[null]}]}'
    annotations = {RESTORE_ANNOTATION: value, "other": "x"}
    value = write_restore(annotations, V2.key, [{"weights": [20], "others": [[0, None]]}])
    assert json.loads(value) == {
        V1.key: [{"weights": [None]}],
        V2.key: [{"weights": [20], "others": [[0, None]]}],
    }
    assert list(json.loads(value)) == sorted(json.loads(value)) and " " not in value
    annotations[RESTORE_ANNOTATION] = value
    assert without_at(read_restore(annotations)[V2.key]) == [{"weights": [20], "others": [[0, None]]}]
    value = write_restore(annotations, V1.key, None)
    assert json.loads(value) == {V2.key: [{"weights": [20], "others": [[0, None]]}]}
    assert write_restore({RESTORE_ANNOTATION: value}, V2.key, []) is None


@pytest.mark.parametrize("raw", ["", "{", "[]", "null", '"x"', "42", '{"a/b": 3}'])
def test_malformed_annotation_reads_as_nothing(raw: str) -> None:
    assert read_restore({RESTORE_ANNOTATION: raw}) == {}
    assert write_restore({RESTORE_ANNOTATION: raw}, "a/b", None) is None


def test_serve_uses_the_recorded_positions_when_the_target_is_no_longer_known() -> None:
    """A target deleted while at zero: the controller only knows the Service, not the subsets."""
    spec = {
        "hosts": ["reviews"],
        "http": [
            {
                "route": [
                    {"destination": {"host": "reviews", "subset": "v1"}, "weight": 50},
                    {"destination": {"host": "reviews", "subset": "v2"}, "weight": 30},
                    {"destination": {"host": "reviews", "subset": "v3"}, "weight": 20},
                ]
            }
        ],
    }
    act = ActivatorRef("elasti-activator.elasti-system.svc.cluster.local", 8012)
    precise = Target("ns", "reviews-v2", "reviews", frozenset({"v2"}), whole_service=False)
    proxied, entries = to_proxy(spec, "ns", precise, act)
    vague = Target("ns", "reviews-v2", "reviews")
    assert to_serve(proxied, "ns", vague, act, entries) == spec


def test_recorded_positions_that_no_longer_fit_fall_back_to_matching() -> None:
    spec = {"hosts": ["details"], "http": [{"route": [{"destination": {"host": "details"}, "weight": 100}]}]}
    act = ActivatorRef("elasti-activator.elasti-system.svc.cluster.local", 8012)
    target = Target("ns", "details", "details")
    proxied, entries = to_proxy(spec, "ns", target, act)
    # Someone put another destination in front while in proxy mode.
    proxied["http"][0]["route"].insert(0, {"destination": {"host": "other"}, "weight": 0})
    served = to_serve(proxied, "ns", target, act, entries)
    route = served["http"][0]["route"]
    assert [d["destination"]["host"] for d in route] == ["other", "details"]
    assert route[1]["weight"] == 100
