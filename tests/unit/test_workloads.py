"""Which pods belong to a target and count as ready: the pure half of the pod watches."""

from __future__ import annotations

from typing import Any

import pytest

from elasti_istio.controller.workloads import pod_is_ready, pod_of_target, selector_string


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
