"""A workload at zero, woken by its own traffic: what clients see through the mesh.

Clients never retry: each request is sent once, on its own connection unless a test is about
keep-alive, and must succeed by itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import secrets
import time
from typing import Any

import aiohttp
import pytest

from elasti_istio import routekey
from elasti_istio.playground.bookinfo import proxied
from elasti_istio.playground.procs import ControllerProc
from tests.e2e.conftest import System
from tests.e2e.support import (
    ENVOYS,
    GROUP,
    VERSION,
    Answer,
    RouteWatch,
    SteadyLoad,
    envoys_route,
    in_threads,
    mesh_no_endpoint,
    mesh_serves,
    phase,
    replicas,
    scale,
    serving,
    to_zero,
    until,
    url,
    vs_spec,
    web_app,
)

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

SLEEP_ASKED = "elasti.truefoundry.com/sleep-requested"


def test_scale_to_zero_proxies_and_traffic_wakes_it_with_bodies_intact(
    e2e: System, namespace: str, controller: ControllerProc
) -> None:
    api, ns = e2e.api, namespace
    api.apply_all(web_app(), ns)
    original = serving(api, ns)
    to_zero(api, ns)
    until(lambda: e2e_status(e2e, ns).get("mode") == "proxy", "status mode proxy")
    assert e2e_status(e2e, ns)["readyReplicas"] == 0

    small = b'{"hello": "elasti"}'
    big = os.urandom(1 << 20)
    chunks = [os.urandom(4096) for _ in range(32)]
    side = e2e.sidecar
    answers = in_threads(
        {
            "small": lambda: side.request("POST", url(ns, "/echo"), small, {"Content-Type": "application/json"}),
            "1MiB": lambda: side.request("POST", url(ns, "/echo"), big),
            "chunked upload": lambda: side.request("POST", url(ns, "/echo"), iter(chunks), chunked=True),
            "stream": lambda: side.get(url(ns, "/stream/20?interval=0.02")),
            "drip": lambda: side.get(url(ns, "/drip?numbytes=12&duration=0.6")),
        }
    )
    for key, ans in answers.items():
        assert isinstance(ans, Answer), f"{key}: {ans!r}"
        assert ans.status == 200, f"{key}: {ans!r}"
        assert ans.cold, f"{key} was not held by the activator: {ans.headers}"
    assert answers["small"].body == small  # type: ignore[union-attr]
    assert hashlib.sha256(answers["1MiB"].body).digest() == hashlib.sha256(big).digest()  # type: ignore[union-attr]
    assert answers["chunked upload"].body == b"".join(chunks)  # type: ignore[union-attr]
    lines = [json.loads(line) for line in answers["stream"].body.splitlines()]  # type: ignore[union-attr]
    assert [doc["id"] for doc in lines] == list(range(20))
    assert answers["drip"].body == b"*" * 12  # type: ignore[union-attr]

    until(lambda: vs_spec(api, ns, "web") == original, "the original routes back")
    until(lambda: phase(api, ns, "web") == "Serving", "Serving")
    assert replicas(api, ns, "web") == (1, 1)


def e2e_status(e2e: System, ns: str, name: str = "web") -> dict[str, Any]:
    es = e2e.api.custom.get_namespaced_custom_object("elasti.truefoundry.com", "v1alpha1", ns, "elastiservices", name)
    return dict(es.get("status") or {})


def test_manual_scale_up_returns_to_serve(e2e: System, namespace: str, controller: ControllerProc) -> None:
    api, ns = e2e.api, namespace
    api.apply_all(web_app(), ns)
    original = serving(api, ns)
    to_zero(api, ns)
    scale(api, ns, "web", 1)
    until(lambda: vs_spec(api, ns, "web") == original, "the original routes back")
    until(lambda: phase(api, ns, "web") == "Serving", "Serving")
    until(lambda: mesh_serves(api, ns), "the mesh to route to the pod")
    ans = e2e.sidecar.get(url(ns, "/hello"))
    assert ans.status == 200 and ans.headers["x-pod-name"].startswith("web-")
    assert not ans.cold, "the activator is still in the path"


def test_200_concurrent_requests_at_zero_all_succeed(e2e: System, namespace: str, controller: ControllerProc) -> None:
    api, ns = e2e.api, namespace
    api.apply_all(web_app(), ns)
    serving(api, ns)
    to_zero(api, ns)

    async def burst() -> list[tuple[int, bool] | str]:
        # force_close: no connection is reused, so aiohttp has nothing to retry.
        conn = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=90)) as session:

            async def one(i: int) -> tuple[int, bool] | str:
                try:
                    async with session.get(url(ns, f"/req/{i}"), proxy=e2e.mesh.outbound) as resp:
                        doc = await resp.json(content_type=None)
                        assert doc["path"] == f"/req/{i}"
                        return resp.status, resp.headers.get("x-elasti-cold-start") == "true"
                except Exception as exc:
                    return f"{type(exc).__name__}: {exc}"

            return await asyncio.gather(*(one(i) for i in range(200)))

    results = asyncio.run(burst())
    failed = [r for r in results if not isinstance(r, tuple) or r[0] != 200]
    assert not failed, f"{len(failed)} of 200 failed: {failed[:5]}"
    assert any(r[1] for r in results if isinstance(r, tuple)), "none was held by the activator"
    assert replicas(api, ns, "web")[0] == 1, "woken to minTargetReplicas, once"


def test_hold_timeout_answers_504(e2e: System, namespace: str, controller: ControllerProc) -> None:
    api, ns = e2e.api, namespace
    # At zero from the start, and a woken pod that takes ten minutes to turn Ready.
    api.apply_all(web_app(replicas=0, hold_timeout="2s", startup_seconds=600), ns)
    until(lambda: proxied(vs_spec(api, ns, "web")), "routes to the activator")
    until(lambda: envoys_route(api, ns, "web", True), "the mesh to route to the activator")
    t = time.monotonic()
    ans = e2e.sidecar.get(url(ns, "/slow-to-wake"))
    waited = time.monotonic() - t
    assert ans.status == 504, ans
    assert json.loads(ans.body)["error"], ans
    assert waited >= 1.5, f"answered after {waited:.2f}s, before the 2s hold timeout"
    assert replicas(api, ns, "web") == (1, 0), "woken, never ready"


def test_one_keepalive_connection_across_the_whole_cycle(
    e2e: System, namespace: str, controller: ControllerProc
) -> None:
    api, ns = e2e.api, namespace
    api.apply_all(web_app(), ns)
    original = serving(api, ns)
    conn = e2e.sidecar.connection()
    statuses: list[tuple[int, bool, str]] = []
    try:

        def send(i: int) -> None:
            ans = e2e.sidecar.get(url(ns, f"/ka/{i}"), conn=conn)
            statuses.append((ans.status, ans.cold, ans.body[:120].decode(errors="replace")))

        send(0)
        assert conn.sock is not None
        local = conn.sock.getsockname()
        to_zero(api, ns)
        # Held, woken, served, then direct again: all on the same connection.
        seen_proxy_then_serve = False
        for i in range(1, 200):
            send(i)
            assert conn.sock is not None and conn.sock.getsockname() == local, f"reconnected at request {i}"
            if any(cold for _, cold, _ in statuses) and vs_spec(api, ns, "web") == original:
                seen_proxy_then_serve = True
                break
            time.sleep(0.02)
        assert seen_proxy_then_serve, "the cycle did not complete within 200 requests"
        for i in range(3):
            send(1000 + i)
        assert conn.sock is not None and conn.sock.getsockname() == local
    finally:
        conn.close()
    bad = [s for s in statuses if s[0] != 200]
    assert not bad, f"{len(bad)} of {len(statuses)} not 200: {bad[:5]}"
    assert statuses[-1][1] is False, "the activator is still in the path"


def test_websocket_at_zero(e2e: System, namespace: str, controller: ControllerProc) -> None:
    api, ns = e2e.api, namespace
    api.apply_all(web_app(), ns)
    original = serving(api, ns)
    to_zero(api, ns)

    async def talk() -> tuple[list[str], bool]:
        async with (
            aiohttp.ClientSession() as session,
            # As an application with a sidecar that does not capture traffic opens it: to the sidecar's
            # listener for the port, the Service named by Host (Envoy takes no ws:// absolute URI).
            session.ws_connect(f"ws://{e2e.mesh.client}:80/ws", headers={"Host": f"web.{ns}.svc.cluster.local"}) as ws,
        ):
            cold = ws._response.headers.get("x-elasti-cold-start") == "true"
            got = []
            for word in ("held", "then", "relayed"):
                await ws.send_str(word)
                msg = await ws.receive(timeout=10)
                got.append(msg.data)
            await ws.send_bytes(b"\x00\x01")
            assert (await ws.receive(timeout=10)).data == b"\x00\x01"
            return got, cold

    got, cold = asyncio.run(talk())
    assert got == ["held", "then", "relayed"]
    assert cold, "the handshake was not held by the activator"
    until(lambda: vs_spec(api, ns, "web") == original, "the original routes back")


def test_client_cannot_choose_another_queue(e2e: System, namespace: str, controller: ControllerProc) -> None:
    api, ns = e2e.api, namespace
    api.apply_all(web_app("web") + web_app("other"), ns)
    serving(api, ns, "web")
    serving(api, ns, "other")
    to_zero(api, ns, "web")
    to_zero(api, ns, "other")
    ans = e2e.sidecar.get(url(ns, "/headers"), headers={"elasti-service": f"{ns}/other"})
    assert ans.status == 200, ans
    assert ans.headers["x-pod-name"].startswith("web-"), ans.headers
    assert ans.cold
    assert "elasti-service" not in {k.lower() for k in json.loads(ans.body)["headers"]}
    time.sleep(1)  # the wake of web is done; a wrong queue would have woken other by now
    assert replicas(api, ns, "other") == (0, 0), "the client's header woke another workload"
    assert proxied(vs_spec(api, ns, "other"))


def test_steady_traffic_during_the_controllers_own_scale_to_zero(
    e2e: System, namespace: str, controller: ControllerProc
) -> None:
    """A scale-down the controller makes (here asked by annotation, as `elasti-istio sleep` does) loses no
    request: the routes go to the activator in a push of their own, then the activator stops forwarding to
    the target and holds, and only then do its pods stop. Four cycles under steady load (100 requests a
    second, so that some cross each step); the client's Envoy is watched the whole time and never routes
    to the Service while it has no endpoint."""
    api, ns = e2e.api, namespace
    api.apply_all(web_app(), ns)
    original = serving(api, ns)
    host = f"web.{ns}.svc.cluster.local"
    with RouteWatch(ENVOYS[0], host) as watch, SteadyLoad(e2e.sidecar, ns, rate=100, limit=3000) as load:
        until(lambda: load.sent > 0, "the load to start")
        for cycle in range(4):
            held_before = load.held()
            api.custom.patch_namespaced_custom_object(
                GROUP, VERSION, ns, "elastiservices", "web", {"metadata": {"annotations": {SLEEP_ASKED: f"c{cycle}"}}}
            )
            until(lambda c=cycle: sleep_done(api, ns) == f"c{c}", "the controller to act on the sleep", 30)
            until(lambda n=held_before: load.held() > n, "a request held by the activator", 30)
            until(lambda: vs_spec(api, ns, "web") == original, "the original routes back", 30)
            until(lambda: mesh_serves(api, ns), "the mesh to route to the workload again", 30)
    assert watch.polls > 100, f"the client's Envoy was read only {watch.polls} times"
    assert not watch.dead_ends, f"the client's Envoy routed to a Service with no endpoint: {watch.dead_ends[:3]}"
    assert len(load.results) == load.sent >= 60, f"{load.sent - len(load.results)} of {load.sent} never finished"
    bad = [(r[0], r[3] or r[1]) for r in load.results if r[1] != 200]
    assert not bad, f"{len(bad)} of {len(load.results)} failed: {bad[:5]}"


def sleep_done(api: Any, ns: str, name: str = "web") -> str | None:
    """The id of the last sleep request the controller carried out."""
    obj = api.custom.get_namespaced_custom_object(GROUP, VERSION, ns, "elastiservices", name)
    last = (obj.get("status") or {}).get("lastSleepRequest") or {}
    return last.get("id") if last.get("result") == "Done" else None


def test_steady_traffic_during_a_keda_scale_to_zero(e2e: System, namespace: str, controller: ControllerProc) -> None:
    """KEDA (or an HPA, or a person) scales the target to 0 directly: the controller switches the routes on
    that event, and with the usual preStop sleep the pod keeps serving meanwhile. What no controller can
    close: the endpoint removal and the new routes usually reach istiod within one debounce, and istiod
    pushes endpoints before routes, so for a few milliseconds Envoy may answer 503 "no healthy upstream".
    Such a request never reached a workload; anything else (a reset, a 502/504, a lost or doubled
    request) fails the test. A scale-down the controller makes itself has no such moment (above)."""
    api, ns = e2e.api, namespace
    api.apply_all(web_app(prestop_sleep=2), ns)
    original = serving(api, ns)
    host = f"web.{ns}.svc.cluster.local"
    with RouteWatch(ENVOYS[0], host) as watch, SteadyLoad(e2e.sidecar, ns, limit=300) as load:
        time.sleep(1)  # steady traffic before the scale
        t_scale = time.monotonic()
        scale(api, ns, "web", 0)  # as KEDA does: a direct change of the scale subresource
        until(load.any_cold, "a request held by the activator", 20)
        until(lambda: vs_spec(api, ns, "web") == original, "the original routes back", 20)
        time.sleep(2)  # steady traffic after the wake
    assert len(load.results) == load.sent >= 40, f"{load.sent - len(load.results)} of {load.sent} never finished"
    bad = [r for r in load.results if r[1] != 200 and not mesh_no_endpoint(r[3])]
    when = [(f"{b[0] - t_scale:+.3f}s after the scale", *b[1:3]) for b in bad[:5]]
    assert not bad, f"{len(bad)} of {len(load.results)} failed: {when}"
    unrouted = [f"{r[0] - t_scale:+.3f}s" for r in load.results if r[1] != 200]
    print(
        f"{len(unrouted)} of {len(load.results)} answered 'no healthy upstream' by the mesh: {unrouted}; "
        f"the client's Envoy routed to no endpoint at {[f'{t - t_scale:+.3f}s' for t, _ in watch.dead_ends]}"
    )


def test_statefulset_target(e2e: System, namespace: str, controller: ControllerProc) -> None:
    api, ns = e2e.api, namespace
    api.apply_all(web_app(kind="StatefulSet"), ns)
    original = serving(api, ns)
    to_zero(api, ns, kind="StatefulSet")
    ans = e2e.sidecar.get(url(ns, "/sts"))
    assert ans.status == 200 and ans.cold, ans
    assert ans.headers["x-pod-name"] == "web-0"
    until(lambda: vs_spec(api, ns, "web") == original, "the original routes back")
    assert replicas(api, ns, "web", "StatefulSet") == (1, 1)


def test_through_the_real_gateway_at_zero_held_and_served(
    e2e: System, namespace: str, controller: ControllerProc
) -> None:
    """Through the Envoy ingress gateway: a workload at zero without an ElastiService gets Envoy's own
    503; with one, the same request is held, the workload woken, and the answer is the workload's."""
    api, ns = e2e.api, namespace
    host = f"web.{ns}.example"
    gateway_vs = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "web-gw", "annotations": {"elasti.truefoundry.com/elastiservice": "web"}},
        "spec": {"hosts": [host], "gateways": ["web-gw"], "http": [{"route": [{"destination": {"host": "web"}}]}]},
    }
    gateway = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "Gateway",
        "metadata": {"name": "web-gw"},
        "spec": {
            "selector": {"istio": "ingressgateway"},
            "servers": [{"port": {"number": 80, "name": "http", "protocol": "HTTP"}, "hosts": [host]}],
        },
    }
    gw = [e2e.mesh.gateway_admin]

    def via_gateway(path: str) -> Answer:
        conn = http.client.HTTPConnection(e2e.mesh.ingress.removeprefix("http://"), timeout=60)
        try:
            conn.request("GET", path, headers={"Host": host})
            resp = conn.getresponse()
            return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    # No ElastiService: Envoy's own answer, no upstream saw the request.
    api.apply_all([d for d in web_app(replicas=0) if d["kind"] != "ElastiService"] + [gateway, gateway_vs], ns)
    ans = until(lambda: (a := via_gateway("/nobody")).status == 503 and a, "Envoy's 503 at the gateway")
    assert ans.body == b"no healthy upstream" and "x-envoy-upstream-service-time" not in ans.headers, ans
    assert replicas(api, ns, "web") == (0, 0)

    # With an ElastiService: held by the activator, woken, served.
    api.apply_all([d for d in web_app(replicas=0) if d["kind"] == "ElastiService"], ns)
    until(lambda: proxied(vs_spec(api, ns, "web-gw")), "the gateway's route moved to the activator")
    until(lambda: envoys_route(api, ns, "web-gw", True, gw), "the gateway to route to the activator")
    ans = via_gateway("/through-the-gateway")
    assert ans.status == 200 and ans.cold, ans
    assert json.loads(ans.body)["path"] == "/through-the-gateway"
    assert ans.headers["x-pod-name"].startswith("web-")
    until(lambda: mesh_serves(api, ns, "web-gw", gw), "the gateway to route to the workload again")
    ans = via_gateway("/warm")
    assert ans.status == 200 and not ans.cold, ans


