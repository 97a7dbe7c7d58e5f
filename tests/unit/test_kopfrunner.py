"""kopf supervision: a kopf that reports a fatal failure and then hangs is ended and started again.

The hang cannot be caused against a real API server on demand (the cluster test
``test_watches_given_up_by_kopf_are_started_again`` covers the failure kopf does end from), so
``kopf.operator`` is replaced here.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf
import pytest

from elasti_istio.controller import kopfrunner
from elasti_istio.controller.kopfrunner import KopfRunner


async def until(cond: Any, timeout: float = 20) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


async def test_a_failed_and_hung_kopf_is_cancelled_and_started_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kopfrunner, "WIND_DOWN", 0.2)
    monkeypatch.setattr(kopfrunner, "RESTART_BACKOFF", (0.01, 0.01))
    runs: list[str] = []
    registries = 0

    async def operator(*, stop_flag: asyncio.Event, ready_flag: asyncio.Event, **_: Any) -> None:
        runs.append("started")
        if len(runs) == 1:
            logging.getLogger("kopf._core.reactor.running").error("Multidimensional multitasker has failed: boom")
            try:
                await asyncio.Event().wait()  # wedged: never ends by itself
            except asyncio.CancelledError:
                runs.append("cancelled")
                raise
        ready_flag.set()
        await stop_flag.wait()
        runs.append("stopped")

    async def registry() -> kopf.OperatorRegistry:
        nonlocal registries
        registries += 1
        return kopf.OperatorRegistry()

    monkeypatch.setattr(kopf, "operator", operator)
    runner = KopfRunner(registry, kopf.OperatorSettings, namespaces=[])
    runner.start()
    try:
        await until(lambda: runner.started.is_set())
        assert runner.restarts == 1
        assert runs == ["started", "cancelled", "started"]
        assert registries == 2  # asked again before each start
    finally:
        await runner.stop()
    assert runs[-1] == "stopped"
    assert runner._thread is not None and not runner._thread.is_alive()


async def test_restart_on_request_needs_no_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    starts = 0

    async def operator(*, stop_flag: asyncio.Event, ready_flag: asyncio.Event, **_: Any) -> None:
        nonlocal starts
        starts += 1
        ready_flag.set()
        await stop_flag.wait()

    async def registry() -> kopf.OperatorRegistry:
        return kopf.OperatorRegistry()

    monkeypatch.setattr(kopf, "operator", operator)
    runner = KopfRunner(registry, kopf.OperatorSettings, namespaces=["a"])
    runner.start()
    try:
        await until(lambda: starts == 1)
        runner.restart("a CRD came")
        await until(lambda: starts == 2)
        assert runner.restarts == 0  # not counted as a failure
    finally:
        await runner.stop()
