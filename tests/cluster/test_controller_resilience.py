"""The controller: restarts at any point, fail open, KEDA pauses, and every bad input."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from tests.cluster.test_controller_lifecycle import activator_dests, bookinfo, phase, vs_spec
from tests.conftest import K8s
from tests.harness import (
    ControllerProc,
    apply,
    condition,
    create,
    delete,
    es,
    events_for,
    get,
    load,
    patch,
    ready_replicas,
    scale,
    wait_event,
    wait_until,
)


def es_doc(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "elasti.truefoundry.com/v1alpha1",
        "kind": "ElastiService",
        "metadata": {"name": name},
        "spec": spec,
    }


def cond_is(k8s: K8s, ns: str, name: str, ctype: str, status: str, reason: str | None = None) -> bool:
    c = condition(es(k8s, ns, name), ctype)
    return bool(c and c["status"] == status and (reason is None or c["reason"] == reason))


# ---- restarts ----------------------------------------------------------------------------------


def test_killed_while_serving_converges_to_proxy(k8s: K8s, namespace: str, start_controller: Any) -> None:
    bookinfo(k8s, namespace)
    ctrl = start_controller()
    wait_until(lambda: phase(k8s, namespace, "details") == "Serving", what="Serving")
    ctrl.kill(signal.SIGKILL)
    scale(k8s, namespace, "details-v1", 0)
    start_controller()
    wait_until(lambda: phase(k8s, namespace, "details") == "ScaledToZero", what="converged to ScaledToZero")
    assert activator_dests(vs_spec(k8s, namespace, "details"))


def test_killed_while_proxying_converges_to_serve(k8s: K8s, namespace: str, start_controller: Any) -> None:
    bookinfo(k8s, namespace)
    original = vs_spec(k8s, namespace, "details")
    ctrl = start_controller()
    scale(k8s, namespace, "details-v1", 0)
    wait_until(lambda: phase(k8s, namespace, "details") == "ScaledToZero", what="ScaledToZero")
    ctrl.kill(signal.SIGKILL)
    scale(k8s, namespace, "details-v1", 1)
    wait_until(lambda: ready_replicas(k8s, namespace, "details-v1") == 1, what="pod ready")
    start_controller()
    wait_until(lambda: phase(k8s, namespace, "details") == "Serving", what="converged to Serving")
    assert vs_spec(k8s, namespace, "details") == original


def test_killed_while_waking_converges(k8s: K8s, namespace: str, start_controller: Any) -> None:
    bookinfo(k8s, namespace)
    original = vs_spec(k8s, namespace, "details")
    patch(
        k8s,
        namespace,
        "Deployment",
        "details-v1",
        {"spec": {"template": {"metadata": {"annotations": {"elasti.truefoundry.com/sim-startup-seconds": "3"}}}}},
    )
    ctrl = start_controller()
    wait_until(lambda: phase(k8s, namespace, "details") == "Serving", what="Serving after the rollout")
    scale(k8s, namespace, "details-v1", 0)
    wait_until(lambda: phase(k8s, namespace, "details") == "ScaledToZero", what="ScaledToZero")
    assert ctrl.wake(namespace, "details")[0] == 202
    ctrl.kill(signal.SIGKILL)  # the pod takes 3 s to be ready: the controller dies mid-wake
    start_controller()
    wait_until(lambda: phase(k8s, namespace, "details") == "Serving", what="converged to Serving")
    assert vs_spec(k8s, namespace, "details") == original
    assert k8s.apps.read_namespaced_deployment("details-v1", namespace).spec.replicas == 1  # type: ignore


def test_crash_between_route_patch_and_status_write_converges(k8s: K8s, namespace: str, start_controller: Any) -> None:
    """The VirtualService says proxy but the status was never written: a restart tells the truth."""
    bookinfo(k8s, namespace)
    ctrl = start_controller()
    scale(k8s, namespace, "details-v1", 0)
    wait_until(lambda: phase(k8s, namespace, "details") == "ScaledToZero", what="ScaledToZero")
    ctrl.kill(signal.SIGKILL)
    proxied = vs_spec(k8s, namespace, "details")
    k8s.custom.patch_namespaced_custom_object_status(  # type: ignore[attr-defined]
        "elasti.truefoundry.com",
        "v1alpha1",
        namespace,
        "elastiservices",
        "details",
        {"status": {"phase": "Serving", "mode": "serve", "readyReplicas": 1}},
    )
    start_controller()
    wait_until(lambda: es(k8s, namespace, "details")["status"]["mode"] == "proxy", what="status corrected")
    st = es(k8s, namespace, "details")["status"]
    assert st["phase"] == "ScaledToZero" and st["readyReplicas"] == 0
    assert vs_spec(k8s, namespace, "details") == proxied  # nothing doubled


def test_watches_given_up_by_kopf_are_started_again(k8s: K8s, namespace: str, start_controller: Any) -> None:
    """A watched CRD that disappears makes kopf give up all its watches ("Watcher for ... has failed",
    as after an API server restart that serves the CRDs late). The controller starts them again
    without that resource, goes on reacting to events, and watches it again once the CRD is back."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    ext = client.ApiextensionsV1Api(k8s.api)  # type: ignore[arg-type]
    name = "scaledobjects.keda.sh"
    saved = k8s.api.sanitize_for_serialization(ext.read_custom_resource_definition(name))  # type: ignore
    body = {"apiVersion": saved["apiVersion"], "kind": saved["kind"], "metadata": {"name": name}, "spec": saved["spec"]}

    def gone() -> bool:
        try:
            ext.read_custom_resource_definition(name)
        except ApiException as exc:
            return exc.status == 404
        return False

    def established() -> bool:
        conds = ext.read_custom_resource_definition(name).status.conditions or []
        return any(c.type == "Established" and c.status == "True" for c in conds)

    bookinfo(k8s, namespace)
    ctrl = start_controller()
    wait_until(lambda: phase(k8s, namespace, "details") == "Serving", what="details Serving")
    ext.delete_custom_resource_definition(name)
    try:
        wait_until(gone, what="the ScaledObject CRD gone")
        wait_until(lambda: "kopf's watches stopped" in ctrl.logs(), what="the controller restarting kopf")
        wait_until(lambda: "scaledobjects are not served" in ctrl.logs(), what="watches without ScaledObjects")
        scale(k8s, namespace, "details-v1", 0)
        wait_until(lambda: activator_dests(vs_spec(k8s, namespace, "details")), what="proxy mode, CRD still gone")
        wait_until(lambda: phase(k8s, namespace, "details") == "ScaledToZero", what="ScaledToZero")
    finally:
        if gone():
            ext.create_custom_resource_definition(body)
        wait_until(established, what="the ScaledObject CRD back")
    wait_until(lambda: "served now: ['scaledobjects']" in ctrl.logs(), what="ScaledObjects watched again")
    scale(k8s, namespace, "details-v1", 1)
    wait_until(lambda: phase(k8s, namespace, "details") == "Serving", what="Serving again")
    assert ctrl.alive()  # the process itself never stopped


