"""Reading an ElastiService (spec.py) and which ElastiServices an event concerns (indexes.py), without a
cluster."""

from __future__ import annotations

import json
from typing import Any

import pytest

from elasti_istio.controller import spec as es_spec
from elasti_istio.controller.indexes import Indexes
from elasti_istio.resources import ANN_BIND, ANN_ORIGINAL_ROUTES


def es(name: str = "details", ns: str = "shop", **spec: Any) -> dict[str, Any]:
    base = {"service": "details", "scaleTargetRef": {"kind": "Deployment", "name": "details-v1"}}
    return {"metadata": {"namespace": ns, "name": name}, "spec": {**base, **spec}}


# ---- spec.parse -------------------------------------------------------------------------------------


def test_defaults() -> None:
    s = es_spec.parse(es())
    assert (s.key, s.service, s.min_replicas, s.hold_timeout, s.cooldown, s.wake_hold_seconds) == (
        "shop/details", "details", 1, 60.0, 300.0, 120.0,
    )  # fmt: skip
    assert s.target.api_version == "apps/v1" and s.triggers == () and s.enabled_period is None


SPEC_ERRORS = [
    ({"scaleTargetRef": {"kind": "CronJob", "name": "x"}}, "UnsupportedKind", "is not one of"),
    ({"scaleTargetRef": {"kind": "Deployment", "name": "x", "apiVersion": "extensions/v1beta1"}}, "UnsupportedKind",
     "does not serve kind Deployment"),
    ({"activator": {"holdTimeout": "0"}}, "InvalidSpec", "activator.holdTimeout"),
    ({"triggers": [{"type": "cpu"}]}, "InvalidTrigger", "is not supported"),
    ({"triggers": [{"type": "prometheus", "metadata": {"threshold": "x"}}]}, "InvalidTrigger", "not a number"),
    ({"triggers": [{"type": "prometheus", "metadata": {"threshold": "1"}}]}, "InvalidTrigger", "needs"),
    ({"triggers": [{"type": "prometheus", "metadata": {"threshold": "1", "query": "q",
                                                       "serverAddress": "http://p/?x="}}]},
     "InvalidTrigger", "query or fragment"),
    ({"enabledPeriod": {"schedule": "0 20 * * *", "duration": "12 hours"}}, "InvalidSchedule", "enabledPeriod"),
]  # fmt: skip


@pytest.mark.parametrize(("spec", "reason", "says"), SPEC_ERRORS)
def test_spec_errors_name_the_field(spec: dict[str, Any], reason: str, says: str) -> None:
    with pytest.raises(es_spec.SpecError) as err:
        es_spec.parse(es(**spec))
    assert err.value.reason == reason and says in err.value.message


def test_a_full_spec() -> None:
    s = es_spec.parse(
        es(
            virtualServices=["details", "front/details"],
            minTargetReplicas=3,
            activator={"holdTimeout": "1m30s"},
            autoscaler={"type": "keda", "name": "so", "wakeHoldSeconds": 30},
            triggers=[
                {
                    "type": "prometheus",
                    "metadata": {"serverAddress": "http://p:9090/", "query": "q", "threshold": "0.5"},
                }
            ],
            enabledPeriod={"schedule": "0 20 * * 1-5", "duration": "12h"},
        )
    )
    assert s.virtual_services == (("shop", "details"), ("front", "details"))
    assert (s.min_replicas, s.hold_timeout, s.autoscaler_name, s.wake_hold_seconds) == (3, 90.0, "so", 30.0)
    assert s.triggers[0] == es_spec.Trigger("http://p:9090", "q", 0.5)
    assert s.enabled_period == es_spec.EnabledPeriod("0 20 * * 1-5", 43200.0)


def test_binding_annotation_and_origin_name() -> None:
    assert es_spec.parse_binding_annotation(" a, other/b ,, c/", "shop") == {("shop", "a"), ("other", "b")}
    assert es_spec.origin_service_name("details") == "details-elasti-origin"
    long = es_spec.origin_service_name("x" * 60)
    assert len(long) <= 63 and long != es_spec.origin_service_name("x" * 61)


