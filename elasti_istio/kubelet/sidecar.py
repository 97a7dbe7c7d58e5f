"""Istio sidecars for simulated pods: a real Envoy per pod, fed by istiod, without traffic capture.

A pod gets one when it asks as Istio's injector reads it (label or annotation
``sidecar.istio.io/inject: "true"``, or its namespace labelled ``istio-injection=enabled``, unless
the pod says ``"false"``). There is no iptables here, so the sidecar works as Istio's
``captureMode: NONE`` does: an Istio ``Sidecar`` resource (owned by the pod, so it goes with it)
gives the proxy one HTTP egress listener per port, bound on the sidecar's own address, and the pod's
apps send their calls there (``http://<sidecar>:<port>``, Host naming the service). The sidecar's
address is the pod's address moved into the range after the pod range, and is written on the pod
(annotation ``elasti.truefoundry.com/sim-sidecar-address``) for whoever plays the pod's process.
The pod turns Ready only once its Envoy is LIVE (has its first configuration from istiod), as
pilot-agent's readiness probe would have it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from elasti_istio.kube import Kube, KubeError
from elasti_istio.kube.client import Resource
from elasti_istio.localcluster import istio
from elasti_istio.localcluster.podnet import enter_netns
from elasti_istio.resources import GROUP, NAMESPACES

log = logging.getLogger("elasti.kubelet.sidecar")

SIDECARS = Resource("networking.istio.io", "v1", "sidecars", kind="Sidecar")
INJECT = "sidecar.istio.io/inject"
ANN_SIDECAR_PORTS = f"{GROUP}/sim-sidecar-ports"
ANN_SIDECAR_ADDRESS = f"{GROUP}/sim-sidecar-address"
ADMIN_PORT = 15000
# 8012: the activator's port. A route moved to the activator needs a cluster for it, and a sidecar imports
# only the Services that have one of its egress listeners' ports.
DEFAULT_PORTS = (80, 8012, 8080, 9080, 9090)


def parse_ports(raw: str) -> tuple[int, ...]:
    ports = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        port = int(part)
        if not 0 < port < 65536 or port == ADMIN_PORT:
            raise ValueError(f"bad sidecar port {part!r} (1-65535, not {ADMIN_PORT})")
        ports.append(port)
    if not ports:
        raise ValueError("no sidecar port given")
    return tuple(dict.fromkeys(ports))


def wants_sidecar(pod: dict[str, Any], namespace_labels: dict[str, str]) -> bool:
    meta = pod.get("metadata") or {}
    own = (meta.get("labels") or {}).get(INJECT) or (meta.get("annotations") or {}).get(INJECT)
    if own is not None:
        return own.lower() == "true"
    return namespace_labels.get("istio-injection") == "enabled"


def selector_value(pod_name: str) -> str:
    """A label value naming the pod (pod names may exceed a label value's 63 characters)."""
    if len(pod_name) <= 63:
        return pod_name
    return f"{pod_name[:50]}-{hashlib.sha256(pod_name.encode()).hexdigest()[:12]}"


def sidecar_resource(pod: dict[str, Any], address: str, ports: tuple[int, ...]) -> dict[str, Any]:
    meta = pod["metadata"]
    return {
        "apiVersion": f"{SIDECARS.group}/{SIDECARS.version}",
        "kind": "Sidecar",
        "metadata": {
            "name": f"sim-{selector_value(meta['name'])}"[:253],
            "namespace": meta["namespace"],
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"], "controller": False}
            ],
        },
        "spec": {
            "workloadSelector": {"labels": {istio.SIDECAR_LABEL: selector_value(meta["name"])}},
            # Without capture there is no original destination to pass unknown hosts through to.
            "outboundTrafficPolicy": {"mode": "REGISTRY_ONLY"},
            "egress": [
                {
                    "port": {"number": p, "protocol": "HTTP", "name": f"http-{p}"},
                    "bind": address,
                    "captureMode": "NONE",
                    "hosts": ["*/*"],
                }
                for p in ports
            ],
        },
    }


