"""The controller against the real API server with Bookinfo: switching, waking, restoring."""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import K8s
from tests.harness import (
    ControllerProc,
    apply,
    create,
    delete,
    es,
    get,
    load,
    patch,
    ready_replicas,
    scale,
    wait_until,
)

ACTIVATOR_HOST = "elasti-activator.elasti-system.svc.cluster.local"


def bookinfo(k8s: K8s, ns: str, *, es_docs: bool = True) -> None:
    apply(k8s, ns, load("bookinfo.yaml"))
    apply(k8s, ns, load("destination-rule-all.yaml"))
    apply(k8s, ns, load("virtual-services.yaml"))
    if es_docs:
        apply(k8s, ns, load("elastiservices.yaml"))
    for d in ("details-v1", "reviews-v1", "reviews-v2", "reviews-v3"):
        wait_until(lambda d=d: ready_replicas(k8s, ns, d) == 1, what=f"{d} ready")


@pytest.fixture
def controller(cluster, namespace: str, tmp_path: Path) -> Iterator[ControllerProc]:  # type: ignore[no-untyped-def]
    proc = ControllerProc(cluster.admin_kubeconfig, namespace, tmp_path / "controller.log").start()
    try:
        proc.wait_ready()
        yield proc
    finally:
        code = proc.stop()
        print(proc.logs()[-6000:])
        assert code == 0, f"controller exit code {code}"


def vs_spec(k8s: K8s, ns: str, name: str) -> dict[str, Any]:
    vs = get(k8s, ns, "VirtualService", name)
    assert vs is not None
    return vs["spec"]


def activator_dests(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        d for r in spec.get("http") or [] for d in r.get("route") or [] if d["destination"]["host"] == ACTIVATOR_HOST
    ]


def phase(k8s: K8s, ns: str, name: str) -> str | None:
    return (es(k8s, ns, name).get("status") or {}).get("phase")


def test_scale_to_zero_proxies_wake_restores_exactly(k8s: K8s, namespace: str, controller: ControllerProc) -> None:
    bookinfo(k8s, namespace)
    original = vs_spec(k8s, namespace, "details")
    wait_until(lambda: phase(k8s, namespace, "details") == "Serving", what="details Serving")
    status = es(k8s, namespace, "details")["status"]
    assert status["mode"] == "serve" and status["readyReplicas"] == 1
    assert status["origin"] == {"service": "details-elasti-origin", "port": 9080, "ports": [9080]}
    assert status["boundVirtualServices"] == [f"{namespace}/details"]

    scale(k8s, namespace, "details-v1", 0)
    wait_until(lambda: activator_dests(vs_spec(k8s, namespace, "details")), what="details VS in proxy mode")
    spec = vs_spec(k8s, namespace, "details")
    route = spec["http"][0]["route"]
    assert route[0]["destination"] == {"host": "details", "subset": "v1"} and route[0]["weight"] == 0
    assert route[1]["weight"] == 100
    assert route[1]["headers"]["request"]["set"] == {"elasti-service": f"{namespace}/details"}
    wait_until(lambda: phase(k8s, namespace, "details") == "ScaledToZero", what="ScaledToZero")
    status = es(k8s, namespace, "details")["status"]
    assert status["mode"] == "proxy" and status["readyReplicas"] == 0 and status["lastScaledToZeroTime"]

    code, body = controller.wake(namespace, "details")
    assert code == 202, body
    assert body == {"namespace": namespace, "name": "details", "phase": "ScalingUp", "ready": False}
    assert k8s.apps.read_namespaced_deployment("details-v1", namespace).spec.replicas == 1  # type: ignore[attr-defined]
    wait_until(lambda: phase(k8s, namespace, "details") == "Serving", what="Serving again")
    assert vs_spec(k8s, namespace, "details") == original
    status = es(k8s, namespace, "details")["status"]
    assert status["mode"] == "serve" and status["readyReplicas"] == 1 and status["lastWakeTime"]
    vs = get(k8s, namespace, "VirtualService", "details")
    assert "elasti.truefoundry.com/original-routes" not in (vs["metadata"].get("annotations") or {})


