"""Wires the controller together: kopf watches feed the indexes and the work queue; the reconciler,
wake server, metrics server, activator watch and leader election run beside kopf on one event loop.

kopf watches third-party objects (workloads, VirtualServices, DestinationRules, Services,
ScaledObjects) only through ``on.event`` handlers, which keep no state on them: users' objects are
never annotated by the operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from typing import Any

import aiohttp
import kopf
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from elasti_istio import routekey
from elasti_istio.controller import bootstrap, metrics
from elasti_istio.controller.bindings import BindingCheck
from elasti_istio.controller.config import ControllerConfig
from elasti_istio.controller.events import Recorder
from elasti_istio.controller.indexes import Indexes, es_key, split_key
from elasti_istio.controller.kopfrunner import KopfRunner
from elasti_istio.controller.leader import LeaderElector
from elasti_istio.controller.podwatch import ReadyPods
from elasti_istio.controller.reconciler import Reconciler
from elasti_istio.controller.waker import Waker
from elasti_istio.controller.workloads import selector_string
from elasti_istio.controller.workqueue import WorkQueue
from elasti_istio.kube import Kube, KubeConnection, load_connection
from elasti_istio.kube.client import KubeError
from elasti_istio.kube.informer import Informer
from elasti_istio.resources import DEPLOYMENTS, GROUP, ROLLOUTS, SCALEDOBJECTS, VERSION, VIRTUALSERVICES

log = logging.getLogger("elasti.controller")

WORKLOADS = (
    ("apps", "v1", "deployments", "Deployment"),
    ("apps", "v1", "statefulsets", "StatefulSet"),
    ("apps", "v1", "replicasets", "ReplicaSet"),
    ("argoproj.io", "v1alpha1", "rollouts", "Rollout"),
)
# Watched only while their CRDs are installed: a watch of a missing resource makes kopf give up.
OPTIONAL = (ROLLOUTS, SCALEDOBJECTS)
API_CHECK_SECONDS = 15.0
# The activators that were waiting on a wake already know the target is ready and are sending its held
# requests; the status write meant for the others waits this long so that it does not compete with
# those first forwards for the API server (the EndpointSlice the mesh needs is written meanwhile).
STATUS_AFTER_ANSWERED_WAKES = 0.03


class Controller:
    def __init__(self, cfg: ControllerConfig, conn: KubeConnection | None = None) -> None:
        self.cfg = cfg
        self.conn = conn or load_connection(cfg.kubeconfig)
        self.kube = Kube(self.conn, user_agent="elasti-controller", limit=64)
        self.idx = Indexes()
        self.recorder = Recorder(self.kube, host=cfg.identity)
        self.reconciler = Reconciler(self.kube, cfg, self.idx, self.recorder)
        self.queue = WorkQueue(self._process, workers=cfg.workers)
        self.reconciler.requeue = self.queue.add
        self.bindings = BindingCheck(self.kube, self.recorder, self.idx, self.queue.enabled)
        self.waker = Waker(self.reconciler.wake, self.is_leader, cfg.wake_token_file, sleep=self._sleep)
        self.seeded = asyncio.Event()
        self.elector: LeaderElector | None = None
        if cfg.leader_election:
            self.elector = LeaderElector(
                self.kube,
                cfg.leader_election_namespace,
                cfg.leader_election_id,
                cfg.identity,
                cfg.lease_seconds,
                on_change=self._leadership,
            )
        self.activator_informer: Informer | None = None
        if cfg.activator_deployment:
            ans, aname = cfg.activator_deployment
            self.activator_informer = Informer(
                self.kube,
                DEPLOYMENTS,
                self._on_activator,
                namespace=ans,
                field_selector=f"metadata.name={aname}",
                relist_seconds=120,
                name="activator-deployment",
            )
        # Pod watches have a connection pool of their own: held watches never starve the other calls.
        self.pod_kube = Kube(self.conn, user_agent="elasti-controller", limit=max(1, cfg.pod_watches))
        self.pods = ReadyPods(self.pod_kube, cfg.pod_watches, self._pods_ready)
        self.reconciler.pod_ready = self.pods.ready
        self._background: set[asyncio.Task[None]] = set()
        self.stop_flag = asyncio.Event()
        self._replicas: dict[tuple[str, str, str], int] = {}  # spec.replicas of workloads, as last seen
        self._ready: dict[tuple[str, str, str], int] = {}  # status.readyReplicas of workloads, as last seen
        self._runners: list[web.AppRunner] = []
        self.kopf: KopfRunner | None = None
        self._watched_optional = frozenset(res.plural for res in OPTIONAL)

    # ---- state -------------------------------------------------------------------------------
    def is_leader(self) -> bool:
        return self.elector is None or self.elector.leader

    def ready(self) -> bool:
        return self.seeded.is_set() and self.is_leader()

    def _leadership(self, leader: bool) -> None:
        metrics.LEADER.set(1 if leader else 0)
        if leader and self.seeded.is_set():
            self.queue.enabled.set()
            for key in self.idx.all_es():
                self.queue.add(key)
        elif not leader:
            self.queue.enabled.clear()
            metrics.clear_state()
            self.pods.drop_all()

    async def _process(self, key: str) -> float | None:
        metrics.QUEUE_DEPTH.set(len(self.queue))
        return await self.reconciler.reconcile(key)

    def enqueue(self, keys: set[str] | list[str], *, target_event: bool = False) -> None:
        now = time.monotonic()
        for key in keys:
            if target_event:
                self.reconciler.saw_target_event(key, now)
            self.queue.add(key)

    async def _sleep(self, namespace: str, name: str) -> str:
        return await self.reconciler.sleep(namespace, name, "ScaledToZeroOnRequest", "asked to sleep (POST /v1/sleep)")

    async def idle_loop(self) -> None:
        """Evaluates idle triggers on an interval, one ElastiService at a time (bounded load on Prometheus)."""
        while True:
            await asyncio.sleep(self.cfg.idle_check_interval)
            if not (self.seeded.is_set() and self.is_leader()):
                continue
            for key in sorted(self.idx.with_triggers()):
                try:
                    await self.reconciler.consider_idle(key)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("%s: idle check failed", key)

    async def route_key_loop(self) -> None:
        """A rotated route key: every ElastiService is reconciled, so VirtualServices in proxy mode carry
        tokens of the new key (the activator accepts every key in the file meanwhile)."""
        keys = self.reconciler.route_keys
        if keys is None:
            return
        while True:
            await asyncio.sleep(routekey.CHECK_EVERY)
            if keys.refresh() and self.seeded.is_set():
                log.info("route key changed: reconciling every ElastiService")
                self.enqueue(self.idx.all_es())

    # ---- events ------------------------------------------------------------------------------
    def on_es(self, etype: str | None, obj: dict[str, Any]) -> None:
        if etype == "DELETED":
            meta = obj.get("metadata") or {}
            gone = es_key(meta.get("namespace", ""), meta.get("name", ""))
            self.enqueue(self.idx.drop_claims(gone))  # the ElastiServices it was in conflict with
            self.bindings.es_gone(gone)
        key = self.idx.update_es(obj, deleted=etype == "DELETED")
        if etype != "DELETED":
            self.queue.add(key)

    def on_workload(self, kind: str, etype: str | None, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        ns, name = meta.get("namespace", ""), meta.get("name", "")
        if self.idx.update_workload(ns, kind, obj, deleted=etype == "DELETED"):
            self.enqueue(self.idx.by_namespace.get(ns, set()))
        keys = self.idx.for_target(ns, kind, name)
        wk = (ns, kind, name)
        replicas = None if etype == "DELETED" else (obj.get("spec") or {}).get("replicas")
        before = self._replicas.pop(wk, None)
        if replicas is not None:
            self._replicas[wk] = replicas
            if replicas == 0 and before:  # a scale to zero, just now: the next reconcile switches first
                for key in keys:
                    self.reconciler.saw_scale_to_zero(key)
        ready = 0 if etype == "DELETED" else int((obj.get("status") or {}).get("readyReplicas") or 0)
        was_ready = self._ready.pop(wk, 0)
        if etype != "DELETED":
            self._ready[wk] = ready
        if ready and not was_ready and replicas:  # a first ready replica, just now: release held requests first
            for key in keys:
                if not self.pods.ready.get(key):  # else the pod watch has released them already
                    self.release_now(key, ready)
        waking = etype != "DELETED" and replicas != 0 and not ready and self.is_leader() and not self.stop_flag.is_set()
        selector = selector_string((obj.get("spec") or {}).get("selector") or {}) if waking else None
        for key in keys:
            if selector and self.cfg.pod_watches > 0:
                self.pods.want(key, ns, kind, name, selector)
            else:
                self.pods.drop(key)
        self.enqueue(keys, target_event=True)

    def _pods_ready(self, key: str, before: int, now: int) -> None:
        if now and not before:
            self.release_now(key, now)
            # Its status write is an ElastiService event, so a reconcile follows; this one is for a write
            # that changed nothing, and comes after the burst of events a first ready pod causes.
            self.queue.add_after(key, 0.05)
        else:
            self.enqueue([key])

    def release_now(self, key: str, ready: int) -> None:
        """Tells the activators waiting on a wake at once, and writes the first ready replica to the
        ElastiService's status outside the work queue (where a reconcile of the same key in progress
        would delay it): the other activators release their held requests on it. When some activator
        was waiting, that write comes a moment later (:data:`STATUS_AFTER_ANSWERED_WAKES`)."""
        rec = self.reconciler.mem.peek(key)
        if not self.ready() or (rec is not None and rec.sleeping):
            return  # a scale-down is under way: this pod is about to stop (a wake after it finds the next one)
        answered = self.waker.ready(*split_key(key), ready)
        delay = STATUS_AFTER_ANSWERED_WAKES if answered else 0.0
        task = asyncio.create_task(self.reconciler.release_at_once(key, ready, delay), name=f"release-{key}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def on_vs(self, etype: str | None, obj: dict[str, Any]) -> None:
        self.enqueue(self.idx.update_vs(obj, deleted=etype == "DELETED"))
        self.bindings.saw(obj, deleted=etype == "DELETED")

    def on_dr(self, etype: str | None, obj: dict[str, Any]) -> None:
        """A DestinationRule applies to routes in its namespace, to its host's Service from anywhere, and
        from the root namespace to every namespace (Istio's lookup order)."""
        ns = (obj.get("metadata") or {}).get("namespace", "")
        self.idx.bump_routing(ns)
        if ns == self.cfg.istio_root_namespace:
            self.enqueue(self.idx.all_es())
            return
        keys = set(self.idx.by_namespace.get(ns, set()))
        keys |= {k for k in self.idx.all_es() if any(vns == ns for vns, _ in self.idx.bound_vs(k))}
        self.enqueue(keys)

    def on_service(self, etype: str | None, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        ns = meta.get("namespace", "")
        keys = self.idx.for_service(ns, meta.get("name", ""))
        for ref in meta.get("ownerReferences") or []:
            if ref.get("kind") == "ElastiService" and ref.get("apiVersion", "").startswith(GROUP):
                keys.add(es_key(ns, ref["name"]))
        self.enqueue(keys)

    def on_scaled_object(self, etype: str | None, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        self.enqueue(
            self.idx.for_target(meta.get("namespace", ""), "ScaledObject", meta.get("name", "")), target_event=True
        )

    def _on_activator(self, etype: str, obj: dict[str, Any]) -> None:
        self._update_activator(None if etype == "DELETED" else obj)

    def _update_activator(self, obj: dict[str, Any] | None) -> None:
        assert self.cfg.activator_deployment is not None
        ans, aname = self.cfg.activator_deployment
        if obj is None:
            state = (
                False,
                "ActivatorMissing",
                f"Deployment {ans}/{aname} not found: routes stay in serve mode and sleeping targets are "
                "woken (fail open)",
            )
        else:
            ready = int((obj.get("status") or {}).get("readyReplicas") or 0)
            if ready >= 1:
                state = (True, "ActivatorReady", f"Deployment {ans}/{aname} has {ready} ready replica(s)")
            else:
                state = (
                    False,
                    "ActivatorNotReady",
                    f"Deployment {ans}/{aname} has no ready replica: routes stay in serve mode and sleeping "
                    "targets are woken (fail open)",
                )
        if state[0] != self.reconciler.activator_available[0] or state[1] != self.reconciler.activator_available[1]:
            self.reconciler.activator_available = state
            if self.seeded.is_set():
                log.info("activator availability: %s", state[2])
                self.enqueue(self.idx.all_es())
        else:
            self.reconciler.activator_available = state

    # ---- kopf --------------------------------------------------------------------------------
    async def optional_served(self) -> frozenset[str]:
        return frozenset([res.plural for res in OPTIONAL if await self.kube.serves(res)])

    async def kopf_registry(self) -> kopf.OperatorRegistry:
        """Called before each start of kopf's watches."""
        served = await self.optional_served()
        for res in OPTIONAL:
            if res.plural not in served and res.plural in self._watched_optional:
                log.warning(
                    "%s/%s %s are not served (is the CRD installed?): not watched until they are",
                    res.group,
                    res.version,
                    res.plural,
                )
        self._watched_optional = served
        return self.registry(served)

    async def api_check_loop(self) -> None:
        """Starts kopf's watches again when an optional CRD (KEDA, Argo Rollouts) comes or goes."""
        while True:
            await asyncio.sleep(API_CHECK_SECONDS)
            try:
                served = await self.optional_served()
            except (TimeoutError, KubeError, OSError, aiohttp.ClientError) as exc:
                log.debug("API discovery failed: %s", exc)
                continue
            if served != self._watched_optional and self.kopf is not None:
                came = sorted(served - self._watched_optional)
                went = sorted(self._watched_optional - served)
                self.kopf.restart(f"served now: {came or '-'}; no longer served: {went or '-'}")

    def registry(self, optional: frozenset[str]) -> kopf.OperatorRegistry:
        """kopf runs on a loop of its own (kopfrunner); each handler hands its event to the
        controller's loop, where the indexes, the work queue and the pod watches live."""
        reg = kopf.OperatorRegistry()
        conn = self.conn
        loop = asyncio.get_running_loop()
        hand = loop.call_soon_threadsafe

        @kopf.on.login(registry=reg)
        def login(**_: Any) -> kopf.ConnectionInfo:
            return kopf.ConnectionInfo(
                server=conn.server,
                ca_path=conn.ca_file,
                insecure=conn.insecure,
                token=conn.bearer(),
                scheme="Bearer" if conn.bearer() else None,
                certificate_path=conn.cert_file,
                private_key_path=conn.key_file,
            )

        @kopf.on.event(GROUP, VERSION, "elastiservices", registry=reg)
        async def es_event(event: dict[str, Any], **_: Any) -> None:
            hand(self.on_es, event.get("type"), event["object"])

        for group, version, plural, kind in WORKLOADS:
            if plural == ROLLOUTS.plural and plural not in optional:
                continue

            async def workload_event(event: dict[str, Any], _kind: str = kind, **_: Any) -> None:
                hand(self.on_workload, _kind, event.get("type"), event["object"])

            kopf.on.event(group, version, plural, registry=reg, id=f"workload-{plural}")(workload_event)

        @kopf.on.event("networking.istio.io", "v1beta1", "virtualservices", registry=reg)
        async def vs_event(event: dict[str, Any], **_: Any) -> None:
            hand(self.on_vs, event.get("type"), event["object"])

        @kopf.on.event("networking.istio.io", "v1beta1", "destinationrules", registry=reg)
        async def dr_event(event: dict[str, Any], **_: Any) -> None:
            hand(self.on_dr, event.get("type"), event["object"])

        @kopf.on.event("", "v1", "services", registry=reg)
        async def service_event(event: dict[str, Any], **_: Any) -> None:
            hand(self.on_service, event.get("type"), event["object"])

        if SCALEDOBJECTS.plural in optional:

            @kopf.on.event(SCALEDOBJECTS.group, SCALEDOBJECTS.version, SCALEDOBJECTS.plural, registry=reg)
            async def so_event(event: dict[str, Any], **_: Any) -> None:
                hand(self.on_scaled_object, event.get("type"), event["object"])

        return reg

    def settings(self) -> kopf.OperatorSettings:
        s = kopf.OperatorSettings()
        s.posting.enabled = False  # Events are ours (events.py), never on users' objects
        s.scanning.disabled = True  # no need to list namespaces and CRDs (least privilege)
        s.peering.standalone = True  # high availability is the Lease's job
        s.watching.server_timeout = 300
        s.watching.client_timeout = 330
        s.watching.reconnect_backoff = 1.0
        s.networking.request_timeout = 30
        return s

    # ---- servers -----------------------------------------------------------------------------
    async def _metrics(self, _request: web.Request) -> web.Response:
        metrics.QUEUE_DEPTH.set(len(self.queue))
        return web.Response(body=generate_latest(metrics.REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, _request: web.Request) -> web.Response:
        if self.ready():
            return web.json_response({"status": "ready", "leader": self.is_leader()})
        why = "not the leader" if self.seeded.is_set() else "caches not filled yet"
        return web.json_response({"status": "not ready", "reason": why}, status=503)

    async def _serve(self, app: web.Application, host: str, port: int) -> None:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=5)
        await runner.setup()
        await web.TCPSite(runner, host, port, reuse_address=True).start()
        self._runners.append(runner)

    async def start_servers(self) -> None:
        admin = web.Application()
        admin.router.add_get("/metrics", self._metrics)
        admin.router.add_get("/healthz", self._healthz)
        admin.router.add_get("/readyz", self._readyz)
        await self._serve(admin, *self.cfg.metrics_listen)
        await self._serve(self.waker.app(), *self.cfg.wake_listen)
        log.info("wake endpoint on %s:%d, metrics on %s:%d", *self.cfg.wake_listen, *self.cfg.metrics_listen)

    # ---- run ---------------------------------------------------------------------------------
    async def seed(self) -> None:
        """Fills what a reconcile must know before it may restore anything: VirtualService bindings
        (a restore on an incomplete view would flap routes) and the activator's availability."""
        delay = 0.2
        while True:
            try:
                namespaces = list(self.cfg.namespaces) or [None]
                for ns in namespaces:
                    listed = await self.kube.list(VIRTUALSERVICES, ns)
                    for vs in listed.get("items") or []:
                        self.idx.update_vs(vs)
                if self.activator_informer is not None:
                    self.activator_informer.start()
                    await asyncio.wait_for(self.activator_informer.synced.wait(), 30)
                    ans, aname = self.cfg.activator_deployment  # type: ignore[misc]
                    self._update_activator(self.activator_informer.get(ans, aname))
                else:
                    self.reconciler.activator_available = (
                        True,
                        "CheckDisabled",
                        "fail-open check disabled (--activator-deployment none)",
                    )
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("initial listing failed (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)
        self.seeded.set()
        if self.elector is None:
            metrics.LEADER.set(1)  # without leader election every replica acts
        if self.is_leader():
            self.queue.enabled.set()
            self.enqueue(self.idx.all_es())

    async def run(self) -> None:
        await self.start_servers()
        self.queue.start()
        if threading.current_thread() is threading.main_thread():
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop_flag.set)
        tasks = [asyncio.create_task(self.seed(), name="seed")]
        if self.elector is not None:
            tasks.append(asyncio.create_task(self.elector.run(), name="leader-election"))
        tasks.append(asyncio.create_task(self.idle_loop(), name="idle-triggers"))
        tasks.append(asyncio.create_task(self.route_key_loop(), name="route-key"))
        tasks.append(asyncio.create_task(self.api_check_loop(), name="api-check"))
        if self.cfg.create_secrets:
            tasks.append(asyncio.create_task(bootstrap.run(self), name="secrets"))
        self.kopf = KopfRunner(self.kopf_registry, self.settings, namespaces=list(self.cfg.namespaces))
        self.kopf.start()
        try:
            await self.stop_flag.wait()
        finally:
            self.pods.drop_all()
            runners, self._runners = self._runners, []
            for runner in runners:
                with contextlib.suppress(Exception):
                    await runner.cleanup()
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            await self.kopf.stop()
            await self.shutdown()

    async def shutdown(self) -> None:
        self.queue.enabled.clear()
        await self.queue.stop()
        await self.bindings.stop()
        if self.activator_informer is not None:
            await self.activator_informer.stop()
        if self.elector is not None:
            await self.elector.release()
        await self.recorder.flush(2.0)
        await self.reconciler.close()
        for runner in self._runners:
            with contextlib.suppress(Exception):
                await runner.cleanup()
        await self.kube.close()
        await self.pod_kube.close()
