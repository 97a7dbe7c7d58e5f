"""Wake authentication between the real activator notifier and the real controller wake endpoint."""

from __future__ import annotations

import os
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from activator.metrics import Metrics
from activator.wake import WakeNotifier
from elasti_istio.controller.waker import Waker


async def _wake(namespace: str, name: str, by: str) -> str:
    return "ScalingUp"


@pytest.fixture
async def endpoint(tmp_path: Path):  # type: ignore[no-untyped-def]
    token = tmp_path / "controller-token"
    token.write_text("s3cret\n")
    server = TestServer(Waker(_wake, lambda: True, str(token)).app(), host="127.0.0.1")
    await server.start_server()
    yield server, token
    await server.close()


async def notify(server: TestServer, token_file: Path | None) -> tuple[str, str]:
    async with aiohttp.ClientSession() as session:
        notifier = WakeNotifier(
            session, str(server.make_url("/")), Metrics(), token_file=str(token_file) if token_file else None
        )
        result = await notifier.notify("ns", "svc")
        return result.result, result.message


async def test_matching_token_is_accepted(endpoint, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, _ = endpoint
    mine = tmp_path / "activator-token"
    mine.write_text("s3cret")
    assert await notify(server, mine) == ("accepted", "")


async def test_missing_or_wrong_token_is_refused_with_401(endpoint, tmp_path: Path) -> None:  # type: ignore
    server, _ = endpoint
    result, message = await notify(server, None)
    assert result == "refused" and "bearer token is required" in message
    wrong = tmp_path / "wrong"
    wrong.write_text("nope")
    assert (await notify(server, wrong))[0] == "refused"
    async with aiohttp.ClientSession() as s, s.post(server.make_url("/v1/wake"), json={}) as resp:
        assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer")


async def test_rotated_token_file_is_picked_up(endpoint, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, token = endpoint
    mine = tmp_path / "activator-token"
    mine.write_text("s3cret")
    assert (await notify(server, mine))[0] == "accepted"
    # A mounted Secret rotates by swapping the file underneath.
    fresh = tmp_path / "fresh"
    fresh.write_text("rotated")
    os.replace(fresh, token)
    assert (await notify(server, mine))[0] == "refused"
    mine.write_text("rotated")
    assert (await notify(server, mine))[0] == "accepted"
