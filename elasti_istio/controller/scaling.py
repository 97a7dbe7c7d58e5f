"""Scaling the target, and KEDA around it: a wake scales to minTargetReplicas (never down); a
ScaledObject paused by its owner is left alone; the controller's own pauses of KEDA (at zero for its own
scale-down, at the woken count for a wake hold) are marked as its own and removed by it."""

from __future__ import annotations

import datetime as dt
from typing import Any

from elasti_istio.controller import conditions as C
from elasti_istio.controller.base import Base, log
from elasti_istio.controller.workloads import WORKLOAD_RESOURCES
from elasti_istio.controller.world import (
    HOLD_UNTIL,
    KEDA_PAUSED,
    KEDA_PAUSED_REPLICAS,
    PAUSED_BY_US,
    Resolved,
    keda_owner_pause,
)
from elasti_istio.kube import KubeError
from elasti_istio.resources import SCALEDOBJECTS


class Scaling(Base):
    """Part of :class:`~elasti_istio.controller.reconciler.Reconciler`."""

    async def scale_up(self, es: dict[str, Any], r: Resolved, reason: str, why: str) -> bool:
        """Scales the target to minTargetReplicas (never down); True when a scale call was made.

        A ScaledObject its owner paused below that (KEDA's pause: maintenance, or keeping a workload off)
        is left as it is and the target is not scaled (False; the ``WakeFailed`` condition says why)."""
        spec = r.spec
        key = spec.key
        if self.owner_paused(r):
            return False
        await self.unpause_keda(r)
        res = WORKLOAD_RESOURCES[r.workload_kind]
        if r.scaled_object is not None and r.state.at_zero:
            await self.hold_keda(r)
        name = r.state.name
        try:
            scale = await self.kube.get(res, name, spec.namespace, sub="scale")
            current = int((scale.get("spec") or {}).get("replicas") or 0)
            if current >= spec.min_replicas:
                return False
            await self.kube.patch(res, name, {"spec": {"replicas": spec.min_replicas}}, spec.namespace, sub="scale")
        except KubeError as exc:
            if exc.status < 500:  # refused, not a passing server failure
                msg = f"scaling {r.workload_kind} {name} to {spec.min_replicas} was refused: {exc.message}"
                self.mem[key].wake_failure = ("ScaleRefused", msg)
            raise
        rec = self.mem[key]
        rec.wake_failure, rec.waking, rec.last_wake = None, True, C.now_iso()
        self.recorder.emit(
            es, "Normal", reason, f"{why}: {r.workload_kind} {name} scaled {current} -> {spec.min_replicas}"
        )
        log.info("%s: %s: %s %s scaled %d -> %d", key, reason, r.workload_kind, name, current, spec.min_replicas)
        return True

    def owner_paused(self, r: Resolved) -> str | None:
        """Why the target may not be woken: its ScaledObject paused by its owner below minTargetReplicas
        (recorded as the wake's failure); None when it may."""
        owner_pause = keda_owner_pause(r.scaled_object)
        if owner_pause is None or r.state.replicas >= r.spec.min_replicas:
            return None
        so_name = ((r.scaled_object or {}).get("metadata") or {}).get("name", "")
        msg = (
            f"ScaledObject {so_name} is paused by its owner ({owner_pause}): {r.workload_kind} {r.state.name} "
            "is not woken and held requests are answered 503; remove the pause to let traffic wake it"
        )
        self.mem[r.spec.key].wake_failure = ("PausedByOwner", msg)
        return msg

    async def unpause_keda(self, r: Resolved) -> None:
        """Removes the KEDA pause annotations this controller set, so KEDA resumes from the woken count."""
        so = r.scaled_object
        if so is None:
            return
        ann = (so.get("metadata") or {}).get("annotations") or {}
        if PAUSED_BY_US not in ann:
            return
        patch = {
            "metadata": {
                "annotations": {KEDA_PAUSED_REPLICAS: None, KEDA_PAUSED: None, PAUSED_BY_US: None, HOLD_UNTIL: None}
            }
        }
        await self.kube.patch(SCALEDOBJECTS, so["metadata"]["name"], patch, r.spec.namespace)
        log.info("%s: removed the KEDA pause from ScaledObject %s", r.spec.key, so["metadata"]["name"])

    async def hold_keda(self, r: Resolved) -> None:
        """KEDA owns 1 -> 0 (``minReplicaCount: 0``): right after a wake its metrics are still empty and it
        would scale the target back to zero. Pause it at the woken count for ``wakeHoldSeconds``; the
        deadline lives on the ScaledObject so a restarted controller still lifts it."""
        so = r.scaled_object
        if so is None or int((so.get("spec") or {}).get("minReplicaCount") or 0) > 0:
            return
        if r.spec.wake_hold_seconds <= 0 or keda_owner_pause(so) is not None:
            return
        until = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=r.spec.wake_hold_seconds)
        patch = {
            "metadata": {
                "annotations": {
                    KEDA_PAUSED_REPLICAS: str(r.spec.min_replicas),
                    PAUSED_BY_US: "wake-hold",
                    HOLD_UNTIL: until.strftime("%Y-%m-%dT%H:%M:%SZ"),
                }
            }
        }
        await self.kube.patch(SCALEDOBJECTS, so["metadata"]["name"], patch, r.spec.namespace)
        log.info(
            "%s: ScaledObject %s paused at %d for %gs after the wake",
            r.spec.key,
            so["metadata"]["name"],
            r.spec.min_replicas,
            r.spec.wake_hold_seconds,
        )

    async def pause_keda_at_zero(self, r: Resolved) -> None:
        """elasti owns 1 -> 0 (``minReplicaCount`` >= 1): before its own scale-down it pauses KEDA at 0,
        which KEDA documents as pinning the target there; the wake removes the pause."""
        so = r.scaled_object
        if so is None or int((so.get("spec") or {}).get("minReplicaCount") or 0) == 0:
            return
        if keda_owner_pause(so) is not None:
            return  # the owner's pause is theirs: never rewritten, never removed
        patch = {"metadata": {"annotations": {KEDA_PAUSED_REPLICAS: "0", PAUSED_BY_US: "sleep", HOLD_UNTIL: None}}}
        await self.kube.patch(SCALEDOBJECTS, so["metadata"]["name"], patch, r.spec.namespace)