def test_one_reviews_version_at_zero_leaves_the_others_alone(
    k8s: K8s, namespace: str, controller: ControllerProc
) -> None:
    bookinfo(k8s, namespace)
    original = vs_spec(k8s, namespace, "reviews")
    for v in ("reviews-v1", "reviews-v2", "reviews-v3"):
        wait_until(lambda v=v: phase(k8s, namespace, v) == "Serving", what=f"{v} Serving")
    scale(k8s, namespace, "reviews-v2", 0)
    wait_until(lambda: activator_dests(vs_spec(k8s, namespace, "reviews")), what="reviews proxied for v2")
    route = vs_spec(k8s, namespace, "reviews")["http"][0]["route"]
    weights = {
        d["destination"].get("subset") or d["headers"]["request"]["set"]["elasti-service"]: d["weight"] for d in route
    }
    assert weights == {"v1": 50, "v2": 0, "v3": 20, f"{namespace}/reviews-v2": 30}
    assert phase(k8s, namespace, "reviews-v1") == "Serving" and phase(k8s, namespace, "reviews-v3") == "Serving"
    assert es(k8s, namespace, "reviews-v1")["status"]["mode"] == "serve"

    scale(k8s, namespace, "reviews-v3", 0)
    wait_until(lambda: len(activator_dests(vs_spec(k8s, namespace, "reviews"))) == 2, what="v3 proxied too")
    scale(k8s, namespace, "reviews-v2", 1)
    wait_until(lambda: phase(k8s, namespace, "reviews-v2") == "Serving", what="v2 back")
    scale(k8s, namespace, "reviews-v3", 1)
    wait_until(lambda: vs_spec(k8s, namespace, "reviews") == original, what="reviews restored exactly")


def test_annotation_binding_is_live(k8s: K8s, namespace: str, controller: ControllerProc) -> None:
    bookinfo(k8s, namespace)
    wait_until(lambda: phase(k8s, namespace, "reviews-v1") == "Serving", what="reviews-v1 Serving")
    assert es(k8s, namespace, "reviews-v1")["status"]["boundVirtualServices"] == [f"{namespace}/reviews"]
    original = vs_spec(k8s, namespace, "reviews")
    scale(k8s, namespace, "reviews-v1", 0)
    wait_until(lambda: activator_dests(vs_spec(k8s, namespace, "reviews")), what="reviews proxied for v1")
    # Unbinding reviews-v1 while in proxy mode gives its share back.
    patch(
        k8s,
        namespace,
        "VirtualService",
        "reviews",
        {"metadata": {"annotations": {"elasti.truefoundry.com/elastiservice": "reviews-v2,reviews-v3"}}},
    )
    wait_until(lambda: vs_spec(k8s, namespace, "reviews") == original, what="unbound share restored")
    wait_until(
        lambda: not es(k8s, namespace, "reviews-v1")["status"].get("boundVirtualServices"),
        what="status shows nothing bound",
    )
    cond = next(
        c for c in es(k8s, namespace, "reviews-v1")["status"]["conditions"] if c["type"] == "VirtualServicesBound"
    )
    assert cond["status"] == "False" and cond["reason"] == "NoVirtualService"
    # Binding again switches it at once.
    patch(
        k8s,
        namespace,
        "VirtualService",
        "reviews",
        {"metadata": {"annotations": {"elasti.truefoundry.com/elastiservice": "reviews-v1, reviews-v2,reviews-v3"}}},
    )
    wait_until(lambda: activator_dests(vs_spec(k8s, namespace, "reviews")), what="bound again and proxied")


def test_delete_at_zero_restores_wakes_and_removes_origin(k8s: K8s, namespace: str, controller: ControllerProc) -> None:
    bookinfo(k8s, namespace)
    original = vs_spec(k8s, namespace, "details")
    wait_until(
        lambda: k8s.core.read_namespaced_service("details-elasti-origin", namespace),  # type: ignore
        what="origin Service",
    )
    scale(k8s, namespace, "details-v1", 0)
    wait_until(lambda: phase(k8s, namespace, "details") == "ScaledToZero", what="ScaledToZero")
    delete(k8s, namespace, "ElastiService", "details")
    wait_until(lambda: get(k8s, namespace, "ElastiService", "details") is None, what="ElastiService gone")
    assert vs_spec(k8s, namespace, "details") == original
    assert k8s.apps.read_namespaced_deployment("details-v1", namespace).spec.replicas == 1  # type: ignore
    svcs = [s.metadata.name for s in k8s.core.list_namespaced_service(namespace).items]  # type: ignore
    assert "details-elasti-origin" not in svcs


