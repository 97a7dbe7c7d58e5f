"""Istio's DestinationRule lookup: client namespace, then the Service's, then the root namespace, among
the rules exported to the client."""

from __future__ import annotations

from typing import Any

from elasti_istio.controller.drlookup import exported_to, rules_for


def rule(ns: str, name: str, host: str = "reviews.shop.svc.cluster.local", export: list[str] | None = None) -> dict:
    spec: dict[str, Any] = {"host": host, "subsets": [{"name": name, "labels": {"version": name}}]}
    if export is not None:
        spec["exportTo"] = export
    return {"metadata": {"namespace": ns, "name": name}, "spec": spec}


def is_reviews(host: str, ns: str) -> bool:
    return host in ("reviews.shop.svc.cluster.local", "reviews") and (host != "reviews" or ns == "shop")


def names(rules: list[dict]) -> list[str]:
    return [r["metadata"]["name"] for r in rules]


def test_exported_to() -> None:
    assert exported_to(rule("shop", "a"), "front")
    assert exported_to(rule("shop", "a", export=["*"]), "front")
    assert exported_to(rule("shop", "a", export=["."]), "shop")
    assert not exported_to(rule("shop", "a", export=["."]), "front")
    assert exported_to(rule("shop", "a", export=["front"]), "front")
    assert not exported_to(rule("shop", "a", export=["~"]), "shop")


def test_client_namespace_first_then_service_then_root() -> None:
    rules = {
        "front": [rule("front", "client-v2")],
        "shop": [rule("shop", "service-v1"), rule("shop", "service-v3", host="reviews")],
        "istio-system": [rule("istio-system", "root-v1")],
    }
    assert names(rules_for("front", "shop", "istio-system", rules, is_reviews)) == ["client-v2"]
    # the Service's namespace: its rules for the host are merged
    assert names(rules_for("shop", "shop", "istio-system", rules, is_reviews)) == ["service-v1", "service-v3"]
    assert names(rules_for("other", "shop", "istio-system", rules, is_reviews)) == ["service-v1", "service-v3"]
    only_root = {"istio-system": rules["istio-system"]}
    assert names(rules_for("front", "shop", "istio-system", only_root, is_reviews)) == ["root-v1"]


def test_rules_not_exported_to_the_client_are_skipped() -> None:
    rules = {
        "front": [rule("front", "elsewhere", host="details.shop.svc.cluster.local")],
        "shop": [rule("shop", "private", export=["."])],
        "istio-system": [rule("istio-system", "root-v1")],
    }
    assert names(rules_for("front", "shop", "istio-system", rules, is_reviews)) == ["root-v1"]
    assert names(rules_for("shop", "shop", "istio-system", rules, is_reviews)) == ["private"]
