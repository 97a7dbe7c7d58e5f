"""``elasti-istio demo``: Bookinfo scaled to zero and back, end to end, narrated.

Brings up the playground (local cluster with istiod and Envoy, elasti-system with the shipped RBAC, the
real controller and activator as processes, Bookinfo), then: details-v1 is scaled to 0 as KEDA would,
the details VirtualService is shown routing to the activator, /productpage is requested through the
ingress gateway, the request is held while details wakes, the complete page comes back, and the
original routes are shown restored. Exit status 0 only if every step passed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from elasti_istio import options
from elasti_istio.playground import bookinfo, mesh
from elasti_istio.playground.narrate import Narrator, Step, StepFailed
from elasti_istio.playground.stack import Playground

DEFAULT_STATE_DIR = ".elasti/demo"
TARGET = "details-v1"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "demo",
        help="run Bookinfo on a local cluster and show details scaled to zero and woken by a request",
        description="Starts a local cluster (Kubernetes, istiod, an Envoy ingress gateway and sidecars) with Bookinfo, "
        "the controller and the activator, "
        "then scales details-v1 to 0 as KEDA would, requests /productpage through the ingress gateway and shows "
        "the request held while details wakes, and the routes restored. Ctrl-C stops everything.",
    )
    options.add(p, "--state-dir", default=DEFAULT_STATE_DIR, help="cluster state, kubeconfigs and every log")
    options.add(
        p,
        "--keep",
        boolean=True,
        default=False,
        help="leave everything running after the story (gateway URL and commands printed) until Ctrl-C",
    )
    options.add(
        p,
        "--startup-seconds",
        type=float,
        default=1.0,
        help="how long a Pod takes to turn Ready (the time a held request waits for details to wake)",
    )
    options.add(p, "--bookinfo-namespace", default="bookinfo", help="namespace Bookinfo is deployed in")
    options.add(p, "--step-timeout", type=float, default=120.0, help="seconds any one step may take")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = sys.stdout
    narrator = Narrator(out)
    pg = Playground(
        Path(args.state_dir),
        startup_seconds=args.startup_seconds,
        namespace=args.bookinfo_namespace,
    )
    rc = 0
    with _interrupt_on_termination():
        try:
            narrator.say("elasti-istio demo: Bookinfo's details service scaled to zero and woken by a request")
            narrator.say(f"state dir and logs: {pg.state_dir}")
            try:
                story(pg, narrator, args.step_timeout)
                narrator.timeline()
                narrator.say("\nAll steps passed.")
            except StepFailed as exc:
                rc = 1
                narrator.timeline()
                narrator.say(f"\nFAILED at step '{exc.title}': {exc.reason}")
                narrator.say(
                    f"Logs: {pg.logs_dir} (controller.log, activator.log, istiod.log, ingress-gateway.log, "
                    "kubelet.log, ...; sidecars in ../sidecars)"
                )
            if args.keep and pg.info is not None:
                try:
                    keep(pg, narrator)
                except KeyboardInterrupt:  # the way out of --keep: keeps the story's exit status
                    narrator.say("")
        except KeyboardInterrupt:
            narrator.say("\ninterrupted")
            rc = 130
        finally:
            # A second Ctrl-C (or a SIGTERM) must not cut the cleanup short.
            previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
            try:
                narrator.say("stopping the controller, the activator and the cluster (istiod, the Envoys) ...")
                pg.stop()
                narrator.say(f"stopped; logs kept in {pg.logs_dir}")
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)
    return rc


def story(pg: Playground, n: Narrator, timeout: float) -> None:
    ns = pg.namespace
    with n.step("start the local cluster"):
        since = time.monotonic()
        pg.cluster.log = lambda msg: n.progress(msg, since)
        info = pg.start_cluster()
        n.detail(
            "etcd, kube-apiserver, kube-controller-manager, istiod, the kubelet stand-in and the Envoy ingress "
            "gateway are up"
        )
        n.detail(f"API server {info.server}; pods get addresses in {info.pod_cidr}; gateway {info.gateway_url}")
    with n.step("install elasti-system: RBAC, activator Deployment"):
        pg.install_system()
        n.detail("the shipped RBAC (deploy/kustomize/base) and the elasti-activator Deployment and Service")
        n.detail("controller and activator run as system:serviceaccount:elasti-system:elasti-{controller,activator}")
    with n.step("start the activator and the controller"):
        act = pg.start_activator()
        ctl = pg.start_controller()
        n.detail(f"activator pid {act.pid} on 127.0.0.1:{act.port} (pod elasti-system/elasti-activator forwards to it;")
        n.detail("its upstream requests go through that pod's Envoy sidecar)")
        n.detail(f"controller pid {ctl.pid}, wake endpoint {ctl.base_url}")
    with n.step(f"deploy Bookinfo in namespace {ns}"):
        pg.deploy_bookinfo()
        n.detail("examples/bookinfo/: " + ", ".join(bookinfo.FILES))
        n.wait(lambda: _done(pg.bookinfo_status()), timeout, "Bookinfo to serve through the gateway")
        n.detail(f"{pg.gateway_url}/productpage serves the complete page; ElastiServices details and reviews-v1..v3")
    api = pg.api
    assert api is not None
    original = bookinfo.virtualservice(api, ns, "details")["spec"]
    with n.step(f"scale {TARGET} to 0, as KEDA would"):
        api.apps.patch_namespaced_deployment_scale(TARGET, ns, {"spec": {"replicas": 0}})
        n.wait(
            lambda: _flag(bookinfo.proxied(bookinfo.virtualservice(api, ns, "details")["spec"]), "routes unchanged"),
            timeout,
            "the details VirtualService to route to the activator",
        )
        n.detail("details VirtualService now:")
        for line in bookinfo.describe_routes(bookinfo.virtualservice(api, ns, "details")["spec"]):
            n.detail("  " + line)
        n.wait(lambda: _scaled_to_zero(pg), timeout, f"{TARGET} to have no pod left")
        status = bookinfo.elastiservice(api, ns, "details").get("status") or {}
        n.detail(f"ElastiService details: phase {status.get('phase')}, mode {status.get('mode')}")
        n.wait(
            lambda: _flag(_productpage_routes_to_activator(pg), "productpage's sidecar still routes to details-v1"),
            timeout,
            "istiod to push the new route to productpage's sidecar",
        )
        n.detail("istiod pushed it: productpage's Envoy sidecar sends calls to details to the activator")
    with n.step("GET /productpage through the ingress gateway") as st:
        request_and_watch(pg, n, st, timeout)
    with n.step("routes restored"):
        n.wait(
            lambda: _flag(
                bookinfo.virtualservice(api, ns, "details")["spec"] == original
                and bookinfo.phase(api, ns, "details") == "Serving",
                "details still routed to the activator",
            ),
            timeout,
            "the original details routes",
        )
        for line in bookinfo.describe_routes(bookinfo.virtualservice(api, ns, "details")["spec"]):
            n.detail("  " + line)
        n.detail("exactly the spec it had before the scale to zero: the activator is out of the path")


def request_and_watch(pg: Playground, n: Narrator, st: Step, timeout: float) -> None:
    """Sends the request in a thread and narrates what the system does until the answer arrives."""
    api = pg.api
    assert api is not None and pg.activator is not None
    ns = pg.namespace
    result: dict[str, Any] = {}

    def send() -> None:
        try:
            result["answer"] = bookinfo.get_page(pg.gateway_url, timeout=timeout)
        except Exception as exc:
            result["error"] = exc
        result["at"] = time.monotonic()

    t0 = time.monotonic()
    thread = threading.Thread(target=send, name="productpage-request", daemon=True)
    thread.start()
    n.event(st, 0.0, "GET /productpage sent to the ingress gateway")
    seen: set[str] = set()
    pending_url = f"{pg.activator.admin_url}/v1/pending/{ns}/details"

    def probe() -> tuple[bool, str]:
        dep = api.apps.read_namespaced_deployment(TARGET, ns)
        replicas, ready = dep.spec.replicas or 0, dep.status.ready_replicas or 0
        pending = _pending(pending_url)
        now = time.monotonic() - t0
        if "at" in result:  # seen in the same poll as the answer: it happened before it
            now = min(now, result["at"] - t0)
        if pending and "held" not in seen:
            seen.add("held")
            n.event(st, now, f"productpage's call to details is held by the activator ({pending} pending)")
        if replicas and "scaled" not in seen:
            seen.add("scaled")
            n.event(st, now, f"the controller scaled {TARGET} to {replicas} (woken by the activator)")
        if ready and "ready" not in seen:
            seen.add("ready")
            n.event(st, now, f"{TARGET} has a ready pod; the activator releases what it held")
        if "at" in result:
            return True, ""
        return False, f"waiting for the page: {TARGET} replicas {replicas}, ready {ready}, held {pending}"

    n.wait(probe, timeout + 5, "the answer to GET /productpage", interval=0.05)
    took = result.get("at", time.monotonic()) - t0
    if "error" in result:
        raise StepFailed("request", f"the request failed after {took:.2f}s: {result['error']}")
    status, headers, body = result["answer"]
    n.event(st, took, f"{status} with {len(body)} bytes after {took:.2f}s")
    problem = bookinfo.page_problem(status, headers, body)
    if problem:
        raise StepFailed("request", problem)
    if "scaled" not in seen:
        dep = api.apps.read_namespaced_deployment(TARGET, ns)
        if not dep.spec.replicas:
            raise StepFailed("request", f"the page came back but {TARGET} was not woken")
    n.detail(f"the page is complete: '{bookinfo.DETAILS_MARK}' and the reviews are on it, nothing degraded")


def _productpage_routes_to_activator(pg: Playground) -> bool:
    """productpage's sidecar (the caller of details) routes details to the activator."""
    api = pg.api
    assert api is not None
    admins = mesh.sidecar_admins(api, pg.namespace, "app=productpage")
    host = f"details.{pg.namespace}.svc.cluster.local"
    return bool(admins) and all(mesh.routes_to_activator(a, host) for a in admins)


