"""The system under test: the playground (cluster with istiod and Envoy, elasti-system, activator,
controller, mesh client) plus the benchmark's workloads, a watch recorder with a timestamp per event
(and per istiod push to the activator's sidecar), and the kubelet's Ready clock.

Workloads in namespace ``bench`` (the generic test app, one replica each):
- ``cold``: taken to zero and woken again for the cold-start and switch figures;
- ``burst``: the same with a longer startup delay, so that a whole burst is held before it wakes;
- ``web``: an ElastiService that stays in serve mode (warm path; late traffic for the activator);
- ``plain``: no ElastiService (the warm path's baseline).
``web`` and ``plain`` are also routed from the ingress gateway (``<name>.bench.example``).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import multiprocessing
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from elasti_istio.kube import Kube, load_connection
from elasti_istio.playground.bookinfo import proxied
from elasti_istio.playground.manifests import Api
from elasti_istio.playground.workloads import web_app
from elasti_istio.resources import DEPLOYMENTS, ELASTISERVICES, ENDPOINTSLICES_V1, PODS, VIRTUALSERVICES

NS = "bench"
GROUP, VERSION = "elasti.truefoundry.com", "v1alpha1"
APP_PATH = "/status/200"  # the generic app's smallest answer
READY_LINE = re.compile(r"(\S+)/(\S+): Ready written at ([\d.]+) \(sent ([\d.]+)\)")


GATEWAY = "bench-gateway"


def workload(name: str, *, elastiservice: bool, startup: float | None = None, queue_limit: int = 1000) -> list[dict]:
    docs = web_app(
        name,
        elastiservice=elastiservice,
        startup_seconds=startup,
        queue_limit=queue_limit,
        hold_timeout="120s",
        image="bench/httpbin",
    )
    if name in ("web", "plain"):  # also reached through the ingress gateway (figure 5)
        vs = next(d for d in docs if d["kind"] == "VirtualService")
        vs["spec"]["hosts"] = [name, gateway_host(name)]
        vs["spec"]["gateways"] = ["mesh", GATEWAY]
    return docs


def gateway_host(name: str) -> str:
    return f"{name}.{NS}.example"


def gateway() -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "Gateway",
        "metadata": {"name": GATEWAY},
        "spec": {
            "selector": {"istio": "ingressgateway"},
            "servers": [{"port": {"number": 80, "name": "http", "protocol": "HTTP"}, "hosts": [f"*.{NS}.example"]}],
        },
    }


def authority(name: str) -> str:
    return f"{name}.{NS}.svc.cluster.local"


# ---- watch recorder --------------------------------------------------------------------------------
@dataclass
class Seen:
    t: float  # wall clock when the event was read
    kind: str
    name: str
    etype: str
    obj: dict[str, Any]


WATCHED = (
    (DEPLOYMENTS, "Deployment"),
    (VIRTUALSERVICES, "VirtualService"),
    (PODS, "Pod"),
    (ELASTISERVICES, "ElastiService"),
    (ENDPOINTSLICES_V1, "EndpointSlice"),
)


@dataclass
class Recorder:
    """Watches Deployments, VirtualServices, Pods, ElastiServices and EndpointSlices of ``bench``, each
    event timed, in a process of its own: the measuring client must not share an interpreter (GIL,
    garbage collector) with the decoding of the very events that arrive while it waits for an answer.
    Events stay there until asked for."""

    kubeconfig: Path
    istiod: str = ""
    _proc: multiprocessing.process.BaseProcess | None = None
    _conn: Connection | None = None

    def start(self) -> Recorder:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_record, args=(str(self.kubeconfig), self.istiod, child), name="watch-recorder", daemon=True
        )
        self._proc.start()
        child.close()
        self._conn = parent
        if not parent.poll(60):
            raise RuntimeError("watch recorder did not start")
        status = parent.recv()
        if status != "ready":
            raise RuntimeError(f"watch recorder did not start ({status})")
        return self

    def stop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.send(("stop",))
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()
            self._proc = None

    def since(self, t0: float, kind: str, name_prefix: str) -> list[Seen]:
        assert self._conn is not None, "the recorder is not running"
        self._conn.send(("since", t0, kind, name_prefix))
        if not self._conn.poll(60):
            raise RuntimeError("watch recorder did not answer")
        return list(self._conn.recv())

    def first(self, t0: float, kind: str, name: str, pred: Callable[[dict[str, Any]], bool]) -> float | None:
        for e in self.since(t0, kind, name):
            if (kind in ("Pod", "EndpointSlice", "EDSPush") or e.name == name) and pred(e.obj):
                return e.t
        return None


EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"


def _sent_time(value: str) -> float:
    """istiod's RFC 3339 ``sentTime`` (nanoseconds) as a Unix time."""
    import datetime as dt

    head, _, frac = value.rstrip("Z").partition(".")
    base = dt.datetime.fromisoformat(head).replace(tzinfo=dt.UTC).timestamp()
    return base + (float("0." + frac) if frac else 0.0)