@dataclass
class SidecarConfig:
    envoy: Path
    xds: tuple[str, int]
    run_dir: Path
    netns: str | None
    pods_net: ipaddress.IPv4Network
    ports: tuple[int, ...] = DEFAULT_PORTS

    def address_of(self, pod_ip: str) -> str:
        return str(ipaddress.ip_address(pod_ip) + self.pods_net.num_addresses)


class Sidecar:
    """One pod's Envoy process."""

    def __init__(self, cfg: SidecarConfig, kube: Kube, pod: dict[str, Any], pod_ip: str) -> None:
        self.cfg = cfg
        self.kube = kube
        self.pod = pod
        self.address = cfg.address_of(pod_ip)
        meta = pod["metadata"]
        self.namespace, self.name = meta["namespace"], meta["name"]
        raw = (meta.get("annotations") or {}).get(ANN_SIDECAR_PORTS)
        self.ports = cfg.ports
        if raw:
            try:
                self.ports = parse_ports(raw)
            except ValueError as exc:
                log.error("%s/%s: bad %s (%s); using %s", self.namespace, self.name, ANN_SIDECAR_PORTS, exc, cfg.ports)
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def admin(self) -> str:
        return f"http://{self.address}:{ADMIN_PORT}"

    async def start(self, timeout: float = 60.0) -> bool:
        """Creates the Sidecar resource, starts Envoy and waits until it is LIVE; False if it did not get there."""
        try:
            await self.kube.create(SIDECARS, sidecar_resource(self.pod, self.address, self.ports), self.namespace)
        except KubeError as exc:
            if exc.status != 409:
                log.error("%s/%s: cannot create its Sidecar resource: %s", self.namespace, self.name, exc.message)
                return False
        labels = dict(self.pod["metadata"].get("labels") or {})
        static = {istio.SIDECAR_LABEL: selector_value(self.name)}
        owner = next(iter(self.pod["metadata"].get("ownerReferences") or []), {}).get("name")
        bootstrap = istio.write_json(
            self.cfg.run_dir / f"{self.namespace}_{self.name}.json",
            istio.envoy_bootstrap(
                kind="sidecar",
                ip=self.address,
                pod=self.name,
                namespace=self.namespace,
                labels=labels,
                static_labels=static,
                xds=self.cfg.xds,
                admin=(self.address, ADMIN_PORT),
                workload=owner,
            ),
        )
        logf = (self.cfg.run_dir / f"{self.namespace}_{self.name}.log").open("ab")
        netns = self.cfg.netns

        def preexec() -> None:
            import ctypes

            with contextlib.suppress(Exception):
                ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # dies with the kubelet
            if netns:
                enter_netns(netns)

        try:
            self.proc = await asyncio.create_subprocess_exec(
                *istio.envoy_argv(self.cfg.envoy, bootstrap),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                preexec_fn=preexec,
                start_new_session=True,
            )
        finally:
            logf.close()
        log.info("%s/%s: sidecar %s (ports %s) starting", self.namespace, self.name, self.address, self.ports)
        return await self._wait_live(timeout)

    async def _wait_live(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while loop.time() < deadline:
                if self.proc is None or self.proc.returncode is not None:
                    log.error(
                        "%s/%s: sidecar exited (%s)", self.namespace, self.name, self.proc and self.proc.returncode
                    )
                    return False
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                    async with session.get(f"{self.admin}/ready") as resp:
                        if resp.status == 200:
                            log.info("%s/%s: sidecar %s live", self.namespace, self.name, self.address)
                            return True
                await asyncio.sleep(0.05)
        log.error("%s/%s: sidecar not live after %.0fs", self.namespace, self.name, timeout)
        return False

    async def stop(self, grace: float = 2.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


async def namespace_labels(kube: Kube, namespace: str) -> dict[str, str]:
    try:
        ns = await kube.get(NAMESPACES, namespace)
    except KubeError:
        return {}
    return dict((ns.get("metadata") or {}).get("labels") or {})
