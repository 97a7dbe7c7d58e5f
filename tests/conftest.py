"""Test harness: one local cluster per session, a fresh namespace per test.

Any test that uses the ``cluster`` fixture (directly or through ``k8s``/``namespace``) is marked
``cluster``, so ``pytest -m "not cluster"`` runs the rest without any control-plane binary.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from elasti_istio.localcluster.cluster import ClusterInfo, LocalCluster, free_port
from elasti_istio.playground.procs import MeshProc

CLUSTER_FIXTURES = {"cluster", "local_cluster", "k8s", "namespace", "mesh"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.cluster)


@dataclass
class MeshInfo:
    """Where the mesh stand-in listens (``mesh`` fixture); the kubelet's apps already use ``outbound``."""

    ingress_port: int
    outbound_port: int
    metrics_port: int

    @property
    def ingress(self) -> str:
        return f"http://127.0.0.1:{self.ingress_port}"

    @property
    def outbound(self) -> str:
        return f"http://127.0.0.1:{self.outbound_port}"

    @property
    def metrics(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"


@pytest.fixture(scope="session")
def mesh_ports() -> MeshInfo:
    """Chosen before the cluster starts, so that the kubelet stand-in can be told the outbound address."""
    ports: list[int] = []
    while len(ports) < 3:
        p = free_port()
        if p not in ports:
            ports.append(p)
    return MeshInfo(*ports)


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory: pytest.TempPathFactory, mesh_ports: MeshInfo) -> Iterator[LocalCluster]:
    state_dir = tmp_path_factory.mktemp("cluster")
    lc = LocalCluster(
        state_dir,
        attached=True,
        startup_seconds=float(os.environ.get("ELASTI_TEST_STARTUP", "0.5")),
        mesh_proxy=mesh_ports.outbound,
    )
    lc.up()
    try:
        yield lc
    finally:
        lc.down(quiet=True, keep_logs=bool(os.environ.get("ELASTI_KEEP_LOGS")))


@pytest.fixture(scope="session")
def cluster(local_cluster: LocalCluster) -> ClusterInfo:
    return local_cluster.info()


@pytest.fixture(scope="session")
def mesh(cluster: ClusterInfo, mesh_ports: MeshInfo) -> Iterator[MeshInfo]:
    """The mesh stand-in (``elasti-istio mesh``) as a process, ready once its watches have synced."""
    proc = MeshProc(
        cluster.admin_kubeconfig,
        cluster.state_dir / "logs" / "mesh.log",
        mesh_ports.ingress_port,
        mesh_ports.outbound_port,
        mesh_ports.metrics_port,
    ).start()
    try:
        proc.wait_ready(60)
        yield mesh_ports
    finally:
        proc.stop(10)


@dataclass
class K8s:
    """Ready clients of the official library, authenticated as the cluster admin."""

    api: object
    core: object
    apps: object
    custom: object
    rbac: object
    kubeconfig: Path

    def endpoint_addresses(self, namespace: str, service: str) -> list[str]:
        slices = self.custom.list_namespaced_custom_object(  # type: ignore[attr-defined]
            "discovery.k8s.io",
            "v1beta1",
            namespace,
            "endpointslices",
            label_selector=f"kubernetes.io/service-name={service}",
        )["items"]
        out = []
        for s in slices:
            for ep in s.get("endpoints") or []:
                if (ep.get("conditions") or {}).get("ready"):
                    out.extend(ep.get("addresses") or [])
        return sorted(out)


@pytest.fixture(scope="session")
def k8s(cluster: ClusterInfo) -> K8s:
    from kubernetes import client, config

    cfg = client.Configuration()
    config.load_kube_config(config_file=str(cluster.admin_kubeconfig), client_configuration=cfg)
    api = client.ApiClient(cfg)
    return K8s(
        api,
        client.CoreV1Api(api),
        client.AppsV1Api(api),
        client.CustomObjectsApi(api),
        client.RbacAuthorizationV1Api(api),
        cluster.admin_kubeconfig,
    )


@pytest.fixture
def namespace(k8s: K8s, request: pytest.FixtureRequest) -> Iterator[str]:
    from kubernetes import client

    base = "".join(ch if ch.isalnum() else "-" for ch in request.node.name.lower())[:40].strip("-")
    name = f"t-{base}-{uuid.uuid4().hex[:5]}"
    k8s.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))  # type: ignore[attr-defined]
    try:
        yield name
    finally:
        _cleanup_namespace(k8s, name)


def _cleanup_namespace(k8s: K8s, name: str) -> None:
    """Removes finalizers a test left on ElastiServices, then deletes the namespace."""
    from kubernetes.client.exceptions import ApiException

    try:
        items = k8s.custom.list_namespaced_custom_object(  # type: ignore[attr-defined]
            "elasti.truefoundry.com", "v1alpha1", name, "elastiservices"
        )["items"]
        for es in items:
            if es["metadata"].get("finalizers"):
                k8s.custom.patch_namespaced_custom_object(  # type: ignore[attr-defined]
                    "elasti.truefoundry.com",
                    "v1alpha1",
                    name,
                    "elastiservices",
                    es["metadata"]["name"],
                    {"metadata": {"finalizers": None}},
                )
        k8s.core.delete_namespace(name)  # type: ignore[attr-defined]
    except ApiException as exc:
        if exc.status != 404:
            raise
