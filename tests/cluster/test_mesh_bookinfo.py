"""Bookinfo from the real manifests, through the mesh stand-in's ingress gateway and sidecar proxy.

Real parts: the API server, the Deployment/ReplicaSet/EndpointSlice controllers, the kubelet stand-in's
Bookinfo apps (which call each other through the mesh) and the mesh process itself.
"""

from __future__ import annotations

import collections
import http.client
import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import utils
from kubernetes.client.exceptions import ApiException

from elasti_istio.playground.bookinfo import unrouted
from tests.conftest import K8s, MeshInfo
from tests.helpers import wait_for

BOOKINFO = Path(__file__).resolve().parents[2] / "examples" / "bookinfo"
ISTIO = "networking.istio.io"
PLURALS = {"VirtualService": "virtualservices", "DestinationRule": "destinationrules", "Gateway": "gateways"}


def load(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((BOOKINFO / name).read_text()) if d]


def apply(k8s: K8s, namespace: str, docs: list[dict[str, Any]]) -> None:
    """Creates the documents, replacing Istio objects that already exist (a VirtualService change)."""
    for doc in docs:
        group, _, version = doc["apiVersion"].rpartition("/")
        if group == ISTIO:
            plural = PLURALS[doc["kind"]]
            name = doc["metadata"]["name"]
            try:
                current = k8s.custom.get_namespaced_custom_object(ISTIO, version, namespace, plural, name)  # type: ignore[attr-defined]
            except ApiException as exc:
                if exc.status != 404:
                    raise
                k8s.custom.create_namespaced_custom_object(ISTIO, version, namespace, plural, doc)  # type: ignore[attr-defined]
                continue
            body = dict(doc, metadata=dict(doc["metadata"], resourceVersion=current["metadata"]["resourceVersion"]))
            k8s.custom.replace_namespaced_custom_object(ISTIO, version, namespace, plural, name, body)  # type: ignore[attr-defined]
        else:
            utils.create_from_dict(k8s.api, doc, namespace=namespace)


def delete_istio(k8s: K8s, namespace: str, kind: str, name: str) -> None:
    try:
        k8s.custom.delete_namespaced_custom_object(ISTIO, "v1beta1", namespace, PLURALS[kind], name)  # type: ignore[attr-defined]
    except ApiException as exc:
        if exc.status != 404:
            raise


def deployments_ready(k8s: K8s, namespace: str) -> bool:
    items = k8s.apps.list_namespaced_deployment(namespace).items  # type: ignore[attr-defined]
    return bool(items) and all((d.status.ready_replicas or 0) == d.spec.replicas for d in items)