# ---- fail open ---------------------------------------------------------------------------------


def activator_deployment(replicas: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "elasti-activator"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "elasti-activator"}},
            "template": {
                "metadata": {"labels": {"app": "elasti-activator"}},
                "spec": {"containers": [{"name": "a", "image": "elasti-istio", "ports": [{"containerPort": 8012}]}]},
            },
        },
    }


def test_fail_open_without_an_activator(k8s: K8s, namespace: str, start_controller: Any) -> None:
    bookinfo(k8s, namespace)
    original = vs_spec(k8s, namespace, "details")
    start_controller(activator_deployment=f"{namespace}/elasti-activator")
    wait_until(
        lambda: cond_is(k8s, namespace, "details", "ActivatorAvailable", "False", "ActivatorMissing"),
        what="ActivatorAvailable=False",
    )
    wait_event(k8s, namespace, "details", "ActivatorMissing")
    scale(k8s, namespace, "details-v1", 0)
    # Fail open: the routes stay on the Service and the target is woken.
    wait_until(
        lambda: k8s.apps.read_namespaced_deployment("details-v1", namespace).spec.replicas == 1,  # type: ignore
        what="target woken",
    )
    assert vs_spec(k8s, namespace, "details") == original
    wait_event(k8s, namespace, "details", "FailOpen")

    create(k8s, namespace, activator_deployment())
    wait_until(lambda: cond_is(k8s, namespace, "details", "ActivatorAvailable", "True"), what="activator back")
    wait_until(lambda: phase(k8s, namespace, "details") == "Serving", what="serving")
    scale(k8s, namespace, "details-v1", 0)
    wait_until(lambda: activator_dests(vs_spec(k8s, namespace, "details")), what="proxy with an activator")
    # The activator disappears while routes point at it: back to serve, target woken.
    scale(k8s, namespace, "elasti-activator", 0)
    wait_until(lambda: vs_spec(k8s, namespace, "details") == original, what="routes restored (fail open)")
    wait_until(lambda: ready_replicas(k8s, namespace, "details-v1") == 1, what="target woken")


