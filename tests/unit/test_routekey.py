"""The route token: only a request that came through a VirtualService the controller rewrote names an
ElastiService the activator accepts; the key rotates without a restart and without refusing what the
old key signed meanwhile."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from elasti_istio import routekey
from elasti_istio.vsrewrite import ActivatorRef, Target, to_proxy
from tests.unit.test_activator_proxy import NS, Env

ACT = ActivatorRef("elasti-activator.elasti-system.svc.cluster.local", 8012)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_tokens_name_one_elastiservice_under_one_of_the_keys(tmp_path: Path) -> None:
    old, new = b"old-key", b"new-key"
    t = routekey.token(old, "shop", "details")
    assert routekey.valid((old,), "shop", "details", t)
    assert not routekey.valid((old,), "shop", "reviews", t)  # another ElastiService's token
    assert not routekey.valid((old,), "other", "details", t)
    assert not routekey.valid((new,), "shop", "details", t)
    assert routekey.valid((new, old), "shop", "details", t)  # during a rotation
    assert not routekey.valid((old,), "shop", "details", None) and not routekey.valid((), "shop", "details", t)
    assert routekey.parse_keys("\n new-key \nold-key\n\n") == (new, old)


def test_the_key_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text("k1\n")
    clock = Clock()
    keys = routekey.KeyFile(str(path), clock=clock)
    assert keys.keys == (b"k1",) and keys.token("a", "b") == routekey.token(b"k1", "a", "b")
    generation = keys.generation
    path.write_text("k2\nk1\n")
    os.utime(path, (1, 1))  # another stamp, whatever the file system's time resolution
    assert not keys.refresh()  # looked at once a second at most
    clock.t += routekey.CHECK_EVERY
    assert keys.refresh() and keys.keys == (b"k2", b"k1") and keys.generation == generation + 1
    path.write_text("")  # emptied by mistake: the keys read before stay
    os.utime(path, (2, 2))
    clock.t += routekey.CHECK_EVERY
    assert not keys.refresh() and keys.keys == (b"k2", b"k1")


def test_the_rewrite_sets_the_token_and_no_client_header_can_stand_in() -> None:
    target = Target(NS, "details", "details", token="t0k3n")
    spec = {
        "http": [
            {
                "route": [
                    {
                        "destination": {"host": "details"},
                        "headers": {
                            "request": {"set": {"elasti-token": "forged", "x": "1"}, "remove": ["elasti-token"]}
                        },
                    }
                ]
            }
        ]
    }
    proxied, _ = to_proxy(spec, NS, target, ACT)
    request = proxied["http"][0]["route"][-1]["headers"]["request"]
    assert request["set"] == {"x": "1", "elasti-service": f"{NS}/details", "elasti-token": "t0k3n"}
    assert "remove" not in request


async def test_the_activator_refuses_requests_without_the_token_of_their_elastiservice(tmp_path: Path) -> None:
    key_file = tmp_path / "route-key"
    key_file.write_text("first\n")
    env = await Env(route_key_file=str(key_file)).start()
    try:
        env.put("details", ready=True)
        env.put("reviews")  # asleep: a forged request must not wake it

        async def ask(name: str, token: str | None) -> tuple[int, dict[str, str]]:
            headers = {"elasti-service": f"{NS}/{name}", **({"elasti-token": token} if token else {})}
            async with env.client.get(env.url + "/echo", headers=headers) as r:
                return r.status, await r.json()

        status, body = await ask("details", None)
        assert (status, body["error"]) == (403, "forbidden")
        assert (await ask("reviews", routekey.token(b"first", NS, "details")))[0] == 403  # details' token
        assert (await ask("details", "0" * 64))[0] == 403
        assert env.wake.calls == [] and env.state.get("hits", {}).get("echo", 0) == 0
        status, body = await ask("details", routekey.token(b"first", NS, "details"))
        assert status == 200
        assert "elasti-token" not in {k.lower() for k, _ in body["headers"]}  # not passed on to the workload

        # Rotation: the new key signs, the old one is still accepted until it is dropped from the file.
        async def until(name: str, token: str, status: int) -> None:
            async with asyncio.timeout(20):  # the file is looked at again within a second
                while (await ask(name, token))[0] != status:
                    await asyncio.sleep(0.05)

        key_file.write_text("second\nfirst\n")
        os.utime(key_file, (5, 5))
        await until("details", routekey.token(b"second", NS, "details"), 200)
        assert (await ask("details", routekey.token(b"first", NS, "details")))[0] == 200
        key_file.write_text("second\n")
        os.utime(key_file, (6, 6))
        await until("details", routekey.token(b"first", NS, "details"), 403)
        assert (await ask("details", routekey.token(b"second", NS, "details")))[0] == 200
    finally:
        await env.stop()
