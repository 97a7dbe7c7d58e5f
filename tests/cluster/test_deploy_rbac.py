"""The rendered manifests on the real API server, RBAC proven rather than claimed.

The rendered RBAC objects are applied unchanged: the local cluster's controller and activator
identities carry the user names of the ServiceAccounts in elasti-system, so the bindings apply to
them as they would in a cluster. Both programs run as local processes with the flags of the rendered
Deployments (only addresses, the token path and the credentials differ), and the activator is reached
through the mesh via the rendered ``elasti-system/elasti-activator`` Service and Deployment, whose
Pod forwards to the process (``sim-forward``) and is Ready while the process is (``sim-readiness-url``).
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from elasti_istio.localcluster.cluster import ClusterInfo
from elasti_istio.playground import mesh as meshview
from tests.cluster.test_mesh_bookinfo import via_sidecar
from tests.conftest import K8s, MeshInfo
from tests.harness import Proc, apply, condition, es, free_port, get, http_json, load, ready_replicas, scale, wait_until
from tests.rendered import (
    RBAC_KINDS,
    ROOT,
    SYSTEM_NS,
    container,
    copy_tree,
    find,
    kinds,
    parse_args,
    render,
    run_kubectl,
    shipped,
    watch_namespaces,
    with_flags,
)

SIM = "elasti.truefoundry.com/"
# The Secrets the controller creates (--create-secrets): file name (Secret key) -> Secret name.
CONTROLLER_SECRETS = {"token": "elasti-wake-token", "key": "elasti-route-key"}
ACTIVATOR_HOST = "elasti-activator.elasti-system.svc.cluster.local"


# ---- applying rendered objects -------------------------------------------------------------------
class Installed:
    """Rendered objects applied with ``kubectl apply`` as the admin, deleted again at the end (the
    grants are cluster-wide, and other tests rely on the identities having none), with the Secrets
    the controller created."""

    def __init__(self, cluster: ClusterInfo) -> None:
        self.kubeconfig = cluster.admin_kubeconfig
        self.docs: list[dict[str, Any]] = []

    def apply(self, docs: list[dict[str, Any]]) -> None:
        self.docs += docs
        run_kubectl(self.kubeconfig, "apply", "-f", "-", docs=docs)

    def remove(self) -> None:
        if self.docs:
            run_kubectl(self.kubeconfig, "delete", "--ignore-not-found", "--wait=false", "-f", "-", docs=self.docs)
        run_kubectl(
            self.kubeconfig, "-n", SYSTEM_NS, "delete", "--ignore-not-found", "secret", *CONTROLLER_SECRETS.values()
        )


@pytest.fixture
def installed(cluster: ClusterInfo, k8s: K8s) -> Iterator[Installed]:

    def system_namespace_active() -> bool:
        try:
            k8s.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=SYSTEM_NS)))  # type: ignore[attr-defined]
        except ApiException as exc:
            if exc.status != 409:
                raise
        # Another test's teardown may still be deleting it.
        return str(k8s.core.read_namespace(SYSTEM_NS).status.phase) == "Active"  # type: ignore[attr-defined]

    wait_until(system_namespace_active, timeout=90, what=f"namespace {SYSTEM_NS} active")
    # An activator workload left by another test would have another selector (immutable).
    for delete in (k8s.apps.delete_namespaced_deployment, k8s.core.delete_namespaced_service):  # type: ignore[attr-defined]
        try:
            delete("elasti-activator", SYSTEM_NS)
        except ApiException as exc:
            if exc.status != 404:
                raise
    wait_until(lambda: not k8s.core.list_namespaced_pod(SYSTEM_NS).items, what="no pod left in elasti-system")  # type: ignore[attr-defined]
    inst = Installed(cluster)
    try:
        yield inst
    finally:
        inst.remove()


def rbac(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return kinds(docs, "ServiceAccount", *RBAC_KINDS)


def activator_workload(docs: list[dict[str, Any]], port: int | None, admin_port: int | None) -> list[dict[str, Any]]:
    """The rendered activator Service and Deployment; with ports, its Pod stands for the local process."""
    dep = find(docs, "Deployment", "elasti-activator")
    if port and admin_port:
        dep["spec"]["template"]["metadata"]["annotations"].update(
            {
                SIM + "sim-forward": f"8012=127.0.0.1:{port},9091=127.0.0.1:{admin_port}",
                SIM + "sim-readiness-url": f"http://127.0.0.1:{admin_port}/readyz",
                SIM + "sim-startup-seconds": "0",
            }
        )
    return [find(docs, "Service", "elasti-activator"), dep]


def secret_files(tmp: Path) -> tuple[Path, Path]:
    """Where the wake token and the route key files will be: empty Secret volumes for now."""
    return tmp / "elasti-wake-token" / "token", tmp / "elasti-route-key" / "key"


def mount_created_secrets(k8s: K8s, files: tuple[Path, ...]) -> None:
    """What the kubelet does once the controller has created the Secrets: their keys become the files."""

    def read(name: str) -> Any:
        return secret(k8s, name)

    for path in files:
        name = CONTROLLER_SECRETS[path.name]
        found = wait_until(lambda name=name: read(name), 90, f"Secret {name} created by the controller")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(found.data[path.name]))


def start(kubeconfig: Path, args: list[str], log: Path) -> Proc:
    parse_args(args)
    return Proc([*args, "--kubeconfig", str(kubeconfig), "--log-level", "debug"], log).start()


def bookinfo(k8s: K8s, ns: str) -> None:
    for name in ("bookinfo.yaml", "destination-rule-all.yaml", "virtual-services.yaml", "elastiservices.yaml"):
        apply(k8s, ns, load(name))
    wait_until(lambda: ready_replicas(k8s, ns, "details-v1") == 1, what="details-v1 ready")


def phase(k8s: K8s, ns: str, name: str) -> str | None:
    return (es(k8s, ns, name).get("status") or {}).get("phase")


def vs_spec(k8s: K8s, ns: str, name: str) -> dict[str, Any]:
    vs = get(k8s, ns, "VirtualService", name)
    assert vs is not None
    return dict(vs["spec"])


def proxied(spec: dict[str, Any]) -> bool:
    return any(d["destination"]["host"] == ACTIVATOR_HOST for r in spec.get("http") or [] for d in r["route"])


# ---- calls as an identity ------------------------------------------------------------------------
class As:
    """The official client authenticated as one of the local cluster's component identities."""

    def __init__(self, kubeconfig: Path) -> None:
        cfg = client.Configuration()
        config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
        api = client.ApiClient(cfg)
        self.core, self.apps, self.custom = client.CoreV1Api(api), client.AppsV1Api(api), client.CustomObjectsApi(api)