# ---- indexes --------------------------------------------------------------------------------------


def vs(name: str, ns: str = "shop", rv: str = "5", **ann: str) -> dict[str, Any]:
    return {"metadata": {"namespace": ns, "name": name, "resourceVersion": rv, "annotations": ann}}


def test_bindings_by_spec_and_by_annotation() -> None:
    idx = Indexes()
    key = idx.update_es(es(virtualServices=["listed"]))
    assert idx.bound_vs(key) == {("shop", "listed")}
    assert idx.update_vs(vs("annotated", **{ANN_BIND: "details"})) == {key}
    assert idx.update_vs(vs("elsewhere", ns="front", **{ANN_BIND: "shop/details"})) == {key}
    assert idx.update_vs(vs("same-name-other-ns", ns="front", **{ANN_BIND: "details"})) == {"front/details"}
    assert idx.bound_vs(key) == {("shop", "listed"), ("shop", "annotated"), ("front", "elsewhere")}
    # The annotation removed: the ElastiService it named is concerned (its route must be restored).
    assert idx.update_vs(vs("annotated", rv="6")) == {key}
    assert ("shop", "annotated") not in idx.bound_vs(key)
    assert idx.update_vs(vs("listed")) == {key}  # listed in the spec: always concerned


def test_restore_data_and_stale_events() -> None:
    idx = Indexes()
    key = idx.update_es(es())
    assert idx.update_vs(vs("r", rv="10", **{ANN_ORIGINAL_ROUTES: json.dumps({key: []})})) == {key}
    assert idx.vs_with_restore(key) == {("shop", "r")}
    assert idx.update_vs(vs("r", rv="9")) == set(), "an older resourceVersion than the one seen is ignored"
    assert idx.vs_with_restore(key) == {("shop", "r")}
    # Unreadable restore data binds nothing; the ElastiService that had data there is concerned once.
    assert idx.update_vs(vs("r", rv="11", **{ANN_ORIGINAL_ROUTES: "not json"})) == {key}
    assert idx.update_vs(vs("r", rv="12", **{ANN_ORIGINAL_ROUTES: json.dumps([key])})) == set()
    assert idx.vs_with_restore(key) == set()
    assert idx.update_vs(vs("r", rv="13"), deleted=True) == set()


def test_targets_and_forgetting() -> None:
    idx = Indexes()
    key = idx.update_es(es(autoscaler={"type": "keda", "name": "so"}))
    assert idx.for_target("shop", "Deployment", "details-v1") == {key}
    assert idx.for_target("shop", "ScaledObject", "so") == {key}
    assert idx.for_target("other", "Deployment", "details-v1") == set()
    assert idx.for_service("shop", "details") == {key}
    assert idx.elastic_targets("shop") == {("Deployment", "details-v1"), ("ScaledObject", "so")}
    idx.set_resolved_targets(key, {("shop", "Deployment", "resolved")})
    assert idx.for_target("shop", "Deployment", "resolved") == {key}
    idx.update_es(es(), deleted=True)
    assert idx.all_es() == set() and idx.for_service("shop", "details") == set()


def test_routing_generation_moves_only_when_what_routing_depends_on_moves() -> None:
    idx = Indexes()
    idx.update_es(es())
    gen = idx.routing_generation["shop"]
    deployment = {
        "metadata": {"name": "web"},
        "spec": {"replicas": 1, "template": {"metadata": {"labels": {"a": "b"}}}},
    }
    assert idx.update_workload("shop", "Deployment", deployment) and idx.routing_generation["shop"] == gen + 1
    assert not idx.update_workload("shop", "Deployment", deployment), "the same labels and serving: no change"
    deployment["spec"]["replicas"] = 0
    assert idx.update_workload("shop", "Deployment", deployment), "it stopped serving"
    assert idx.update_workload("shop", "Deployment", deployment, deleted=True)
    assert idx.routing_generation["shop"] == gen + 3


