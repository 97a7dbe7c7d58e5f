"""Bookinfo from the real manifests, through the real mesh: istiod, the Envoy ingress gateway and the
Envoy sidecars of Bookinfo's pods and of the mesh client.

Real parts: the API server, the Deployment/ReplicaSet/EndpointSlice controllers, istiod and Envoy; the
kubelet stand-in plays the Bookinfo apps, which call each other through their sidecars.
"""

from __future__ import annotations

import collections
import http.client
import re
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import utils
from kubernetes.client.exceptions import ApiException

from elasti_istio.playground.bookinfo import INJECTION, unrouted
from elasti_istio.playground.manifests import Api
from elasti_istio.playground.mesh import cluster_hosts, healthy_hosts, routed_clusters, sidecar_admins
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
    """A request through the mesh client's sidecar (its listener at the URL's port) in absolute-URI form, as
    the activator sends them."""
    port = urllib.parse.urlsplit(url).port or 80
    conn = http.client.HTTPConnection(mesh.client, port, timeout=30)
    try:
        conn.request("GET", url, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@pytest.fixture
def bookinfo(k8s: K8s, namespace: str, mesh: MeshInfo) -> Iterator[str]:
    """Bookinfo (every pod with a sidecar), its gateway and its DestinationRules, serving through the ingress."""
    k8s.core.patch_namespace(namespace, {"metadata": {"labels": INJECTION}})  # type: ignore[attr-defined]
    apply(k8s, namespace, load("bookinfo.yaml") + load("bookinfo-gateway.yaml") + load("destination-rule-all.yaml"))
    api = Api(k8s.kubeconfig)
    try:
        wait_for(lambda: deployments_ready(k8s, namespace), timeout=90, what="bookinfo deployments ready")
        wait_for(
            lambda: not unrouted(api, mesh.gateway_admin, namespace), timeout=60, what="every subset to have endpoints"
        )
        # Every Envoy has every Ready pod as a healthy endpoint of its Service's cluster and of its subset's:
        # a test's route to one subset then finds its pod, whatever order istiod pushed the pods in.
        wait_for(
            lambda: not endpoints_behind(api, namespace, [mesh.gateway_admin, *sidecar_admins(api, namespace)]),
            timeout=60,
            what="every Envoy of Bookinfo to have the Ready pods of each Service and subset",
        )
        wait_for(
            lambda: request(mesh.ingress, "/productpage")[0] == 200,
            timeout=30,
            what="productpage through the ingress",
        )
        yield namespace
    finally:
        api.close()
        # The gateway's VirtualService claims host "*": remove it now rather than with the namespace, so
        # that a later test's Bookinfo is not shadowed by this one (Istio merges the oldest first).
        delete_istio(k8s, namespace, "VirtualService", "bookinfo")
        delete_istio(k8s, namespace, "Gateway", "bookinfo-gateway")


def endpoints_behind(api: Api, namespace: str, admins: list[str]) -> list[str]:
    """The clusters (each Service's, each DestinationRule subset's) whose healthy endpoints in some Envoy
    are not exactly the Ready pods they select."""
    pods = [
        p
        for p in api.core.list_namespaced_pod(namespace).items
        if not p.metadata.deletion_timestamp
        and p.status.pod_ip
        and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
    ]

    def selected(selector: dict[str, str]) -> set[str]:
        return {p.status.pod_ip for p in pods if selector.items() <= (p.metadata.labels or {}).items()}

    subsets: dict[str, list[dict[str, Any]]] = {}
    for rule in api.custom.list_namespaced_custom_object(ISTIO, "v1", namespace, "destinationrules")["items"]:
        subsets[rule["spec"]["host"]] = rule["spec"].get("subsets") or []
    wanted: dict[str, set[str]] = {}
    for svc in api.core.list_namespaced_service(namespace).items:
        selector = svc.spec.selector or {}
        fqdn = f"{svc.metadata.name}.{namespace}.svc.cluster.local"
        for port in svc.spec.ports or []:
            wanted[f"outbound|{port.port}||{fqdn}"] = selected(selector)
            for subset in subsets.get(svc.metadata.name, []):
                labels = {**selector, **(subset.get("labels") or {})}
                wanted[f"outbound|{port.port}|{subset['name']}|{fqdn}"] = selected(labels)
    behind = []
    for admin in admins:
        for cluster, ips in sorted(wanted.items()):
            if cluster_hosts(admin, cluster, healthy=True) != ips:
                behind.append(f"{cluster} in {admin}")
    return behind


def productpage_sidecar(k8s: K8s, namespace: str) -> str:
    """The admin URL of productpage's Envoy sidecar (the caller of reviews)."""
    api = Api(k8s.kubeconfig)
    try:
        (admin,) = sidecar_admins(api, namespace, "app=productpage")
    finally:
        api.close()
    return admin


def reviews_version(page: bytes, why: str = "") -> str:
    """v1: no stars; v2: black stars; v3: red stars (as real Bookinfo renders them). ``why``: productpage's
    account of a degraded page, for the failure message."""
    text = page.decode()
    if 'data-color="red"' in text:
        return "v3"
    if 'data-color="black"' in text:
        return "v2"
    assert "Book Reviews" in text, why or text[-300:]
    return "v1"


def version_of(answer: tuple[int, dict[str, str], bytes]) -> str:
    """The reviews version of a productpage answer."""
    status, headers, body = answer
    assert status == 200, (status, body[:300])
    return reviews_version(body, headers.get("x-bookinfo-degraded-why", ""))


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
    # Paths the gateway's VirtualService does not route are Envoy's 404 (istiod names the gateway's server).
    status, headers, body = request(mesh.ingress, "/not-routed")
    assert (status, headers.get("server"), body) == (404, "istio-envoy", b"")


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


def test_envoy_has_the_ready_endpoints_of_each_subset(k8s: K8s, mesh: MeshInfo, bookinfo: str) -> None:
    api = Api(k8s.kubeconfig)
    try:
        apply(k8s, bookinfo, load("virtual-service-reviews-v2-v3.yaml"))  # reviews: v2 50, v3 50
        wait_for(lambda: not unrouted(api, mesh.gateway_admin, bookinfo), timeout=30, what="reviews v2 and v3")
        k8s.apps.patch_namespaced_deployment_scale("reviews-v3", bookinfo, {"spec": {"replicas": 0}})  # type: ignore[attr-defined]
        wait_for(
            lambda: unrouted(api, mesh.gateway_admin, bookinfo) == ["reviews subset v3"],
            timeout=30,
            what="reviews v3 without endpoints in every Envoy",
        )
        k8s.apps.patch_namespaced_deployment_scale("reviews-v3", bookinfo, {"spec": {"replicas": 2}})  # type: ignore[attr-defined]
        v3 = f"outbound|9080|v3|reviews.{bookinfo}.svc.cluster.local"
        wait_for(lambda: healthy_hosts(mesh.gateway_admin).get(v3) == 2, timeout=30, what="two endpoints for v3")
    finally:
        api.close()


def test_header_match_sends_jason_to_v2_and_others_to_v3(k8s: K8s, mesh: MeshInfo, bookinfo: str) -> None:
    apply(k8s, bookinfo, load("virtual-service-reviews-jason-v2-v3.yaml"))
    # productpage's sidecar (the caller of reviews) has the new routes: v2 for jason, v3 for the others.
    page = productpage_sidecar(k8s, bookinfo)
    fqdn = f"reviews.{bookinfo}.svc.cluster.local"
    wanted = {f"outbound|9080|{v}|{fqdn}" for v in ("v2", "v3")}
    wait_for(lambda: routed_clusters(page, fqdn, 9080) == wanted, timeout=30, what="istiod's push of the jason route")
    for _ in range(5):
        assert version_of(request(mesh.ingress, "/productpage", headers={"end-user": "jason"})) == "v2"
        assert version_of(request(mesh.ingress, "/productpage")) == "v3"
    # Logged in as jason (productpage's cookie), as in the Istio task.
    req = urllib.request.Request(
        f"{mesh.ingress}/login", data=b"username=jason", headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
    with opener.open(req, timeout=30) as resp:
        assert reviews_version(resp.read()) == "v2"


def test_subsets_and_weights(k8s: K8s, mesh: MeshInfo, bookinfo: str) -> None:
    page = productpage_sidecar(k8s, bookinfo)
    fqdn = f"reviews.{bookinfo}.svc.cluster.local"

    def routed(*versions: str) -> bool:
        return routed_clusters(page, fqdn, 9080) == {f"outbound|9080|{v}|{fqdn}" for v in versions}

    apply(k8s, bookinfo, load("virtual-service-all-v1.yaml"))
    wait_for(lambda: routed("v1"), timeout=30, what="productpage's sidecar routing reviews to v1 only")
    assert all(version_of(request(mesh.ingress, "/productpage")) == "v1" for _ in range(6))
    apply(k8s, bookinfo, load("virtual-service-reviews-80-20.yaml"))
    wait_for(lambda: routed("v1", "v2"), timeout=30, what="the 80/20 split in productpage's sidecar")
    counts = collections.Counter(version_of(request(mesh.ingress, "/productpage")) for _ in range(200))
    # 200 draws at p=0.2: mean 40, sd ~5.7; [10, 80] is more than 5 sd on either side.
    assert set(counts) <= {"v1", "v2"}, counts
    assert 10 <= counts["v2"] <= 80, counts


def test_east_west_through_the_sidecar_in_absolute_form(k8s: K8s, mesh: MeshInfo, bookinfo: str) -> None:
    fqdn = f"details.{bookinfo}.svc.cluster.local"
    for host in (fqdn, f"details.{bookinfo}", f"details.{bookinfo}.svc"):
        status, headers, body = via_sidecar(mesh, f"http://{host}:9080/details/7")
        assert status == 200, (host, body)
        assert b'"id": 7' in body and headers["x-pod-name"].startswith("details-v1-")
    # A short name means the caller's namespace (the mesh client's), where there is no details: Envoy
    # does not route it to this one (the sidecars are REGISTRY_ONLY: 502 from Envoy itself).
    status, headers, _ = via_sidecar(mesh, "http://details:9080/details/0")
    assert (status, headers.get("server")) == (502, "envoy")
    status, headers, body = via_sidecar(mesh, "http://no-such-service.nowhere.svc.cluster.local:9080/")
    assert (status, headers.get("server"), "x-envoy-upstream-service-time" in headers) == (502, "envoy", False)


def test_envoy_counts_requests_per_cluster(k8s: K8s, mesh: MeshInfo, bookinfo: str) -> None:
    """What a Prometheus scrape of the gateway and of productpage's sidecar sees (Envoy's own statistics)."""

    def upstream_requests(admin: str, cluster: str) -> float:
        with urllib.request.urlopen(f"{admin}/stats/prometheus", timeout=10) as resp:
            text = resp.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith("envoy_cluster_upstream_rq_total{") and f'cluster_name="{cluster}"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return total

    pods = k8s.core.list_namespaced_pod(bookinfo, label_selector="app=productpage").items  # type: ignore[attr-defined]
    productpage_sidecar = f"http://{pods[0].metadata.annotations['elasti.truefoundry.com/sim-sidecar-address']}:15000"
    pp = f"outbound|9080||productpage.{bookinfo}.svc.cluster.local"
    details = f"outbound|9080||details.{bookinfo}.svc.cluster.local"
    before = upstream_requests(mesh.gateway_admin, pp), upstream_requests(productpage_sidecar, details)
    for _ in range(3):
        assert request(mesh.ingress, "/productpage")[0] == 200
    after = upstream_requests(mesh.gateway_admin, pp), upstream_requests(productpage_sidecar, details)
    assert (after[0] - before[0], after[1] - before[1]) == (3, 3)
