"""Which pods belong to a target and count as ready: the pure half of the pod watches."""

from __future__ import annotations

from typing import Any

import pytest

from elasti_istio.controller.indexes import Indexes
from elasti_istio.controller.workloads import owns_whole_service, pod_is_ready, pod_of_target, selector_string


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ({"matchLabels": {"version": "v1", "app": "details"}}, "app=details,version=v1"),
        (
            {
                "matchLabels": {"app": "reviews"},
                "matchExpressions": [
                    {"key": "version", "operator": "In", "values": ["v3", "v2"]},
                    {"key": "canary", "operator": "NotIn", "values": ["true"]},
                    {"key": "tier", "operator": "Exists"},
                    {"key": "legacy", "operator": "DoesNotExist"},
                ],
            },
            "app=reviews,version in (v2,v3),canary notin (true),tier,!legacy",
        ),
        ({}, None),  # selects everything: never watched
        ({"matchExpressions": [{"key": "x", "operator": "In", "values": []}]}, None),
        ({"matchExpressions": [{"key": "x", "operator": "Gt", "values": ["1"]}]}, None),
    ],
)
def test_selector_string(selector: dict[str, Any], expected: str | None) -> None:
    assert selector_string(selector) == expected


def pod(
    owner: tuple[str, str] | None = ("ReplicaSet", "details-v1-7d4b9c"),
    labels: dict[str, str] | None = None,
    ready: str = "True",
    terminating: bool = False,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "p", "labels": {"pod-template-hash": "7d4b9c"} if labels is None else labels}
    if owner:
        meta["ownerReferences"] = [{"kind": owner[0], "name": owner[1], "controller": True}]
    if terminating:
        meta["deletionTimestamp"] = "2026-11-22T00:00:00Z"
    return {"metadata": meta, "status": {"conditions": [{"type": "Ready", "status": ready}]}}


def test_pod_is_ready() -> None:
    assert pod_is_ready(pod())
    assert not pod_is_ready(pod(ready="False"))
    assert not pod_is_ready(pod(terminating=True))
    assert not pod_is_ready({"metadata": {}, "status": {}})


def test_pod_of_target_through_the_replicaset_hash() -> None:
    assert pod_of_target(pod(), "Deployment", "details-v1")
    assert pod_of_target(pod(), "Rollout", "details-v1")
    # Another Deployment whose name is a prefix, or a ReplicaSet with another hash, is not the target.
    assert not pod_of_target(pod(), "Deployment", "details")
    assert not pod_of_target(pod(labels={"pod-template-hash": "0000"}), "Deployment", "details-v1")
    assert not pod_of_target(pod(labels={}), "Deployment", "details-v1")
    assert not pod_of_target(pod(owner=None), "Deployment", "details-v1")


def test_pod_of_target_owned_directly() -> None:
    assert pod_of_target(pod(owner=("StatefulSet", "db")), "StatefulSet", "db")
    assert pod_of_target(pod(owner=("ReplicaSet", "bare")), "ReplicaSet", "bare")
    assert not pod_of_target(pod(owner=("ReplicaSet", "bare")), "StatefulSet", "bare")
    not_controller = pod()
    not_controller["metadata"]["ownerReferences"][0]["controller"] = False
    assert not pod_of_target(not_controller, "Deployment", "details-v1")


def workload(name: str, replicas: int | None, ready: int = 0, labels: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"template": {"metadata": {"labels": labels or {"app": "web"}}}}
    if replicas is not None:
        spec["replicas"] = replicas
    return {"metadata": {"name": name}, "spec": spec, "status": {"readyReplicas": ready}}


SERVICE = {"app": "web"}


def test_a_retired_workload_at_zero_does_not_keep_the_whole_service_from_the_target() -> None:
    others = [("Deployment", workload("web-a", 0)), ("Deployment", workload("web-retired", 0))]
    assert owns_whole_service(SERVICE, "Deployment", "web-a", others)


def test_a_workload_that_serves_keeps_the_whole_service() -> None:
    for other in (workload("web-b", 1), workload("web-b", 0, ready=1), workload("web-b", None)):
        assert not owns_whole_service(
            SERVICE, "Deployment", "web-a", [("Deployment", workload("web-a", 0)), ("Deployment", other)]
        )


def test_workloads_the_service_does_not_select_do_not_count() -> None:
    other = ("Deployment", workload("api", 3, labels={"app": "api"}))
    assert owns_whole_service(SERVICE, "Deployment", "web-a", [other])


def test_two_elastic_targets_at_zero_share_the_service_by_name_order() -> None:
    """Both at zero behind one subset-less Service: the destination is the first one's (kind, then name),
    so exactly one ElastiService switches it; the other's ElastiService leaves it alone."""
    both = [("Deployment", workload("web-a", 0)), ("Deployment", workload("web-b", 0))]
    elastic = {("Deployment", "web-a"), ("Deployment", "web-b")}
    assert owns_whole_service(SERVICE, "Deployment", "web-a", both, elastic)
    assert not owns_whole_service(SERVICE, "Deployment", "web-b", both, elastic)
    # web-a woken: it serves, so web-b's ElastiService never takes the destination
    woken = [("Deployment", workload("web-a", 1)), ("Deployment", workload("web-b", 0))]
    assert not owns_whole_service(SERVICE, "Deployment", "web-b", woken, elastic)


def test_a_scale_of_a_workload_the_service_selects_redoes_the_routing_analysis() -> None:
    idx = Indexes()
    assert idx.update_workload("ns", "Deployment", workload("web-b", 1))
    assert not idx.update_workload("ns", "Deployment", workload("web-b", 1))
    assert idx.update_workload("ns", "Deployment", workload("web-b", 0, ready=1)) is False  # still serving
    assert idx.update_workload("ns", "Deployment", workload("web-b", 0))  # serves no more
    assert idx.update_workload("ns", "Deployment", workload("web-b", 2))  # serves again
