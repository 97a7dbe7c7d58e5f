"""The activator's ElastiService registry against the real API server, as the activator identity with
nothing but get/list/watch on ElastiServices.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from activator.registry import Registry
from elasti_istio.kube import Gone, Kube, KubeError, load_connection
from elasti_istio.localcluster.cluster import ClusterInfo
from elasti_istio.resources import ELASTISERVICES, PODS
from tests.conftest import K8s
from tests.unit.test_activator_proxy import Env

ACTIVATOR_USER = "system:serviceaccount:elasti-system:elasti-activator"
ROLE = "test-activator-elastiservice-reader"


@pytest.fixture(scope="module")
def activator_may_read_elastiservices(k8s: K8s) -> Iterator[None]:
    """The least privilege the activator needs: get/list/watch ElastiServices, nothing else."""
    role = client.V1ClusterRole(
        metadata=client.V1ObjectMeta(name=ROLE),
        rules=[
            client.V1PolicyRule(
                api_groups=["elasti.truefoundry.com"], resources=["elastiservices"], verbs=["get", "list", "watch"]
            )
        ],
    )
    binding = client.V1ClusterRoleBinding(
        metadata=client.V1ObjectMeta(name=ROLE),
        role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="ClusterRole", name=ROLE),
        subjects=[client.RbacV1Subject(api_group="rbac.authorization.k8s.io", kind="User", name=ACTIVATOR_USER)],
    )
    for create in (lambda: k8s.rbac.create_cluster_role(role), lambda: k8s.rbac.create_cluster_role_binding(binding)):  # type: ignore[attr-defined]
        try:
            create()
        except ApiException as exc:
            if exc.status != 409:
                raise
    yield
    k8s.rbac.delete_cluster_role_binding(ROLE)  # type: ignore[attr-defined]
    k8s.rbac.delete_cluster_role(ROLE)  # type: ignore[attr-defined]


def es_body(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "elasti.truefoundry.com/v1alpha1",
        "kind": "ElastiService",
        "metadata": {"name": name},
        "spec": {
            "service": name,
            "scaleTargetRef": {"kind": "Deployment", "name": name},
            "activator": {"holdTimeout": "2m", "retryInterval": "50ms", "queueLimit": 50},
        },
    }


class CountingKube(Kube):
    """The real client; the first list reports resourceVersion "1", so the watch that follows is answered
    410 Gone by the API server and the informer has to re-list."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.lists = 0
        self.gone = 0

    async def list(self, res: Any, namespace: str | None = None, **params: Any) -> Any:
        out = await super().list(res, namespace, **params)
        self.lists += 1
        if self.lists == 1:
            out["metadata"]["resourceVersion"] = "1"
        return out

    async def watch(self, *a: Any, **kw: Any) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        try:
            async for event in super().watch(*a, **kw):
                yield event
        except Gone:
            self.gone += 1
            raise


async def until(probe: Any, timeout: float = 30, what: str = "condition") -> None:
    async with asyncio.timeout(timeout):
        while not probe():
            await asyncio.sleep(0.02)


async def test_registry_lists_watches_releases_and_forgets(
    cluster: ClusterInfo, namespace: str, activator_may_read_elastiservices: None
) -> None:
    admin = Kube(load_connection(str(cluster.admin_kubeconfig)))
    kube = Kube(load_connection(str(cluster.activator_kubeconfig)), user_agent="elasti-activator")
    await admin.create(ELASTISERVICES, es_body("details"), namespace)  # exists before the first list
    registry = Registry()
    env = Env()
    env.registry = registry
    await env.start()
    try:
        with pytest.raises(KubeError) as denied:  # nothing beyond reading ElastiServices
            await kube.list(PODS, namespace)
        assert denied.value.status == 403
        registry.start(kube, (namespace,))
        assert await registry.wait_synced(30)
        target = registry.get((namespace, "details"))
        assert target is not None and (target.hold_timeout, target.retry_interval, target.queue_limit) == (
            120.0,
            0.05,
            50,
        )
        assert not target.ready and target.base_url is None

        origin = f"details-elasti-origin.{namespace}.svc.cluster.local:9080"
        env.mesh.route(origin, f"http://127.0.0.1:{env.backend_port}")
        held = asyncio.create_task(_get(env, namespace))
        await env.until_pending(1, ns=namespace)
        await admin.patch(
            ELASTISERVICES,
            "details",
            {"status": {"origin": {"service": "details-elasti-origin", "port": 9080}, "readyReplicas": 0}},
            namespace,
            sub="status",
        )
        await until(lambda: registry.get((namespace, "details")).base_url is not None)  # type: ignore[union-attr]
        assert env.pending_sync(namespace) == 1  # an origin alone does not release it
        await admin.patch(ELASTISERVICES, "details", {"status": {"readyReplicas": 1}}, namespace, sub="status")
        status, headers = await asyncio.wait_for(held, 30)  # the watch event releases it
        assert status == 200 and headers["X-Elasti-Cold-Start"] == "true"
        assert env.wake.count(namespace, "details") == 1

        await admin.patch(ELASTISERVICES, "details", {"status": {"readyReplicas": 0}}, namespace, sub="status")
        await until(lambda: not registry.get((namespace, "details")).ready)  # type: ignore[union-attr]
        held = asyncio.create_task(_get(env, namespace))
        await env.until_pending(1, ns=namespace)
        await admin.delete(ELASTISERVICES, "details", namespace)
        status, _ = await asyncio.wait_for(held, 30)
        assert status == 503  # deleted while held
        assert registry.get((namespace, "details")) is None
        status, _ = await _get(env, namespace)
        assert status == 404
    finally:
        await env.stop()
        await kube.close()
        await admin.close()


async def test_registry_relists_after_410_gone(
    cluster: ClusterInfo, namespace: str, activator_may_read_elastiservices: None
) -> None:
    admin = Kube(load_connection(str(cluster.admin_kubeconfig)))
    kube = CountingKube(load_connection(str(cluster.activator_kubeconfig)))
    registry = Registry()
    try:
        await admin.create(ELASTISERVICES, es_body("ratings"), namespace)
        registry.start(kube, (namespace,))
        await until(lambda: kube.gone >= 1 and kube.lists >= 2, what="a 410 and a re-list")
        await admin.patch(
            ELASTISERVICES,
            "ratings",
            {"status": {"readyReplicas": 2, "origin": {"service": "o", "port": 80}}},
            namespace,
            sub="status",
        )
        await until(lambda: (t := registry.get((namespace, "ratings"))) is not None and t.forwardable)
        await admin.create(ELASTISERVICES, es_body("reviews"), namespace)
        await until(lambda: registry.get((namespace, "reviews")) is not None)
    finally:
        await registry.stop()
        await kube.close()
        await admin.close()


async def _get(env: Env, namespace: str) -> tuple[int, Any]:
    async with env.get("/echo", ns=namespace) as r:
        await r.read()
        return r.status, r.headers