def test_a_workloads_own_no_healthy_upstream_is_relayed_once(
    e2e: System, namespace: str, controller: ControllerProc
) -> None:
    """The workload answers 503 "no healthy upstream" itself (an app relaying a failing dependency): the
    held POST reaches it exactly once and its answer comes back as it is, not replayed until the hold
    timeout. Envoy's own reply has no x-envoy-upstream-service-time; one from an upstream has it."""
    api, ns = e2e.api, namespace
    api.apply_all(web_app(hold_timeout="20s"), ns)
    serving(api, ns)
    to_zero(api, ns)
    ans = e2e.sidecar.request("POST", url(ns, "/status/503?body=no%20healthy%20upstream"), b"once")
    assert (ans.status, ans.body, ans.cold) == (503, b"no healthy upstream", True), ans
    assert ans.headers["x-pod-name"].startswith("web-"), ans.headers  # the workload's answer
    (pod,) = [p for p in api.core.list_namespaced_pod(ns, label_selector="app=web").items if p.status.pod_ip]
    conn = http.client.HTTPConnection(pod.status.pod_ip, 8080, timeout=10)
    try:
        conn.request("GET", "/seen?path=/status/503")
        assert json.loads(conn.getresponse().read())["count"] == 1
    finally:
        conn.close()