def status(call: Callable[[], Any]) -> int:
    try:
        call()
        return 200
    except ApiException as exc:
        return int(exc.status)


ES = ("elasti.truefoundry.com", "v1alpha1")
VS = ("networking.istio.io", "v1beta1")


# ---- the tests -----------------------------------------------------------------------------------
def serving_with_activator(k8s: K8s, namespace: str) -> bool:
    """Serving, and the controller has seen the activator Deployment ready: before that a scale to zero
    is answered by waking the target (fail open)."""
    obj = es(k8s, namespace, "details")
    cond = condition(obj, "ActivatorAvailable")
    return (obj.get("status") or {}).get("phase") == "Serving" and cond is not None and cond["status"] == "True"


def test_rendered_manifests_are_valid_for_the_server(
    cluster: ClusterInfo, namespace: str, installed: Installed, tmp_path: Path
) -> None:
    """Everything the server serves is accepted by it (server-side dry run, after kubectl's schema check)."""
    served = set(run_kubectl(cluster.admin_kubeconfig, "api-versions").split())
    tree = copy_tree(tmp_path / "tree")
    watch_namespaces(tree, [namespace])
    for docs in (shipped("cluster-wide"), render(tree, "namespace-scoped")):
        unserved = sorted(d["kind"] for d in docs if d["apiVersion"] not in served)
        assert unserved == [], unserved
        assert {"PodDisruptionBudget", "HorizontalPodAutoscaler"} <= {d["kind"] for d in docs}
        run_kubectl(cluster.admin_kubeconfig, "apply", "--dry-run=server", "-f", "-", docs=docs)


