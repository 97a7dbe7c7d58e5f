"""The API server enforces what a real cluster enforces: schemas, subresources, defaults."""

from __future__ import annotations

import pytest
from kubernetes.client.exceptions import ApiException

from tests.conftest import K8s

GROUP, VERSION, PLURAL = "elasti.truefoundry.com", "v1alpha1", "elastiservices"


def es(name: str, **spec: object) -> dict:
    base: dict = {
        "service": "details",
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "details-v1"},
    }
    base.update(spec)
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ElastiService", "metadata": {"name": name}, "spec": base}


def create(k8s: K8s, ns: str, body: dict) -> dict:
    return k8s.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)  # type: ignore[attr-defined]


def refused(k8s: K8s, ns: str, body: dict) -> str:
    with pytest.raises(ApiException) as info:
        create(k8s, ns, body)
    assert info.value.status == 422, info.value.body
    return str(info.value.body)


def test_missing_service_is_refused(k8s: K8s, namespace: str) -> None:
    body = es("no-service")
    del body["spec"]["service"]
    assert "spec.service: Required value" in refused(k8s, namespace, body)


def test_min_target_replicas_zero_is_refused(k8s: K8s, namespace: str) -> None:
    msg = refused(k8s, namespace, es("zero", minTargetReplicas=0))
    assert "spec.minTargetReplicas" in msg and "greater than or equal to 1" in msg


def test_unknown_kind_is_refused(k8s: K8s, namespace: str) -> None:
    msg = refused(k8s, namespace, es("cronjob", scaleTargetRef={"kind": "CronJob", "name": "x"}))
    assert "spec.scaleTargetRef.kind" in msg and "Unsupported value" in msg


def test_bad_hold_timeout_is_refused(k8s: K8s, namespace: str) -> None:
    msg = refused(k8s, namespace, es("bad-timeout", activator={"holdTimeout": "sixty"}))
    assert "spec.activator.holdTimeout" in msg


def test_defaults_are_applied_by_the_server(k8s: K8s, namespace: str) -> None:
    obj = create(k8s, namespace, es("defaults"))
    assert obj["spec"]["minTargetReplicas"] == 1
    assert obj["spec"]["activator"] == {"holdTimeout": "60s", "retryInterval": "100ms", "queueLimit": 1000}


def test_status_is_a_subresource(k8s: K8s, namespace: str) -> None:
    create(k8s, namespace, es("sub"))
    # A status written through the main resource is ignored; through /status it sticks.
    k8s.custom.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        "sub",  # type: ignore[attr-defined]
        {"status": {"phase": "Serving"}},
    )
    obj = k8s.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "sub")  # type: ignore[attr-defined]
    assert "status" not in obj or "phase" not in obj.get("status", {})
    k8s.custom.patch_namespaced_custom_object_status(  # type: ignore[attr-defined]
        GROUP, VERSION, namespace, PLURAL, "sub", {"status": {"phase": "ScaledToZero", "mode": "proxy"}}
    )
    obj = k8s.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "sub")  # type: ignore[attr-defined]
    assert obj["status"] == {"phase": "ScaledToZero", "mode": "proxy"}
    with pytest.raises(ApiException) as info:
        k8s.custom.patch_namespaced_custom_object_status(  # type: ignore[attr-defined]
            GROUP, VERSION, namespace, PLURAL, "sub", {"status": {"phase": "Sleeping"}}
        )
    assert info.value.status == 422


def test_virtualservice_with_string_weight_is_refused(k8s: K8s, namespace: str) -> None:
    vs = {
        "apiVersion": "networking.istio.io/v1beta1",
        "kind": "VirtualService",
        "metadata": {"name": "details"},
        "spec": {"hosts": ["details"], "http": [{"route": [{"destination": {"host": "details"}, "weight": 100}]}]},
    }
    k8s.custom.create_namespaced_custom_object(
        "networking.istio.io",
        "v1beta1",
        namespace,  # type: ignore[attr-defined]
        "virtualservices",
        vs,
    )
    with pytest.raises(ApiException) as info:
        k8s.custom.patch_namespaced_custom_object(  # type: ignore[attr-defined]
            "networking.istio.io",
            "v1beta1",
            namespace,
            "virtualservices",
            "details",
            {"spec": {"http": [{"route": [{"destination": {"host": "details"}, "weight": "100"}]}]}},
        )
    assert info.value.status == 422
    assert "weight" in str(info.value.body)


