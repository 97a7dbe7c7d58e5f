"""A released queue shares a bounded pool of upstream connections (``--upstream-connections``)."""

from __future__ import annotations

import asyncio

from tests.unit.test_activator_proxy import Env


async def test_released_requests_share_at_most_upstream_connections() -> None:
    env = await Env(upstream_connections=3).start()
    try:
        env.put("details", ready=False)
        n = 30

        async def one(i: int) -> tuple[int, str]:
            async with env.get(f"/echo/{i}") as r:
                return r.status, (await r.json())["target"]

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        await env.until_pending(n)
        env.put("details", ready=True)
        answers = await asyncio.gather(*tasks)
        assert sorted(answers) == sorted((200, f"/echo/{i}") for i in range(n))
        # Thirty held requests went out over at most three connections, reused one after another.
        assert 1 <= len(env.mesh.peers) <= 3, env.mesh.peers
    finally:
        await env.stop()
