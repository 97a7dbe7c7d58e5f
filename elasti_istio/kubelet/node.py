"""One simulated node: binds pending Pods, runs their apps on their pod addresses, reports their status.

Only Pods bound to this node are handled (a Pod naming another node is left alone, as a kubelet
would). A Pod's containers serve on ``podIP:containerPort`` after its startup delay; then the Pod is
reported Running and Ready, and the real ReplicaSet, Deployment and EndpointSlice controllers do
the rest. On deletion the app stops taking connections, in-flight requests finish within the grace
period, and the Pod is deleted for good.

What a container runs: a Bookinfo stand-in for ``examples-bookinfo-*`` images, the generic test app
for any other image (gRPC with health, reflection and an echo service on ports named ``grpc*``), or
— for a Pod annotated ``elasti.truefoundry.com/sim-forward`` — a TCP forwarder to a local process.
A Pod annotated ``elasti.truefoundry.com/sim-readiness-url`` is Ready exactly while that URL answers
(polled every ``readiness_interval`` seconds; see :meth:`Kubelet.probe` for the schemes).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
import urllib.parse
from typing import Any, NamedTuple

import aiohttp
import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

from elasti_istio.kube import Kube, KubeError
from elasti_istio.kube.informer import Informer
from elasti_istio.kubelet.apps import Caller, PodIdentity, generic_app, inflight
from elasti_istio.kubelet.bookinfo import bookinfo_app, bookinfo_kind
from elasti_istio.kubelet.forward import TcpForwarder, parse_forward
from elasti_istio.kubelet.grpcapp import GrpcApp, is_grpc_port
from elasti_istio.kubelet.ipam import PodAddresses
from elasti_istio.kubelet.sidecar import ANN_SIDECAR_ADDRESS, Sidecar, SidecarConfig, namespace_labels, wants_sidecar
from elasti_istio.localcluster.podnet import NetnsSockets
from elasti_istio.resources import ANN_SIM_FORWARD, ANN_SIM_READINESS_URL, ANN_SIM_STARTUP, NODES, PODS

log = logging.getLogger("elasti.kubelet")


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ContainerPort(NamedTuple):
    container: str
    port: int
    name: str  # the port's name ("" when unnamed)


def container_ports(pod: dict[str, Any]) -> list[ContainerPort]:
    out = []
    for c in pod.get("spec", {}).get("containers", []):
        for p in c.get("ports") or []:
            if (p.get("protocol") or "TCP") == "TCP" and p.get("containerPort"):
                out.append(ContainerPort(c["name"], int(p["containerPort"]), str(p.get("name") or "")))
    return out


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """Literal ``env`` values of a container (``valueFrom`` is not resolved)."""
    return {e["name"]: str(e.get("value", "")) for e in container.get("env") or [] if "name" in e and "value" in e}


def prestop_seconds(pod: dict[str, Any]) -> float:
    """The longest ``sleep`` among the containers' preStop hooks: an ``exec`` of ``sleep N`` (directly or
    through ``sh -c``), or the ``sleep`` action of newer Kubernetes versions."""
    longest = 0.0
    for c in (pod.get("spec") or {}).get("containers") or []:
        hook = ((c.get("lifecycle") or {}).get("preStop")) or {}
        seconds = None
        if isinstance(hook.get("sleep"), dict):
            seconds = hook["sleep"].get("seconds")
        elif isinstance(hook.get("exec"), dict):
            words = " ".join(str(w) for w in hook["exec"].get("command") or []).split()
            if "sleep" in words and words.index("sleep") + 1 < len(words):
                seconds = words[words.index("sleep") + 1]
        try:
            longest = max(longest, float(seconds)) if seconds is not None else longest
        except ValueError:
            continue
    return longest


class PodRuntime:
    """The life of one Pod on this node, driven by the latest object seen for it."""

    def __init__(self, kubelet: Kubelet, pod: dict[str, Any]) -> None:
        self.kubelet = kubelet
        self.latest = pod
        meta = pod["metadata"]
        self.uid: str = meta["uid"]
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.ip: str | None = None
        self.runners: list[web.AppRunner] = []
        self.forwarders: list[TcpForwarder] = []
        # gRPC apps with the forwarder from the pod address; apart from `forwarders`, as their
        # connections are pooled HTTP/2 ones that the server itself closes on stop.
        self.grpc_apps: list[tuple[GrpcApp, TcpForwarder]] = []
        self.ready: bool | None = None
        self.readiness: asyncio.Task[None] | None = None
        self.sidecar: Sidecar | None = None
        self.changed = asyncio.Event()
        self.gone = False
        self.task: asyncio.Task[None] | None = None

    @property
    def deleting(self) -> bool:
        return self.gone or bool(self.latest["metadata"].get("deletionTimestamp"))

    def startup_seconds(self) -> float:
        raw = (self.latest["metadata"].get("annotations") or {}).get(ANN_SIM_STARTUP)
        try:
            return max(0.0, float(raw)) if raw is not None else self.kubelet.startup_seconds
        except ValueError:
            log.warning("%s/%s: bad %s %r, using the default", self.namespace, self.name, ANN_SIM_STARTUP, raw)
            return self.kubelet.startup_seconds

    def annotation(self, name: str) -> str | None:
        return (self.latest["metadata"].get("annotations") or {}).get(name)

    async def run(self) -> None:
        kl = self.kubelet
        try:
            status = self.latest.get("status") or {}
            restarted = status.get("podIP") and kl.addresses.claim(status["podIP"])
            self.ip = status["podIP"] if restarted else kl.addresses.allocate()
            if not self.deleting:
                if not restarted:
                    await self.patch_status(ready=False, running=False)
                    await self._wait_or_deleted(self.startup_seconds())
                if not self.deleting:
                    self.sidecar = await kl.sidecar_for(self.latest, self.ip)
                    await self.start_apps()
                    live = self.sidecar is None or await self.sidecar.start()
                    if not live:
                        log.error("%s/%s: stays unready: its sidecar is not live", self.namespace, self.name)
                    elif self.annotation(ANN_SIM_READINESS_URL):
                        self.readiness = asyncio.create_task(self._readiness_loop())
                    else:
                        self.ready = True
                        await self.patch_status(ready=True)
            while not self.deleting:
                self.changed.clear()
                await self.changed.wait()
            await self._stop_readiness()
            await self.terminate()
        except asyncio.CancelledError:
            await self._stop_readiness()
            await self.stop_apps(0)
            raise
        except Exception:
            log.exception("%s/%s: pod runtime failed", self.namespace, self.name)
            await self._stop_readiness()
            await self.stop_apps(0)
        finally:
            kl.addresses.release(self.ip)
            kl.pods.pop(self.uid, None)

    async def _stop_readiness(self) -> None:
        if self.readiness is not None:
            self.readiness.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.readiness
            self.readiness = None

    async def _readiness_loop(self) -> None:
        """Ready exactly while the annotated URL answers (:meth:`Kubelet.probe`); both transitions are reported."""
        while not self.deleting:
            url = self.annotation(ANN_SIM_READINESS_URL)
            ok = True if not url else await self.kubelet.probe(url)
            if ok != self.ready and not self.deleting:
                log.info("%s/%s: readiness %s (%s)", self.namespace, self.name, "passed" if ok else "failed", url)
                self.ready = ok
                await self.patch_status(ready=ok)
            await asyncio.sleep(self.kubelet.readiness_interval)

    async def _wait_or_deleted(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not self.deleting:
            left = deadline - loop.time()
            if left <= 0:
                return
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)

    def _app(self, container: dict[str, Any], port: int) -> web.Application:
        assert self.ip is not None
        kl = self.kubelet
        ident = PodIdentity(self.namespace, self.name, self.ip, port, container["name"])
        kind = bookinfo_kind(container.get("image") or "")
        sidecar = self.sidecar.address if self.sidecar is not None else None
        if kind is not None:
            return bookinfo_app(kind, ident, container_env(container), sidecar, kl.app_timeout)
        return generic_app(ident, Caller(ident, sidecar, kl.app_timeout))

    async def _start_forwarders(self, spec: str) -> None:
        assert self.ip is not None
        ports = [p.port for p in container_ports(self.latest)]
        try:
            targets = parse_forward(spec, ports)
        except ValueError as exc:
            log.error("%s/%s: bad %s: %s", self.namespace, self.name, ANN_SIM_FORWARD, exc)
            return
        for port in ports:
            target = targets.get(port)
            if target is None:
                continue
            fwd = TcpForwarder(self.ip, port, target, self.kubelet.sockets)
            try:
                await fwd.start()
            except OSError as exc:
                log.error("%s/%s: cannot listen on %s:%s: %s", self.namespace, self.name, self.ip, port, exc)
                continue
            self.forwarders.append(fwd)
        log.info("%s/%s: forwarding %s", self.namespace, self.name, {p: f"{h}:{tp}" for p, (h, tp) in targets.items()})

    async def start_apps(self) -> None:
        assert self.ip is not None
        forward = self.annotation(ANN_SIM_FORWARD)
        if forward:
            await self._start_forwarders(forward)
            return
        containers = {c["name"]: c for c in self.latest.get("spec", {}).get("containers", [])}
        for container, port, name in container_ports(self.latest):
            spec = containers[container]
            if is_grpc_port(name) and bookinfo_kind(spec.get("image") or "") is None:
                await self._start_grpc(spec, port)
                continue
            app = self._app(spec, port)
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=30, handler_cancellation=True)
            await runner.setup()
            try:
                sock = await asyncio.to_thread(self.kubelet.sockets.listen, self.ip, port)
                site = web.SockSite(runner, sock)
                await site.start()
            except OSError as exc:
                log.error("%s/%s: cannot listen on %s:%s: %s", self.namespace, self.name, self.ip, port, exc)
                await runner.cleanup()
                continue
            self.runners.append(runner)
        log.info(
            "%s/%s: serving on %s ports %s",
            self.namespace,
            self.name,
            self.ip,
            [p.port for p in container_ports(self.latest)],
        )

    async def _start_grpc(self, container: dict[str, Any], port: int) -> None:
        """The gRPC app on a loopback port of the kubelet's own network (gRPC binds by address and
        cannot take a socket made in the pod network), reached from ``podIP:port`` through a forwarder."""
        assert self.ip is not None
        app = GrpcApp(PodIdentity(self.namespace, self.name, self.ip, port, container["name"]))
        try:
            bound = await app.start("127.0.0.1", 0)
        except (OSError, RuntimeError) as exc:
            log.error("%s/%s: cannot start the gRPC app of port %s: %s", self.namespace, self.name, port, exc)
            await app.stop(None)
            return
        fwd = TcpForwarder(self.ip, port, ("127.0.0.1", bound), self.kubelet.sockets)
        try:
            await fwd.start()
        except OSError as exc:
            log.error("%s/%s: cannot listen on %s:%s: %s", self.namespace, self.name, self.ip, port, exc)
            await app.stop(None)
            return
        self.grpc_apps.append((app, fwd))

    async def stop_apps(self, grace: float) -> None:
        runners, self.runners = self.runners, []
        forwarders, self.forwarders = self.forwarders, []
        grpc_apps, self.grpc_apps = self.grpc_apps, []
        for runner in runners:
            # Closes the listening sockets first (no new connections), then waits for handlers.
            for site in list(runner.sites):
                with contextlib.suppress(Exception):
                    await site.stop()
        for fwd in forwarders:
            fwd.stop_accepting()
        for _app, fwd in grpc_apps:
            fwd.stop_accepting()
        # A gRPC server's stop sends GOAWAY and lets the calls in flight finish within the grace.
        await asyncio.gather(
            _wait_idle(runners, forwarders, grace),
            *(app.stop(grace) for app, _fwd in grpc_apps),
            return_exceptions=True,
        )
        for runner in runners:
            with contextlib.suppress(Exception):
                await runner.cleanup()
        for fwd in [*forwarders, *(f for _app, f in grpc_apps)]:
            with contextlib.suppress(Exception):
                await fwd.close()
        sidecar, self.sidecar = self.sidecar, None
        if sidecar is not None:  # after the apps, as Istio stops the proxy last
            await sidecar.stop()

    async def terminate(self) -> None:
        grace = self.latest["metadata"].get("deletionGracePeriodSeconds")
        grace = 30.0 if grace is None else float(grace)
        # As a kubelet runs a preStop hook before it signals the containers, the apps keep serving
        # through a `sleep` preStop (the usual way to let routes converge before a pod stops).
        pause = min(prestop_seconds(self.latest), grace)
        if pause > 0:
            log.info("%s/%s: preStop: serving %.1fs more before stopping", self.namespace, self.name, pause)
            await asyncio.sleep(pause)
        await self.stop_apps(max(0.0, grace - pause))
        log.info("%s/%s: stopped", self.namespace, self.name)
        if not self.gone:
            with contextlib.suppress(KubeError):
                await self.kubelet.kube.request(
                    "DELETE",
                    PODS.path(self.namespace, self.name),
                    body={
                        "kind": "DeleteOptions",
                        "apiVersion": "v1",
                        "gracePeriodSeconds": 0,
                        "preconditions": {"uid": self.uid},
                    },
                )

    async def patch_status(self, *, ready: bool, running: bool = True) -> None:
        """``running``: containers started (a running pod may be unready while its readiness probe fails)."""
        running = running or ready
        t = now()
        rd = "True" if ready else "False"
        conds = [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": t},
            {"type": "Initialized", "status": "True", "lastTransitionTime": t},
            {"type": "ContainersReady", "status": rd, "lastTransitionTime": t},
            {"type": "Ready", "status": rd, "lastTransitionTime": t},
        ]
        containers = [
            {
                "name": c["name"],
                "image": c.get("image", ""),
                "imageID": "",
                "ready": ready,
                "started": running,
                "restartCount": 0,
                "state": {"running": {"startedAt": t}} if running else {"waiting": {"reason": "ContainerCreating"}},
            }
            for c in self.latest["spec"].get("containers", [])
        ]
        status = {
            "phase": "Running" if running else "Pending",
            "hostIP": "127.0.0.1",
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "conditions": conds,
            "containerStatuses": containers,
            "startTime": self.latest.get("status", {}).get("startTime") or t,
        }
        sent = time.time()
        written = await self.kubelet.retry(
            lambda: self.kubelet.kube.patch(PODS, self.name, {"status": status}, self.namespace, sub="status"),
            f"status of {self.namespace}/{self.name}",
            stop=lambda: self.deleting,
        )
        if ready and written is not None:
            # Conditions carry whole seconds only; benchmarks read the moment the Pod turned Ready from here.
            log.info("%s/%s: Ready written at %.6f (sent %.6f)", self.namespace, self.name, time.time(), sent)


async def _wait_idle(runners: list[web.AppRunner], forwarders: list[TcpForwarder], grace: float) -> None:
    """Waits until no request or forwarded connection is in flight, at most ``grace`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while loop.time() < deadline and (any(inflight(r.app) for r in runners) or any(f.inflight() for f in forwarders)):
        await asyncio.sleep(0.05)


class Kubelet:
    def __init__(
        self,
        kube: Kube,
        node_name: str,
        pod_cidr: str,
        startup_seconds: float = 1.0,
        *,
        app_timeout: float = 30.0,
        readiness_interval: float = 0.15,
        netns: str | None = None,
        sidecars: SidecarConfig | None = None,
    ) -> None:
        self.kube = kube
        self.sockets = NetnsSockets(netns)
        self.sidecars = sidecars
        self.node_name = node_name
        self.addresses = PodAddresses(pod_cidr)
        self.startup_seconds = startup_seconds
        self.app_timeout = app_timeout
        self.readiness_interval = readiness_interval
        self._probe_session: aiohttp.ClientSession | None = None
        self.pods: dict[str, PodRuntime] = {}
        self._binding: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.informer = Informer(kube, PODS, self.on_pod, relist_seconds=120, name="pods")

    async def sidecar_for(self, pod: dict[str, Any], ip: str) -> Sidecar | None:
        """The pod's Istio sidecar when it asks for one (not started yet); its address is written on the pod."""
        if self.sidecars is None:
            return None
        meta = pod["metadata"]
        if not wants_sidecar(pod, await namespace_labels(self.kube, meta["namespace"])):
            return None
        sidecar = Sidecar(self.sidecars, self.kube, pod, ip)
        patch = {"metadata": {"annotations": {ANN_SIDECAR_ADDRESS: sidecar.address}}}
        await self.retry(
            lambda: self.kube.patch(PODS, meta["name"], patch, meta["namespace"]),
            f"annotating {meta['namespace']}/{meta['name']} with its sidecar address",
        )
        return sidecar

    async def retry(self, fn: Any, what: str, stop: Any = None, attempts: int = 20) -> Any:
        delay = 0.1
        for i in range(attempts):
            try:
                return await fn()
            except KubeError as exc:
                if exc.not_found or (stop is not None and stop()) or i == attempts - 1:
                    log.debug("%s: giving up (%s)", what, exc)
                    return None
                log.warning("%s failed (%s); retrying", what, exc)
            except OSError as exc:
                log.warning("%s failed (%s); retrying", what, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5)
        return None

    async def probe(self, url: str) -> bool:
        """One readiness probe, passed when within a second ``http(s)://...`` answers 200, ``grpc://host:port/svc``
        answers SERVING to the standard health check of ``svc`` (empty: the whole server), or ``tcp://host:port``
        accepts a connection. The last two are for ports that do not answer an HTTP GET, such as gRPC ones."""
        scheme = urllib.parse.urlsplit(url).scheme
        if scheme == "grpc":
            return await self._probe_grpc(url)
        if scheme == "tcp":
            return await self._probe_tcp(url)
        if self._probe_session is None or self._probe_session.closed:
            self._probe_session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=1.0), cookie_jar=aiohttp.DummyCookieJar()
            )
        try:
            async with self._probe_session.get(url, allow_redirects=False) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return False

    async def _probe_grpc(self, url: str) -> bool:
        parts = urllib.parse.urlsplit(url)
        try:
            async with grpc.aio.insecure_channel(parts.netloc) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=parts.path.strip("/")), timeout=1.0
                )
        except (grpc.RpcError, ValueError):
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def _probe_tcp(self, url: str) -> bool:
        parts = urllib.parse.urlsplit(url)
        try:
            if parts.hostname is None or parts.port is None:
                return False
            _reader, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, parts.port), 1.0)
        except (OSError, TimeoutError, ValueError):
            return False
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        return True

    async def register_node(self) -> None:
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.node_name,
                "labels": {
                    "kubernetes.io/hostname": self.node_name,
                    "kubernetes.io/os": "linux",
                    "elasti.truefoundry.com/simulated": "true",
                },
            },
        }
        try:
            await self.kube.create(NODES, node)
        except KubeError as exc:
            if exc.status != 409:
                raise
        t = now()
        status = {
            "capacity": {"cpu": "64", "memory": "256Gi", "pods": "1000"},
            "allocatable": {"cpu": "64", "memory": "256Gi", "pods": "1000"},
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.node_name},
            ],
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "elasti-istio kubelet stand-in",
                    "lastHeartbeatTime": t,
                    "lastTransitionTime": t,
                }
            ],
            "nodeInfo": {
                "kubeletVersion": "v1.20.2-elasti-sim",
                "kubeProxyVersion": "",
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
                "kernelVersion": "",
                "osImage": "",
                "containerRuntimeVersion": "sim://1",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }
        await self.kube.patch(NODES, self.node_name, {"status": status}, sub="status")

    async def on_pod(self, etype: str, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        if etype == "DELETED":
            rt = self.pods.get(uid)
            if rt is not None:
                rt.gone = True
                rt.changed.set()
            return
        node = pod.get("spec", {}).get("nodeName")
        if not node:
            if not meta.get("deletionTimestamp") and uid not in self._binding:
                self._binding.add(uid)
                task = asyncio.create_task(self.bind(pod))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return
        if node != self.node_name:
            return
        rt = self.pods.get(uid)
        if rt is None:
            if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                return
            rt = PodRuntime(self, pod)
            self.pods[uid] = rt
            rt.task = asyncio.create_task(rt.run(), name=f"pod-{meta['namespace']}/{meta['name']}")
        else:
            rt.latest = pod
            rt.changed.set()

    async def bind(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name},
        }

        async def create() -> None:
            try:
                await self.kube.create(PODS, body, meta["namespace"], name=meta["name"], sub="binding")
            except KubeError as exc:
                if exc.status != 409:  # 409: already bound
                    raise

        try:
            await self.retry(create, f"binding {meta['namespace']}/{meta['name']}")
        finally:
            self._binding.discard(meta["uid"])

    async def run(self) -> None:
        await self.retry(self.register_node, "node registration", attempts=50)
        self.informer.start()
        await asyncio.Event().wait()

    async def shutdown(self) -> None:
        await self.informer.stop()
        tasks = [rt.task for rt in self.pods.values() if rt.task]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._probe_session is not None:
            await self._probe_session.close()