def test_deployment_scale_subresource_reads_back(k8s: K8s, namespace: str) -> None:
    from kubernetes import client

    k8s.apps.create_namespaced_deployment(
        namespace,
        client.V1Deployment(  # type: ignore[attr-defined]
            metadata=client.V1ObjectMeta(name="web"),
            spec=client.V1DeploymentSpec(
                replicas=1,
                selector=client.V1LabelSelector(match_labels={"app": "web"}),
                template=client.V1PodTemplateSpec(
                    metadata=client.V1ObjectMeta(labels={"app": "web"}),
                    spec=client.V1PodSpec(containers=[client.V1Container(name="web", image="example/web")]),
                ),
            ),
        ),
    )
    k8s.apps.patch_namespaced_deployment_scale("web", namespace, {"spec": {"replicas": 3}})  # type: ignore[attr-defined]
    scale = k8s.apps.read_namespaced_deployment_scale("web", namespace)  # type: ignore[attr-defined]
    assert scale.spec.replicas == 3
    assert k8s.apps.read_namespaced_deployment("web", namespace).spec.replicas == 3  # type: ignore[attr-defined]


def test_component_identities_have_no_permissions_yet(cluster, namespace: str) -> None:  # type: ignore[no-untyped-def]
    from kubernetes import client, config

    for kubeconfig in (cluster.controller_kubeconfig, cluster.activator_kubeconfig):
        cfg = client.Configuration()
        config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
        api = client.CustomObjectsApi(client.ApiClient(cfg))
        with pytest.raises(ApiException) as info:
            api.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
        assert info.value.status == 403
        assert "system:serviceaccount:elasti-system:elasti-" in str(info.value.body)


def test_empty_strings_in_custom_resources_are_accepted(k8s: K8s, namespace: str) -> None:
    """As on real clusters (the local build carries the fix for kubernetes#99804)."""
    vs = {
        "apiVersion": "networking.istio.io/v1beta1",
        "kind": "VirtualService",
        "metadata": {"name": "empty"},
        "spec": {"hosts": ["details"], "http": [{"name": "", "route": [{"destination": {"host": "details"}}]}]},
    }
    created = k8s.custom.create_namespaced_custom_object(  # type: ignore[attr-defined]
        "networking.istio.io", "v1beta1", namespace, "virtualservices", vs
    )
    assert created["spec"]["http"][0]["name"] == ""


def test_operations_fields_are_schema_checked(k8s: K8s, namespace: str) -> None:
    obj = create(
        k8s,
        namespace,
        es(
            "ops",
            cooldownPeriod=60,
            triggers=[
                {
                    "type": "prometheus",
                    "metadata": {"serverAddress": "http://p:9090", "query": "up", "threshold": "0.5"},
                }
            ],
            enabledPeriod={"schedule": "0 8 * * 1-5", "duration": "10h"},
            autoscaler={"type": "keda", "name": "so"},
            activator={"staticResponses": [{"match": {"path": {"exact": "/healthz"}}, "response": {"body": "ok"}}]},
        ),
    )
    static = obj["spec"]["activator"]["staticResponses"][0]
    assert static["wake"] is False and static["response"]["status"] == 200  # server defaults
    assert obj["spec"]["autoscaler"]["wakeHoldSeconds"] == 120
    assert "threshold" in refused(
        k8s,
        namespace,
        es(
            "bad-threshold",
            triggers=[{"type": "prometheus", "metadata": {"serverAddress": "x", "query": "up", "threshold": "lots"}}],
        ),
    )
    assert "Unsupported value" in refused(
        k8s,
        namespace,
        es(
            "bad-trigger",
            triggers=[{"type": "cpu", "metadata": {"serverAddress": "x", "query": "up", "threshold": "1"}}],
        ),
    )