def test_helm_chart_is_valid_for_the_server(cluster: ClusterInfo, installed: Installed) -> None:
    """The chart as Helm renders it, PodDisruptionBudget and HorizontalPodAutoscaler included (server-side
    dry run; the CRD the chart carries is the one the cluster already has)."""
    from tests.unit.test_deploy_helm import helm

    docs = helm()["docs"]
    served = set(run_kubectl(cluster.admin_kubeconfig, "api-versions").split())
    assert sorted(d["kind"] for d in docs if d["apiVersion"] not in served) == []
    assert {"PodDisruptionBudget", "HorizontalPodAutoscaler"} <= {d["kind"] for d in docs}
    run_kubectl(cluster.admin_kubeconfig, "apply", "--dry-run=server", "-f", "-", docs=docs)


def test_cluster_wide_rbac_runs_the_whole_cycle_and_nothing_more(
    cluster: ClusterInfo, k8s: K8s, mesh: MeshInfo, namespace: str, installed: Installed, tmp_path: Path
) -> None:
    docs = shipped("cluster-wide")
    installed.apply(rbac(docs))
    token, route_key = secret_files(tmp_path)
    wake_port, metrics_port, port, admin_port = (free_port() for _ in range(4))
    installed.apply(activator_workload(docs, port, admin_port))
    act_args = with_flags(
        container(find(docs, "Deployment", "elasti-activator"))["args"],
        listen=f"127.0.0.1:{port}",
        admin_listen=f"127.0.0.1:{admin_port}",
        controller_url=f"http://127.0.0.1:{wake_port}",
        wake_token_file=str(token),
        route_key_file=str(route_key),
        sidecar_address=mesh.client,
    )
    ctrl_args = with_flags(
        container(find(docs, "Deployment", "elasti-controller"))["args"],
        wake_listen=f"127.0.0.1:{wake_port}",
        metrics_listen=f"127.0.0.1:{metrics_port}",
        wake_token_file=str(token),
        route_key_file=str(route_key),
        leader_election_id=f"elasti-controller-{uuid.uuid4().hex[:6]}",
    )
    bookinfo(k8s, namespace)
    original = vs_spec(k8s, namespace, "details")
    activator = start(cluster.activator_kubeconfig, act_args, tmp_path / "activator.log")
    controller = start(cluster.controller_kubeconfig, ctrl_args, tmp_path / "controller.log")
    try:
        # Both start before the Secrets exist; the controller creates them, the kubelet mounts them, and
        # both programs pick the files up without a restart (the activator is Ready only then).
        mount_created_secrets(k8s, (token, route_key))
        # The probes of the rendered Deployments, on the real programs.
        for path in ("/healthz", "/readyz"):
            activator.wait_http(f"http://127.0.0.1:{admin_port}{path}", 60, f"serving {path}")
            controller.wait_http(f"http://127.0.0.1:{metrics_port}{path}", 60, f"serving {path} (leader)")
        wait_until(lambda: serving_with_activator(k8s, namespace), what="details Serving, activator available")
        assert es(k8s, namespace, "details")["status"]["origin"]["service"] == "details-elasti-origin"

        scale(k8s, namespace, "details-v1", 0)
        wait_until(lambda: phase(k8s, namespace, "details") == "ScaledToZero", what="ScaledToZero")
        assert proxied(vs_spec(k8s, namespace, "details"))
        fqdn = f"details.{namespace}.svc.cluster.local"
        wait_until(lambda: meshview.routes_to_activator(mesh.client_admin, fqdn) is True, what="istiod's push")
        # A request through the mesh is held by the activator, which wakes details with the token.
        code, headers, body = via_sidecar(mesh, f"http://details.{namespace}.svc.cluster.local:9080/details/0")
        assert code == 200, body
        assert headers.get("x-elasti-cold-start") == "true"
        assert b'"author"' in body
        wait_until(lambda: vs_spec(k8s, namespace, "details") == original, what="routes restored exactly")
        assert k8s.apps.read_namespaced_deployment("details-v1", namespace).spec.replicas == 1  # type: ignore
        # Wake authentication is on as rendered.
        assert (
            http_json("POST", f"http://127.0.0.1:{wake_port}/v1/wake", {"namespace": namespace, "name": "x"})[0] == 401
        )

        act, ctrl = As(cluster.activator_kubeconfig), As(cluster.controller_kubeconfig)
        assert status(lambda: act.custom.list_cluster_custom_object(*ES, "elastiservices")) == 200
        forbidden = {
            "activator patches a VirtualService": lambda: act.custom.patch_namespaced_custom_object(
                *VS, namespace, "virtualservices", "details", {"metadata": {"labels": {"x": "y"}}}
            ),
            "activator writes an ElastiService status": lambda: act.custom.patch_namespaced_custom_object_status(
                *ES, namespace, "elastiservices", "details", {"status": {"phase": "Serving"}}
            ),
            "activator lists pods cluster-wide": lambda: act.core.list_pod_for_all_namespaces(),
            "activator reads the wake token": lambda: act.core.read_namespaced_secret("elasti-wake-token", SYSTEM_NS),
            "activator scales a Deployment": lambda: act.apps.patch_namespaced_deployment_scale(
                "details-v1", namespace, {"spec": {"replicas": 2}}
            ),
            "controller changes the wake token": lambda: ctrl.core.patch_namespaced_secret(
                "elasti-wake-token", SYSTEM_NS, {"stringData": {"token": "x"}}
            ),
            "controller reads another Secret in elasti-system": lambda: ctrl.core.read_namespaced_secret(
                "another", SYSTEM_NS
            ),
            "controller lists Secrets in elasti-system": lambda: ctrl.core.list_namespaced_secret(SYSTEM_NS),
            "controller lists Secrets": lambda: ctrl.core.list_namespaced_secret(namespace),
            "controller edits a Deployment": lambda: ctrl.apps.patch_namespaced_deployment(
                "details-v1", namespace, {"metadata": {"labels": {"x": "y"}}}
            ),
            "controller deletes a Deployment": lambda: ctrl.apps.delete_namespaced_deployment("details-v1", namespace),
            "controller creates a Pod": lambda: ctrl.core.create_namespaced_pod(
                namespace, {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "x"}]}}
            ),
            "controller lists Nodes": lambda: ctrl.core.list_node(),
            "controller writes a Lease outside elasti-system": lambda: ctrl.custom.create_namespaced_custom_object(
                "coordination.k8s.io", "v1", namespace, "leases", {"metadata": {"name": "l"}, "spec": {}}
            ),
        }
        got = {what: status(call) for what, call in forbidden.items()}
        assert got == dict.fromkeys(forbidden, 403)
    finally:
        for proc in (activator, controller):
            code = proc.stop()
            print(proc.logs()[-3000:])
            assert code == 0, f"{proc.args[0]} exit code {code}"
            assert not refusals(proc.logs()), f"{proc.args[0]} was refused something: {refusals(proc.logs())}"


