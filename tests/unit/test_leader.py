"""Leader election judges a Lease's expiry on this replica's own clock (from when it last saw the record
change), as client-go does: clock skew between replicas never makes two leaders."""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any

from elasti_istio.controller.leader import LeaderElector
from elasti_istio.kube import KubeError


class FakeLeases:
    """The Lease API of one object, with resourceVersion checks (the only fault here is the clocks)."""

    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.rv = 0

    async def get_or_none(self, res: Any, name: str, namespace: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.lease)

    async def create(self, res: Any, body: dict[str, Any], namespace: str) -> dict[str, Any]:
        if self.lease is not None:
            raise KubeError(409, "AlreadyExists", "exists")
        self.rv += 1
        self.lease = dict(body, metadata=dict(body["metadata"], resourceVersion=str(self.rv)))
        return copy.deepcopy(self.lease)

    async def replace(self, res: Any, name: str, body: dict[str, Any], namespace: str) -> dict[str, Any]:
        assert self.lease is not None
        if body["metadata"].get("resourceVersion") != self.lease["metadata"]["resourceVersion"]:
            raise KubeError(409, "Conflict", "changed")
        self.rv += 1
        self.lease = dict(body, metadata=dict(body["metadata"], resourceVersion=str(self.rv)))
        return copy.deepcopy(self.lease)

    def renew_as_holder(self, holder: str, clock_offset: dt.timedelta) -> None:
        """The holder, whose wall clock is ``clock_offset`` off, renews."""
        assert self.lease is not None
        now = dt.datetime.now(dt.UTC) + clock_offset
        self.rv += 1
        self.lease["spec"].update(holderIdentity=holder, renewTime=now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
        self.lease["metadata"]["resourceVersion"] = str(self.rv)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


async def test_a_holder_whose_clock_is_an_hour_behind_keeps_the_lease_while_it_renews() -> None:
    leases = FakeLeases()
    holder = LeaderElector(leases, "ns", "lease", "a", lease_seconds=15)  # type: ignore[arg-type]
    assert await holder.try_acquire_or_renew()
    clock = Clock()
    other = LeaderElector(leases, "ns", "lease", "b", lease_seconds=15, clock=clock)  # type: ignore[arg-type]
    for _ in range(5):
        leases.renew_as_holder("a", -dt.timedelta(hours=1))  # its renewTime looks an hour old here
        clock.t += 5
        assert not await other.try_acquire_or_renew(), "took over a Lease that is being renewed"
    assert leases.lease["spec"]["holderIdentity"] == "a"  # type: ignore[index]


async def test_a_holder_that_stops_renewing_is_replaced_after_the_lease_on_this_clock() -> None:
    leases = FakeLeases()
    holder = LeaderElector(leases, "ns", "lease", "a", lease_seconds=15)  # type: ignore[arg-type]
    assert await holder.try_acquire_or_renew()
    leases.renew_as_holder("a", dt.timedelta(hours=1))  # its clock is an hour ahead, then it dies
    clock = Clock()
    other = LeaderElector(leases, "ns", "lease", "b", lease_seconds=15, clock=clock)  # type: ignore[arg-type]
    assert not await other.try_acquire_or_renew()  # first sight: the full lease must pass here
    clock.t += 14
    assert not await other.try_acquire_or_renew()
    clock.t += 2
    assert await other.try_acquire_or_renew()
    assert leases.lease["spec"]["holderIdentity"] == "b"  # type: ignore[index]