# ---- KEDA --------------------------------------------------------------------------------------


def test_scaled_object_target_and_its_pause_annotations(k8s: K8s, namespace: str, start_controller: Any) -> None:
    bookinfo(k8s, namespace, es_docs=False)
    create(
        k8s,
        namespace,
        {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "ScaledObject",
            "metadata": {
                "name": "details",
                "annotations": {
                    "autoscaling.keda.sh/paused-replicas": "0",
                    "elasti.truefoundry.com/paused-keda": "true",
                    "unrelated": "kept",
                },
            },
            "spec": {
                "scaleTargetRef": {"name": "details-v1"},
                "minReplicaCount": 1,
                "triggers": [
                    {
                        "type": "cron",
                        "metadata": {
                            "timezone": "UTC",
                            "start": "0 8 * * *",
                            "end": "0 9 * * *",
                            "desiredReplicas": "1",
                        },
                    }
                ],
            },
        },
    )
    create(
        k8s,
        namespace,
        es_doc(
            "details",
            service="details",
            virtualServices=["details"],
            scaleTargetRef={"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "name": "details"},
        ),
    )
    ctrl = start_controller()
    wait_until(lambda: phase(k8s, namespace, "details") == "Serving", what="Serving")
    assert "ScaledObject details" in condition(es(k8s, namespace, "details"), "TargetFound")["message"]  # type: ignore
    scale(k8s, namespace, "details-v1", 0)
    wait_until(lambda: phase(k8s, namespace, "details") == "ScaledToZero", what="ScaledToZero")
    assert ctrl.wake(namespace, "details")[0] == 202
    so = get(k8s, namespace, "ScaledObject", "details")
    ann = so["metadata"]["annotations"]  # type: ignore[index]
    assert ann == {"unrelated": "kept"}
    wait_until(lambda: phase(k8s, namespace, "details") == "Serving", what="woken")


# ---- bad input ---------------------------------------------------------------------------------


def test_missing_target_service_and_virtualservice(k8s: K8s, namespace: str, start_controller: Any) -> None:
    bookinfo(k8s, namespace, es_docs=False)
    start_controller()
    create(
        k8s,
        namespace,
        es_doc(
            "no-target",
            service="details",
            virtualServices=["details"],
            scaleTargetRef={"kind": "Deployment", "name": "ghost"},
        ),
    )
    create(
        k8s,
        namespace,
        es_doc(
            "no-service",
            service="ghost-svc",
            virtualServices=["details"],
            scaleTargetRef={"kind": "Deployment", "name": "details-v1"},
        ),
    )
    create(
        k8s,
        namespace,
        es_doc(
            "no-vs",
            service="details",
            virtualServices=["ghost-vs"],
            scaleTargetRef={"kind": "Deployment", "name": "details-v1"},
        ),
    )
    wait_until(
        lambda: cond_is(k8s, namespace, "no-target", "TargetFound", "False", "TargetNotFound"), what="TargetNotFound"
    )
    assert "Deployment ghost not found" in condition(es(k8s, namespace, "no-target"), "TargetFound")["message"]  # type: ignore
    assert cond_is(k8s, namespace, "no-target", "Ready", "False")
    wait_event(k8s, namespace, "no-target", "TargetNotFound")
    wait_until(
        lambda: cond_is(k8s, namespace, "no-service", "ServiceFound", "False", "ServiceNotFound"),
        what="ServiceNotFound",
    )
    wait_event(k8s, namespace, "no-service", "ServiceNotFound")
    wait_until(
        lambda: cond_is(k8s, namespace, "no-vs", "VirtualServicesBound", "False", "VirtualServiceNotFound"),
        what="VirtualServiceNotFound",
    )
    assert (
        f"{namespace}/ghost-vs not found"
        in condition(
            es(k8s, namespace, "no-vs"),  # type: ignore[index]
            "VirtualServicesBound",
        )["message"]
    )
    wait_event(k8s, namespace, "no-vs", "VirtualServiceNotFound")
    # Creating the missing target fixes it without any other action.
    create(
        k8s,
        namespace,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "ghost"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "ghost"}},
                "template": {
                    "metadata": {"labels": {"app": "ghost"}},
                    "spec": {"containers": [{"name": "g", "image": "x"}]},
                },
            },
        },
    )
    wait_until(lambda: cond_is(k8s, namespace, "no-target", "TargetFound", "True"), what="target found later")