def test_large_uploads_held_at_zero_are_served_like_small_ones(
    e2e: System, namespace: str, controller: ControllerProc
) -> None:
    """Bodies over --retry-body-limit (1 MiB) are kept on disk, so one released the moment the target is
    ready, before the mesh has its endpoint, is sent again whole instead of failing."""
    api, ns = e2e.api, namespace
    api.apply_all(web_app(), ns)
    serving(api, ns)
    for cycle in range(4):
        to_zero(api, ns)
        body = os.urandom(2 * 1024 * 1024 + cycle)
        ans = e2e.sidecar.request("POST", url(ns, f"/echo?cycle={cycle}"), body)
        assert ans.status == 200 and ans.cold, (cycle, ans)
        assert hashlib.sha256(ans.body).digest() == hashlib.sha256(body).digest(), cycle
        serving(api, ns)


def test_a_pod_that_calls_the_activator_directly_cannot_use_any_queue(
    e2e: System, namespace: str, controller: ControllerProc
) -> None:
    """Any pod reaches elasti-activator:8012 through the mesh; naming an ElastiService in the header is not
    enough: without the route token the controller put on that ElastiService's routes it gets 403, and
    nothing is forwarded or woken. Through the VirtualService the same request is served."""
    api, ns = e2e.api, namespace
    api.apply_all(web_app(), ns)
    serving(api, ns)
    to_zero(api, ns)
    activator = "http://elasti-activator.elasti-system.svc.cluster.local:8012/forged"
    for headers in (
        {"elasti-service": f"{ns}/web"},
        {"elasti-service": f"{ns}/web", "elasti-token": "0" * 64},
    ):
        ans = e2e.sidecar.get(activator, headers=headers)
        assert ans.status == 403 and json.loads(ans.body)["error"] == "forbidden", ans
    assert replicas(api, ns, "web") == (0, 0), "a forged request woke the target"
    assert len(_route_token(api, ns)) == 64
    ans = e2e.sidecar.get(url(ns, "/through-the-route"))
    assert ans.status == 200 and ans.cold, ans