def keep(pg: Playground, n: Narrator) -> None:
    """Prints how to look around, then waits for Ctrl-C, reporting a process that exits meanwhile."""
    assert pg.info is not None and pg.activator is not None and pg.controller is not None
    kc = pg.info.admin_kubeconfig
    ns = pg.namespace
    n.say()
    n.say("Everything keeps running. Try:")
    for line in (
        f"gateway      {pg.gateway_url}/productpage",
        f"kubeconfig   {kc}",
        f"logs         {pg.logs_dir}",
        "",
        f"export KUBECONFIG={kc}",
        f"kubectl -n {ns} get elastiservices,deployments",
        f"kubectl -n {ns} scale deployment {TARGET} --replicas=0",
        f"kubectl -n {ns} get virtualservice details -o yaml",
        f"curl -s {pg.gateway_url}/productpage | grep -c '{bookinfo.DETAILS_MARK}'",
        f"kubectl -n {ns} scale deployment reviews-v2 --replicas=0   # one version of three asleep",
        f"curl -s {pg.activator.admin_url}/metrics | grep ^elasti_",
        f"curl -s {pg.info.gateway_admin}/stats/prometheus | grep envoy_cluster_upstream_rq_total",
        f"curl -s {pg.info.istiod}/debug/syncz",
    ):
        n.say("  " + line if line else "")
    n.say("Ctrl-C stops everything.")
    reported: set[str] = set()
    while True:
        for proc in pg.procs():
            if not proc.alive() and proc.name not in reported:
                reported.add(proc.name)
                n.say(f"{proc.name} exited; see {proc.log_path}")
        for name, ok in pg.cluster.component_status().items():
            if not ok and name not in reported:
                reported.add(name)
                n.say(f"{name} is not running; see {pg.logs_dir / (name + '.log')}")
        time.sleep(1)


@contextlib.contextmanager
def _interrupt_on_termination() -> Iterator[None]:
    """SIGTERM and SIGHUP end the demo like Ctrl-C does: everything is stopped first."""

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _done(missing: str) -> tuple[bool, str]:
    return not missing, missing


def _flag(ok: bool, otherwise: str) -> tuple[bool, str]:
    return ok, "" if ok else otherwise


def _scaled_to_zero(pg: Playground) -> tuple[bool, str]:
    assert pg.api is not None
    pods = pg.api.core.list_namespaced_pod(pg.namespace, label_selector="app=details").items
    if pods:
        return False, f"{len(pods)} details pod(s) still terminating"
    phase = bookinfo.phase(pg.api, pg.namespace, "details")
    return phase == "ScaledToZero", f"ElastiService details: {phase}"


def _pending(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return int(json.loads(resp.read()).get("pending") or 0)
    except (OSError, ValueError):
        return 0
