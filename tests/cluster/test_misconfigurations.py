"""Misconfigurations that used to pass in silence: a VirtualService annotated for an ElastiService that does
not exist, and two ElastiServices claiming the same route destination."""

from __future__ import annotations

from typing import Any

from elasti_istio.resources import ANN_BIND
from tests.cluster.test_controller_lifecycle import activator_dests, bookinfo, phase, vs_spec
from tests.cluster.test_controller_resilience import cond_is, es_doc
from tests.conftest import K8s
from tests.harness import condition, create, delete, es, events_for, get, patch, scale, wait_until


def vs_warnings(k8s: K8s, ns: str, name: str) -> list[Any]:
    return [
        e
        for e in events_for(k8s, ns, name)
        if e.involved_object.kind == "VirtualService" and e.reason == "ElastiServiceNotFound"
    ]


def test_a_virtualservice_annotated_for_a_missing_elastiservice(
    k8s: K8s, namespace: str, start_controller: Any
) -> None:
    bookinfo(k8s, namespace)
    start_controller()
    wait_until(lambda: phase(k8s, namespace, "details") == "Serving", what="Serving")
    patch(k8s, namespace, "VirtualService", "details", {"metadata": {"annotations": {ANN_BIND: "detials"}}})
    [warning] = wait_until(lambda: vs_warnings(k8s, namespace, "details"), 60, "the Warning on the VirtualService")
    assert warning.type == "Warning" and warning.count == 1
    assert f"annotated {ANN_BIND}=detials, but ElastiService {namespace}/detials does not exist" in warning.message
    # A change that leaves the annotation as it is (a label) posts nothing: when a later VirtualService's
    # Warning has come, a check of this one would have come before it.
    patch(k8s, namespace, "VirtualService", "details", {"metadata": {"labels": {"touched": "yes"}}})
    patch(k8s, namespace, "VirtualService", "reviews", {"metadata": {"annotations": {ANN_BIND: "reviews-v9"}}})
    wait_until(lambda: vs_warnings(k8s, namespace, "reviews"), 60, "the reviews VirtualService's Warning")
    [again] = vs_warnings(k8s, namespace, "details")
    assert again.count == 1, "one Warning per change of the annotation"
    # The bound ElastiServices keep working: details is still bound through spec.virtualServices.
    assert cond_is(k8s, namespace, "details", "Ready", "True")


def test_two_elastiservices_claiming_one_destination(k8s: K8s, namespace: str, start_controller: Any) -> None:
    bookinfo(k8s, namespace)
    start_controller()
    wait_until(lambda: phase(k8s, namespace, "details") == "Serving", what="Serving")
    first = es(k8s, namespace, "details")["metadata"]["creationTimestamp"]
    create(
        k8s,
        namespace,
        es_doc(
            "details-again",
            service="details",
            scaleTargetRef={"kind": "Deployment", "name": "details-v1"},
            virtualServices=["details"],
        ),
    )
    # The later one: created after it, or in the same second and after it by name.
    assert es(k8s, namespace, "details-again")["metadata"]["creationTimestamp"] >= first
    wait_until(lambda: cond_is(k8s, namespace, "details-again", "Conflict", "True", "DestinationClaimedTwice"), 60)
    wait_until(lambda: cond_is(k8s, namespace, "details", "Conflict", "True", "DestinationClaimedTwice"), 60)
    later = condition(es(k8s, namespace, "details-again"), "Conflict")
    assert later is not None and f"ElastiService {namespace}/details, created first" in later["message"]
    earlier = condition(es(k8s, namespace, "details"), "Conflict")
    assert earlier is not None and f"ElastiService {namespace}/details-again also claims" in earlier["message"]
    wait_until(lambda: cond_is(k8s, namespace, "details-again", "Ready", "False", "DestinationClaimedTwice"), 60)
    assert cond_is(k8s, namespace, "details", "Ready", "True")
    for name in ("details", "details-again"):
        wait_until(
            lambda name=name: any(
                e.type == "Warning" and e.reason == "DestinationClaimedTwice" for e in events_for(k8s, namespace, name)
            ),
            60,
            f"the Warning on {name}",
        )
    # Bookinfo's reviews versions share one VirtualService and Service, told apart by subsets: no conflict.
    for name in ("reviews-v1", "reviews-v2", "reviews-v3"):
        assert condition(es(k8s, namespace, name), "Conflict") is None

    # At zero, only the first one switches: one activator destination, with its header.
    scale(k8s, namespace, "details-v1", 0)
    wait_until(lambda: phase(k8s, namespace, "details") == "ScaledToZero", 60, "ScaledToZero")
    dests = wait_until(lambda: activator_dests(vs_spec(k8s, namespace, "details")), 60, "proxied")
    assert [d["headers"]["request"]["set"]["elasti-service"] for d in dests] == [f"{namespace}/details"]
    wait_until(lambda: phase(k8s, namespace, "details-again") == "ScaledToZero", 60, "its phase too")
    assert es(k8s, namespace, "details-again")["status"]["mode"] == "serve"
    assert es(k8s, namespace, "details")["status"]["mode"] == "proxy"

    # The later one goes (its finalizer wakes nothing: the target is the first one's), the conflict is over.
    delete(k8s, namespace, "ElastiService", "details-again")
    wait_until(lambda: get(k8s, namespace, "ElastiService", "details-again") is None, 60, "details-again deleted")
    wait_until(lambda: cond_is(k8s, namespace, "details", "Conflict", "False", "NoConflict"), 60, "NoConflict")
    dests = activator_dests(vs_spec(k8s, namespace, "details"))
    assert [d["headers"]["request"]["set"]["elasti-service"] for d in dests] == [f"{namespace}/details"]
    assert k8s.apps.read_namespaced_deployment("details-v1", namespace).spec.replicas == 0  # type: ignore[attr-defined]