def test_edit_in_proxy_mode_is_kept_and_rewritten(k8s: K8s, namespace: str, controller: ControllerProc) -> None:
    bookinfo(k8s, namespace)
    wait_until(lambda: phase(k8s, namespace, "details") == "Serving", what="Serving")
    scale(k8s, namespace, "details-v1", 0)
    wait_until(lambda: activator_dests(vs_spec(k8s, namespace, "details")), what="proxy mode")
    # Someone (a GitOps tool) re-applies the original spec with a new retry policy.
    edited = {
        "http": [
            {
                "retries": {"attempts": 3, "perTryTimeout": "2s"},
                "route": [{"destination": {"host": "details", "subset": "v1"}}],
            }
        ]
    }
    patch(k8s, namespace, "VirtualService", "details", {"spec": edited})
    wait_until(lambda: activator_dests(vs_spec(k8s, namespace, "details")), what="proxied again after the edit")
    spec = vs_spec(k8s, namespace, "details")
    assert spec["http"][0]["retries"] == {"attempts": 3, "perTryTimeout": "2s"}
    scale(k8s, namespace, "details-v1", 1)
    wait_until(
        lambda: vs_spec(k8s, namespace, "details") == {"hosts": ["details"], **edited},
        what="the edited spec is the new original",
    )


def test_manual_scale_up_restores_serve_mode(k8s: K8s, namespace: str, controller: ControllerProc) -> None:
    bookinfo(k8s, namespace)
    original = vs_spec(k8s, namespace, "details")
    scale(k8s, namespace, "details-v1", 0)
    wait_until(lambda: phase(k8s, namespace, "details") == "ScaledToZero", what="ScaledToZero")
    scale(k8s, namespace, "details-v1", 2)
    wait_until(lambda: phase(k8s, namespace, "details") == "Serving", what="Serving")
    assert vs_spec(k8s, namespace, "details") == original
    wait_until(lambda: es(k8s, namespace, "details")["status"]["readyReplicas"] == 2, what="readyReplicas mirrors")