def request(
    base: str, path: str, *, host: str | None = None, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection; never retried."""
    hostport = base.removeprefix("http://")
    conn = http.client.HTTPConnection(hostport, timeout=30)
    try:
        h = dict(headers or {})
        if host:
            h["Host"] = host
        conn.request(method, path, headers=h)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def via_sidecar(mesh: MeshInfo, url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """A request through the outbound proxy in absolute-URI form, as the activator sends them."""
    conn = http.client.HTTPConnection(mesh.outbound.removeprefix("http://"), timeout=30)
    try:
        conn.request("GET", url, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@pytest.fixture
def bookinfo(k8s: K8s, namespace: str, mesh: MeshInfo) -> Iterator[str]:
    """Bookinfo, its gateway and its DestinationRules, serving through the ingress."""
    apply(k8s, namespace, load("bookinfo.yaml") + load("bookinfo-gateway.yaml") + load("destination-rule-all.yaml"))
    try:
        wait_for(lambda: deployments_ready(k8s, namespace), timeout=60, what="bookinfo deployments ready")
        wait_for(lambda: not unrouted(mesh.metrics, namespace), timeout=30, what="every subset to have endpoints")
        wait_for(
            lambda: request(mesh.ingress, "/productpage")[0] == 200,
            timeout=30,
            what="productpage through the ingress",
        )
        yield namespace
    finally:
        # The gateway's VirtualService claims host "*": remove it now rather than with the namespace, so
        # that a later test's Bookinfo is not shadowed by this one (Istio merges the oldest first).
        delete_istio(k8s, namespace, "VirtualService", "bookinfo")
        delete_istio(k8s, namespace, "Gateway", "bookinfo-gateway")


def reviews_version(page: bytes) -> str:
    """v1: no stars; v2: black stars; v3: red stars (as real Bookinfo renders them)."""
    text = page.decode()
    if 'data-color="red"' in text:
        return "v3"
    if 'data-color="black"' in text:
        return "v2"
    assert "Book Reviews" in text, text[:500]
    return "v1"


def test_productpage_renders_details_and_reviews(mesh: MeshInfo, bookinfo: str) -> None:
    status, headers, body = request(mesh.ingress, "/productpage")
    page = body.decode()
    assert status == 200
    assert "The Comedy of Errors" in page
    assert "PublisherA" in page and "123-1234567890" in page  # from details
    assert "An extremely entertaining play by Shakespeare" in page  # from reviews
    assert "Reviewer2" in page
    assert "x-bookinfo-degraded" not in headers
    m = re.search(r'class="reviews-pod">([^<]+)<', page)
    assert m and m.group(1).startswith("reviews-v")
    # Paths the gateway's VirtualService does not route are Envoy's 404.
    status, headers, body = request(mesh.ingress, "/not-routed")
    assert (status, headers.get("server"), body) == (404, "envoy", b"")


def test_reviews_v2_gets_stars_from_ratings_through_the_mesh(k8s: K8s, mesh: MeshInfo, bookinfo: str) -> None:
    vs = load("virtual-service-reviews-v2-v3.yaml")
    vs[0]["spec"]["http"][0]["route"] = [{"destination": {"host": "reviews", "subset": "v2"}}]
    apply(k8s, bookinfo, vs)
    page = wait_for(
        lambda: (b := request(mesh.ingress, "/productpage")[2]) and reviews_version(b) == "v2" and b,
        timeout=30,
        what="reviews v2 behind productpage",
    )
    text = page.decode()
    assert text.count('class="star star-black"') == 9  # 5 + 4 stars: ratings answered through the mesh
    # Stop ratings: reviews v2 now says so, as the real one does.
    k8s.apps.patch_namespaced_deployment_scale("ratings-v1", bookinfo, {"spec": {"replicas": 0}})  # type: ignore[attr-defined]
    wait_for(
        lambda: "Ratings service is currently unavailable" in request(mesh.ingress, "/productpage")[2].decode(),
        timeout=30,
        what="reviews reporting ratings unavailable",
    )


def test_debug_routes_count_the_ready_endpoints_of_each_subset(k8s: K8s, mesh: MeshInfo, bookinfo: str) -> None:
    apply(k8s, bookinfo, load("virtual-service-reviews-v2-v3.yaml"))  # reviews: v2 50, v3 50
    wait_for(lambda: not unrouted(mesh.metrics, bookinfo), timeout=30, what="endpoints for reviews v2 and v3")
    k8s.apps.patch_namespaced_deployment_scale("reviews-v3", bookinfo, {"spec": {"replicas": 0}})  # type: ignore[attr-defined]
    wait_for(
        lambda: unrouted(mesh.metrics, bookinfo) == ["reviews subset v3"],
        timeout=30,
        what="reviews v3 without endpoints",
    )
    k8s.apps.patch_namespaced_deployment_scale("reviews-v3", bookinfo, {"spec": {"replicas": 2}})  # type: ignore[attr-defined]

    def v3_endpoints() -> int:
        with urllib.request.urlopen(f"{mesh.metrics}/debug/routes", timeout=10) as resp:
            routes = json.load(resp)["mesh"]["hosts"][f"reviews.{bookinfo}.svc.cluster.local"]
        return sum(d["endpoints"] for r in routes for d in r["destinations"] if d["subset"] == "v3")

    wait_for(lambda: v3_endpoints() == 2, timeout=30, what="two endpoints for reviews v3")


def test_header_match_sends_jason_to_v2_and_others_to_v3(k8s: K8s, mesh: MeshInfo, bookinfo: str) -> None:
    apply(k8s, bookinfo, load("virtual-service-reviews-jason-v2-v3.yaml"))
    wait_for(
        lambda: reviews_version(request(mesh.ingress, "/productpage")[2]) == "v3",
        timeout=30,
        what="reviews v3 for an anonymous user",
    )
    for _ in range(5):
        assert reviews_version(request(mesh.ingress, "/productpage", headers={"end-user": "jason"})[2]) == "v2"
        assert reviews_version(request(mesh.ingress, "/productpage")[2]) == "v3"
    # Logged in as jason (productpage's cookie), as in the Istio task.
    req = urllib.request.Request(
        f"{mesh.ingress}/login", data=b"username=jason", headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
    with opener.open(req, timeout=30) as resp:
        assert reviews_version(resp.read()) == "v2"


def test_subsets_and_weights(k8s: K8s, mesh: MeshInfo, bookinfo: str) -> None:
    apply(k8s, bookinfo, load("virtual-service-all-v1.yaml"))
    wait_for(
        lambda: all(reviews_version(request(mesh.ingress, "/productpage")[2]) == "v1" for _ in range(6)),
        timeout=30,
        what="all reviews traffic on v1",
    )
    apply(k8s, bookinfo, load("virtual-service-reviews-80-20.yaml"))
    wait_for(
        lambda: reviews_version(request(mesh.ingress, "/productpage")[2]) == "v2",
        timeout=30,
        what="the 80/20 split to take effect",
    )
    counts = collections.Counter(reviews_version(request(mesh.ingress, "/productpage")[2]) for _ in range(200))
    # 200 draws at p=0.2: mean 40, sd ~5.7; [10, 80] is more than 5 sd on either side.
    assert set(counts) <= {"v1", "v2"}, counts
    assert 10 <= counts["v2"] <= 80, counts


def test_east_west_through_the_sidecar_in_absolute_form(k8s: K8s, mesh: MeshInfo, bookinfo: str) -> None:
    fqdn = f"details.{bookinfo}.svc.cluster.local"
    for host in (fqdn, f"details.{bookinfo}", f"details.{bookinfo}.svc"):
        status, headers, body = via_sidecar(mesh, f"http://{host}:9080/details/7")
        assert status == 200, (host, body)
        assert b'"id": 7' in body and headers["x-pod-name"].startswith("details-v1-")
    # A short name means the caller's namespace; a local process is not in this one.
    status, headers, _ = via_sidecar(mesh, "http://details:9080/details/0")
    assert (status, headers.get("server")) == (404, "envoy")
    status, headers, body = via_sidecar(mesh, "http://no-such-service.nowhere.svc.cluster.local:9080/")
    assert (status, headers.get("server"), body) == (404, "envoy", b"")


def test_metrics_count_requests_with_bounded_labels(mesh: MeshInfo, bookinfo: str) -> None:
    def series() -> dict[str, float]:
        with urllib.request.urlopen(f"{mesh.metrics}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith("istio_requests_total{"):
                labels, value = line.rsplit(" ", 1)
                out[labels] = float(value)
        return out

    def count(s: dict[str, float], **want: str) -> float:
        return sum(v for k, v in s.items() if all(f'{lk}="{lv}"' in k for lk, lv in want.items()))

    before = series()
    for _ in range(3):
        assert request(mesh.ingress, "/productpage")[0] == 200
    for i in range(5):  # made-up hosts must not become label values
        request(mesh.ingress, "/", host=f"random-{i}.example")
    after = series()
    pp = {"destination_service_name": "productpage", "destination_service_namespace": bookinfo}
    assert count(after, **pp, response_code="200", reporter="source") - count(before, **pp, response_code="200") == 3
    details = {"destination_service_name": "details", "destination_service_namespace": bookinfo}
    assert (
        count(after, **details, source_workload="productpage-v1", response_code="200")
        - count(before, **details, source_workload="productpage-v1", response_code="200")
        == 3
    )
    assert not any("random-" in k for k in after)
    assert count(after, destination_service_name="unknown", response_code="404") >= 5
