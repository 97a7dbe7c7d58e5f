"""The pod network of the local cluster: a network namespace that owns the pod range.

Current Kubernetes refuses loopback addresses in EndpointSlices ("may not be in the loopback
range"), so pods cannot live on 127.x.y.z. Instead each cluster makes its own network namespace
(a test host of its own on this machine) in which a whole private /17 is local (``ip route add
local``: any address in it can be bound without being configured, as 127/8 on ``lo``), joined to
this namespace by a veth pair:

    this namespace  10.O.128.1/30 ──veth── 10.O.128.2/30  netns elasti-<id>
    route 10.O.0.0/17 via 10.O.128.2                      local 10.O.0.0/17 dev lo

Whatever serves a pod address (the kubelet stand-in's apps, the Envoy proxies) listens inside the
namespace; everything else (the API server, istiod, tests) stays here and reaches pods through the
route. No packet leaves the machine. Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import ipaddress
import os
import shutil
import subprocess
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")


class PodNetworkError(RuntimeError):
    """The pod network could not be made; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class PodNetwork:
    """Names and addresses of one cluster's pod network (``octet`` picks the 10.O.0.0/17 range)."""

    ident: str
    octet: int

    @property
    def netns(self) -> str:
        return f"elasti-{self.ident}"

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.netns

    @property
    def host_if(self) -> str:
        return f"ev{self.ident}"[:15]

    @property
    def ns_if(self) -> str:
        return f"ep{self.ident}"[:15]

    @property
    def pod_cidr(self) -> str:
        return f"10.{self.octet}.0.0/17"

    @property
    def pods_cidr(self) -> str:
        """Where the kubelet stand-in takes pod addresses; the next /18 holds their sidecars' addresses."""
        return f"10.{self.octet}.0.0/18"

    @property
    def host_ip(self) -> str:
        """This namespace's end of the veth: where processes in the pod network reach istiod."""
        return f"10.{self.octet}.128.1"

    @property
    def ns_ip(self) -> str:
        return f"10.{self.octet}.128.2"

    def exists(self) -> bool:
        return self.netns_path.exists()

    def up(self) -> None:
        """Makes the namespace, the veth pair and the routes (idempotent: a complete network is kept)."""
        if shutil.which("ip") is None:
            raise PodNetworkError("the `ip` command (Debian's iproute2) is needed for the pod network")
        if os.geteuid() != 0:
            raise PodNetworkError("the local cluster's pod network needs root (a network namespace and a veth pair)")
        if self.exists():
            self.down()
        net = ipaddress.ip_network(self.pod_cidr)
        link = f"10.{self.octet}.128.0/30"
        if any(net.overlaps(n) or ipaddress.ip_network(link).overlaps(n) for n in _host_networks()):
            raise PodNetworkError(
                f"the pod range {self.pod_cidr} overlaps a network of this machine; use another state dir"
            )
        steps = [
            ["ip", "netns", "add", self.netns],
            ["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if],
            ["ip", "link", "set", self.ns_if, "netns", self.netns],
            ["ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if],
            ["ip", "link", "set", self.host_if, "up"],
            ["ip", "-n", self.netns, "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if],
            ["ip", "-n", self.netns, "link", "set", self.ns_if, "up"],
            ["ip", "-n", self.netns, "link", "set", "lo", "up"],
            ["ip", "-n", self.netns, "route", "add", "local", self.pod_cidr, "dev", "lo"],
            ["ip", "route", "add", self.pod_cidr, "via", self.ns_ip, "dev", self.host_if],
        ]
        for argv in steps:
            proc = subprocess.run(argv, capture_output=True, text=True)
            if proc.returncode != 0:
                self.down()
                raise PodNetworkError(f"`{' '.join(argv)}` failed: {proc.stderr.strip() or proc.returncode}")

    def down(self) -> None:
        """Removes the route, the veth pair (both ends go together) and the namespace; quiet if absent."""
        for argv in (
            ["ip", "route", "del", self.pod_cidr],
            ["ip", "link", "del", self.host_if],
            ["ip", "netns", "del", self.netns],
        ):
            subprocess.run(argv, capture_output=True)

    def enter(self) -> Callable[[], None]:
        """A ``preexec_fn`` that moves a child process into the pod network before it runs."""
        path = str(self.netns_path)

        def _enter() -> None:
            enter_netns(path)

        return _enter


def _host_networks() -> list[ipaddress.IPv4Network]:
    """The IPv4 networks configured on this namespace's interfaces (to avoid shadowing one)."""
    proc = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True)
    out = []
    for line in proc.stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            with contextlib.suppress(ValueError):
                out.append(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
    return [n for n in out if not n.is_loopback]


def enter_netns(path: str) -> None:
    """Moves the calling thread into the network namespace at ``path``."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


class NetnsSockets:
    """Makes listening sockets inside a network namespace for a process that stays outside it.

    A socket belongs to the namespace of the thread that created it, whichever thread uses it later;
    one worker thread enters the namespace once and creates them all.
    """

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                assert self.path is not None
                path = self.path
                self._pool = ThreadPoolExecutor(1, "netns", initializer=enter_netns, initargs=(path,))
            return self._pool

    def listen(self, host: str, port: int, backlog: int = 1024) -> Any:
        import socket

        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((host, port))
                s.listen(backlog)
                s.setblocking(False)
            except BaseException:
                s.close()
                raise
            return s

        if not self.path:
            return make()
        return self._executor().submit(make).result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
