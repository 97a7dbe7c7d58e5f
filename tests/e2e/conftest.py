"""The end-to-end suite's system: the session cluster and its real mesh (istiod, Envoy gateway and
sidecars), plus elasti-system and one activator whose upstream requests go through its pod's sidecar.

For the duration of this package the shipped RBAC is installed (the activator's ClusterRoleBinding
included: it only reads ElastiServices); the controller's ClusterRole is granted per test namespace,
because each test runs its own controller restricted to its namespaces (``--namespace``) beside the
controllers of other tests in the same cluster. Controllers listen for wake calls on one fixed port,
the one the activator was told, so that whichever controller a test runs is the one woken.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from elasti_istio.localcluster.cluster import ClusterInfo
from elasti_istio.playground import mesh as meshview
from elasti_istio.playground import system
from elasti_istio.playground.manifests import Api
from elasti_istio.playground.procs import ActivatorProc, ControllerProc, free_ports
from tests.conftest import K8s, MeshInfo, _cleanup_namespace
from tests.e2e import support
from tests.e2e.support import Sidecar
from tests.helpers import wait_for


@dataclass
class System:
    api: Api
    cluster: ClusterInfo
    mesh: MeshInfo
    activator: ActivatorProc
    wake_port: int
    logs: Path
    route_key: Path  # the route key file both programs read (proxy-mode routes carry its tokens)

    @property
    def sidecar(self) -> Sidecar:
        return Sidecar(self.mesh.client)

    def activator_ready(self) -> None:
        """The process answers /readyz and its Pod is Ready, so the controllers route to it."""
        self.activator.wait_ready()
        wait_for(lambda: system.activator_ready(self.api), 60, "elasti-activator Deployment ready", 0.05)


@pytest.fixture(scope="package")
def e2e(k8s: K8s, cluster: ClusterInfo, mesh: MeshInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    api = Api(cluster.admin_kubeconfig)
    logs = tmp_path_factory.mktemp("e2e")
    wake_port, port, admin_port = free_ports(3)
    system.install(api, port, admin_port, cluster_wide_controller=False)
    route_key = logs / "route-key"
    route_key.write_text(secrets.token_hex(32) + "\n")
    activator = ActivatorProc(
        cluster.activator_kubeconfig,
        logs / "activator.log",
        "--route-key-file",
        str(route_key),
        controller_url=f"http://127.0.0.1:{wake_port}",
        sidecar_address=system.activator_sidecar(api),
        port=port,
        admin_port=admin_port,
        drain_timeout=5,
        log_level="debug",
    ).start()
    sys_ = System(api, cluster, mesh, activator, wake_port, logs, route_key)
    support.ENVOYS[:] = [mesh.client_admin]
    try:
        sys_.activator_ready()
        meshview.wait_synced(cluster.istiod, 60)
        yield sys_
    finally:
        activator.stop()
        system.uninstall(api)
        api.close()


@pytest.fixture
def start_controller(e2e: System, tmp_path: Path) -> Iterator[Callable[..., ControllerProc]]:
    """Starts the real controller as its own identity, restricted to the given namespaces."""
    procs: list[ControllerProc] = []

    def start(*namespaces: str) -> ControllerProc:
        for ns in namespaces:
            system.bind_controller(e2e.api, ns)
        proc = ControllerProc(
            e2e.cluster.controller_kubeconfig,
            list(namespaces),
            tmp_path / f"controller-{len(procs)}.log",
            "--route-key-file",
            str(e2e.route_key),
            activator_deployment=f"{system.SYSTEM_NAMESPACE}/{system.ACTIVATOR}",
            wake_port=e2e.wake_port,
            log_level="debug",
        ).start()
        procs.append(proc)
        return proc.wait_ready()

    yield start
    for p in procs:
        code = p.stop()
        print(f"--- {p.log_path.name} (exit {code})\n{p.logs()[-3000:]}")
    print(f"--- activator log tail\n{e2e.activator.tail(40)}")


@pytest.fixture
def controller(start_controller: Callable[..., ControllerProc], namespace: str) -> ControllerProc:
    return start_controller(namespace)


@pytest.fixture
def other_namespace(k8s: K8s) -> Iterator[str]:
    from kubernetes import client

    name = f"t-e2e-other-{uuid.uuid4().hex[:5]}"
    k8s.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))  # type: ignore[attr-defined]
    try:
        yield name
    finally:
        _cleanup_namespace(k8s, name)
