"""A stand-in for KEDA's operator that acts on ScaledObjects the way KEDA documents it.

- ``autoscaling.keda.sh/paused-replicas: "<n>"``: paused; the target is scaled to n and kept there.
- ``autoscaling.keda.sh/paused: "true"``: paused at the current count; nothing is done.
- otherwise: the target follows the trigger's activity between ``minReplicaCount`` (default 0) and
  ``maxReplicaCount`` (default 100): 0 when inactive and minReplicaCount is 0, at least 1 when
  active. The stand-in's "metric" is the ScaledObject annotation ``keda-standin/active`` (true/false),
  since there is no real trigger source here.
"""

from __future__ import annotations

import threading
from typing import Any

from kubernetes.client.exceptions import ApiException

from tests.conftest import K8s

ACTIVE = "keda-standin/active"


class KedaStandIn:
    def __init__(self, k8s: K8s, namespace: str, interval: float = 0.2) -> None:
        self.k8s, self.namespace, self.interval = k8s, namespace, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.actions: list[tuple[str, int]] = []  # (ScaledObject, replicas set) in order

    def __enter__(self) -> KedaStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except ApiException:
                pass

    def tick(self) -> None:
        sos = self.k8s.custom.list_namespaced_custom_object(  # type: ignore[attr-defined]
            "keda.sh", "v1alpha1", self.namespace, "scaledobjects"
        )["items"]
        for so in sos:
            self.act(so)

    def act(self, so: dict[str, Any]) -> None:
        ann = so["metadata"].get("annotations") or {}
        spec = so["spec"]
        target = spec["scaleTargetRef"]["name"]
        current = self.k8s.apps.read_namespaced_deployment_scale(target, self.namespace).spec.replicas or 0  # type: ignore
        if "autoscaling.keda.sh/paused-replicas" in ann:
            desired = int(ann["autoscaling.keda.sh/paused-replicas"])
        elif ann.get("autoscaling.keda.sh/paused") == "true":
            return
        else:
            lo, hi = int(spec.get("minReplicaCount", 0)), int(spec.get("maxReplicaCount", 100))
            active = ann.get(ACTIVE, "false") == "true"
            desired = max(lo, 1) if active else lo
            desired = min(max(desired, current if active else desired), hi)
        if desired != current:
            self.k8s.apps.patch_namespaced_deployment_scale(  # type: ignore[attr-defined]
                target, self.namespace, {"spec": {"replicas": desired}}
            )
            self.actions.append((so["metadata"]["name"], desired))
