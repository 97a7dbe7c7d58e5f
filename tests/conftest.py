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

from elasti_istio.localcluster.cluster import ClusterInfo, LocalCluster
from elasti_istio.playground import mesh as meshview
from elasti_istio.playground.manifests import Api

CLUSTER_FIXTURES = {"cluster", "local_cluster", "k8s", "namespace", "mesh"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.cluster)


@dataclass
class MeshInfo:
    """The real mesh of the session cluster: istiod, the Envoy ingress gateway, and a client pod's sidecar.

    The client sidecar does not capture traffic: it listens on its own address at each service port, so
    a request to ``http://web.<ns>.svc.cluster.local:<port>/...`` is sent to ``client:<port>`` in
    absolute-URI form (:meth:`proxy_for`), as an application pod's sidecar carries it.
    """

    ingress: str
    gateway_admin: str
    istiod: str
    client: str

    def proxy_for(self, port: int = 80) -> str:
        return f"http://{self.client}:{port}"

    @property
    def outbound(self) -> str:
        """The client sidecar's listener for port 80 (the usual Service port of the tests)."""
        return self.proxy_for(80)

    @property
    def client_admin(self) -> str:
        return f"http://{self.client}:15000"

    def routable(self, service: str, namespace: str, port: int, subset: str = "", admin: str | None = None) -> bool:
        """The client's sidecar (or the Envoy at ``admin``) has a healthy endpoint for the destination:
        what a test waits for before it sends traffic to a workload that just turned Ready."""
        cluster = f"outbound|{port}|{subset}|{service}.{namespace}.svc.cluster.local"
        return meshview.healthy_hosts(admin or self.client_admin).get(cluster, 0) > 0


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    state_dir = tmp_path_factory.mktemp("cluster")
    lc = LocalCluster(state_dir, attached=True, startup_seconds=float(os.environ.get("ELASTI_TEST_STARTUP", "0.5")))
    lc.up()
    try:
        yield lc
    finally:
        lc.down(quiet=True, keep_logs=bool(os.environ.get("ELASTI_KEEP_LOGS")))


@pytest.fixture(scope="session")
def cluster(local_cluster: LocalCluster) -> ClusterInfo:
    return local_cluster.info()


@pytest.fixture(scope="session")
def mesh(cluster: ClusterInfo) -> Iterator[MeshInfo]:
    """istiod and the gateway (parts of the cluster) plus the mesh client, every proxy synced."""
    api = Api(cluster.admin_kubeconfig)
    try:
        client = meshview.start_client(api)
        meshview.wait_synced(cluster.istiod, 60)
        yield MeshInfo(cluster.gateway_url, cluster.gateway_admin, cluster.istiod, client)
    finally:
        api.close()


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
            "v1",
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
