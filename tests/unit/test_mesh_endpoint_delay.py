"""Endpoints that go away reach the mesh's proxies later (as istiod debounces its pushes); new ones at once."""

from __future__ import annotations

import asyncio
from typing import Any

from elasti_istio.mesh.state import MeshState


def slice_(addresses: list[str], rv: str = "1") -> dict[str, Any]:
    return {
        "metadata": {
            "namespace": "ns",
            "name": "web-abc",
            "resourceVersion": rv,
            "labels": {"kubernetes.io/service-name": "web"},
        },
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses],
    }


def addresses(state: MeshState) -> list[str]:
    return [e.ip for e in state.endpoints("ns", "web", "http", None)]


async def test_removals_are_delayed_additions_are_not() -> None:
    state = MeshState(None, removal_delay=0.2)  # type: ignore[arg-type]
    state._slice_event("ADDED", slice_(["127.1.0.1"]))
    assert addresses(state) == ["127.1.0.1"]
    state._slice_event("MODIFIED", slice_([], "2"))
    assert addresses(state) == ["127.1.0.1"]  # still routed to while the removal propagates
    await asyncio.sleep(0.3)
    assert addresses(state) == []


async def test_a_later_event_wins_over_a_pending_removal() -> None:
    state = MeshState(None, removal_delay=0.2)  # type: ignore[arg-type]
    state._slice_event("ADDED", slice_(["127.1.0.1"]))
    state._slice_event("MODIFIED", slice_([], "2"))
    state._slice_event("MODIFIED", slice_(["127.1.0.1", "127.1.0.2"], "3"))  # nothing removed: at once
    assert addresses(state) == ["127.1.0.1", "127.1.0.2"]
    await asyncio.sleep(0.3)
    assert addresses(state) == ["127.1.0.1", "127.1.0.2"]  # the stale removal was dropped
