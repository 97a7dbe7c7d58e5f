"""Watches the pods of targets waking from zero, to learn of their first ready pod directly.

A workload's ``status.readyReplicas`` reaches the controller only after Kubernetes' ReplicaSet and
Deployment controllers have each seen the pod and written a status (several milliseconds, more on a
busy control plane), while the endpoints the mesh routes to follow the pod itself. Held requests
wait for that whole chain; a pod watch scoped to one waking target cuts it short. One watch per
target between "replicas > 0, none ready" and the workload reporting a ready replica, at most
``limit`` at a time (beyond that, the workload's own status is the signal, as without this).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from elasti_istio.controller.workloads import pod_is_ready, pod_of_target
from elasti_istio.kube import Kube
from elasti_istio.kube.informer import Informer
from elasti_istio.resources import PODS

log = logging.getLogger(__name__)


class ReadyPods:
    def __init__(self, kube: Kube, limit: int, on_change: Callable[[str, int, int], None]) -> None:
        """``on_change(key, before, now)`` is called when the count of a target's ready pods changes."""
        self.kube = kube
        self.limit = limit
        self.on_change = on_change
        self.ready: dict[str, int] = {}  # ready pods of each watched target, as last seen
        self._watches: dict[str, tuple[tuple[str, str, str, str], Informer]] = {}

    def want(self, key: str, namespace: str, kind: str, name: str, selector: str) -> None:
        """Watches the target's pods (again, if what identifies them changed); a no-op at the limit."""
        ident = (namespace, kind, name, selector)
        current = self._watches.get(key)
        if current is not None:
            if current[0] == ident:
                return
            self.drop(key)
        if len(self._watches) >= self.limit:
            log.debug("%s: %d pod watches open already; waiting for %s %s's own status", key, self.limit, kind, name)
            return
        inf = Informer(
            self.kube,
            PODS,
            lambda _etype, _obj: self._count(key),
            namespace=namespace,
            label_selector=selector,
            relist_seconds=120,
            watch_timeout=60,
            name=f"pods-of-{key}",
        )
        self._watches[key] = (ident, inf)
        self.ready[key] = 0
        inf.start()

    def drop(self, key: str) -> None:
        entry = self._watches.pop(key, None)
        self.ready.pop(key, None)
        if entry is not None:
            entry[1].cancel()

    def drop_all(self) -> None:
        for key in list(self._watches):
            self.drop(key)

    def _count(self, key: str) -> None:
        entry = self._watches.get(key)
        if entry is None:
            return
        (_, kind, name, _), inf = entry
        now = sum(1 for pod in inf.store.values() if pod_of_target(pod, kind, name) and pod_is_ready(pod))
        before = self.ready.get(key, 0)
        if now != before:
            self.ready[key] = now
            self.on_change(key, before, now)
