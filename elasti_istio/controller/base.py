"""What the parts of the reconciler share: the clients, the configuration, the indexes, and one memory
record per ElastiService (:mod:`memory`), with the lock that makes a reconcile, a wake and a sleep of
one ElastiService run one after the other."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

import aiohttp

from elasti_istio import routekey, vsrewrite
from elasti_istio.controller import decide, metrics
from elasti_istio.controller.config import ControllerConfig
from elasti_istio.controller.events import Recorder
from elasti_istio.controller.indexes import Indexes, Key, split_key
from elasti_istio.controller.memory import Memories
from elasti_istio.controller.ratelimit import TokenBucket
from elasti_istio.kube import Kube
from elasti_istio.resources import GROUP

log = logging.getLogger("elasti.controller")

FINALIZER = f"{GROUP}/finalizer"
MANAGED_LABEL = f"{GROUP}/elastiservice"
# Before routes go back to a woken target: how often its Service's EndpointSlices are looked at, and
# for how long at most (seconds).
ENDPOINTS_POLL = decide.ENDPOINTS_POLL
ENDPOINTS_WAIT = 10.0
# After a deleted ElastiService's routes are restored: how long its origin Service stays for the
# forwards of requests the activators released (seconds).
ORIGIN_GRACE = 2.0


class Base:
    """The state every part of :class:`~elasti_istio.controller.reconciler.Reconciler` works with."""

    def __init__(self, kube: Kube, cfg: ControllerConfig, indexes: Indexes, recorder: Recorder) -> None:
        self.kube = kube
        self.cfg = cfg
        self.idx = indexes
        self.recorder = recorder
        self.activator = vsrewrite.ActivatorRef(cfg.activator_host, cfg.activator_port)
        self.route_keys = routekey.KeyFile(cfg.route_key_file) if cfg.route_key_file else None
        self.activator_available: tuple[bool, str, str] = (True, "NotChecked", "")
        self.mem = Memories()
        # Wired by the operator: the work queue's ``add``, and the pod watches' ready-pod counts.
        self.requeue: Callable[[Key], None] = lambda key: None
        self.pod_ready: Mapping[Key, int] = {}
        self.endpoints_forbidden = False
        self._http: aiohttp.ClientSession | None = None
        self.fail_open_bucket = TokenBucket(cfg.fail_open_wakes_per_second, cfg.fail_open_burst)

    @property
    def activator_available(self) -> tuple[bool, str, str]:
        """(available, reason, message) of the activator as the routes see it: not while the route key
        is configured but not loaded yet, since the activator would refuse an unsigned route."""
        keys = self.route_keys
        if keys is not None and not keys.keys:
            return (
                False,
                "RouteKeyMissing",
                f"the route key ({keys.path}) is not loaded yet: routes stay in serve mode and sleeping targets "
                "are woken (fail open)",
            )
        return self._activator_available

    @activator_available.setter
    def activator_available(self, state: tuple[bool, str, str]) -> None:
        self._activator_available = state

    def lock(self, key: Key) -> asyncio.Lock:
        """One writer per ElastiService at a time (never two different ones): a reconcile, a wake and a
        sleep of it run one after the other, and each reads what it decides on after taking the lock, so
        no decision comes from reads older than the last write another one made."""
        return self.mem[key].lock

    def saw_target_event(self, key: Key, when: float) -> None:
        """A target event the next switch answers (the switch latency metric starts here)."""
        rec = self.mem[key]
        if rec.event_time is None:
            rec.event_time = when

    def saw_scale_to_zero(self, key: Key) -> None:
        """A watch event showed the target going to 0 replicas just now: the next reconcile switches first."""
        self.mem[key].went_to_zero = True

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession()
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    def forget(self, key: Key) -> None:
        ns, name = split_key(key)
        for rival in self.idx.drop_claims(key):
            self.requeue(rival)  # its Conflict is over
        self.idx.forget_es(key)
        self.mem.forget(key)
        metrics.forget(ns, name)