def _route_token(api: Any, ns: str) -> str:
    return next(
        d["headers"]["request"]["set"]["elasti-token"]
        for route in vs_spec(api, ns, "web")["http"]
        for d in route["route"]
        if "elasti-service" in ((d.get("headers") or {}).get("request") or {}).get("set", {})
    )


def test_a_rotated_route_key_reaches_the_routes_and_the_old_key_can_be_dropped(
    e2e: System, namespace: str, controller: ControllerProc
) -> None:
    """Rotation as the docs tell it: the new key first with the old one kept, the controller re-signs the
    routes in proxy mode, then the old key goes; the activator refuses it, and a cold request through
    the route is still served."""
    api, ns = e2e.api, namespace
    api.apply_all(web_app(), ns)
    serving(api, ns)
    to_zero(api, ns)
    old = routekey.parse_keys(e2e.route_key.read_text())[0]
    assert _route_token(api, ns) == routekey.token(old, ns, "web")
    new = secrets.token_hex(32).encode()

    def write_keys(*keys: bytes) -> None:  # swapped in whole, as the kubelet updates a mounted Secret
        tmp = e2e.route_key.with_suffix(".new")
        tmp.write_bytes(b"".join(k + b"\n" for k in keys))
        os.replace(tmp, e2e.route_key)

    write_keys(new, old)
    until(lambda: _route_token(api, ns) == routekey.token(new, ns, "web"), "the routes signed with the new key")
    assert proxied(vs_spec(api, ns, "web")) and replicas(api, ns, "web") == (0, 0), "a rotation wakes nothing"

    # An ElastiService that does not exist: a token the activator accepts gets 404, one it refuses 403.
    activator = "http://elasti-activator.elasti-system.svc.cluster.local:8012/rotation"
    probe = {"elasti-service": f"{ns}/absent", "elasti-token": routekey.token(old, ns, "absent")}
    assert e2e.sidecar.get(activator, headers=probe).status == 404, "the old key is still accepted meanwhile"
    write_keys(new)
    until(lambda: e2e.sidecar.get(activator, headers=probe).status == 403, "the old key refused by the activator")

    ans = e2e.sidecar.get(url(ns, "/after-rotation"))
    assert ans.status == 200 and ans.cold, ans
