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
from elasti_istio.localcluster import binaries, crds, identities, istio
from elasti_istio.localcluster.podnet import PodNetwork, PodNetworkError, enter_netns
from elasti_istio.resources import CRDS, NAMESPACES, NODES, SERVICES, VALIDATING_WEBHOOKS, VIRTUALSERVICES

DEFAULT_STATE_DIR = ".elasti/cluster"
DEFAULT_NODE = "elasti-sim-node"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "istiod", "kubelet", "ingress-gateway")


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
    gateway: str = ""
    gateway_admin: str = ""
    istiod: str = ""

    @property
    def gateway_url(self) -> str:
        """The ingress gateway (Envoy, fed by istiod) as the test client reaches it."""
        return f"http://{self.gateway}"


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


def pod_network(state_dir: Path) -> PodNetwork:
    """The cluster's pod network: names and range derived from the state dir, so two clusters rarely collide."""
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()
    return PodNetwork(ident=digest[:8], octet=16 + int(digest, 16) % 224)


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
    ) -> None:
        self.state_dir = Path(state_dir).absolute()
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
            gateway=state.get("gateway", ""),
            gateway_admin=f"http://{state['gateway_admin']}" if state.get("gateway_admin") else "",
            istiod=f"http://127.0.0.1:{state['ports']['istiod_http']}" if "istiod_http" in state["ports"] else "",
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

    def _up(self, bins: binaries.Binaries) -> ClusterInfo:
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
        podnet = pod_network(sd)
        state: dict[str, Any] = {
            "version": 1,
            "server": server,
            "ports": {"etcd": etcd_port, "etcd_peer": peer_port, "apiserver": api_port},
            "etcd_data": str(etcd_data),
            "pod_cidr": podnet.pod_cidr,
            "netns": podnet.netns,
            "pod_network": {"ident": podnet.ident, "octet": podnet.octet},
            "node_name": self.node_name,
            "tokens": tokens,
            "procs": {},
        }
        self._write_state(state)

        t0 = time.monotonic()
        self.log(f"making the pod network {podnet.pod_cidr} (network namespace {podnet.netns})")
        try:
            podnet.up()
        except PodNetworkError as exc:
            raise ClusterError(str(exc)) from exc
        self.log("starting etcd")
        self._start(
            state,
            "etcd",
            [
                str(bins["etcd"]),
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
                str(bins["kube-controller-manager"]),
                "--kubeconfig",
                str(sd / "admin.kubeconfig"),
                "--leader-elect=false",
                "--controllers=*,-node-lifecycle-controller",
                f"--service-account-private-key-file={sa_key}",
                "--use-service-account-credentials=false",
                "--bind-address=127.0.0.1",
                "--secure-port=0",
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
        asyncio.run(self._install_crds(sd / "admin.kubeconfig", bins.istio_crds))

        self.log("starting istiod")
        self._start_istiod(bins, state, podnet)

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
                podnet.pods_cidr,
                "--netns",
                str(podnet.netns_path),
                "--envoy",
                str(bins["envoy"]),
                "--xds-address",
                f"{podnet.host_ip}:{state['ports']['istiod_xds']}",
                "--run-dir",
                str(sd / "sidecars"),
                "--startup-seconds",
                str(self.startup_seconds),
            ],
            match="elasti_istio",
        )
        asyncio.run(self._wait_node(sd / "admin.kubeconfig"))

        self.log("starting the ingress gateway (Envoy)")
        self._start_gateway(bins, state, podnet)
        self.log(f"cluster up in {time.monotonic() - t0:.1f}s")
        return self.info(state)

    def apiserver_argv(
        self, bins: binaries.Binaries, state: dict[str, Any], cert_dir: Path, sa_key: Path, sa_pub: Path
    ) -> list[str]:
        return [
            str(bins["kube-apiserver"]),
            f"--etcd-servers=http://127.0.0.1:{state['ports']['etcd']}",
            f"--cert-dir={cert_dir}",
            f"--secure-port={state['ports']['apiserver']}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            # No Endpoints for the kubernetes Service: its address (loopback) is not a valid endpoint.
            "--endpoint-reconciler-type=none",
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

    def _start(
        self,
        state: dict[str, Any],
        name: str,
        argv: list[str],
        match: str,
        *,
        env: dict[str, str] | None = None,
        netns: str | None = None,
    ) -> None:
        logf = (self.state_dir / "logs" / f"{name}.log").open("ab")
        attached = self.attached

        def preexec() -> None:
            if attached:
                _pdeathsig()
            if netns:
                enter_netns(netns)

        proc = subprocess.Popen(
            argv,
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=preexec if (attached or netns) else None,
            env={**os.environ, **(env or {})},
            cwd=str(self.state_dir),
        )
        logf.close()
        self.procs[name] = proc
        state["procs"][name] = {"pid": proc.pid, "argv": argv, "match": match, "env": env or {}, "netns": netns}
        self._write_state(state)

    def _start_istiod(self, bins: binaries.Binaries, state: dict[str, Any], podnet: PodNetwork) -> None:
        sd = self.state_dir
        ports = state["ports"]
        ports["istiod_xds"] = free_port(podnet.host_ip)
        for key in ("istiod_http", "istiod_webhook", "istiod_monitoring", "istiod_ctrlz"):
            ports[key] = free_port()
        certs = istio.make_certificates(sd / "pki" / "istio")
        argv = istio.istiod_argv(
            bins["pilot-discovery"], sd / "admin.kubeconfig", sd / "istio", certs, ports, podnet.host_ip
        )
        asyncio.run(self._prepare_istio_namespace(sd / "admin.kubeconfig"))
        self._start(state, "istiod", argv, match="pilot-discovery", env=dict(istio.ISTIOD_ENV))
        ready = f"http://127.0.0.1:{ports['istiod_http']}/ready"
        self._wait(lambda: self._http_get(ready, None), "istiod", 120)
        webhook = istio.webhook_configuration(
            f"https://127.0.0.1:{ports['istiod_webhook']}/validate", certs["ca"].read_bytes()
        )
        asyncio.run(self._register_webhook(sd / "admin.kubeconfig", webhook))

    async def _prepare_istio_namespace(self, kubeconfig: Path) -> None:
        async with Kube(load_connection(str(kubeconfig))) as kube:
            ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": istio.ISTIO_NAMESPACE}}
            for res, body, where in (
                (NAMESPACES, ns, None),
                (SERVICES, istio.gateway_service(), istio.ISTIO_NAMESPACE),
            ):
                try:
                    await kube.create(res, body, where)
                except KubeError as exc:
                    if exc.status != 409:
                        raise

    async def _register_webhook(self, kubeconfig: Path, webhook: dict[str, Any]) -> None:
        """Registers Istio's validating webhook and waits until it judges writes (a refused dry run)."""
        async with Kube(load_connection(str(kubeconfig))) as kube:
            try:
                await kube.create(VALIDATING_WEBHOOKS, webhook)
            except KubeError as exc:
                if exc.status != 409:
                    raise
            probe = {
                "apiVersion": f"{VIRTUALSERVICES.group}/{VIRTUALSERVICES.version}",
                "kind": "VirtualService",
                "metadata": {"name": "elasti-webhook-probe"},
                "spec": {
                    "hosts": ["probe"],
                    "http": [
                        {
                            "route": [
                                {"destination": {"host": "a"}, "weight": 0},
                                {"destination": {"host": "b"}, "weight": 0},
                            ]
                        }
                    ],
                },
            }
            deadline = time.monotonic() + 60
            last = ""
            while time.monotonic() < deadline:
                try:
                    await kube.request(
                        "POST", VIRTUALSERVICES.path(istio.ISTIO_NAMESPACE), body=probe, params={"dryRun": "All"}
                    )
                    last = "an invalid VirtualService was accepted"
                except KubeError as exc:
                    if "total destination weight = 0" in exc.message:
                        return
                    last = exc.message
                await asyncio.sleep(0.2)
            raise ClusterError(f"Istio's validating webhook is not judging VirtualServices after 60s ({last})")

    def _start_gateway(self, bins: binaries.Binaries, state: dict[str, Any], podnet: PodNetwork) -> None:
        sd = self.state_dir
        admin_port = 15000  # on the gateway's own address in the pod network
        bootstrap = istio.write_json(
            sd / "istio" / "gateway.json",
            istio.envoy_bootstrap(
                kind="router",
                ip=podnet.ns_ip,
                pod="istio-ingressgateway-local",
                namespace=istio.ISTIO_NAMESPACE,
                labels=dict(istio.GATEWAY_LABELS),
                xds=(podnet.host_ip, state["ports"]["istiod_xds"]),
                admin=(podnet.ns_ip, admin_port),
                workload=istio.GATEWAY_SERVICE,
            ),
        )
        state["gateway"] = f"{podnet.ns_ip}:{istio.GATEWAY_TARGET_PORT}"
        state["gateway_admin"] = f"{podnet.ns_ip}:{admin_port}"
        self._start(
            state,
            "ingress-gateway",
            istio.envoy_argv(bins["envoy"], bootstrap),
            match="envoy",
            netns=str(podnet.netns_path),
        )
        admin = f"http://{podnet.ns_ip}:{admin_port}/ready"
        self._wait(lambda: self._http_get(admin, None), "ingress-gateway", 60)

    def restart_component(self, name: str, *, stop_only: bool = False) -> None:
        """Stops one component and starts it again with the same arguments (fault tests)."""
        state = self.read_state()
        if not state or name not in state["procs"]:
            raise ClusterError(f"{name} is not part of the cluster in {self.state_dir}")
        entry = state["procs"][name]
        _stop_pid(entry["pid"], entry.get("match"), self.procs.get(name))
        if stop_only:
            return
        self._start(state, name, entry["argv"], entry["match"], env=entry.get("env"), netns=entry.get("netns"))
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

    async def _install_crds(self, kubeconfig: Path, istio_crds: Path) -> None:
        async with Kube(load_connection(str(kubeconfig))) as kube:
            names = []
            for doc in crds.all_crds(istio_crds):
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
        net = (state or {}).get("pod_network")
        if net:
            PodNetwork(**net).down()
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