def _record(kubeconfig: str, istiod: str, conn: Connection) -> None:
    """The recorder process: one watch per kind and istiod's pushes of endpoints to the activator's sidecar
    (``/debug/syncz``, polled every 10 ms: an ``EDSPush`` at istiod's own ``sentTime``), answering
    ``since`` queries from the pipe."""
    loop = asyncio.new_event_loop()
    events: list[Seen] = []
    try:
        kube = Kube(load_connection(kubeconfig), user_agent="elasti-bench")
    except Exception as exc:
        conn.send(f"error: {exc!r}")
        return
    started = 0

    async def watch(res: Any, kind: str) -> None:
        nonlocal started
        listed = await kube.list(res, NS)
        rv = listed["metadata"]["resourceVersion"]
        started += 1
        if started == len(WATCHED):
            conn.send("ready")
        while True:
            try:
                async for etype, obj in kube.watch(res, NS, resource_version=rv, timeout_seconds=290):
                    t = time.time()
                    rv = obj.get("metadata", {}).get("resourceVersion", rv)
                    if etype != "BOOKMARK":
                        events.append(Seen(t, kind, obj["metadata"]["name"], etype, obj))
            except asyncio.CancelledError:
                raise
            except Exception:
                rv = (await kube.list(res, NS))["metadata"]["resourceVersion"]

    def on_request() -> None:
        try:
            req = conn.recv()
        except (EOFError, OSError):
            req = ("stop",)
        if req[0] == "since":
            _, t0, kind, prefix = req
            conn.send([e for e in events if e.t >= t0 and e.kind == kind and e.name.startswith(prefix)])
            return
        loop.remove_reader(conn.fileno())  # the parent closes its end next: no second "stop"
        loop.stop()

    async def eds_pushes() -> None:
        import aiohttp

        seen: dict[str, str] = {}
        url = f"{istiod}/debug/syncz?namespace=elasti-system"
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    async with session.get(url) as resp:
                        entries = await resp.json(content_type=None)
                    for e in entries or []:
                        eds = ((e.get("resources") or {}).get(EDS)) or {}
                        sent, when = eds.get("sent"), eds.get("sentTime")
                        if sent and when and seen.get(e["proxy"]) != sent:
                            seen[e["proxy"]] = sent
                            events.append(Seen(_sent_time(when), "EDSPush", e["proxy"], "PUSH", eds))
                except (aiohttp.ClientError, ValueError, OSError):
                    pass
                await asyncio.sleep(0.01)

    tasks = [loop.create_task(watch(res, kind)) for res, kind in WATCHED]
    if istiod:
        tasks.append(loop.create_task(eds_pushes()))
    loop.add_reader(conn.fileno(), on_request)
    try:
        loop.run_forever()
    finally:
        loop.remove_reader(conn.fileno())
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))  # the watches end
        loop.run_until_complete(kube.close())
        loop.close()


def deployment_ready(dep: dict[str, Any]) -> bool:
    return ((dep.get("status") or {}).get("readyReplicas") or 0) >= 1


def vs_proxied(vs: dict[str, Any]) -> bool:
    return proxied(vs.get("spec") or {})


def es_ready(es: dict[str, Any]) -> bool:
    return ((es.get("status") or {}).get("readyReplicas") or 0) >= 1


def slice_ready(eps: dict[str, Any]) -> bool:
    return any((ep.get("conditions") or {}).get("ready") for ep in eps.get("endpoints") or [])


# ---- the kubelet's Ready clock -------------------------------------------------------------------
def ready_times(kubelet_log: Path) -> list[tuple[str, str, float, float]]:
    """(namespace, pod, acknowledged, sent) for every "Ready written" line of the kubelet stand-in."""
    out = []
    for line in kubelet_log.read_text(errors="replace").splitlines():
        m = READY_LINE.search(line)
        if m:
            out.append((m.group(1), m.group(2), float(m.group(3)), float(m.group(4))))
    return out


def pod_ready_after(kubelet_log: Path, prefix: str, t0: float, timeout: float = 10) -> tuple[str, float, float]:
    """The first pod named ``prefix-*`` in ``bench`` written Ready after ``t0``: (name, acknowledged, sent)."""
    deadline = time.monotonic() + timeout
    while True:
        for ns, pod, ack, sent in ready_times(kubelet_log):
            if ns == NS and pod.startswith(prefix + "-") and sent >= t0:
                return pod, ack, sent
        if time.monotonic() > deadline:
            raise RuntimeError(f"no Ready line for {prefix} after {t0} in {kubelet_log}")
        time.sleep(0.05)


