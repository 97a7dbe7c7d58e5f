"""Leader election with a coordination.k8s.io/v1 Lease, as client-go's leaderelection does it.

Only the leader reconciles and serves wakes; the others keep their watches warm and take over when
the Lease has not been renewed for its duration. "Not renewed" is judged on this replica's own clock,
from when it last saw the Lease record change, never by comparing its clock with the holder's
``renewTime``: clocks that disagree by more than the lease would otherwise make two leaders.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable

from elasti_istio.kube import Kube, KubeError
from elasti_istio.resources import LEASES

log = logging.getLogger("elasti.leader")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _fmt(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str,
        identity: str,
        lease_seconds: float = 15.0,
        on_change: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kube = kube
        self.clock = clock
        self._observed: tuple[object, ...] | None = None  # the Lease record as last seen
        self._observed_at = 0.0  # when (``clock``) it was last seen to change
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_seconds = lease_seconds
        self.renew_every = max(0.5, lease_seconds / 3)
        self.on_change = on_change
        self.leader = False

    def _set(self, leader: bool) -> None:
        if leader != self.leader:
            self.leader = leader
            log.info("%s leadership of Lease %s/%s", "acquired" if leader else "lost", self.namespace, self.name)
            if self.on_change:
                self.on_change(leader)

    async def try_acquire_or_renew(self) -> bool:
        now = _now()
        lease = await self.kube.get_or_none(LEASES, self.name, self.namespace)
        spec_new = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.lease_seconds)),
            "renewTime": _fmt(now),
        }
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": dict(spec_new, acquireTime=_fmt(now), leaseTransitions=0),
            }
            try:
                await self.kube.create(LEASES, body, self.namespace)
                return True
            except KubeError as exc:
                if exc.status == 409:
                    return False
                raise
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        fields = ("holderIdentity", "renewTime", "acquireTime", "leaseTransitions", "leaseDurationSeconds")
        record = tuple(spec.get(k) for k in fields)
        if record != self._observed:
            self._observed, self._observed_at = record, self.clock()
        duration = float(spec.get("leaseDurationSeconds") or self.lease_seconds)
        expired = self.clock() - self._observed_at > duration
        if holder and holder != self.identity and not expired:
            return False
        new_spec = dict(spec, **spec_new)
        if holder != self.identity:
            new_spec["acquireTime"] = _fmt(now)
            new_spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
        body = dict(lease, spec=new_spec)
        try:
            await self.kube.replace(LEASES, self.name, body, self.namespace)
            return True
        except KubeError as exc:
            if exc.status == 409:
                return False
            raise

    async def run(self) -> None:
        last_renew = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                ok = await self.try_acquire_or_renew()
                if ok:
                    last_renew = loop.time()
                self._set(ok or (self.leader and loop.time() - last_renew < self.lease_seconds * 2 / 3))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("lease %s/%s: %s", self.namespace, self.name, exc)
                if self.leader and loop.time() - last_renew >= self.lease_seconds * 2 / 3:
                    self._set(False)
            await asyncio.sleep(self.renew_every if self.leader else min(self.renew_every, 1.0))

    async def release(self) -> None:
        """Hands the Lease back on shutdown so that another replica takes over at once."""
        if not self.leader:
            return
        try:
            lease = await self.kube.get_or_none(LEASES, self.name, self.namespace)
            if lease and (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                spec = dict(lease["spec"], holderIdentity="", leaseDurationSeconds=1)
                await self.kube.replace(LEASES, self.name, dict(lease, spec=spec), self.namespace)
        except (KubeError, OSError) as exc:
            log.warning("could not release the Lease: %s", exc)
        self._set(False)
