"""The system around a sleeping workload changing under it: activator gone, ElastiService deleted,
controller restarted, Service edited, and the same name in two namespaces.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

import pytest

from elasti_istio.playground import mesh as meshview
from elasti_istio.playground.bookinfo import proxied
from elasti_istio.playground.procs import ControllerProc
from tests.e2e.conftest import System
from tests.e2e.support import (
    Answer,
    mesh_serves,
    phase,
    replicas,
    scale,
    serving,
    to_zero,
    until,
    url,
    vs_spec,
    web_app,
)

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]


def test_activator_down_fails_open(e2e: System, namespace: str, controller: ControllerProc) -> None:
    api, ns = e2e.api, namespace
    api.apply_all(web_app(), ns)
    original = serving(api, ns)
    to_zero(api, ns)
    e2e.activator.stop()
    try:
        # Its Pod turns unready: routes go back to the Service and the target is woken.
        until(lambda: vs_spec(api, ns, "web") == original, "routes restored without an activator")
        until(lambda: replicas(api, ns, "web") == (1, 1), "target woken")
        until(lambda: mesh_serves(api, ns), "the mesh to route to the woken pod")
        ans = e2e.sidecar.get(url(ns, "/open"))
        assert ans.status == 200 and not ans.cold, ans
        # A scale to zero while the activator is down is undone, and the routes never leave the Service.
        scale(api, ns, "web", 0)
        until(lambda: replicas(api, ns, "web") == (1, 1), "target woken again")
        assert vs_spec(api, ns, "web") == original
        # Nothing holds requests without an activator: the new pod is served once the mesh has it, and
        # the stopped pod's endpoint is gone from it (until istiod pushes that, Envoy may pick it).
        until(lambda: mesh_serves(api, ns), "the mesh to route to the pod woken again")
        cluster = f"outbound|80||web.{ns}.svc.cluster.local"

        def only_ready_pods() -> bool:
            # Ready pods, not merely running ones: a pod that is not Ready yet reaches Envoy as an unhealthy
            # endpoint, and with the stopped pod gone that is "no healthy upstream" from Envoy itself.
            pods = api.core.list_namespaced_pod(ns, label_selector="app=web").items
            ready = {
                p.status.pod_ip
                for p in pods
                if not p.metadata.deletion_timestamp
                and p.status.pod_ip
                and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
            }
            admin = e2e.mesh.client_admin
            return (
                bool(ready)
                and meshview.cluster_hosts(admin, cluster) == ready
                and meshview.cluster_hosts(admin, cluster, healthy=True) == ready
            )

        until(only_ready_pods, "the client's Envoy to have only the running pod's endpoint")
        ans = e2e.sidecar.get(url(ns, "/open-again"))
        assert ans.status == 200 and not ans.cold, ans
    finally:
        e2e.activator.start()
        e2e.activator_ready()
    to_zero(api, ns)  # with the activator back, proxy mode again


def test_elastiservice_deleted_at_zero_serves_held_requests_then_restores(
    e2e: System, namespace: str, controller: ControllerProc
) -> None:
    """An uninstall while the target is at zero loses nothing: the finalizer wakes the target and keeps the
    routes on the activator until it has a ready replica; the held requests and those sent meanwhile are
    served, then the routes go back and the ElastiService goes."""
    api, ns = e2e.api, namespace
    api.apply_all(web_app(startup_seconds=3), ns)
    original = serving(api, ns)
    to_zero(api, ns)
    answers: dict[str, Answer | BaseException] = {}

    def send(path: str) -> threading.Thread:
        def run() -> None:
            try:
                answers[path] = e2e.sidecar.get(url(ns, path))
            except BaseException as exc:
                answers[path] = exc

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    first = send("/held-before-delete")
    until(lambda: _pending(e2e, ns) == 1, "the request held")
    api.delete("elasti.truefoundry.com/v1alpha1", "ElastiService", "web", ns)
    until(
        lambda: (
            (api.get("elasti.truefoundry.com/v1alpha1", "ElastiService", "web", ns) or {})
            .get("metadata", {})
            .get("deletionTimestamp")
        ),
        "the deletion under way",
    )
    second = send("/sent-while-deleting")
    for t in (first, second):
        t.join(60)
    for path in ("/held-before-delete", "/sent-while-deleting"):
        ans = answers.get(path)
        assert isinstance(ans, Answer) and ans.status == 200, (path, ans)
    until(lambda: api.get("elasti.truefoundry.com/v1alpha1", "ElastiService", "web", ns) is None, "ES gone")
    assert vs_spec(api, ns, "web") == original
    assert replicas(api, ns, "web") == (1, 1)
    assert api.get("v1", "Service", "web-elasti-origin", ns) is None
    until(lambda: mesh_serves(api, ns), "the mesh to route to the woken pod")
    ans = e2e.sidecar.get(url(ns, "/after-delete"))
    assert ans.status == 200 and not ans.cold, ans


def test_controller_restarted_while_in_proxy_converges(
    e2e: System, namespace: str, start_controller: Callable[..., ControllerProc]
) -> None:
    api, ns = e2e.api, namespace
    api.apply_all(web_app(), ns)
    first = start_controller(ns)
    original = serving(api, ns)
    to_zero(api, ns)
    first.kill()  # SIGKILL: no cleanup of any kind
    result: dict[str, Answer | BaseException] = {}

    def send() -> None:
        try:
            result["answer"] = e2e.sidecar.get(url(ns, "/during-restart"))
        except BaseException as exc:
            result["answer"] = exc

    held = threading.Thread(target=send, daemon=True)
    held.start()
    until(lambda: _pending(e2e, ns) == 1, "the request held while no controller runs")
    assert replicas(api, ns, "web")[0] == 0, "nothing could have woken it"
    start_controller(ns)
    held.join(60)
    ans = result.get("answer")
    assert isinstance(ans, Answer) and ans.status == 200 and ans.cold, ans
    until(lambda: vs_spec(api, ns, "web") == original, "the original routes back")
    until(lambda: phase(api, ns, "web") == "Serving", "Serving")


def _pending(e2e: System, ns: str, name: str = "web") -> int:
    from tests.harness import http_json

    code, body = http_json("GET", f"{e2e.activator.admin_url}/v1/pending/{ns}/{name}", timeout=5)
    return int(body["pending"]) if code == 200 else -1


def test_public_service_edited_while_in_proxy_origin_follows(
    e2e: System, namespace: str, controller: ControllerProc
) -> None:
    api, ns = e2e.api, namespace
    api.apply_all(web_app(ports=(8080, 9090)), ns)
    serving(api, ns)
    to_zero(api, ns)
    api.core.patch_namespaced_service(
        "web", ns, {"spec": {"ports": [{"name": "http", "port": 80, "targetPort": 9090}]}}
    )

    def origin_port() -> object:
        svc = api.core.read_namespaced_service("web-elasti-origin", ns)
        return svc.spec.ports[0].target_port

    until(lambda: origin_port() == 9090, "the origin Service's targetPort to follow")
    ans = e2e.sidecar.get(url(ns, "/which-port"))
    assert ans.status == 200 and ans.cold, ans
    assert json.loads(ans.body)["port"] == 9090, "served on the port the edited Service names"


def test_same_name_in_two_namespaces_is_independent(
    e2e: System, namespace: str, other_namespace: str, start_controller: Callable[..., ControllerProc]
) -> None:
    api, a, b = e2e.api, namespace, other_namespace
    for ns in (a, b):
        api.apply_all(web_app(), ns)
    start_controller(a, b)
    original = {ns: serving(api, ns) for ns in (a, b)}
    to_zero(api, a)
    assert phase(api, b, "web") == "Serving" and not proxied(vs_spec(api, b, "web"))
    to_zero(api, b)
    sets = {ns: vs_spec(api, ns, "web")["http"][0]["route"][1]["headers"]["request"]["set"] for ns in (a, b)}
    for ns in (a, b):
        assert sets[ns]["elasti-service"] == f"{ns}/web"
    assert sets[a]["elasti-token"] != sets[b]["elasti-token"], "one name, two namespaces: two tokens"

    ans = e2e.sidecar.get(url(a, "/first"))
    assert ans.status == 200 and ans.cold and ans.headers["x-pod-namespace"] == a, ans
    until(lambda: vs_spec(api, a, "web") == original[a], f"{a} restored")
    assert replicas(api, b, "web") == (0, 0), f"waking {a}/web woke {b}/web"
    assert proxied(vs_spec(api, b, "web")) and phase(api, b, "web") == "ScaledToZero"

    ans = e2e.sidecar.get(url(b, "/second"))
    assert ans.status == 200 and ans.cold and ans.headers["x-pod-namespace"] == b, ans
    until(lambda: vs_spec(api, b, "web") == original[b], f"{b} restored")
