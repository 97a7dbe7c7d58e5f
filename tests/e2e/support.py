"""What the end-to-end scenarios share: a generic app with its ElastiService, and clients that never retry.

Every request goes through the real mesh: the mesh client's Envoy sidecar, at the target's port, in
absolute-URI form, as an application pod's sidecar carries it (``GET http://web.<ns>.svc.cluster.local/...``).
"""

from __future__ import annotations

import http.client
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from elasti_istio.playground import mesh as meshview
from elasti_istio.playground.bookinfo import proxied
from elasti_istio.playground.manifests import Api
from elasti_istio.playground.workloads import web_app as web_app
from tests.helpers import wait_for

GROUP, VERSION = "elasti.truefoundry.com", "v1alpha1"
COLD = "x-elasti-cold-start"


def url(namespace: str, path: str, service: str = "web", port: int | None = None) -> str:
    authority = f"{service}.{namespace}.svc.cluster.local" + (f":{port}" if port else "")
    return f"http://{authority}{path}"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def cold(self) -> bool:
        return self.headers.get(COLD) == "true"

    def __repr__(self) -> str:
        # The headers say which hop answered (Envoy's own replies carry no x-envoy-upstream-service-time).
        return f"Answer({self.status}, {self.body[:200]!r}, headers={self.headers})"


class Sidecar:
    """Requests through the mesh client's sidecar; each on a fresh connection unless one is passed.

    The sidecar listens on its address at each service port: a request goes to the listener of its
    target's port.
    """

    def __init__(self, address: str) -> None:
        self.address = address

    def connection(self, timeout: float = 60, port: int = 80) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.address, port, timeout=timeout)

    def request(
        self,
        method: str,
        target: str,
        body: bytes | Iterable[bytes] | None = None,
        headers: dict[str, str] | None = None,
        *,
        conn: http.client.HTTPConnection | None = None,
        timeout: float = 60,
        chunked: bool = False,
    ) -> Answer:
        own = conn is None
        c = conn or self.connection(timeout, urllib.parse.urlsplit(target).port or 80)
        try:
            c.request(method, target, body=body, headers=headers or {}, encode_chunked=chunked)
            resp = c.getresponse()
            return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            if own:
                c.close()

    def get(self, target: str, **kw: Any) -> Answer:
        return self.request("GET", target, **kw)


def in_threads(calls: dict[str, Callable[[], Answer]], timeout: float = 90) -> dict[str, Answer | BaseException]:
    """Runs the calls at the same time; each result or the exception it raised."""
    results: dict[str, Answer | BaseException] = {}

    def run(key: str, fn: Callable[[], Answer]) -> None:
        try:
            results[key] = fn()
        except BaseException as exc:
            results[key] = exc

    threads = [threading.Thread(target=run, args=(k, f), daemon=True) for k, f in calls.items()]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return results


# ---- reading the cluster ----------------------------------------------------------------------------


def vs_spec(api: Api, ns: str, name: str) -> dict[str, Any]:
    vs = api.custom.get_namespaced_custom_object("networking.istio.io", "v1beta1", ns, "virtualservices", name)
    return dict(vs["spec"])


def es_status(api: Api, ns: str, name: str) -> dict[str, Any]:
    es = api.custom.get_namespaced_custom_object(GROUP, VERSION, ns, "elastiservices", name)
    return dict(es.get("status") or {})


def phase(api: Api, ns: str, name: str) -> str | None:
    return es_status(api, ns, name).get("phase")


def replicas(api: Api, ns: str, name: str, kind: str = "Deployment") -> tuple[int, int]:
    """(spec.replicas, status.readyReplicas)."""
    obj = (
        api.apps.read_namespaced_stateful_set(name, ns)
        if kind == "StatefulSet"
        else api.apps.read_namespaced_deployment(name, ns)
    )
    return int(obj.spec.replicas or 0), int(obj.status.ready_replicas or 0)


def scale(api: Api, ns: str, name: str, n: int, kind: str = "Deployment") -> None:
    """A direct change of spec.replicas through the scale subresource, as KEDA or a person makes it."""
    body = {"spec": {"replicas": n}}
    if kind == "StatefulSet":
        api.apps.patch_namespaced_stateful_set_scale(name, ns, body)
    else:
        api.apps.patch_namespaced_deployment_scale(name, ns, body)


def until(probe: Callable[[], Any], what: str, timeout: float = 45) -> Any:
    return wait_for(probe, timeout, what, interval=0.05)


# The Envoys whose routes the scenarios wait for (set by the e2e fixture: the mesh client's sidecar).
# A VirtualService written is not yet a route applied: istiod pushes it after its debounce.
ENVOYS: list[str] = []


def envoys_route(api: Api, ns: str, vs: str, to_activator: bool, admins: list[str] | None = None) -> bool:
    """Every watched Envoy routes the VirtualService's hosts to the activator (or nowhere near it)."""
    hosts = [h if "." in h else f"{h}.{ns}.svc.cluster.local" for h in vs_spec(api, ns, vs).get("hosts") or []]
    return all(
        meshview.routes_to_activator(admin, host) == to_activator for admin in (admins or ENVOYS) for host in hosts
    )


