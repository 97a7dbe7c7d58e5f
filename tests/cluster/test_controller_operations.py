"""Operations: the controller's own scale-down (idle triggers with a real Prometheus, POST /v1/sleep),
KEDA without tug of war, the enabledPeriod schedule, and a port the activator cannot carry."""

from __future__ import annotations

import collections
import datetime as dt
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
from kubernetes import watch

from tests.cluster.test_controller_lifecycle import activator_dests, bookinfo, phase, vs_spec
from tests.cluster.test_controller_resilience import cond_is, es_doc
from tests.cluster.test_kubectl_view import table
from tests.conftest import K8s, MeshInfo
from tests.harness import (
    condition,
    create,
    es,
    events_for,
    free_port,
    get,
    http_json,
    patch,
    ready_replicas,
    scale,
    wait_event,
    wait_until,
)
from tests.keda_standin import ACTIVE, KedaStandIn


class Recorder:
    """Watches VirtualServices, Deployments and ElastiServices of a namespace and keeps (resourceVersion, kind, object):
    etcd's revisions are global, so they order writes to different objects."""

    def __init__(self, k8s: K8s, namespace: str) -> None:
        self.k8s, self.namespace = k8s, namespace
        self.events: list[tuple[int, str, dict[str, Any]]] = []
        self._threads: list[threading.Thread] = []
        self._watches: list[watch.Watch] = []

    def start(self) -> Recorder:
        rv = self.k8s.core.list_namespaced_config_map(self.namespace).metadata.resource_version  # type: ignore
        for kind, fn, args in (
            (
                "VirtualService",
                self.k8s.custom.list_namespaced_custom_object,  # type: ignore[attr-defined]
                ("networking.istio.io", "v1beta1", self.namespace, "virtualservices"),
            ),
            (
                "Deployment",
                self.k8s.custom.list_namespaced_custom_object,  # type: ignore[attr-defined]
                ("apps", "v1", self.namespace, "deployments"),
            ),
            (
                "ElastiService",
                self.k8s.custom.list_namespaced_custom_object,  # type: ignore[attr-defined]
                ("elasti.truefoundry.com", "v1alpha1", self.namespace, "elastiservices"),
            ),
        ):
            w = watch.Watch()
            self._watches.append(w)
            t = threading.Thread(target=self._run, args=(w, kind, fn, args, rv), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _run(self, w: watch.Watch, kind: str, fn: Any, args: tuple[str, ...], rv: str) -> None:
        try:
            for ev in w.stream(fn, *args, resource_version=rv, timeout_seconds=120):
                obj = ev["object"]
                self.events.append((int(obj["metadata"]["resourceVersion"]), kind, obj))
        except (urllib3.exceptions.HTTPError, ValueError):
            pass

    def stop(self) -> None:
        for w in self._watches:
            w.stop()

    def first(self, kind: str, pred: Any) -> int | None:
        return min((rv for rv, k, o in self.events if k == kind and pred(o)), default=None)


def proxied_then_zero(rec: Recorder, deployment: str) -> tuple[int | None, int | None]:
    vs_rv = rec.first("VirtualService", lambda o: bool(activator_dests(o["spec"])))
    dep_rv = rec.first("Deployment", lambda o: o["metadata"]["name"] == deployment and o["spec"]["replicas"] == 0)
    return vs_rv, dep_rv


# ---- POST /v1/sleep ---------------------------------------------------------------------------


def test_sleep_switches_routes_first_then_scales_to_zero(k8s: K8s, namespace: str, start_controller: Any) -> None:
    bookinfo(k8s, namespace)
    ctrl = start_controller()
    wait_until(lambda: phase(k8s, namespace, "details") == "Serving", what="Serving")
    rec = Recorder(k8s, namespace).start()
    try:
        code, body = http_json(
            "POST", ctrl.wake_url.replace("/wake", "/sleep"), {"namespace": namespace, "name": "details"}
        )
        assert code == 202 and body["phase"] == "ScalingToZero", body
        wait_until(lambda: phase(k8s, namespace, "details") == "ScaledToZero", what="ScaledToZero")
        vs_rv, dep_rv = wait_until(
            lambda: (lambda p: p if None not in p else None)(proxied_then_zero(rec, "details-v1")),
            what="both writes seen",
        )
        assert vs_rv < dep_rv, "the routes must move to the activator before the target is scaled down"
        # The activators forward to a ready target themselves, so they are told it has no ready replica
        # (and hold from then on) after the routes came to them and before its pods stop.
        told = rec.first(
            "ElastiService",
            lambda o: o["metadata"]["name"] == "details" and (o.get("status") or {}).get("readyReplicas") == 0,
        )
        assert told is not None and vs_rv < told < dep_rv, (vs_rv, told, dep_rv)
    finally:
        rec.stop()
    wait_event(k8s, namespace, "details", "ScaledToZeroOnRequest")
    code, body = http_json("POST", ctrl.wake_url.replace("/wake", "/sleep"), {"namespace": namespace, "name": "nope"})
    assert code == 404


def proxy_switches(rec: Recorder) -> collections.Counter[str]:
    """How many times each ElastiService's share of a VirtualService went to the activator, over the
    recorded writes in etcd order."""
    count: collections.Counter[str] = collections.Counter()
    last: dict[tuple[str, str], bool] = {}
    seen: set[int] = set()
    for rv, kind, obj in sorted(rec.events, key=lambda e: e[0]):
        if kind != "VirtualService" or rv in seen:
            continue
        seen.add(rv)
        held = {
            ((d.get("headers") or {}).get("request") or {}).get("set", {}).get("elasti-service")
            for d in activator_dests(obj["spec"])
        }
        for es_name in ("details", "reviews-v1", "reviews-v2", "reviews-v3"):
            key = (obj["metadata"]["name"], es_name)
            now = f"{obj['metadata']['namespace']}/{es_name}" in held
            if now and not last.get(key, False):
                count[es_name] += 1
            last[key] = now
    return count


def test_concurrent_sleeps_never_flap_the_routes(k8s: K8s, namespace: str, start_controller: Any) -> None:
    """The controller's own scale-down has no window: a reconcile that read the target before a sleep
    never puts the routes back on the terminating workload after it (one writer per ElastiService)."""
    bookinfo(k8s, namespace)
    ctrl = start_controller()
    names = ("details", "reviews-v1", "reviews-v2", "reviews-v3")
    wait_until(lambda: all(phase(k8s, namespace, n) == "Serving" for n in names), what="all Serving")
    sleep_url = ctrl.wake_url.replace("/wake", "/sleep")
    cycles = 8
    rec = Recorder(k8s, namespace).start()
    try:
        for _ in range(cycles):
            threads = [
                threading.Thread(target=http_json, args=("POST", sleep_url, {"namespace": namespace, "name": n}))
                for n in names
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            wait_until(lambda: all(phase(k8s, namespace, n) == "ScaledToZero" for n in names), what="all asleep")
            for n in names:
                assert ctrl.wake(namespace, n)[0] == 202
            wait_until(lambda: all(phase(k8s, namespace, n) == "Serving" for n in names), 60, "all woken")
        latest = max(
            int(vs["metadata"]["resourceVersion"])
            for vs in (get(k8s, namespace, "VirtualService", v) for v in ("details", "reviews"))
            if vs
        )
        wait_until(
            lambda: any(rv >= latest for rv, k, _ in list(rec.events) if k == "VirtualService"),
            what="the watch to catch up",
        )
    finally:
        rec.stop()
    assert proxy_switches(rec) == {n: cycles for n in names}, "a route went back to a sleeping workload and again"


# ---- KEDA -------------------------------------------------------------------------------------


def scaled_object(name: str, target: str, min_replicas: int, active: bool = False) -> dict[str, Any]:
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": name, "annotations": {ACTIVE: "true" if active else "false"}},
        "spec": {
            "scaleTargetRef": {"name": target},
            "minReplicaCount": min_replicas,
            "maxReplicaCount": 5,
            "triggers": [
                {
                    "type": "metrics-api",
                    "metadata": {
                        "url": "http://elasti-activator.elasti-system:9091/v1/pending/ns/details",
                        "valueLocation": "pending",
                        "targetValue": "1",
                    },
                }
            ],
        },
    }


def so_annotations(k8s: K8s, ns: str, name: str) -> dict[str, str]:
    return (get(k8s, ns, "ScaledObject", name) or {})["metadata"].get("annotations") or {}


def keda_es(kind: str, name: str, wake_hold: int | None = None) -> dict[str, Any]:
    """The ElastiService of Bookinfo's details with KEDA's ScaledObject ``details`` as its autoscaler."""
    autoscaler: dict[str, Any] = {"type": "keda", "name": "details"}
    if wake_hold is not None:
        autoscaler["wakeHoldSeconds"] = wake_hold
    return {
        "apiVersion": "elasti.truefoundry.com/v1alpha1",
        "kind": "ElastiService",
        "metadata": {"name": "details"},
        "spec": {
            "service": "details",
            "virtualServices": ["details"],
            "scaleTargetRef": {"kind": kind, "name": name},
            "autoscaler": autoscaler,
        },
    }


def test_keda_min_one_elasti_owns_one_to_zero(k8s: K8s, namespace: str, start_controller: Any) -> None:
    """minReplicaCount 1: the controller pauses KEDA at 0 before its scale-down and unpauses on wake."""
    bookinfo(k8s, namespace, es_docs=False)
    create(k8s, namespace, scaled_object("details", "details-v1", 1))
    create(k8s, namespace, keda_es("Deployment", "details-v1"))
    ctrl = start_controller()
    with KedaStandIn(k8s, namespace) as keda:
        wait_until(lambda: phase(k8s, namespace, "details") == "Serving", what="Serving")
        code, _ = http_json(
            "POST", ctrl.wake_url.replace("/wake", "/sleep"), {"namespace": namespace, "name": "details"}
        )
        assert code == 202
        wait_until(lambda: phase(k8s, namespace, "details") == "ScaledToZero", what="asleep")
        ann = so_annotations(k8s, namespace, "details")
        assert ann["autoscaling.keda.sh/paused-replicas"] == "0"
        time.sleep(1)  # several stand-in ticks: a paused KEDA must keep the target at zero
        assert not k8s.apps.read_namespaced_deployment_scale("details-v1", namespace).spec.replicas  # type: ignore
        n = len(keda.actions)
        assert ctrl.wake(namespace, "details")[0] == 202
        assert "autoscaling.keda.sh/paused-replicas" not in so_annotations(k8s, namespace, "details")
        wait_until(lambda: phase(k8s, namespace, "details") == "Serving", what="woken")
        time.sleep(1)  # KEDA resumes from 1 (its minimum): nothing takes it back to zero
        assert ready_replicas(k8s, namespace, "details-v1") == 1
        assert all(r >= 1 for _, r in keda.actions[n:])


def test_keda_min_zero_keda_owns_one_to_zero_with_a_wake_hold(k8s: K8s, namespace: str, start_controller: Any) -> None:
    """minReplicaCount 0: KEDA scales to zero itself; after a wake the controller holds the target up for
    wakeHoldSeconds so that KEDA's still-empty metrics cannot undo the wake, then lets KEDA decide."""
    bookinfo(k8s, namespace, es_docs=False)
    create(k8s, namespace, scaled_object("details", "details-v1", 0))
    create(k8s, namespace, keda_es("ScaledObject", "details", wake_hold=4))
    ctrl = start_controller()
    with KedaStandIn(k8s, namespace):
        wait_until(lambda: phase(k8s, namespace, "details") == "ScaledToZero", what="KEDA took it to zero")
        assert activator_dests(vs_spec(k8s, namespace, "details"))
        assert ctrl.wake(namespace, "details")[0] == 202
        ann = so_annotations(k8s, namespace, "details")
        assert ann["autoscaling.keda.sh/paused-replicas"] == "1" and "elasti.truefoundry.com/wake-hold-until" in ann
        wait_until(lambda: phase(k8s, namespace, "details") == "Serving", what="woken and held")
        wait_until(
            lambda: "autoscaling.keda.sh/paused-replicas" not in so_annotations(k8s, namespace, "details"),
            what="hold lifted",
        )
        # KEDA decides again: its trigger is inactive, so the target goes back to zero, through the proxy.
        wait_until(lambda: phase(k8s, namespace, "details") == "ScaledToZero", what="KEDA's decision applies")


def test_keda_paused_by_its_owner_is_never_taken_over(k8s: K8s, namespace: str, start_controller: Any) -> None:
    """A ScaledObject its owner paused at 0 (KEDA's pause for maintenance) stays theirs: a wake neither
    rewrites nor removes the pause, the target stays at zero, and WakeFailed says why; once the owner lifts
    the pause, traffic wakes the target again."""
    bookinfo(k8s, namespace, es_docs=False)
    so = scaled_object("details", "details-v1", 0)
    so["metadata"]["annotations"]["autoscaling.keda.sh/paused-replicas"] = "0"
    create(k8s, namespace, so)
    create(k8s, namespace, keda_es("ScaledObject", "details", wake_hold=2))
    ctrl = start_controller()
    with KedaStandIn(k8s, namespace):
        wait_until(lambda: phase(k8s, namespace, "details") == "ScaledToZero", what="paused at zero by its owner")
        owner = dict(so_annotations(k8s, namespace, "details"))
        code, body = ctrl.wake(namespace, "details")
        assert (code, body.get("reason")) == (409, "PausedByOwner"), body
        assert "autoscaling.keda.sh/paused-replicas=0" in body["error"]
        assert so_annotations(k8s, namespace, "details") == owner
        wait_until(
            lambda: cond_is(k8s, namespace, "details", "WakeFailed", "True", "PausedByOwner"),
            what="WakeFailed PausedByOwner",
        )
        wait_event(k8s, namespace, "details", "PausedByOwner")
        assert not k8s.apps.read_namespaced_deployment_scale("details-v1", namespace).spec.replicas  # type: ignore
        # The owner lifts the pause: the condition clears and a wake works (with the controller's own hold).
        lift = {"metadata": {"annotations": {"autoscaling.keda.sh/paused-replicas": None}}}
        patch(k8s, namespace, "ScaledObject", "details", lift)
        wait_until(lambda: not cond_is(k8s, namespace, "details", "WakeFailed", "True"), what="WakeFailed cleared")
        assert ctrl.wake(namespace, "details")[0] == 202
        wait_until(lambda: phase(k8s, namespace, "details") == "Serving", what="woken once the pause is lifted")


# ---- enabledPeriod ----------------------------------------------------------------------------


def test_schedule_outside_period_keeps_awake_and_invalid_cron_is_reported(
    k8s: K8s, namespace: str, start_controller: Any
) -> None:
    bookinfo(k8s, namespace)
    ctrl = start_controller()
    sleep_url = ctrl.wake_url.replace("/wake", "/sleep")
    wait_until(lambda: phase(k8s, namespace, "details") == "Serving", what="Serving")
    # A period that started two hours ago and lasted a minute: we are outside it.
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    patch(
        k8s,
        namespace,
        "ElastiService",
        "details",
        {"spec": {"enabledPeriod": {"schedule": f"{past.minute} {past.hour} * * *", "duration": "1m"}}},
    )
    wait_until(
        lambda: cond_is(k8s, namespace, "details", "ScaleToZeroAllowed", "False", "OutsideEnabledPeriod"),
        what="outside the period",
    )
    code, body = http_json("POST", sleep_url, {"namespace": namespace, "name": "details"})
    assert code == 409 and "enabledPeriod" in body["error"]
    # Someone else scales it to zero outside the period: it is woken.
    k8s.apps.patch_namespaced_deployment_scale("details-v1", namespace, {"spec": {"replicas": 0}})  # type: ignore
    wait_event(k8s, namespace, "details", "OutsideEnabledPeriod")
    wait_until(lambda: ready_replicas(k8s, namespace, "details-v1") == 1, what="woken outside the period")

    patch(
        k8s,
        namespace,
        "ElastiService",
        "details",
        {"spec": {"enabledPeriod": {"schedule": "61 * * * *", "duration": "1h"}}},
    )
    wait_until(
        lambda: cond_is(k8s, namespace, "details", "ScaleToZeroAllowed", "False", "InvalidSchedule"),
        what="invalid schedule reported",
    )
    assert "61" in condition(es(k8s, namespace, "details"), "ScaleToZeroAllowed")["message"]  # type: ignore[index]
    wait_event(k8s, namespace, "details", "InvalidSchedule")
    assert http_json("POST", sleep_url, {"namespace": namespace, "name": "details"})[0] == 409

    patch(
        k8s,
        namespace,
        "ElastiService",
        "details",
        {"spec": {"enabledPeriod": {"schedule": "* * * * *", "duration": "1h"}}},
    )
    wait_until(
        lambda: cond_is(k8s, namespace, "details", "ScaleToZeroAllowed", "True", "InEnabledPeriod"),
        what="inside the period",
    )
    assert http_json("POST", sleep_url, {"namespace": namespace, "name": "details"})[0] == 202
    wait_until(lambda: phase(k8s, namespace, "details") == "ScaledToZero", what="asleep inside the period")


# ---- a protocol the activator cannot carry -----------------------------------------------------


def db_workload(k8s: K8s, ns: str, port: dict[str, Any]) -> None:
    """A Deployment ``db`` behind a Service with ``port``, an http route to it and its ElastiService."""
    create(
        k8s,
        ns,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "db"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "db"}},
                "template": {
                    "metadata": {"labels": {"app": "db"}},
                    "spec": {"containers": [{"name": "db", "image": "x", "ports": [{"containerPort": 8080}]}]},
                },
            },
        },
    )
    create(
        k8s,
        ns,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "db"},
            "spec": {"selector": {"app": "db"}, "ports": [port]},
        },
    )
    create(
        k8s,
        ns,
        {
            "apiVersion": "networking.istio.io/v1beta1",
            "kind": "VirtualService",
            "metadata": {"name": "db"},
            "spec": {"hosts": ["db"], "http": [{"route": [{"destination": {"host": "db"}}]}]},
        },
    )
    create(
        k8s, ns, es_doc("db", service="db", virtualServices=["db"], scaleTargetRef={"kind": "Deployment", "name": "db"})
    )


