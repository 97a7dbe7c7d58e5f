"""The real ``elasti-istio activator`` process: SIGTERM turns it unready, closes the listener, lets held
requests finish (released by the status watch) and exits 0 within the drain timeout.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from elasti_istio.kube import Kube, load_connection
from elasti_istio.localcluster.cluster import ClusterInfo, free_port
from elasti_istio.resources import ELASTISERVICES
from tests.activator_stubs import MeshProxy, WakeEndpoint, serve
from tests.cluster.test_activator_registry import es_body
from tests.unit.test_activator_proxy import backend_app


class Running:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, admin: int, log: Path) -> None:
        self.proc, self.port, self.admin, self.log = proc, port, admin, log
        self.url = f"http://127.0.0.1:{port}"
        self.admin_url = f"http://127.0.0.1:{admin}"


@pytest.fixture
async def stubs() -> AsyncIterator[tuple[MeshProxy, WakeEndpoint, int]]:
    runner, backend_port = await serve(backend_app({}))
    mesh = await MeshProxy().start()
    wake = await WakeEndpoint().start()
    try:
        yield mesh, wake, backend_port
    finally:
        await wake.stop()
        await mesh.stop()
        await runner.cleanup()


def start_activator(
    cluster: ClusterInfo, namespace: str, mesh: MeshProxy, wake: WakeEndpoint, tmp: Path, drain: float
) -> Running:
    port, admin = free_port(), free_port()
    log = tmp / "activator.log"
    env = dict(os.environ, ELASTI_NAMESPACE=namespace)  # a repeatable flag through its variable
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "elasti_istio",
            "activator",
            "--listen",
            f"127.0.0.1:{port}",
            "--admin-listen",
            f"127.0.0.1:{admin}",
            "--kubeconfig",
            str(cluster.admin_kubeconfig),
            "--controller-url",
            wake.url,
            "--upstream-proxy",
            mesh.url,
            "--drain-timeout",
            str(drain),
        ],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
        env=env,
    )
    return Running(proc, port, admin, log)


async def wait_ready(client: aiohttp.ClientSession, act: Running) -> None:
    async with asyncio.timeout(30):
        while True:
            assert act.proc.poll() is None, act.log.read_text()
            try:
                async with client.get(act.admin_url + "/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)


async def pending(client: aiohttp.ClientSession, act: Running, ns: str, n: int) -> None:
    async with asyncio.timeout(30):
        while True:
            async with client.get(f"{act.admin_url}/v1/pending/{ns}/details") as r:
                if r.status == 200 and (await r.json())["pending"] == n:
                    return
            await asyncio.sleep(0.05)


async def exited(act: Running, timeout: float) -> int:
    async with asyncio.timeout(timeout):
        while act.proc.poll() is None:
            await asyncio.sleep(0.05)
    return act.proc.returncode


async def test_sigterm_drains_held_requests(
    cluster: ClusterInfo, namespace: str, stubs: tuple[MeshProxy, WakeEndpoint, int], tmp_path: Path
) -> None:
    mesh, wake, backend_port = stubs
    mesh.route(f"details-elasti-origin.{namespace}.svc.cluster.local:9080", f"http://127.0.0.1:{backend_port}")
    admin = Kube(load_connection(str(cluster.admin_kubeconfig)))
    await admin.create(ELASTISERVICES, es_body("details"), namespace)
    origin = {"service": "details-elasti-origin", "port": 9080}
    await admin.patch(
        ELASTISERVICES, "details", {"status": {"origin": origin, "readyReplicas": 0}}, namespace, sub="status"
    )
    act = start_activator(cluster, namespace, mesh, wake, tmp_path, drain=30)
    client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    try:
        await wait_ready(client, act)
        held = [asyncio.create_task(_get(client, act, namespace)) for _ in range(3)]
        await pending(client, act, namespace, 3)

        act.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            while True:  # unready while draining; the admin port stays up for the probes
                async with client.get(act.admin_url + "/readyz") as r:
                    if r.status == 503:
                        break
                await asyncio.sleep(0.05)
        with pytest.raises(OSError):  # the proxy listener is closed: no new connections
            await asyncio.open_connection("127.0.0.1", act.port)
        assert act.proc.poll() is None  # still draining: the held requests are not done

        await admin.patch(ELASTISERVICES, "details", {"status": {"readyReplicas": 1}}, namespace, sub="status")
        results = await asyncio.wait_for(asyncio.gather(*held), 30)
        assert [status for status, _ in results] == [200, 200, 200]
        assert all(cold == "true" for _, cold in results)
        assert await exited(act, 30) == 0, act.log.read_text()
        assert wake.count(namespace, "details") == 1
    finally:
        if act.proc.poll() is None:
            act.proc.kill()
        await client.close()
        await admin.close()


async def test_drain_timeout_answers_what_is_still_held(
    cluster: ClusterInfo, namespace: str, stubs: tuple[MeshProxy, WakeEndpoint, int], tmp_path: Path
) -> None:
    mesh, wake, _ = stubs
    admin = Kube(load_connection(str(cluster.admin_kubeconfig)))
    await admin.create(ELASTISERVICES, es_body("details"), namespace)
    act = start_activator(cluster, namespace, mesh, wake, tmp_path, drain=2)
    client = aiohttp.ClientSession()
    try:
        await wait_ready(client, act)
        held = asyncio.create_task(_get(client, act, namespace, full=True))
        await pending(client, act, namespace, 1)
        act.proc.send_signal(signal.SIGTERM)
        status, body = await asyncio.wait_for(held, 30)  # never ready: answered before the process exits
        assert status == 503 and b"shutting down" in body
        assert await exited(act, 30) == 0, act.log.read_text()
    finally:
        if act.proc.poll() is None:
            act.proc.kill()
        await client.close()
        await admin.close()


async def _get(client: aiohttp.ClientSession, act: Running, namespace: str, full: bool = False) -> tuple[int, Any]:
    async with client.get(act.url + "/echo", headers={"elasti-service": f"{namespace}/details"}) as r:
        body = await r.read()
        return r.status, body if full else r.headers.get("X-Elasti-Cold-Start")