def mesh_serves(api: Api, ns: str, vs: str = "web", admins: list[str] | None = None) -> bool:
    """Every watched Envoy routes the VirtualService's hosts to the workload (not to the activator) and has
    a healthy endpoint for each cluster it routes them to."""
    hosts = [h if "." in h else f"{h}.{ns}.svc.cluster.local" for h in vs_spec(api, ns, vs).get("hosts") or []]
    for admin in admins or ENVOYS:
        healthy = meshview.healthy_hosts(admin)
        for host in hosts:
            clusters = meshview.routed_clusters(admin, host)
            if not clusters or any("|elasti-activator." in c or healthy.get(c, 0) == 0 for c in clusters):
                return False
    return True


def serving(api: Api, ns: str, name: str = "web", vs: str | None = None) -> dict[str, Any]:
    """Waits for phase Serving with the routes on the Service; returns the VirtualService spec."""
    until(lambda: phase(api, ns, name) == "Serving", f"{ns}/{name} Serving")

    def routes() -> dict[str, Any] | None:
        spec = vs_spec(api, ns, vs or name)
        return None if proxied(spec) else spec

    spec = dict(until(routes, "serve-mode routes"))
    until(lambda: mesh_serves(api, ns, vs or name), "the mesh to route to the workload's endpoints")
    return spec


def to_zero(
    api: Api,
    ns: str,
    target: str = "web",
    *,
    es: str | None = None,
    vs: str | None = None,
    kind: str = "Deployment",
    envoys: list[str] | None = None,
) -> None:
    """Scales ``target`` to 0 and waits until the routes go to the activator, in the VirtualService and in
    the Envoys (``envoys``, by default the mesh client's sidecar), and no replica is left."""
    es = es or target
    vs = vs or es
    scale(api, ns, target, 0, kind)
    until(lambda: proxied(vs_spec(api, ns, vs)), f"{ns}/{vs} routed to the activator")
    until(lambda: phase(api, ns, es) == "ScaledToZero", f"{ns}/{es} ScaledToZero")
    until(lambda: envoys_route(api, ns, vs, True, envoys), f"the mesh to route {ns}/{vs} to the activator")


class RouteWatch:
    """Watches one Envoy's view of a host every few milliseconds, in a thread, and keeps each moment its
    routes sent traffic to a workload cluster with no healthy endpoint ("no healthy upstream" for a
    request arriving then). A poll can miss a moment shorter than its interval, so an empty result
    proves nothing alone; a non-empty one is a window Envoy really had."""

    def __init__(self, admin: str, host: str) -> None:
        self.admin, self.host = admin, host
        self.dead_ends: list[tuple[float, frozenset[str]]] = []
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RouteWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                clusters = meshview.routed_clusters(self.admin, self.host) or set()
                healthy = meshview.healthy_hosts(self.admin)
            except OSError:
                continue
            self.polls += 1
            empty = frozenset(c for c in clusters if "|elasti-activator." not in c and healthy.get(c, 0) == 0)
            if empty:
                self.dead_ends.append((time.monotonic(), empty))
            time.sleep(0.002)


class SteadyLoad:
    """``rate`` requests a second through the mesh client's sidecar, each on its own thread and connection
    (never retried), until stopped or ``limit`` are sent; every answer is kept with the time it was sent."""

    def __init__(self, sidecar: Sidecar, ns: str, rate: float = 20, limit: int = 600) -> None:
        self.sidecar, self.ns, self.rate, self.limit = sidecar, ns, rate, limit
        self.results: list[tuple[float, int | str, bool, Answer | None]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._senders: list[threading.Thread] = []
        self._loader = threading.Thread(target=self._load, daemon=True)

    def __enter__(self) -> SteadyLoad:
        self._loader.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._loader.join(5)
        deadline = time.monotonic() + 60
        for th in list(self._senders):
            th.join(max(0.1, deadline - time.monotonic()))

    @property
    def sent(self) -> int:
        return len(self._senders)

    def _one(self, i: int) -> None:
        t = time.monotonic()
        ans: Answer | None = None
        try:
            ans = self.sidecar.get(url(self.ns, f"/steady/{i}"), timeout=60)
            status: int | str = ans.status if ans.status == 200 else f"{ans.status} {ans.body[:100]!r}"
            cold = ans.cold
        except Exception as exc:
            status, cold = f"{type(exc).__name__}: {exc}", False
        with self._lock:
            self.results.append((t, status, cold, ans))

    def _load(self) -> None:
        start = time.monotonic()
        for i in range(self.limit):
            if self._stop.is_set():
                return
            time.sleep(max(0.0, start + i / self.rate - time.monotonic()))
            th = threading.Thread(target=self._one, args=(i,), daemon=True)
            self._senders.append(th)
            th.start()

    def held(self) -> int:
        """How many answers so far were held by the activator (cold starts)."""
        with self._lock:
            return sum(1 for r in self.results if r[2])

    def any_cold(self) -> bool:
        return self.held() > 0


def mesh_no_endpoint(ans: Answer | None) -> bool:
    """The mesh's own answer for a route whose Service has no endpoint: Envoy picked no host, so no
    workload saw the request."""
    return (
        ans is not None
        and ans.status == 503
        and ans.body == b"no healthy upstream"
        and "x-envoy-upstream-service-time" not in ans.headers
    )