def test_a_port_the_activator_cannot_carry_is_refused_not_broken(
    k8s: K8s, namespace: str, start_controller: Any
) -> None:
    """A Service port named tcp-db behind an http route: the ElastiService says so (condition, Ready,
    kubectl, a Warning), its VirtualService is never rewritten, not even when someone else scales the
    target to zero (it is woken instead), and it is not scaled down on request; once the port is named
    for HTTP, it works as usual."""
    db_workload(k8s, namespace, {"name": "tcp-db", "port": 5432, "targetPort": 8080})
    wait_until(lambda: ready_replicas(k8s, namespace, "db") == 1, what="db ready")
    ctrl = start_controller()
    wait_until(
        lambda: cond_is(k8s, namespace, "db", "ProtocolSupported", "False", "UnsupportedProtocol"),
        60,
        "ProtocolSupported=False",
    )
    obj = es(k8s, namespace, "db")
    status = obj["status"]
    message = condition(obj, "ProtocolSupported")["message"]  # type: ignore[index]
    assert message.startswith("Service db port 5432 (name tcp-db) is TCP: the activator carries only "), message
    assert cond_is(k8s, namespace, "db", "Ready", "False", "UnsupportedProtocol")
    assert status["mode"] == "serve"
    row = table(k8s, namespace)["db"]
    assert (row["READY"], row["REASON"], row["MODE"]) == ("False", "UnsupportedProtocol", "serve"), row
    warning = wait_event(k8s, namespace, "db", "UnsupportedProtocol")
    assert warning.type == "Warning" and warning.message == message

    before = get(k8s, namespace, "VirtualService", "db")
    assert before is not None
    rec = Recorder(k8s, namespace).start()
    try:
        # Someone else scales the target to zero: the routes stay, and the target is woken.
        scale(k8s, namespace, "db", 0)
        wait_until(
            lambda: any(
                e.reason == "UnsupportedProtocol" and e.type == "Normal" for e in events_for(k8s, namespace, "db")
            ),
            60,
            "the wake Event",
        )
        wait_until(lambda: ready_replicas(k8s, namespace, "db") == 1, 60, "db woken")
        wait_until(lambda: phase(k8s, namespace, "db") == "Serving", 60, "Serving again")
        code, body = http_json("POST", ctrl.wake_url.replace("/wake", "/sleep"), {"namespace": namespace, "name": "db"})
        assert (code, body.get("reason")) == (409, "UnsupportedProtocol"), body
        assert k8s.apps.read_namespaced_deployment("db", namespace).spec.replicas == 1  # type: ignore[attr-defined]
        after = get(k8s, namespace, "VirtualService", "db")
        assert after is not None and after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
        assert after["spec"] == before["spec"]
        assert rec.first("VirtualService", lambda o: bool(activator_dests(o["spec"]))) is None
        assert es(k8s, namespace, "db")["status"]["mode"] == "serve"
    finally:
        rec.stop()

    # Named for HTTP: supported, Ready, and a scale to zero moves the route to the activator.
    k8s.core.patch_namespaced_service(  # type: ignore[attr-defined]
        "db", namespace, {"spec": {"ports": [{"name": "http-db", "port": 5432, "targetPort": 8080}]}}
    )
    wait_until(lambda: cond_is(k8s, namespace, "db", "ProtocolSupported", "True", "Supported"), 60, "Supported")
    wait_until(lambda: cond_is(k8s, namespace, "db", "Ready", "True"), 60, "Ready")
    scale(k8s, namespace, "db", 0)
    wait_until(lambda: activator_dests(vs_spec(k8s, namespace, "db")), 60, "db proxied")