def test_virtualservice_that_never_routes_to_the_service(k8s: K8s, namespace: str, start_controller: Any) -> None:
    bookinfo(k8s, namespace, es_docs=False)
    start_controller()
    create(
        k8s,
        namespace,
        es_doc(
            "wrong-vs",
            service="details",
            virtualServices=["reviews"],
            scaleTargetRef={"kind": "Deployment", "name": "details-v1"},
        ),
    )
    wait_until(
        lambda: cond_is(k8s, namespace, "wrong-vs", "VirtualServicesBound", "False", "NoRouteToTarget"),
        what="NoRouteToTarget",
    )
    msg = condition(es(k8s, namespace, "wrong-vs"), "VirtualServicesBound")["message"]  # type: ignore[index]
    assert f"{namespace}/reviews has no http route to Service details" in msg
    wait_event(k8s, namespace, "wrong-vs", "NoRouteToTarget")
    # At zero nothing is rewritten on a VirtualService that does not route to the Service.
    before = vs_spec(k8s, namespace, "reviews")
    scale(k8s, namespace, "details-v1", 0)
    wait_until(lambda: phase(k8s, namespace, "wrong-vs") == "ScaledToZero", what="ScaledToZero")
    assert vs_spec(k8s, namespace, "reviews") == before


def test_missing_destination_rule_means_no_subset_route(k8s: K8s, namespace: str, start_controller: Any) -> None:
    apply(k8s, namespace, load("bookinfo.yaml"))
    apply(k8s, namespace, load("virtual-services.yaml"))
    apply(k8s, namespace, load("elastiservices.yaml"))
    start_controller()
    wait_until(
        lambda: cond_is(k8s, namespace, "reviews-v2", "VirtualServicesBound", "False", "NoRouteToTarget"),
        what="no subset without DestinationRule",
    )
    assert (
        "no DestinationRule subset selects"
        in condition(
            es(k8s, namespace, "reviews-v2"),  # type: ignore[index]
            "VirtualServicesBound",
        )["message"]
    )
    apply(k8s, namespace, load("destination-rule-all.yaml"))
    wait_until(lambda: cond_is(k8s, namespace, "reviews-v2", "VirtualServicesBound", "True"), what="bound with DR")