def test_claims_say_who_shares_a_destination() -> None:
    idx = Indexes()
    whole = ("shop", "details", "shop", "details", "")
    v1 = ("shop", "reviews", "shop", "reviews", "v1")
    a, b, c = ("t1", "shop/a"), ("t2", "shop/b"), ("t3", "shop/c")
    assert idx.set_claims("shop/a", a, frozenset({whole})) == set()
    assert idx.set_claims("shop/c", c, frozenset({v1})) == set()
    assert idx.set_claims("shop/b", b, frozenset({whole})) == {"shop/a"}  # a must say so too
    assert idx.set_claims("shop/b", b, frozenset({whole})) == set(), "unchanged: nobody to tell"
    assert idx.rivals("shop/a", {("shop", "details")}) == {"shop/b": (b, frozenset({whole}))}
    assert idx.rivals("shop/a", {("shop", "other")}) == {}
    assert idx.set_claims("shop/b", b, frozenset({v1})) == {"shop/a", "shop/c"}  # left a, joined c
    assert idx.drop_claims("shop/b") == {"shop/c"}
    assert idx.drop_claims("shop/b") == set()
    assert idx.set_claims("shop/a", a, frozenset()) == set() and "shop/a" not in idx.es_claims


# ---- a KubeElasti manifest -------------------------------------------------------------------------

# KubeElasti's playground ElastiService (truefoundry/KubeElasti playground/config/demo-elastiService.yaml),
# with the uptimeFilter its e2e tests set and its KEDA autoscaler.
KUBEELASTI = {
    "apiVersion": "elasti.truefoundry.com/v1alpha1",
    "kind": "ElastiService",
    "metadata": {"name": "httpbin", "namespace": "target"},
    "spec": {
        "service": "httpbin",
        "minTargetReplicas": 1,
        "cooldownPeriod": 100,
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "deployments", "name": "httpbin"},
        "triggers": [
            {
                "type": "prometheus",
                "metadata": {
                    "query": "round(sum(rate(envoy_http_downstream_rq_total[1m])),0.001) or vector(0)",
                    "serverAddress": "http://prometheus-operated.monitoring.svc.cluster.local:9090",
                    "threshold": "0.01",
                    "uptimeFilter": 'container="foo"',
                },
            }
        ],
        "autoscaler": {"type": "keda", "name": "httpbin-so"},
    },
}


def test_a_kubeelasti_manifest_is_read_as_it_is() -> None:
    s = es_spec.parse(KUBEELASTI)
    assert (s.target.kind, s.target.name, s.target.api_version) == ("Deployment", "httpbin", "apps/v1")
    assert s.cooldown == 100.0  # its cooldownPeriod is seconds, as ours
    assert s.triggers == (
        es_spec.Trigger(
            "http://prometheus-operated.monitoring.svc.cluster.local:9090",
            "round(sum(rate(envoy_http_downstream_rq_total[1m])),0.001) or vector(0)",
            0.01,
        ),
    )
    assert (s.autoscaler_type, s.autoscaler_name) == ("keda", "httpbin-so")
    assert es_spec.ignored_fields(KUBEELASTI) == ["spec.triggers[0].metadata.uptimeFilter"]
    assert es_spec.ignored_fields(es()) == []


@pytest.mark.parametrize(
    ("kind", "ours"),
    [("deployments", "Deployment"), ("statefulsets", "StatefulSet"), ("rollouts", "Rollout"), ("Rollout", "Rollout")],
)
def test_kubeelasti_plural_kinds(kind: str, ours: str) -> None:
    s = es_spec.parse(es(scaleTargetRef={"kind": kind, "name": "w"}))
    assert s.target.kind == ours and s.target.api_version == es_spec.DEFAULT_API_VERSION[ours]
    idx = Indexes()
    key = idx.update_es(es(scaleTargetRef={"kind": kind, "name": "w"}))
    assert idx.for_target("shop", ours, "w") == {key}
    with pytest.raises(es_spec.SpecError):
        es_spec.parse(es(scaleTargetRef={"kind": "replicaset", "name": "w"}))
