"""The overlays from a fresh clone on the real API server: they apply with no generated file and carry
no Secret; the controller, with the rendered RBAC of its ServiceAccount, creates the wake token and
route key Secrets once, random, agrees with a replica starting beside it, and never changes a Secret
that exists.

The bootstrap runs as the controller does it (:mod:`elasti_istio.controller.bootstrap`, with the
Secrets the rendered flags name), with the controller identity's credentials; the last test runs the
controller process itself with the rendered flags and files that are not there yet.
"""

from __future__ import annotations

import asyncio
import base64
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from elasti_istio.controller import bootstrap
from elasti_istio.controller.config import from_args
from elasti_istio.kube import Kube, load_connection
from elasti_istio.localcluster.cluster import ClusterInfo
from tests.cluster.test_deploy_rbac import As, installed, refusals, secret, start, status  # noqa: F401 - fixture
from tests.conftest import K8s
from tests.harness import free_port, http_json, wait_until
from tests.rendered import (
    OVERLAYS,
    SYSTEM_NS,
    container,
    find,
    fresh_clone,
    kinds,
    parse_args,
    render,
    watch_namespaces,
    with_flags,
)

SECRETS = ("elasti-wake-token", "elasti-route-key")
RANDOM = re.compile(r"[0-9a-f]{64}")


def delete_secrets(k8s: K8s) -> None:
    for name in SECRETS:
        try:
            k8s.core.delete_namespaced_secret(name, SYSTEM_NS)  # type: ignore[attr-defined]
        except ApiException as exc:
            if exc.status != 404:
                raise
    wait_until(lambda: all(secret(k8s, n) is None for n in SECRETS), 60, "no Secret left from before")


def value(obj: Any, key: str) -> str:
    return base64.b64decode(obj.data[key]).decode()


