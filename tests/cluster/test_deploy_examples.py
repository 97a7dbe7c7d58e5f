"""examples/bookinfo/README.md on the local cluster: its KEDA ScaledObject against KEDA's real CRD and
its ``kubectl patch`` of the details ElastiService against ours, as the README runs them."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from elasti_istio.localcluster.cluster import ClusterInfo
from tests.conftest import K8s
from tests.harness import BOOKINFO, apply, es, get, load
from tests.rendered import container, find, parse_args, run_kubectl, shipped

README = BOOKINFO / "README.md"


def readme_command(pattern: str) -> re.Match[str]:
    match = re.search(pattern, README.read_text())
    assert match, f"examples/bookinfo/README.md has no command matching {pattern!r}"
    return match


def test_keda_scaledobject_and_autoscaler_patch_apply_and_agree(cluster: ClusterInfo, k8s: K8s, namespace: str) -> None:
    apply(k8s, namespace, load("bookinfo.yaml"))
    apply(k8s, namespace, load("elastiservices.yaml"))
    patch = readme_command(r"kubectl -n bookinfo patch elastiservice details --type merge -p '([^']+)'").group(1)
    run_kubectl(
        cluster.admin_kubeconfig, "-n", namespace, "patch", "elastiservice", "details", "--type", "merge", "-p", patch
    )
    readme_command(r"kubectl -n bookinfo apply -f examples/bookinfo/keda-scaledobject\.yaml")
    run_kubectl(cluster.admin_kubeconfig, "-n", namespace, "apply", "-f", str(BOOKINFO / "keda-scaledobject.yaml"))

    details = es(k8s, namespace, "details")
    so = get(k8s, namespace, "ScaledObject", "details")
    assert so is not None
    autoscaler = details["spec"]["autoscaler"]
    assert (autoscaler["type"], autoscaler["name"]) == ("keda", so["metadata"]["name"])
    assert so["spec"]["scaleTargetRef"]["name"] == details["spec"]["scaleTargetRef"]["name"]
    assert so["spec"]["minReplicaCount"] == 0

    triggers = {t["type"]: t["metadata"] for t in so["spec"]["triggers"]}
    # Held requests, summed over every activator pod: the URL's port must be the pods' admin port.
    docs = shipped("cluster-wide")
    svc, dep = find(docs, "Service", "elasti-activator"), find(docs, "Deployment", "elasti-activator")
    url = urlsplit(triggers["metrics-api"]["url"])
    assert url.hostname == f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local"
    assert url.port == parse_args(container(dep)["args"]).admin_listen[1]
    assert url.path == f"/v1/pending/bookinfo/{details['metadata']['name']}"
    assert triggers["metrics-api"]["valueLocation"] == "pending"
    assert triggers["metrics-api"]["aggregateFromKubeServiceEndpoints"] == "true"
    # Traffic to the ElastiService's Service keeps it awake.
    query = triggers["prometheus"]["query"]
    assert f'destination_service_name="{details["spec"]["service"]}"' in query
    assert 'destination_service_namespace="bookinfo"' in query