def test_unsupported_scaled_object_target(k8s: K8s, namespace: str, start_controller: Any) -> None:
    bookinfo(k8s, namespace, es_docs=False)
    start_controller()
    create(
        k8s,
        namespace,
        {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "ScaledObject",
            "metadata": {"name": "job"},
            "spec": {
                "scaleTargetRef": {"kind": "CronJob", "apiVersion": "batch/v1", "name": "x"},
                "triggers": [{"type": "cpu", "metadata": {"value": "50"}}],
            },
        },
    )
    create(
        k8s,
        namespace,
        es_doc(
            "job",
            service="details",
            virtualServices=["details"],
            scaleTargetRef={"kind": "ScaledObject", "name": "job"},
        ),
    )
    wait_until(lambda: cond_is(k8s, namespace, "job", "TargetFound", "False", "UnsupportedKind"), what="unsupported")
    wait_event(k8s, namespace, "job", "UnsupportedKind")


def test_route_timeout_shorter_than_hold_timeout(k8s: K8s, namespace: str, start_controller: Any) -> None:
    bookinfo(k8s, namespace)
    start_controller()
    patch(
        k8s,
        namespace,
        "VirtualService",
        "details",
        {"spec": {"http": [{"timeout": "10s", "route": [{"destination": {"host": "details", "subset": "v1"}}]}]}},
    )
    wait_until(
        lambda: cond_is(k8s, namespace, "details", "RouteTimeoutsCompatible", "False", "RouteTimeoutShorterThanHold"),
        what="timeout condition",
    )
    msg = condition(es(k8s, namespace, "details"), "RouteTimeoutsCompatible")["message"]  # type: ignore[index]
    assert "10s" in msg and "60s" in msg
    wait_event(k8s, namespace, "details", "RouteTimeoutShorterThanHold")
    assert cond_is(k8s, namespace, "details", "Ready", "True")  # still works, with a warning


def test_wake_of_a_target_that_cannot_create_pods(k8s: K8s, namespace: str, start_controller: Any) -> None:
    bookinfo(k8s, namespace)
    ctrl = start_controller()
    scale(k8s, namespace, "details-v1", 0)
    wait_until(lambda: phase(k8s, namespace, "details") == "ScaledToZero", what="ScaledToZero")
    k8s.core.create_namespaced_resource_quota(
        namespace,
        {  # type: ignore[attr-defined]
            "metadata": {"name": "no-pods"},
            "spec": {"hard": {"pods": "0"}},
        },
    )
    wait_until(
        lambda: k8s.core.read_namespaced_resource_quota("no-pods", namespace).status.hard,  # type: ignore
        what="quota in force",
    )
    assert ctrl.wake(namespace, "details")[0] == 202
    wait_until(
        lambda: cond_is(k8s, namespace, "details", "WakeFailed", "True", "TargetReplicaFailure"),
        what="WakeFailed",
        timeout=60,
    )
    assert "exceeded quota" in condition(es(k8s, namespace, "details"), "WakeFailed")["message"]  # type: ignore
    wait_event(k8s, namespace, "details", "TargetReplicaFailure")
    # Lifting the quota lets the wake complete, and the condition says so.
    k8s.core.delete_namespaced_resource_quota("no-pods", namespace)  # type: ignore[attr-defined]
    wait_until(lambda: cond_is(k8s, namespace, "details", "WakeFailed", "False", "Woken"), what="woken", timeout=60)


def test_refused_scale_is_reported(k8s: K8s, namespace: str, cluster, start_controller: Any) -> None:  # type: ignore[no-untyped-def]
    """The controller's own identity lacks the scale permission: the wake says so at once."""
    from tests.rbac import bind_controller_role

    bookinfo(k8s, namespace)
    bind_controller_role(k8s, namespace, drop=("deployments/scale",))
    ctrl = ControllerProc(cluster.controller_kubeconfig, namespace, Path(cluster.state_dir) / f"ctrl-{namespace}.log")
    ctrl.start()
    try:
        ctrl.wait_ready()
        scale(k8s, namespace, "details-v1", 0)
        wait_until(lambda: phase(k8s, namespace, "details") == "ScaledToZero", what="ScaledToZero")
        code, body = ctrl.wake(namespace, "details")
        assert code == 409 and "forbidden" in body["error"].lower(), body
        wait_until(lambda: cond_is(k8s, namespace, "details", "WakeFailed", "True", "ScaleRefused"), what="refused")
        wait_event(k8s, namespace, "details", "ScaleRefused")
    finally:
        ctrl.stop()
        print(ctrl.logs()[-3000:])