# ---- idle triggers with a real Prometheus ---------------------------------------------------------


@pytest.fixture(scope="module")
def prometheus(mesh: MeshInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    assert Path(binary).exists(), "Debian's prometheus is needed (scripts/install-control-plane installs it)"
    d = tmp_path_factory.mktemp("prometheus")
    (d / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: mesh\n    metrics_path: /stats/prometheus\n    static_configs:\n"
        f"      - targets: ['{mesh.client_admin.removeprefix('http://')}']\n"
    )
    port = free_port()
    log = (d / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={d / 'prometheus.yml'}",
            f"--storage.tsdb.path={d / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_json("GET", url + "/-/ready", timeout=2)[0] == 200, 60, "prometheus ready")
        yield url
    finally:
        proc.terminate()
        proc.wait(20)


def traffic(mesh: MeshInfo, host: str, stop: threading.Event, results: list[int]) -> None:
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": mesh.proxy_for(9080)}))
    while not stop.is_set():
        try:
            with opener.open(f"http://{host}:9080/details/0", timeout=10) as resp:
                results.append(resp.status)
        except urllib.error.HTTPError as exc:
            results.append(exc.code)
        except OSError:
            results.append(0)
        stop.wait(0.1)


def test_idle_scale_down_with_prometheus(
    k8s: K8s, namespace: str, start_controller: Any, mesh: MeshInfo, prometheus: str
) -> None:
    bookinfo(k8s, namespace)
    # Envoy's own counter, as scraped from the calling sidecar: requests to any subset of details.
    query = (
        f'sum(rate(envoy_cluster_upstream_rq_total{{cluster_name=~"outbound[|]9080[|].*[|]details[.]{namespace}'
        f'[.]svc[.]cluster[.]local"}}[5s]))'
    )
    patch(
        k8s,
        namespace,
        "ElastiService",
        "details",
        {
            "spec": {
                "cooldownPeriod": 2,
                "triggers": [
                    {
                        "type": "prometheus",
                        "metadata": {"serverAddress": prometheus, "query": query, "threshold": "0.5"},
                    }
                ],
            }
        },
    )
    wait_until(lambda: mesh.routable("details", namespace, 9080, "v1"), 60, "details routable from the mesh client")
    stop, results = threading.Event(), []
    t = threading.Thread(target=traffic, args=(mesh, f"details.{namespace}.svc.cluster.local", stop, results))
    t.start()
    try:
        # Prometheus must have seen the traffic before the controller looks (an empty answer counts as 0).
        import urllib.parse

        def rate() -> float:
            answer = http_json("GET", f"{prometheus}/api/v1/query?query={urllib.parse.quote(query)}")[1]
            result = answer["data"]["result"]
            return float(result[0]["value"][1]) if result else 0.0

        wait_until(lambda: rate() > 0.5, 60, f"Prometheus to see the traffic (client results {results[-5:]})")
        start_controller("--idle-check-interval", "0.5")
        wait_until(
            lambda: cond_is(k8s, namespace, "details", "TriggersHealthy", "True", "Busy"),
            60,
            "the controller to find the target busy",
        )
        assert phase(k8s, namespace, "details") == "Serving"
    finally:
        stop.set()
        t.join(10)
    assert results and set(results) == {200}
    rec = Recorder(k8s, namespace).start()
    try:
        wait_until(lambda: phase(k8s, namespace, "details") == "ScaledToZero", 90, "idle scale-down")
        vs_rv, dep_rv = proxied_then_zero(rec, "details-v1")
        assert vs_rv is not None and dep_rv is not None and vs_rv < dep_rv
    finally:
        rec.stop()
    wait_event(k8s, namespace, "details", "ScaledToZeroWhenIdle")


def test_failing_prometheus_never_scales_down(k8s: K8s, namespace: str, start_controller: Any, prometheus: str) -> None:
    bookinfo(k8s, namespace)
    dead = f"http://127.0.0.1:{free_port()}"
    patch(
        k8s,
        namespace,
        "ElastiService",
        "details",
        {
            "spec": {
                "cooldownPeriod": 0,
                "triggers": [
                    {"type": "prometheus", "metadata": {"serverAddress": dead, "query": "vector(0)", "threshold": "1"}}
                ],
            }
        },
    )
    patch(
        k8s,
        namespace,
        "ElastiService",
        "reviews-v1",
        {
            "spec": {
                "cooldownPeriod": 0,
                "triggers": [
                    {"type": "prometheus", "metadata": {"serverAddress": prometheus, "query": "sum(", "threshold": "1"}}
                ],
            }
        },
    )
    ctrl = start_controller("--idle-check-interval", "0.3")

    def errors(name: str) -> float:
        for line in ctrl.metrics().splitlines():
            if (
                line.startswith("elasti_controller_idle_checks_total")
                and f'name="{name}"' in line
                and 'result="error"' in line
            ):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    wait_until(lambda: errors("details") >= 5 and errors("reviews-v1") >= 5, 60, "several failed evaluations")
    for name, deployment in (("details", "details-v1"), ("reviews-v1", "reviews-v1")):
        assert phase(k8s, namespace, name) == "Serving"
        assert k8s.apps.read_namespaced_deployment(deployment, namespace).spec.replicas == 1  # type: ignore
        assert cond_is(k8s, namespace, name, "TriggersHealthy", "False", "MetricsUnavailable")
    assert "unreachable" in condition(es(k8s, namespace, "details"), "TriggersHealthy")["message"]  # type: ignore
    assert "400" in condition(es(k8s, namespace, "reviews-v1"), "TriggersHealthy")["message"]  # type: ignore