# ---- cluster helpers -------------------------------------------------------------------------------
class Bench:
    """What the figures do to the cluster, through the admin client."""

    def __init__(self, api: Api) -> None:
        self.api = api

    def es(self, name: str) -> dict[str, Any]:
        return dict(self.api.custom.get_namespaced_custom_object(GROUP, VERSION, NS, "elastiservices", name))

    def vs(self, name: str) -> dict[str, Any]:
        return dict(
            self.api.custom.get_namespaced_custom_object("networking.istio.io", "v1beta1", NS, "virtualservices", name)
        )

    def scale(self, name: str, replicas: int) -> float:
        """Sets ``spec.replicas``; the wall-clock time the API server acknowledged it."""
        self.api.apps.patch_namespaced_deployment_scale(name, NS, {"spec": {"replicas": replicas}})
        return time.time()

    def pods(self, name: str) -> list[Any]:
        return list(self.api.core.list_namespaced_pod(NS, label_selector=f"app={name}").items)

    def serving(self, name: str) -> bool:
        st = self.es(name).get("status") or {}
        dep = self.api.apps.read_namespaced_deployment(name, NS)
        return (
            st.get("phase") == "Serving"
            and st.get("mode") == "serve"
            and (dep.status.ready_replicas or 0) >= 1
            and not vs_proxied(self.vs(name))
        )

    def asleep(self, name: str) -> bool:
        """At zero, routed to the activator, and no pod left (a clean start for the next wake)."""
        st = self.es(name).get("status") or {}
        return (
            st.get("mode") == "proxy"
            and (st.get("readyReplicas") or 0) == 0
            and vs_proxied(self.vs(name))
            and not self.pods(name)
        )


def until(probe: Callable[[], object], what: str, timeout: float = 90, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            if probe():
                return
        except Exception as exc:
            last = exc
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}" + (f" ({last!r})" if last else ""))


def sidecar_get(outbound: str, target: str, timeout: float = 120) -> tuple[int, dict[str, str], bytes, float]:
    """One GET through the mesh client's sidecar (its listener for the target's port) on a fresh connection;
    (status, headers, body, t_complete)."""
    conn = http.client.HTTPConnection(outbound.removeprefix("http://"), timeout=timeout)
    try:
        conn.request("GET", target)
        resp = conn.getresponse()
        body = resp.read()
        done = time.time()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body, done
    finally:
        conn.close()


def gateway_status(gateway_url: str, host: str) -> int:
    """The status of one GET of the app's smallest answer through the ingress gateway for ``host``."""
    conn = http.client.HTTPConnection(gateway_url.removeprefix("http://"), timeout=10)
    try:
        conn.request("GET", APP_PATH, headers={"Host": host})
        resp = conn.getresponse()
        resp.read()
        return int(resp.status)
    finally:
        conn.close()


GRPC_PORT = 9090


def grpc_workload(name: str, *, queue_limit: int = 1000) -> list[dict[str, Any]]:
    """The generic app serving the gRPC echo service (``elasti.echo.v1.Echo``) on a container port named
    ``grpc``, its Service (port ``grpc``), a mesh VirtualService to that port and an ElastiService."""
    labels = {"app": name}
    container = {"name": "app", "image": "bench/echo", "ports": [{"name": "grpc", "containerPort": GRPC_PORT}]}
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name},
            "spec": {"selector": labels, "ports": [{"name": "grpc", "port": GRPC_PORT, "targetPort": GRPC_PORT}]},
        },
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": name},
            "spec": {
                "hosts": [name],
                "http": [{"route": [{"destination": {"host": name, "port": {"number": GRPC_PORT}}}]}],
            },
        },
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ElastiService",
            "metadata": {"name": name},
            "spec": {
                "service": name,
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                "virtualServices": [name],
                "minTargetReplicas": 1,
                "activator": {"holdTimeout": "120s", "retryInterval": "100ms", "queueLimit": queue_limit},
            },
        },
    ]


def grpc_unary(
    address: str,
    authority: str | None,
    message: str,
    metadata: tuple[tuple[str, str], ...] = (),
    timeout: float = 120,
) -> tuple[Any, str, dict[str, Any], float]:
    """One unary ``elasti.echo.v1.Echo/Unary`` call with grpcio on a channel (and connection) of its own,
    naming ``authority`` (default: the address): (status code, the answer's message or the error's
    details, initial metadata, t_complete)."""
    import grpc

    from elasti_istio.kubelet import grpcecho

    options: list[tuple[str, Any]] = [("grpc.use_local_subchannel_pool", 1)]
    if authority:
        options.append(("grpc.default_authority", authority))
    channel = grpc.insecure_channel(address, options=options)
    try:
        resp, call = grpcecho.stub(channel).Unary.with_call(
            grpcecho.EchoRequest(message=message), metadata=metadata, timeout=timeout
        )
        done = time.time()
        return call.code(), resp.message, dict(call.initial_metadata()), done
    except grpc.RpcError as exc:
        return exc.code(), exc.details(), dict(exc.initial_metadata() or ()), time.time()  # type: ignore[attr-defined]
    finally:
        channel.close()