def test_metric_labels_are_bounded(k8s: K8s, namespace: str, start_controller: Any) -> None:
    bookinfo(k8s, namespace)
    ctrl = start_controller()
    # Twice: the first scale to zero may come before the controller's watches have listed the
    # Deployment (then there is no event to time the switch from); the second comes after its wake.
    for _ in range(2):
        scale(k8s, namespace, "details-v1", 0)
        wait_until(lambda: phase(k8s, namespace, "details") == "ScaledToZero", what="ScaledToZero")
        ctrl.wake(namespace, "details")
        wait_until(lambda: phase(k8s, namespace, "details") == "Serving", what="Serving")
    ctrl.wake(namespace, "does-not-exist")
    allowed = {"namespace", "name", "phase", "mode", "outcome", "le"}
    import re

    for line in ctrl.metrics().splitlines():
        if line.startswith("elasti_controller_") and "{" in line:
            labels = set(re.findall(r'(\w+)="', line))
            assert labels <= allowed, line
    text = ctrl.metrics()
    assert f'elasti_controller_switch_seconds_count{{mode="proxy",name="details",namespace="{namespace}"}}' in text
    # Deleting the ElastiService drops its series.
    delete(k8s, namespace, "ElastiService", "details")
    wait_until(lambda: get(k8s, namespace, "ElastiService", "details") is None, what="deleted")
    wait_until(lambda: 'name="details"' not in ctrl.metrics(), what="series dropped")


def test_fail_open_waking_many_targets_is_rate_limited(k8s: K8s, namespace: str, start_controller: Any) -> None:
    names = [f"svc{i}" for i in range(5)]
    for n in names:
        create(
            k8s,
            namespace,
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": n},
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": {"app": n}},
                    "template": {
                        "metadata": {"labels": {"app": n}},
                        "spec": {"containers": [{"name": "app", "image": "x", "ports": [{"containerPort": 80}]}]},
                    },
                },
            },
        )
        create(
            k8s,
            namespace,
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": n},
                "spec": {"selector": {"app": n}, "ports": [{"port": 80, "name": "http"}]},
            },
        )
        create(
            k8s,
            namespace,
            {
                "apiVersion": "networking.istio.io/v1beta1",
                "kind": "VirtualService",
                "metadata": {"name": n},
                "spec": {"hosts": [n], "http": [{"route": [{"destination": {"host": n}}]}]},
            },
        )
        create(
            k8s, namespace, es_doc(n, service=n, virtualServices=[n], scaleTargetRef={"kind": "Deployment", "name": n})
        )
    create(k8s, namespace, activator_deployment())
    wait_until(lambda: ready_replicas(k8s, namespace, "elasti-activator") == 1, what="activator ready")
    start_controller(
        "--fail-open-wakes-per-second",
        "0.5",
        "--fail-open-burst",
        "2",
        activator_deployment=f"{namespace}/elasti-activator",
    )
    for n in names:
        wait_until(lambda n=n: phase(k8s, namespace, n) == "Serving", what=f"{n} serving")
        wait_until(lambda n=n: cond_is(k8s, namespace, n, "ActivatorAvailable", "True"), what=f"{n} sees the activator")
        scale(k8s, namespace, n, 0)
    for n in names:
        wait_until(lambda n=n: phase(k8s, namespace, n) == "ScaledToZero", what=f"{n} asleep")
    delete(k8s, namespace, "Deployment", "elasti-activator")
    wait_until(
        lambda: any(e.reason == "FailOpenRateLimited" for n in names for e in events_for(k8s, namespace, n)),
        what="a rate-limited fail-open wake reported",
    )
    for n in names:
        wait_until(lambda n=n: ready_replicas(k8s, namespace, n) == 1, 60, f"{n} woken (fail open)")
        assert not activator_dests(vs_spec(k8s, namespace, n))