def test_namespace_scoped_rbac_works_in_the_watched_namespace_only(
    cluster: ClusterInfo, k8s: K8s, namespace: str, installed: Installed, tmp_path: Path
) -> None:
    other = f"{namespace[:50]}-other"
    k8s.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=other)))  # type: ignore[attr-defined]
    try:
        tree = copy_tree(tmp_path / "tree")
        watch_namespaces(tree, [namespace])
        docs = render(tree, "namespace-scoped")
        assert not kinds(docs, "ClusterRole", "ClusterRoleBinding")
        installed.apply(rbac(docs))
        # The activator Pod (a generic app here) is Ready, so the controller does not fail open.
        installed.apply(activator_workload(docs, None, None))
        token, route_key = secret_files(tmp_path)
        wake_port, metrics_port = free_port(), free_port()
        ctrl_args = with_flags(
            container(find(docs, "Deployment", "elasti-controller"))["args"],
            wake_listen=f"127.0.0.1:{wake_port}",
            metrics_listen=f"127.0.0.1:{metrics_port}",
            wake_token_file=str(token),
            route_key_file=str(route_key),
            leader_election_id=f"elasti-controller-{uuid.uuid4().hex[:6]}",
        )
        assert parse_args(ctrl_args).namespace == [namespace]
        for ns in (namespace, other):
            bookinfo(k8s, ns)
        original = vs_spec(k8s, namespace, "details")
        controller = start(cluster.controller_kubeconfig, ctrl_args, tmp_path / "controller.log")
        try:
            mount_created_secrets(k8s, (token,))  # the route key is left to the API value
            controller.wait_http(f"http://127.0.0.1:{metrics_port}/readyz", 60, "ready (leader)")
            wait_until(lambda: serving_with_activator(k8s, namespace), what="details Serving, activator available")
            scale(k8s, namespace, "details-v1", 0)
            wait_until(lambda: proxied(vs_spec(k8s, namespace, "details")), what="proxy mode")
            wake = http_json(
                "POST",
                f"http://127.0.0.1:{wake_port}/v1/wake",
                {"namespace": namespace, "name": "details"},
                headers={"Authorization": f"Bearer {token.read_text()}"},
            )
            assert wake[0] == 202, wake
            wait_until(lambda: vs_spec(k8s, namespace, "details") == original, what="routes restored")
            # The other namespace is out of reach, and untouched.
            assert not es(k8s, other, "details").get("status")
            assert not es(k8s, other, "details")["metadata"].get("finalizers")
        finally:
            code = controller.stop()
            print(controller.logs()[-3000:])
        assert code == 0
        assert not refusals(controller.logs()), f"the controller was refused something: {refusals(controller.logs())}"

        act, ctrl = As(cluster.activator_kubeconfig), As(cluster.controller_kubeconfig)
        assert status(lambda: act.custom.list_namespaced_custom_object(*ES, namespace, "elastiservices")) == 200
        assert status(lambda: ctrl.core.list_namespaced_pod(namespace)) == 200
        forbidden = {
            "activator lists ElastiServices elsewhere": lambda: act.custom.list_namespaced_custom_object(
                *ES, other, "elastiservices"
            ),
            "activator lists ElastiServices cluster-wide": lambda: act.custom.list_cluster_custom_object(
                *ES, "elastiservices"
            ),
            "controller lists ElastiServices elsewhere": lambda: ctrl.custom.list_namespaced_custom_object(
                *ES, other, "elastiservices"
            ),
            "controller lists ElastiServices cluster-wide": lambda: ctrl.custom.list_cluster_custom_object(
                *ES, "elastiservices"
            ),
            "controller patches a VirtualService elsewhere": lambda: ctrl.custom.patch_namespaced_custom_object(
                *VS, other, "virtualservices", "details", {"metadata": {"labels": {"x": "y"}}}
            ),
            "controller scales elsewhere": lambda: ctrl.apps.patch_namespaced_deployment_scale(
                "details-v1", other, {"spec": {"replicas": 0}}
            ),
            "controller lists pods cluster-wide": lambda: ctrl.core.list_pod_for_all_namespaces(),
            "controller reads another Secret in elasti-system": lambda: ctrl.core.read_namespaced_secret(
                "another", SYSTEM_NS
            ),
            "controller creates a Secret in a watched namespace": lambda: ctrl.core.create_namespaced_secret(
                namespace, {"metadata": {"name": "elasti-wake-token"}}
            ),
        }
        got = {what: status(call) for what, call in forbidden.items()}
        assert got == dict.fromkeys(forbidden, 403)
    finally:
        k8s.core.delete_namespace(other)  # type: ignore[attr-defined]


