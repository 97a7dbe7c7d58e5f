"""Slow and idle clients cannot pin the activator's connections: a request's headers must arrive within
--header-timeout, an idle keep-alive connection goes after --keepalive-timeout, and past
--max-connections a new connection is refused with a clear answer. Meanwhile normal requests are served."""

from __future__ import annotations

import asyncio
import json
import resource

from tests.unit.test_activator_proxy import NS, Env

SLOW = 2000


def enough_descriptors(n: int) -> None:
    """Both ends of ``n`` connections live in this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n), hard))
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= n, "raise the open-file limit to run this test"


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sent until it closed the connection."""
    return await reader.read()


async def normal_request(env: Env) -> int:
    async with env.client.get(env.url + "/echo", headers={"elasti-service": f"{NS}/details"}) as r:
        await r.read()
        return r.status


async def test_two_thousand_half_request_lines_are_closed_in_time_and_others_are_served() -> None:
    enough_descriptors(2 * SLOW + 200)
    loop = asyncio.get_running_loop()
    errors: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    env = await Env(header_timeout=2.0).start()
    writers = []
    try:
        env.put("details", ready=True)
        readers = []
        for _ in range(SLOW):
            reader, writer = await asyncio.open_connection(*env.activator.proxy_address)
            writer.write(b"GET /echo HT")  # half a request line, never finished
            readers.append(reader)
            writers.append(writer)
        await asyncio.gather(*(w.drain() for w in writers))
        assert await normal_request(env) == 200  # served while 2,000 slow connections are open
        # Every slow connection is closed by the activator (generous deadline; 2 s are asked for).
        answers = await asyncio.wait_for(asyncio.gather(*(closed_by_server(r) for r in readers)), 60)
        assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers), answers[0]
        assert json.loads(answers[0].split(b"\r\n\r\n", 1)[1])["error"] == "request header timeout"
        assert await normal_request(env) == 200
        # Closing a late connection raises nothing in the event loop (it used to, once per connection).
        assert not errors, errors[0]
    finally:
        loop.set_exception_handler(None)
        for w in writers:
            w.close()
        await env.stop()


async def test_an_idle_keepalive_connection_is_closed_after_the_keepalive_timeout() -> None:
    env = await Env(keepalive_timeout=1.0, header_timeout=30.0).start()
    try:
        env.put("details", ready=True)
        reader, writer = await asyncio.open_connection(*env.activator.proxy_address)
        writer.write(f"GET /echo HTTP/1.1\r\nHost: details\r\nelasti-service: {NS}/details\r\n\r\n".encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        length = int(next(x for x in head.split(b"\r\n") if x.lower().startswith(b"content-length:")).split(b":")[1])
        await reader.readexactly(length)
        assert await asyncio.wait_for(reader.read(), 30) == b""  # closed by the activator once idle
        writer.close()
    finally:
        await env.stop()


async def test_connections_past_the_cap_are_refused_with_a_clear_answer() -> None:
    env = await Env(max_connections=20, header_timeout=30.0).start()
    writers = []
    try:
        env.put("details", ready=True)
        for _ in range(20):
            _, writer = await asyncio.open_connection(*env.activator.proxy_address)
            writers.append(writer)
        reader, writer = await asyncio.open_connection(*env.activator.proxy_address)
        answer = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert b"Retry-After:" in answer
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] == "too many connections"
        for w in writers:
            w.close()
        # Once they are gone, connections are taken again.
        async with asyncio.timeout(30):
            while True:
                try:
                    if await normal_request(env) == 200:
                        break
                except Exception:
                    await asyncio.sleep(0.05)
    finally:
        for w in writers:
            w.close()
        await env.stop()