def rendered_wants(docs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> list[bootstrap.Wanted]:
    """The Secrets the rendered controller provides, its namespace from the downward API as in the pod."""
    dep = find(docs, "Deployment", "elasti-controller")
    args = parse_args(container(dep)["args"])
    assert args.create_secrets is True
    monkeypatch.setenv("POD_NAMESPACE", dep["metadata"]["namespace"])
    wants = [w for w in bootstrap.wanted(from_args(args)) if w is not None]
    assert [(w.namespace, w.name) for w in wants] == [(SYSTEM_NS, n) for n in SECRETS]
    return wants


def run_bootstraps(kubeconfig: Path, wants: list[bootstrap.Wanted], replicas: int) -> list[dict[str, str | None]]:
    """``replicas`` bootstraps at once, each with a client of its own (as the controller's replicas)."""

    async def one() -> dict[str, str | None]:
        async with Kube(load_connection(str(kubeconfig)), user_agent="elasti-controller") as kube:
            got = await bootstrap.provide(kube, wants)
        return {w.name: v for w, v in got.items()}

    async def all_of_them() -> list[dict[str, str | None]]:
        return list(await asyncio.wait_for(asyncio.gather(*(one() for _ in range(replicas))), 120))

    return asyncio.run(all_of_them())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_from_a_fresh_clone_applies_and_the_controller_creates_its_secrets_once(
    cluster: ClusterInfo,
    k8s: K8s,
    namespace: str,
    installed: Any,  # noqa: F811 - the fixture
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    overlay: str,
) -> None:
    tree = fresh_clone(tmp_path / "clone")
    if overlay == "namespace-scoped":
        watch_namespaces(tree, [namespace])
    docs = render(tree, overlay)
    assert not kinds(docs, "Secret")
    delete_secrets(k8s)
    # The CRD is the session's; the namespace is there already (the fixture keeps it for other tests).
    installed.apply([d for d in docs if d["kind"] not in ("CustomResourceDefinition", "Namespace")])
    for name in ("elasti-controller", "elasti-activator"):
        k8s.apps.read_namespaced_deployment(name, SYSTEM_NS)  # type: ignore[attr-defined]
    assert all(secret(k8s, n) is None for n in SECRETS), "no Secret before the controller starts"
    wants = rendered_wants(docs, monkeypatch)

    # Two replicas starting together: one creates, the other reads what it made; they agree.
    first, second = run_bootstraps(cluster.controller_kubeconfig, wants, 2)
    assert first == second
    made = {n: secret(k8s, n) for n in SECRETS}
    for want in wants:
        obj = made[want.name]
        assert obj is not None and obj.type == "Opaque" and sorted(obj.data) == [want.key]
        assert obj.metadata.labels["app.kubernetes.io/name"] == "elasti-istio"
        assert RANDOM.fullmatch(value(obj, want.key)) and first[want.name] == value(obj, want.key)
    assert first["elasti-wake-token"] != first["elasti-route-key"]

    # Started again (a restart, a rollout): nothing changes.
    again = run_bootstraps(cluster.controller_kubeconfig, wants, 1)[0]
    assert again == first
    for n in SECRETS:
        assert secret(k8s, n).metadata.resource_version == made[n].metadata.resource_version

    # A Secret of the user's own (or a rotated one) is left as it is; a missing one is made.
    k8s.core.delete_namespaced_secret("elasti-wake-token", SYSTEM_NS)  # type: ignore[attr-defined]
    wait_until(lambda: secret(k8s, "elasti-wake-token") is None, 60, "the wake token Secret gone")
    own = client.V1Secret(
        metadata=client.V1ObjectMeta(name="elasti-wake-token"), string_data={"token": "the-users-own-token"}
    )
    mine = k8s.core.create_namespaced_secret(SYSTEM_NS, own)  # type: ignore[attr-defined]
    k8s.core.delete_namespaced_secret("elasti-route-key", SYSTEM_NS)  # type: ignore[attr-defined]
    wait_until(lambda: secret(k8s, "elasti-route-key") is None, 60, "the route key Secret gone")
    third = run_bootstraps(cluster.controller_kubeconfig, wants, 3)
    assert third[0] == third[1] == third[2]
    assert third[0]["elasti-wake-token"] == "the-users-own-token"
    kept = secret(k8s, "elasti-wake-token")
    assert kept.metadata.resource_version == mine.metadata.resource_version and not kept.metadata.labels
    new_key = secret(k8s, "elasti-route-key")
    assert third[0]["elasti-route-key"] == value(new_key, "key") != first["elasti-route-key"]
    assert RANDOM.fullmatch(value(new_key, "key"))

    # The rendered grant is that and no more: no list, no change, no other Secret's value.
    ctrl = As(cluster.controller_kubeconfig)
    assert status(lambda: ctrl.core.read_namespaced_secret("elasti-route-key", SYSTEM_NS)) == 200
    refused = {
        "lists Secrets": lambda: ctrl.core.list_namespaced_secret(SYSTEM_NS),
        "changes the wake token": lambda: ctrl.core.patch_namespaced_secret(
            "elasti-wake-token", SYSTEM_NS, {"stringData": {"token": "x"}}
        ),
        "deletes the route key": lambda: ctrl.core.delete_namespaced_secret("elasti-route-key", SYSTEM_NS),
        "reads another Secret": lambda: ctrl.core.read_namespaced_secret("another", SYSTEM_NS),
        "creates a Secret elsewhere": lambda: ctrl.core.create_namespaced_secret(
            namespace, {"metadata": {"name": "elasti-wake-token"}}
        ),
    }
    assert {what: status(call) for what, call in refused.items()} == dict.fromkeys(refused, 403)


def test_controller_creates_the_secrets_and_checks_wakes_with_them_before_the_files_are_mounted(
    cluster: ClusterInfo,
    k8s: K8s,
    installed: Any,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    """The controller process with the rendered flags and RBAC, its Secret volumes still empty."""
    docs = render(fresh_clone(tmp_path / "clone"), "cluster-wide")
    delete_secrets(k8s)
    installed.apply(kinds(docs, "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"))
    mounts = tmp_path / "secrets"  # where the kubelet would put the files, empty for now
    token_file, key_file = mounts / "wake-token" / "token", mounts / "route-key" / "key"
    wake_port, metrics_port = free_port(), free_port()
    args = with_flags(
        container(find(docs, "Deployment", "elasti-controller"))["args"],
        wake_listen=f"127.0.0.1:{wake_port}",
        metrics_listen=f"127.0.0.1:{metrics_port}",
        wake_token_file=str(token_file),
        route_key_file=str(key_file),
        leader_election_id=f"elasti-controller-{uuid.uuid4().hex[:6]}",
        activator_deployment="none",
    )
    controller = start(cluster.controller_kubeconfig, args, tmp_path / "controller.log")
    try:
        wait_until(lambda: all(secret(k8s, n) is not None for n in SECRETS), 90, "the Secrets created")
        token = value(secret(k8s, "elasti-wake-token"), "token")
        assert RANDOM.fullmatch(token) and RANDOM.fullmatch(value(secret(k8s, "elasti-route-key"), "key"))
        controller.wait_http(f"http://127.0.0.1:{metrics_port}/readyz", 60, "ready (leader)")
        url = f"http://127.0.0.1:{wake_port}/v1/wake"
        body = {"namespace": "nowhere", "name": "nothing"}

        def wake_with(bearer: str) -> int:
            return http_json("POST", url, body, headers={"Authorization": f"Bearer {bearer}"})[0]

        # The token from the API is required at once (404: authenticated, and no such ElastiService).
        wait_until(lambda: wake_with(token) == 404, 60, "the created token accepted")
        assert wake_with("0" * 64) == 401
        # The kubelet fills the volumes; the files take over without a restart.
        for path, name, key in ((token_file, "elasti-wake-token", "token"), (key_file, "elasti-route-key", "key")):
            path.parent.mkdir(parents=True)
            path.write_text(value(secret(k8s, name), key))
        assert wake_with(token) == 404 and wake_with("0" * 64) == 401
    finally:
        code = controller.stop()
        print(controller.logs()[-3000:])
    assert code == 0
    assert not refusals(controller.logs()), f"the controller was refused something: {refusals(controller.logs())}"
    assert "Secret elasti-system/elasti-wake-token created" in controller.logs()
