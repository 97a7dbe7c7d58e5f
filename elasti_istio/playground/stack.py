"""The whole system on one machine: local cluster (with istiod and the Envoy gateway), elasti-system,
activator, controller, Bookinfo.

Each part is a method so that a caller can time and narrate it; :meth:`Playground.stop` stops what was
started, newest first, and is safe to call at any point (also twice).
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from elasti_istio.localcluster.cluster import ClusterInfo, LocalCluster
from elasti_istio.playground import bookinfo, mesh, system
from elasti_istio.playground.manifests import Api
from elasti_istio.playground.procs import ActivatorProc, ControllerProc, Proc, free_ports


class PlaygroundError(RuntimeError):
    """A part did not come up; the message says which and where its log is."""


@dataclass
class Ports:
    activator: int
    activator_admin: int
    wake: int
    controller_metrics: int

    @classmethod
    def pick(cls) -> Ports:
        return cls(*free_ports(4))


@dataclass
class Playground:
    state_dir: Path
    startup_seconds: float = 1.0
    namespace: str = "bookinfo"
    log: Callable[[str], None] = lambda _msg: None
    ports: Ports = field(init=False)
    cluster: LocalCluster = field(init=False)
    info: ClusterInfo | None = field(init=False, default=None)
    api: Api | None = field(init=False, default=None)
    activator: ActivatorProc | None = field(init=False, default=None)
    client: str | None = field(init=False, default=None)
    controller: ControllerProc | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).absolute()
        self.ports = Ports.pick()
        self.cluster = LocalCluster(self.state_dir, attached=True, startup_seconds=self.startup_seconds, log=self.log)

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def gateway_url(self) -> str:
        """The Istio ingress gateway (Envoy) of the local cluster."""
        return self._info().gateway_url

    def procs(self) -> list[Proc]:
        return [p for p in (self.activator, self.controller) if p is not None]

    # ---- parts, in order --------------------------------------------------------------------
    def start_cluster(self) -> ClusterInfo:
        state = self.cluster.read_state()
        if state is not None:
            if all(self.cluster.component_status(state).values()) and self.cluster.apiserver_healthy(state):
                raise PlaygroundError(
                    f"a cluster is already running in {self.state_dir} (another demo with --keep?); stop it first "
                    "or choose another --state-dir"
                )
            self.cluster.down(quiet=True)  # what a killed earlier run left behind
        shutil.rmtree(self.logs_dir, ignore_errors=True)
        self.info = self.cluster.up()
        self.api = Api(self.info.admin_kubeconfig)
        return self.info

    def install_system(self) -> None:
        system.install(self._api(), self.ports.activator, self.ports.activator_admin)

    def start_mesh_client(self) -> str:
        """A pod with only an Envoy sidecar, for callers inside the mesh; its sidecar's address."""
        self.client = mesh.start_client(self._api())
        return self.client

    def client_url(self, port: int = 80) -> str:
        """The mesh client's sidecar listener for a service port (requests in absolute-URI form)."""
        if self.client is None:
            raise PlaygroundError("the mesh client is not started")
        return f"http://{self.client}:{port}"

    @property
    def route_key(self) -> Path:
        """The route key both programs read (made once per playground): proxy-mode routes are signed."""
        path = self.logs_dir / "route-key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_hex(32) + "\n")
            path.chmod(0o600)
        return path

    def start_activator(self) -> ActivatorProc:
        info = self._info()
        self.activator = ActivatorProc(
            info.activator_kubeconfig,
            self.logs_dir / "activator.log",
            "--route-key-file",
            str(self.route_key),
            controller_url=f"http://127.0.0.1:{self.ports.wake}",
            sidecar_address=system.activator_sidecar(self._api()),
            port=self.ports.activator,
            admin_port=self.ports.activator_admin,
            drain_timeout=5,
        ).start()
        self.activator.wait_ready()
        self._wait(lambda: system.activator_ready(self._api()), 60, "the elasti-activator Deployment to be ready")
        return self.activator

    def start_controller(self) -> ControllerProc:
        info = self._info()
        self.controller = ControllerProc(
            info.controller_kubeconfig,
            None,
            self.logs_dir / "controller.log",
            "--route-key-file",
            str(self.route_key),
            activator_deployment=f"{system.SYSTEM_NAMESPACE}/{system.ACTIVATOR}",
            wake_port=self.ports.wake,
            metrics_port=self.ports.controller_metrics,
        ).start()
        self.controller.wait_ready()
        return self.controller

    def deploy_bookinfo(self) -> None:
        bookinfo.apply(self._api(), self.namespace)

    def bookinfo_status(self) -> str:
        """What is still missing before Bookinfo serves (empty when everything does)."""
        api = self._api()
        ready, total = bookinfo.deployments_ready(api, self.namespace)
        if not total or ready < total:
            return f"{ready}/{total} Deployments ready"
        waiting = [n for n in bookinfo.ELASTISERVICES if bookinfo.phase(api, self.namespace, n) != "Serving"]
        if waiting:
            return "ElastiServices not Serving yet: " + ", ".join(waiting)
        unrouted = bookinfo.unrouted(self._api(), self._info().gateway_admin, self.namespace)
        if unrouted:
            return "the mesh has no ready endpoint yet for " + ", ".join(unrouted)
        late = mesh.unsynced(self._info().istiod)
        if late:
            return "istiod has not seen these proxies ack their configuration yet: " + ", ".join(late)
        status, headers, body = bookinfo.get_page(self.gateway_url, timeout=10)
        problem = bookinfo.page_problem(status, headers, body)
        return f"productpage through the gateway: {problem}" if problem else ""

    # ---- stop --------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stops every process, newest first, and the cluster; the logs stay in :attr:`logs_dir`."""
        for proc in reversed(self.procs()):
            with contextlib.suppress(Exception):
                proc.stop(timeout=15)
        if self.api is not None:
            with contextlib.suppress(Exception):
                self.api.close()
            self.api = None
        if self.info is not None:  # never another run's cluster found in the state dir
            with contextlib.suppress(Exception):
                self.cluster.down(quiet=True, keep_logs=True)
            self.info = None

    # ---- helpers -----------------------------------------------------------------------------
    def _api(self) -> Api:
        if self.api is None:
            raise PlaygroundError("the cluster is not started")
        return self.api

    def _info(self) -> ClusterInfo:
        if self.info is None:
            raise PlaygroundError("the cluster is not started")
        return self.info

    def _wait(self, probe: Callable[[], object], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                if probe():
                    return
            except Exception as exc:
                last = exc
            time.sleep(0.1)
        raise PlaygroundError(f"timed out after {timeout:.0f}s waiting for {what}" + (f" ({last})" if last else ""))