def test_namespace_users_get_elastiservices_with_the_standard_roles(k8s: K8s, namespace: str) -> None:
    """The shipped tenant ClusterRoles aggregate into view, edit and admin: a user bound to `view` in a
    namespace reads its ElastiServices, one bound to `edit` also changes them; on the real API server,
    with kube-controller-manager's ClusterRole aggregation."""
    apply_tenant_roles(k8s)
    for user, cluster_role in (("tenant-viewer", "view"), ("tenant-editor", "edit")):
        k8s.rbac.create_namespaced_role_binding(  # type: ignore[attr-defined]
            namespace,
            {
                "metadata": {"name": user},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
            },
        )
    authz = client.AuthorizationV1Api(k8s.api)

    def may(user: str, verb: str, subresource: str = "") -> bool:
        review = authz.create_subject_access_review(
            {
                "spec": {
                    "user": user,
                    "resourceAttributes": {
                        "namespace": namespace,
                        "verb": verb,
                        "group": "elasti.truefoundry.com",
                        "resource": "elastiservices",
                        "subresource": subresource,
                    },
                }
            }
        )
        return bool(review.status.allowed)

    wait_until(lambda: may("tenant-viewer", "list") and may("tenant-editor", "create"), 60, "the roles aggregated")
    assert may("tenant-viewer", "get") and may("tenant-viewer", "watch") and may("tenant-viewer", "get", "status")
    assert not may("tenant-viewer", "create") and not may("tenant-viewer", "delete")
    assert may("tenant-editor", "patch") and may("tenant-editor", "delete") and may("tenant-editor", "list")
    assert not may("tenant-editor", "patch", "status"), "status is the controller's"
    assert not may("nobody", "get")