def test_concurrent_wakes_make_one_scale_call(k8s: K8s, namespace: str, controller: ControllerProc) -> None:
    bookinfo(k8s, namespace)
    scale(k8s, namespace, "details-v1", 0)
    wait_until(lambda: phase(k8s, namespace, "details") == "ScaledToZero", what="ScaledToZero")
    results: list[tuple[int, Any]] = []
    threads = [
        threading.Thread(target=lambda: results.append(controller.wake(namespace, "details"))) for _ in range(20)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [c for c, _ in results] == [202] * 20
    text = controller.metrics()
    scaled = [
        line
        for line in text.splitlines()
        if line.startswith("elasti_controller_wakes_total")
        and f'namespace="{namespace}"' in line
        and 'outcome="scaled"' in line
    ]
    assert scaled and scaled[0].endswith(" 1.0"), scaled
    wait_until(lambda: phase(k8s, namespace, "details") == "Serving", what="Serving")


def test_wake_endpoint_rejects_bad_requests(k8s: K8s, namespace: str, controller: ControllerProc) -> None:
    from tests.harness import http_json

    code, body = controller.wake(namespace, "nope")
    assert code == 404 and "nope" in body["error"]
    code, body = http_json("POST", controller.wake_url, b"{not json")
    assert code == 400 and "JSON" in body["error"]
    code, body = http_json("POST", controller.wake_url, {"namespace": "a"})
    assert code == 400 and "name" in body["error"]
    code, body = http_json("POST", controller.wake_url, {"namespace": "UPPER", "name": "x"})
    assert code == 400


def test_same_name_in_two_namespaces_is_independent(
    k8s: K8s, namespace: str, controller: ControllerProc, tmp_path: Path, cluster
) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import _cleanup_namespace

    other = namespace + "-b"
    k8s.core.create_namespace({"metadata": {"name": other}})  # type: ignore[attr-defined]
    ctrl_all = ControllerProc(
        cluster.admin_kubeconfig, None, tmp_path / "all.log", "--namespace", namespace, "--namespace", other
    ).start()
    controller.stop()
    try:
        ctrl_all.wait_ready()
        bookinfo(k8s, namespace)
        bookinfo(k8s, other)
        scale(k8s, namespace, "details-v1", 0)
        wait_until(lambda: phase(k8s, namespace, "details") == "ScaledToZero", what="first at zero")
        wait_until(lambda: phase(k8s, other, "details") == "Serving", what="second serving")
        assert not activator_dests(vs_spec(k8s, other, "details"))
        scale(k8s, other, "details-v1", 0)
        wait_until(lambda: phase(k8s, other, "details") == "ScaledToZero", what="second at zero")
        assert ctrl_all.wake(other, "details")[0] == 202
        wait_until(lambda: phase(k8s, other, "details") == "Serving", what="second woken")
        assert phase(k8s, namespace, "details") == "ScaledToZero"
    finally:
        ctrl_all.stop()
        print(ctrl_all.logs()[-3000:])
        _cleanup_namespace(k8s, other)


def test_origin_service_follows_the_public_service(k8s: K8s, namespace: str, controller: ControllerProc) -> None:
    bookinfo(k8s, namespace)
    origin = wait_until(
        lambda: k8s.core.read_namespaced_service("details-elasti-origin", namespace),  # type: ignore
        what="origin Service",
    )
    assert origin.spec.selector == {"app": "details", "version": "v1"}
    assert [(p.name, p.port) for p in origin.spec.ports] == [("http", 9080)]
    owner = origin.metadata.owner_references[0]
    assert owner.kind == "ElastiService" and owner.name == "details" and owner.controller
    k8s.core.patch_namespaced_service(
        "details",
        namespace,
        {
            "spec": {
                "ports": [  # type: ignore[attr-defined]
                    {"name": "http", "port": 9080, "targetPort": 9080},
                    {"name": "admin", "port": 9090, "targetPort": 9090},
                ]
            }
        },
    )
    wait_until(
        lambda: (
            len(
                k8s.core.read_namespaced_service(  # type: ignore[attr-defined]
                    "details-elasti-origin", namespace
                ).spec.ports
            )
            == 2
        ),
        what="origin ports follow",
    )


def test_statefulset_target(k8s: K8s, namespace: str, controller: ControllerProc) -> None:
    sts = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "db"},
        "spec": {
            "replicas": 1,
            "serviceName": "db",
            "selector": {"matchLabels": {"app": "db"}},
            "template": {
                "metadata": {"labels": {"app": "db"}},
                "spec": {"containers": [{"name": "db", "image": "x", "ports": [{"containerPort": 80}]}]},
            },
        },
    }
    create(k8s, namespace, sts)
    create(
        k8s,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "db"},
            "spec": {"selector": {"app": "db"}, "ports": [{"port": 80, "name": "http"}]},
        },
    )
    create(
        k8s,
        namespace,
        {
            "apiVersion": "networking.istio.io/v1beta1",
            "kind": "VirtualService",
            "metadata": {"name": "db"},
            "spec": {"hosts": ["db"], "http": [{"route": [{"destination": {"host": "db"}}]}]},
        },
    )
    create(
        k8s,
        namespace,
        {
            "apiVersion": "elasti.truefoundry.com/v1alpha1",
            "kind": "ElastiService",
            "metadata": {"name": "db"},
            "spec": {
                "service": "db",
                "virtualServices": ["db"],
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db"},
            },
        },
    )
    wait_until(lambda: phase(k8s, namespace, "db") == "Serving", what="db Serving")
    original = copy.deepcopy(vs_spec(k8s, namespace, "db"))
    scale(k8s, namespace, "db", 0, kind="StatefulSet")
    wait_until(lambda: activator_dests(vs_spec(k8s, namespace, "db")), what="db proxied")
    assert controller.wake(namespace, "db")[0] == 202
    wait_until(lambda: phase(k8s, namespace, "db") == "Serving", what="db woken")
    assert vs_spec(k8s, namespace, "db") == original
