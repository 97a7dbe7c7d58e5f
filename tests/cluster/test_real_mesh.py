"""The ground the suite stands on is the real thing: a current Kubernetes, Istio's own admission rules,
istiod pushing to Envoy, and Envoy's own answers."""

from __future__ import annotations

import http.client
import ipaddress
import uuid
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from elasti_istio.localcluster.cluster import ClusterInfo
from elasti_istio.playground import mesh as meshview
from tests.conftest import K8s, MeshInfo
from tests.helpers import wait_for

ISTIO = ("networking.istio.io", "v1")


def gateway_get(mesh: MeshInfo, host: str, path: str = "/") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(mesh.ingress.removeprefix("http://"), timeout=30)
    try:
        conn.request("GET", path, headers={"Host": host})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def web(k8s: K8s, ns: str, replicas: int) -> None:
    from kubernetes import utils

    labels = {"app": "web"}
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web"},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "containers": [{"name": "app", "image": "e2e/httpbin", "ports": [{"containerPort": 8080}]}]
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web"},
            "spec": {"selector": labels, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
        },
    ]
    for doc in docs:
        utils.create_from_dict(k8s.api, doc, namespace=ns)


def gateway_route(k8s: K8s, ns: str, host: str) -> None:
    """A Gateway for one host (so that other tests' Gateways are not disturbed) routed to web."""
    gw = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "Gateway",
        "metadata": {"name": "gw"},
        "spec": {
            "selector": {"istio": "ingressgateway"},
            "servers": [{"port": {"number": 80, "name": "http", "protocol": "HTTP"}, "hosts": [host]}],
        },
    }
    vs = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "web-gw"},
        "spec": {"hosts": [host], "gateways": ["gw"], "http": [{"route": [{"destination": {"host": "web"}}]}]},
    }
    k8s.custom.create_namespaced_custom_object(*ISTIO, ns, "gateways", gw)  # type: ignore[attr-defined]
    k8s.custom.create_namespaced_custom_object(*ISTIO, ns, "virtualservices", vs)  # type: ignore[attr-defined]


def test_the_server_is_a_current_kubernetes(k8s: K8s, cluster: ClusterInfo, namespace: str) -> None:
    from kubernetes import client

    version = client.VersionApi(k8s.api).get_code()  # type: ignore[arg-type]
    assert version.major == "1" and int(version.minor.rstrip("+")) >= 34, version.git_version
    # Pods get addresses that EndpointSlices (discovery.k8s.io/v1) accept: not loopback.
    web(k8s, namespace, 1)
    addresses = wait_for(lambda: k8s.endpoint_addresses(namespace, "web"), 60, "web's EndpointSlice")
    (address,) = addresses
    assert ipaddress.ip_address(address) in ipaddress.ip_network(cluster.pod_cidr)
    assert not ipaddress.ip_address(address).is_loopback


def test_third_party_crds_keep_their_cel_rules(k8s: K8s, namespace: str) -> None:
    so = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "so"},
        "spec": {"scaleTargetRef": {"name": "web"}, "minReplicaCount": 3, "maxReplicaCount": 1, "triggers": []},
    }
    with pytest.raises(ApiException) as info:
        k8s.custom.create_namespaced_custom_object("keda.sh", "v1alpha1", namespace, "scaledobjects", so)  # type: ignore[attr-defined]
    assert info.value.status == 422
    assert "minReplicaCount must be less than or equal to maxReplicaCount" in str(info.value.body)
    vs = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "timeout"},
        "spec": {"hosts": ["web"], "http": [{"timeout": "1us", "route": [{"destination": {"host": "web"}}]}]},
    }
    with pytest.raises(ApiException) as info:
        k8s.custom.create_namespaced_custom_object(*ISTIO, namespace, "virtualservices", vs)  # type: ignore[attr-defined]
    assert info.value.status == 422
    assert "must be a valid duration greater than 1ms" in str(info.value.body)


def test_istios_webhook_refuses_a_route_whose_weights_are_all_zero(k8s: K8s, namespace: str) -> None:
    vs = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "zero"},
        "spec": {
            "hosts": ["web"],
            "http": [
                {"route": [{"destination": {"host": "web"}, "weight": 0}, {"destination": {"host": "x"}, "weight": 0}]}
            ],
        },
    }
    with pytest.raises(ApiException) as info:
        k8s.custom.create_namespaced_custom_object(*ISTIO, namespace, "virtualservices", vs)  # type: ignore[attr-defined]
    body = str(info.value.body)
    assert "admission webhook" in body and "denied the request" in body, body
    assert "configuration is invalid: total destination weight = 0" in body, body


def test_envoy_answers_itself_for_a_workload_at_zero(k8s: K8s, mesh: MeshInfo, namespace: str) -> None:
    host = f"zero-{uuid.uuid4().hex[:6]}.example"
    web(k8s, namespace, 1)
    gateway_route(k8s, namespace, host)
    _, headers, _ = wait_for(
        lambda: (a := gateway_get(mesh, host, "/get"))[0] == 200 and a, 60, "web served through the gateway"
    )
    assert "x-envoy-upstream-service-time" in headers  # an answer from an upstream says so
    k8s.apps.patch_namespaced_deployment_scale("web", namespace, {"spec": {"replicas": 0}})  # type: ignore[attr-defined]
    # While Envoy still has the endpoint of the pod that stopped, it answers "upstream connect error"
    # (also its own answer); once istiod has pushed the removal, "no healthy upstream".
    status, headers, _ = wait_for(
        lambda: (a := gateway_get(mesh, host, "/get"))[2] == b"no healthy upstream" and a,
        60,
        "Envoy to have no endpoint for web",
    )
    assert status == 503 and headers.get("server") == "istio-envoy"
    assert "x-envoy-upstream-service-time" not in headers  # Envoy's own answer: no upstream saw it


def test_istiod_reports_every_proxy_synced(mesh: MeshInfo) -> None:
    entries = meshview.syncz(mesh.istiod)
    proxies = {e["proxy"]: e for e in entries}
    gateway = next(p for p in proxies if p.startswith("istio-ingressgateway"))
    client = next(p for p in proxies if p.startswith(meshview.CLIENT))
    assert proxies[gateway]["proxy_type"] == "router" and proxies[client]["proxy_type"] == "sidecar"
    meshview.wait_synced(mesh.istiod, 60, (gateway, client))
