"""Starts, inspects and stops the local control plane.

``up`` starts etcd, kube-apiserver, kube-controller-manager and the kubelet stand-in as background
processes with their logs in the state dir, installs the CRDs and waits until they are Established.
The state dir (``state.json``) is how ``status`` and ``down`` find the processes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from elasti_istio.kube import Kube, KubeError, load_connection
from elasti_istio.localcluster import binaries, crds, identities
from elasti_istio.resources import CRDS, NODES

DEFAULT_STATE_DIR = ".elasti/cluster"
DEFAULT_NODE = "elasti-sim-node"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kubelet")


class ClusterError(RuntimeError):
    """A problem the user can act on; the message says what to do."""


@dataclasses.dataclass
class ClusterInfo:
    state_dir: Path
    server: str
    admin_kubeconfig: Path
    controller_kubeconfig: Path
    activator_kubeconfig: Path
    pod_cidr: str
    node_name: str


def _pdeathsig() -> None:
    """Child dies with the process that started it (used when a test session owns the cluster)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def pid_alive(pid: int | None, name: str | None = None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
        if name:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            return name in cmd
    except OSError:
        return False
    return True


def _pod_octet(state_dir: Path) -> int:
    """Second octet of the pod range: derived from the state dir so two clusters rarely collide."""
    return 10 + int(hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest(), 16) % 240


class LocalCluster:
    def __init__(
        self,
        state_dir: str | os.PathLike[str] = DEFAULT_STATE_DIR,
        *,
        apiserver_port: int = 0,
        node_name: str = DEFAULT_NODE,
        startup_seconds: float = 1.0,
        attached: bool = False,
        log: Callable[[str], None] | None = None,
        mesh_proxy: str | None = None,
    ) -> None:
        self.state_dir = Path(state_dir).absolute()
        self.mesh_proxy = mesh_proxy  # the kubelet's apps call other services through it
        self.apiserver_port = apiserver_port
        self.node_name = node_name
        self.startup_seconds = startup_seconds
        self.attached = attached
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    # ---- state -------------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    def read_state(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise ClusterError(f"{self.state_file} is unreadable ({exc}); remove {self.state_dir}") from exc

    def _write_state(self, state: dict[str, Any]) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_file)

    def info(self, state: dict[str, Any] | None = None) -> ClusterInfo:
        state = state or self.read_state()
        if not state:
            raise ClusterError(f"no cluster in {self.state_dir}; start one with `elasti-istio cluster up`")
        return ClusterInfo(
            state_dir=self.state_dir,
            server=state["server"],
            admin_kubeconfig=self.state_dir / "admin.kubeconfig",
            controller_kubeconfig=self.state_dir / "controller.kubeconfig",
            activator_kubeconfig=self.state_dir / "activator.kubeconfig",
            pod_cidr=state["pod_cidr"],
            node_name=state["node_name"],
        )

    def component_status(self, state: dict[str, Any] | None = None) -> dict[str, bool]:
        state = state or self.read_state() or {}
        procs = state.get("procs", {})
        return {
            name: pid_alive(procs.get(name, {}).get("pid"), procs.get(name, {}).get("match")) for name in COMPONENTS
        }

    def apiserver_healthy(self, state: dict[str, Any] | None = None) -> bool:
        state = state or self.read_state()
        if not state:
            return False
        try:
            self._http_get(state["server"] + "/readyz", state["tokens"]["admin"], timeout=3)
            return True
        except (OSError, urllib.error.URLError):
            return False

    # ---- up ----------------------------------------------------------------------------------
    def up(self) -> ClusterInfo:
        state = self.read_state()
        if state is not None:
            alive = self.component_status(state)
            if all(alive.values()) and self.apiserver_healthy(state):
                self.log(f"cluster already running in {self.state_dir}")
                return self.info(state)
            dead = ", ".join(n for n, ok in alive.items() if not ok) or "kube-apiserver not healthy"
            raise ClusterError(
                f"stale state dir {self.state_dir}: a cluster was started here but is not running ({dead} "
                f"down). Run `elasti-istio cluster down --state-dir {self.state_dir}` to clean it up, then up again."
            )
        if self.apiserver_port and port_in_use(self.apiserver_port):
            raise ClusterError(
                f"port {self.apiserver_port} on 127.0.0.1 is in use by another process; choose another with "
                "--apiserver-port (0 picks a free one) or stop that process"
            )
        bins = binaries.find(install=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            return self._up(bins)
        except BaseException:
            self.log("cluster up failed; stopping what was started")
            with contextlib.suppress(Exception):
                self.down(quiet=True, keep_logs=True)
            raise

    def _up(self, bins: Path) -> ClusterInfo:
        sd = self.state_dir
        (sd / "logs").mkdir(exist_ok=True)
        pki = sd / "pki"
        sa_key, sa_pub = identities.make_service_account_key(pki)
        tokens = identities.write_tokens(sd / "tokens.csv")
        shm = Path("/dev/shm")
        if shm.is_dir() and os.access(shm, os.W_OK):
            etcd_data = shm / f"elasti-etcd-{hashlib.sha256(str(sd).encode()).hexdigest()[:12]}"
            shutil.rmtree(etcd_data, ignore_errors=True)
        else:
            etcd_data = sd / "etcd"
        etcd_port, peer_port = free_port(), free_port()
        api_port = self.apiserver_port or free_port()
        server = f"https://127.0.0.1:{api_port}"
        octet = _pod_octet(sd)
        state: dict[str, Any] = {
            "version": 1,
            "server": server,
            "ports": {"etcd": etcd_port, "etcd_peer": peer_port, "apiserver": api_port},
            "etcd_data": str(etcd_data),
            "pod_cidr": f"127.{octet}.0.0/16",
            "node_name": self.node_name,
            "tokens": tokens,
            "procs": {},
        }
        self._write_state(state)

        t0 = time.monotonic()
        self.log("starting etcd")
        self._start(
            state,
            "etcd",
            [
                str(bins / "etcd"),
                "--name",
                "elasti",
                "--data-dir",
                str(etcd_data),
                "--listen-client-urls",
                f"http://127.0.0.1:{etcd_port}",
                "--advertise-client-urls",
                f"http://127.0.0.1:{etcd_port}",
                "--listen-peer-urls",
                f"http://127.0.0.1:{peer_port}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{peer_port}",
                "--initial-cluster",
                f"elasti=http://127.0.0.1:{peer_port}",
                "--log-level",
                "warn",
            ],
            match="etcd",
        )
        self._wait(lambda: self._http_get(f"http://127.0.0.1:{etcd_port}/health", None), "etcd", 30)

        self.log("starting kube-apiserver")
        cert_dir = pki / "apiserver"
        self._start(
            state, "kube-apiserver", self.apiserver_argv(bins, state, cert_dir, sa_key, sa_pub), match="kube-apiserver"
        )
        self._wait(lambda: self._http_get(server + "/readyz", tokens["admin"]), "kube-apiserver", 90)
        ca = cert_dir / "apiserver.crt"
        ca_file = ca if ca.exists() else None
        for ident in identities.IDENTITIES:
            identities.write_kubeconfig(
                sd / f"{ident}.kubeconfig", server, ca_file, identities.IDENTITIES[ident][0], tokens[ident]
            )

        self.log("starting kube-controller-manager")
        self._start(
            state,
            "kube-controller-manager",
            [
                str(bins / "kube-controller-manager"),
                "--kubeconfig",
                str(sd / "admin.kubeconfig"),
                "--leader-elect=false",
                "--controllers=*,-nodelifecycle,-endpoint",
                f"--service-account-private-key-file={sa_key}",
                "--use-service-account-credentials=false",
                "--bind-address=127.0.0.1",
                "--secure-port=0",
                "--port=0",
                "--concurrent-deployment-syncs=10",
                "--concurrent-replicaset-syncs=10",
                "--concurrent-namespace-syncs=10",
                "--concurrent-gc-syncs=30",
                "--concurrent-service-endpoint-syncs=10",
                "--v=1",
            ],
            match="kube-controller-manager",
        )

        self.log("installing CRDs")
        asyncio.run(self._install_crds(sd / "admin.kubeconfig"))

        self.log("starting the kubelet stand-in")
        self._start(
            state,
            "kubelet",
            [
                sys.executable,
                "-m",
                "elasti_istio",
                "kubelet",
                "--kubeconfig",
                str(sd / "admin.kubeconfig"),
                "--node-name",
                self.node_name,
                "--pod-cidr",
                state["pod_cidr"],
                "--startup-seconds",
                str(self.startup_seconds),
                *(["--mesh-proxy", self.mesh_proxy] if self.mesh_proxy else []),
            ],
            match="elasti_istio",
        )
        asyncio.run(self._wait_node(sd / "admin.kubeconfig"))
        self.log(f"cluster up in {time.monotonic() - t0:.1f}s")
        return self.info(state)

    def apiserver_argv(
        self, bins: Path, state: dict[str, Any], cert_dir: Path, sa_key: Path, sa_pub: Path
    ) -> list[str]:
        return [
            str(bins / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{state['ports']['etcd']}",
            f"--cert-dir={cert_dir}",
            f"--secure-port={state['ports']['apiserver']}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            "--insecure-port=0",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={sa_pub}",
            f"--service-account-signing-key-file={sa_key}",
            "--authorization-mode=RBAC",
            f"--token-auth-file={self.state_dir / 'tokens.csv'}",
            "--allow-privileged=true",
            "--disable-admission-plugins=ServiceAccount",
            "--profiling=false",
            "--event-ttl=1h",
            "--v=0",
        ]

    def _start(self, state: dict[str, Any], name: str, argv: list[str], match: str) -> None:
        logf = (self.state_dir / "logs" / f"{name}.log").open("ab")
        env = dict(os.environ)
        proc = subprocess.Popen(
            argv,
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_pdeathsig if self.attached else None,
            env=env,
            cwd=str(self.state_dir),
        )
        logf.close()
        self.procs[name] = proc
        state["procs"][name] = {"pid": proc.pid, "argv": argv, "match": match}
        self._write_state(state)

    def restart_component(self, name: str, *, stop_only: bool = False) -> None:
        """Stops one component and starts it again with the same arguments (fault tests)."""
        state = self.read_state()
        if not state or name not in state["procs"]:
            raise ClusterError(f"{name} is not part of the cluster in {self.state_dir}")
        entry = state["procs"][name]
        _stop_pid(entry["pid"], entry.get("match"), self.procs.get(name))
        if stop_only:
            return
        self._start(state, name, entry["argv"], entry["match"])
        if name == "etcd":
            port = state["ports"]["etcd"]
            self._wait(lambda: self._http_get(f"http://127.0.0.1:{port}/health", None), "etcd", 30)
        elif name == "kube-apiserver":
            self._wait(
                lambda: self._http_get(state["server"] + "/readyz", state["tokens"]["admin"]), "kube-apiserver", 90
            )

    def _wait(self, probe: Callable[[], Any], name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise ClusterError(f"{name} exited with code {proc.returncode}:\n{self._tail(name)}")
            try:
                probe()
                return
            except Exception as exc:
                last = exc
            time.sleep(0.2)
        raise ClusterError(f"{name} not ready after {timeout:.0f}s ({last}):\n{self._tail(name)}")

    def _tail(self, name: str, lines: int = 25) -> str:
        path = self.state_dir / "logs" / f"{name}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return f"(no log at {path})"

    @staticmethod
    def _http_get(url: str, token: str | None, timeout: float = 2.0) -> bytes:
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
            return bytes(resp.read())

    async def _install_crds(self, kubeconfig: Path) -> None:
        async with Kube(load_connection(str(kubeconfig))) as kube:
            version = await kube.request("GET", "/version")
            minor = int("".join(ch for ch in str(version.get("minor", "20")) if ch.isdigit()) or 20)
            names = []
            for doc in crds.all_crds():
                doc = crds.sanitize(doc, minor)
                names.append(doc["metadata"]["name"])
                await apply_crd(kube, doc)
            deadline = time.monotonic() + 60
            pending = set(names)
            while pending and time.monotonic() < deadline:
                for name in sorted(pending):
                    obj = await kube.get(CRDS, name)
                    conds = {c["type"]: c["status"] for c in (obj.get("status") or {}).get("conditions") or []}
                    if conds.get("Established") == "True":
                        pending.discard(name)
                if pending:
                    await asyncio.sleep(0.2)
            if pending:
                raise ClusterError(f"CRDs not Established after 60s: {', '.join(sorted(pending))}")

    async def _wait_node(self, kubeconfig: Path) -> None:
        async with Kube(load_connection(str(kubeconfig))) as kube:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                proc = self.procs.get("kubelet")
                if proc is not None and proc.poll() is not None:
                    raise ClusterError(f"kubelet stand-in exited with code {proc.returncode}:\n{self._tail('kubelet')}")
                node = await kube.get_or_none(NODES, self.node_name)
                if node:
                    return
                await asyncio.sleep(0.2)
            raise ClusterError(f"node {self.node_name} not registered after 30s:\n{self._tail('kubelet')}")

    # ---- down --------------------------------------------------------------------------------
    def down(self, *, quiet: bool = False, keep_logs: bool = False) -> bool:
        """Stops every process and removes the state; False when there was nothing to stop."""
        state = self.read_state()
        if state is None and not self.state_dir.exists():
            if not quiet:
                self.log(f"no cluster in {self.state_dir}")
            return False
        procs = (state or {}).get("procs", {})
        for name in reversed(COMPONENTS):
            entry = procs.get(name)
            if entry:
                _stop_pid(entry["pid"], entry.get("match"), self.procs.get(name))
                if not quiet:
                    self.log(f"stopped {name}")
        etcd_data = (state or {}).get("etcd_data")
        if etcd_data:
            shutil.rmtree(etcd_data, ignore_errors=True)
        if keep_logs:
            self.state_file.unlink(missing_ok=True)
        else:
            shutil.rmtree(self.state_dir, ignore_errors=True)
        return True


def _stop_pid(pid: int, match: str | None, proc: subprocess.Popen[bytes] | None, grace: float = 10.0) -> None:
    if proc is not None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        return
    if not pid_alive(pid, match):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and pid_alive(pid, match):
        time.sleep(0.1)
    if pid_alive(pid, match):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


async def apply_crd(kube: Kube, doc: dict[str, Any]) -> None:
    name = doc["metadata"]["name"]
    try:
        await kube.create(CRDS, doc)
    except KubeError as exc:
        if exc.status != 409:
            raise ClusterError(f"CRD {name} refused by the API server: {exc.message}") from exc
        current = await kube.get(CRDS, name)
        doc = dict(doc, metadata=dict(doc["metadata"], resourceVersion=current["metadata"]["resourceVersion"]))
        await kube.replace(CRDS, name, doc)