def test_the_optional_activator_authorizationpolicy_is_valid_for_istio(cluster: ClusterInfo, namespace: str) -> None:
    """deploy/istio/ is accepted by the AuthorizationPolicy CRD and istiod's validation webhook; a
    deliberately broken copy is refused, so the check has teeth."""
    import copy as copying

    import yaml

    policy = yaml.safe_load((ROOT / "deploy" / "istio" / "activator-authorizationpolicy.yaml").read_text())
    policy["metadata"]["namespace"] = namespace
    run_kubectl(cluster.admin_kubeconfig, "apply", "--dry-run=server", "-f", "-", docs=[policy])
    broken = copying.deepcopy(policy)
    broken["spec"]["rules"][0]["to"][0]["operation"]["ports"] = ["not-a-port"]
    with pytest.raises(AssertionError, match=r"(?i)denied|invalid"):
        run_kubectl(cluster.admin_kubeconfig, "apply", "--dry-run=server", "-f", "-", docs=[broken])


def apply_tenant_roles(k8s: K8s) -> None:
    """The shipped tenant ClusterRoles (``elasti-istio-*``), created or brought up to date."""
    for role in kinds(shipped("cluster-wide"), "ClusterRole"):
        if not role["metadata"]["name"].startswith("elasti-istio-"):
            continue
        try:
            k8s.rbac.create_cluster_role(role)  # type: ignore[attr-defined]
        except ApiException as exc:
            if exc.status != 409:
                raise
            k8s.rbac.patch_cluster_role(role["metadata"]["name"], role)  # type: ignore[attr-defined]


def secret(k8s: K8s, name: str) -> Any:
    """The Secret ``name`` of elasti-system, None when there is none."""
    try:
        return k8s.core.read_namespaced_secret(name, SYSTEM_NS)  # type: ignore[attr-defined]
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def refusals(logs: str) -> list[str]:
    """Log lines where the API server refused a request for lack of permission. A 403 because a
    namespace is being deleted (an earlier test's, still seen by a controller that watches them all)
    is not one."""
    return [
        line
        for line in logs.lower().splitlines()
        if "forbidden" in line and "because it is being terminated" not in line
    ]
