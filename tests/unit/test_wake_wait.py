"""A wake call that waits for the target's first ready replica: the real activator notifier against the
real controller wake endpoint (the scale itself is a stand-in coroutine)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from activator.metrics import Metrics
from activator.wake import WakeNotifier, WakeResult
from elasti_istio.controller.waker import Waker


class Phase:
    value = "ScalingUp"
    by: list[str] = []

    async def wake(self, namespace: str, name: str, by: str) -> str:
        self.by.append(by)
        return self.value


@pytest.fixture
async def served() -> AsyncIterator[tuple[Waker, Phase, str]]:
    phase = Phase()
    waker = Waker(phase.wake, lambda: True)
    server = TestServer(waker.app(), host="127.0.0.1")
    await server.start_server()
    yield waker, phase, str(server.make_url("/"))
    await server.close()


async def notify(url: str, wait: float) -> WakeResult:
    async with aiohttp.ClientSession() as session:
        return await WakeNotifier(session, url, Metrics(), wait=wait).notify("ns", "svc")


async def test_answered_when_a_ready_replica_is_seen(served: tuple[Waker, Phase, str]) -> None:
    waker, _, url = served
    call = asyncio.create_task(notify(url, wait=30))
    async with asyncio.timeout(10):
        while "ns/svc" not in waker._ready_waiters:
            await asyncio.sleep(0.01)
    assert not call.done()  # still waiting: nothing is ready yet
    assert waker.ready("ns", "other", 1) == 0  # another ElastiService: no answer for this one
    await asyncio.sleep(0.05)
    assert not call.done()
    assert waker.ready("ns", "svc", 2) == 1
    assert (await asyncio.wait_for(call, 10)).result == "ready"
    assert not waker._ready_waiters  # nothing left behind


async def test_answered_not_ready_when_the_wait_is_over(served: tuple[Waker, Phase, str]) -> None:
    waker, _, url = served
    assert (await asyncio.wait_for(notify(url, wait=0.2), 10)).result == "accepted"
    assert not waker._ready_waiters


async def test_without_wait_the_answer_is_immediate(served: tuple[Waker, Phase, str]) -> None:
    _, _, url = served
    assert (await asyncio.wait_for(notify(url, wait=0), 10)).result == "accepted"


async def test_a_target_already_serving_is_ready_at_once(served: tuple[Waker, Phase, str]) -> None:
    _, phase, url = served
    phase.value = "Serving"
    assert (await asyncio.wait_for(notify(url, wait=30), 10)).result == "ready"


@pytest.mark.parametrize("wait", [-1, 61, "5", True, None])
async def test_a_bad_wait_is_refused(served: tuple[Waker, Phase, str], wait: object) -> None:
    _, _, url = served
    async with (
        aiohttp.ClientSession() as session,
        session.post(url + "v1/wake", json={"namespace": "ns", "name": "svc", "wait": wait}) as resp,
    ):
        assert resp.status == 400
        assert "wait must be a number of seconds" in (await resp.json())["error"]


async def test_who_asked_is_passed_on(served: tuple[Waker, Phase, str]) -> None:
    """The activator sends no ``by``; ``elasti-istio wake`` sends ``cli``: the Woken Event says which."""
    _, phase, url = served
    phase.by = []
    async with aiohttp.ClientSession() as session:
        for body, status in (({}, 202), ({"by": "cli"}, 202), ({"by": "someone"}, 400), ({"by": 1}, 400)):
            async with session.post(url + "v1/wake", json={"namespace": "ns", "name": "svc", **body}) as resp:
                assert resp.status == status, body
                if status == 400:
                    assert "by must be one of activator, cli" in (await resp.json())["error"]
    assert phase.by == ["activator", "cli"]
