"""Bookinfo from examples/bookinfo/, east-west: the apps call each other through their Envoy sidecars,
and so does this test, through the mesh client's, as a client pod would."""

from __future__ import annotations

import json

import pytest

from elasti_istio.playground import bookinfo as bi
from elasti_istio.playground import mesh as meshview
from elasti_istio.playground.manifests import Api, load
from elasti_istio.playground.procs import ControllerProc
from tests.e2e import support
from tests.e2e.conftest import System
from tests.e2e.support import phase, replicas, to_zero, until, url, vs_spec

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

# Everything of the example but its gateway: a Gateway VirtualService for host "*" would shadow others.
FILES = ("bookinfo.yaml", "destination-rule-all.yaml", "virtual-services.yaml", "elastiservices.yaml")


@pytest.fixture
def bookinfo(e2e: System, namespace: str, controller: ControllerProc) -> str:
    e2e.api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "labels": bi.INJECTION}})
    for name in FILES:
        e2e.api.apply_all(load(bi.examples_dir() / name), namespace)
    until(lambda: bi.deployments_ready(e2e.api, namespace) == (6, 6), "6 Bookinfo Deployments ready", 90)
    for es in bi.ELASTISERVICES:
        until(lambda es=es: phase(e2e.api, namespace, es) == "Serving", f"{es} Serving")
    until(
        lambda: not bi.unrouted(e2e.api, e2e.mesh.gateway_admin, namespace),
        "the mesh to have endpoints for every subset",
    )
    return namespace


def envoys(api: Api, ns: str) -> list[str]:
    """The mesh client's sidecar and productpage's, which calls details and reviews."""
    return [*support.ENVOYS, *meshview.sidecar_admins(api, ns, "app=productpage")]


def test_productpage_calls_details_at_zero(e2e: System, bookinfo: str) -> None:
    api, ns = e2e.api, bookinfo
    original = vs_spec(api, ns, "details")
    to_zero(api, ns, "details-v1", es="details", envoys=envoys(api, ns))
    ans = e2e.sidecar.get(url(ns, "/productpage", service="productpage", port=9080))
    problem = bi.page_problem(ans.status, ans.headers, ans.body.decode(errors="replace"))
    assert problem is None, problem
    assert replicas(api, ns, "details-v1") == (1, 1)
    until(lambda: vs_spec(api, ns, "details") == original, "details routes restored")


def test_reviews_v2_asleep_while_v1_and_v3_serve(e2e: System, bookinfo: str) -> None:
    api, ns = e2e.api, bookinfo
    original = vs_spec(api, ns, "reviews")
    to_zero(api, ns, "reviews-v2", es="reviews-v2", vs="reviews", envoys=envoys(api, ns))
    weights = {
        (d["destination"].get("subset") or d["headers"]["request"]["set"]["elasti-service"]): d["weight"]
        for d in vs_spec(api, ns, "reviews")["http"][0]["route"]
    }
    assert weights == {"v1": 50, "v2": 0, "v3": 20, f"{ns}/reviews-v2": 30}
    served_by: list[str] = []
    woke = None
    for i in range(60):  # 30% of the traffic is v2's: P(no request for it in 60) < 1e-9
        ans = e2e.sidecar.get(url(ns, f"/reviews/{i}", service="reviews", port=9080))
        assert ans.status == 200, ans
        pod = json.loads(ans.body)["podname"]
        if ans.cold:
            woke = pod
            break
        served_by.append(pod)
        assert phase(api, ns, "reviews-v1") == "Serving" and phase(api, ns, "reviews-v3") == "Serving"
    assert woke is not None and woke.startswith("reviews-v2-"), woke
    assert all(p.startswith(("reviews-v1-", "reviews-v3-")) for p in served_by), served_by
    assert replicas(api, ns, "reviews-v1") == (1, 1) and replicas(api, ns, "reviews-v3") == (1, 1)
    until(lambda: vs_spec(api, ns, "reviews") == original, "the 50/30/20 split restored")
