"""The pure parts of the local cluster's Istio: proxy bootstraps, sidecar resources, sync status, the pod
network's names and ranges."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from elasti_istio.kubelet import sidecar as sc
from elasti_istio.localcluster import istio
from elasti_istio.localcluster.cluster import pod_network
from elasti_istio.localcluster.podnet import PodNetwork


def test_sidecar_bootstrap_names_the_pod_and_does_not_capture() -> None:
    boot = istio.envoy_bootstrap(
        kind="sidecar",
        ip="10.20.64.5",
        pod="productpage-v1-abc",
        namespace="bookinfo",
        labels={"app": "productpage"},
        static_labels={istio.SIDECAR_LABEL: "productpage-v1-abc"},
        xds=("10.20.128.1", 15010),
        admin=("10.20.64.5", 15000),
        workload="productpage-v1",
    )
    node = boot["node"]
    assert node["id"] == "sidecar~10.20.64.5~productpage-v1-abc.bookinfo~bookinfo.svc.cluster.local"
    meta = node["metadata"]
    assert meta["INTERCEPTION_MODE"] == "NONE" and meta["INSTANCE_IPS"] == "10.20.64.5"
    assert meta["LABELS"] == {"app": "productpage", istio.SIDECAR_LABEL: "productpage-v1-abc"}
    assert meta["STATIC_LABELS"] == {istio.SIDECAR_LABEL: "productpage-v1-abc"}
    assert meta["CLUSTER_ID"] == istio.CLUSTER_ID and meta["NAMESPACE"] == "bookinfo"
    xds = boot["static_resources"]["clusters"][0]
    assert xds["name"] == "xds-grpc"
    assert xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] == {
        "socket_address": {"address": "10.20.128.1", "port_value": 15010}
    }


def test_gateway_bootstrap_is_a_router_without_interception_mode() -> None:
    boot = istio.envoy_bootstrap(
        kind="router",
        ip="10.20.128.2",
        pod="istio-ingressgateway-local",
        namespace=istio.ISTIO_NAMESPACE,
        labels=dict(istio.GATEWAY_LABELS),
        xds=("10.20.128.1", 15010),
        admin=("10.20.128.2", 15000),
    )
    assert boot["node"]["id"].startswith("router~10.20.128.2~istio-ingressgateway-local.istio-system~")
    assert "INTERCEPTION_MODE" not in boot["node"]["metadata"]
    assert "STATIC_LABELS" not in boot["node"]["metadata"]


def test_gateway_service_maps_80_and_8080_to_the_gateway_port() -> None:
    ports = {p["port"]: p["targetPort"] for p in istio.gateway_service()["spec"]["ports"]}
    assert ports == {80: istio.GATEWAY_TARGET_PORT, 8080: istio.GATEWAY_TARGET_PORT}


def test_webhook_is_reached_by_url_and_judges_every_istio_group() -> None:
    hook = istio.webhook_configuration("https://127.0.0.1:15017/validate", b"PEM")["webhooks"][0]
    assert hook["clientConfig"] == {"url": "https://127.0.0.1:15017/validate", "caBundle": "UEVN"}
    assert "networking.istio.io" in hook["rules"][0]["apiGroups"]
    assert hook["failurePolicy"] == "Fail" and hook["sideEffects"] == "None"


def test_synced_means_every_type_acked_and_none_refused() -> None:
    def entry(proxy: str, **types: tuple[str, str, str]) -> dict[str, object]:
        return {
            "proxy": proxy,
            "resources": {t: {"sent": s, "acked": a, "lastError": e} for t, (s, a, e) in types.items()},
        }

    syncz = [
        entry("a.ns", cds=("1", "1", ""), lds=("2", "2", "")),
        entry("b.ns", cds=("1", "1", ""), lds=("3", "2", "")),
        entry("c.ns", cds=("1", "1", "bad config")),
        {"proxy": "d.ns", "resources": {}},
    ]
    assert istio.synced(syncz, "a.ns")
    assert not istio.synced(syncz, "b.ns")  # a push not acked yet
    assert not istio.synced(syncz, "c.ns")  # refused
    assert not istio.synced(syncz, "d.ns")  # nothing sent yet
    assert not istio.synced(syncz, "e.ns")  # not connected


@pytest.mark.parametrize(
    ("pod", "ns_labels", "wanted"),
    [
        ({"metadata": {"labels": {sc.INJECT: "true"}}}, {}, True),
        ({"metadata": {"annotations": {sc.INJECT: "true"}}}, {}, True),
        ({"metadata": {}}, {"istio-injection": "enabled"}, True),
        ({"metadata": {"labels": {sc.INJECT: "false"}}}, {"istio-injection": "enabled"}, False),
        ({"metadata": {}}, {}, False),
    ],
)
def test_a_pod_gets_a_sidecar_as_istios_injector_reads_it(
    pod: dict[str, object], ns_labels: dict[str, str], wanted: bool
) -> None:
    assert sc.wants_sidecar(pod, ns_labels) is wanted


def test_sidecar_resource_binds_one_http_listener_per_port_on_the_sidecar_address() -> None:
    pod = {"metadata": {"name": "p" * 70, "namespace": "ns", "uid": "u-1"}}
    res = sc.sidecar_resource(pod, "10.20.64.9", (80, 8012))
    label = res["spec"]["workloadSelector"]["labels"][istio.SIDECAR_LABEL]
    assert len(label) <= 63 and label == sc.selector_value("p" * 70)
    assert res["metadata"]["ownerReferences"][0]["uid"] == "u-1"  # goes with its pod
    assert res["spec"]["outboundTrafficPolicy"] == {"mode": "REGISTRY_ONLY"}
    assert [
        (e["port"]["number"], e["port"]["protocol"], e["bind"], e["captureMode"]) for e in res["spec"]["egress"]
    ] == [
        (80, "HTTP", "10.20.64.9", "NONE"),
        (8012, "HTTP", "10.20.64.9", "NONE"),
    ]


def test_sidecar_ports_are_parsed_and_checked() -> None:
    assert sc.parse_ports("80, 9080,80") == (80, 9080)
    for bad in ("", "0", "70000", "x", str(sc.ADMIN_PORT)):
        with pytest.raises(ValueError):
            sc.parse_ports(bad)


def test_sidecar_address_is_the_pod_address_in_the_next_range() -> None:
    cfg = sc.SidecarConfig(
        envoy=Path("envoy"), xds=("h", 1), run_dir=Path("."), netns=None, pods_net=ipaddress.IPv4Network("10.20.0.0/18")
    )
    assert cfg.address_of("10.20.3.4") == "10.20.67.4"


def test_pod_network_ranges_and_names() -> None:
    net = PodNetwork(ident="0123abcd", octet=42)
    assert (net.pod_cidr, net.pods_cidr) == ("10.42.0.0/17", "10.42.0.0/18")
    assert (net.host_ip, net.ns_ip) == ("10.42.128.1", "10.42.128.2")
    pods, link = ipaddress.ip_network(net.pod_cidr), ipaddress.ip_network(f"{net.host_ip}/30", strict=False)
    assert not pods.overlaps(link)  # the link is outside the range that is local in the namespace
    assert len(net.host_if) <= 15 and len(net.ns_if) <= 15  # Linux interface names
    a, b = pod_network(Path("/tmp/a")), pod_network(Path("/tmp/b"))
    assert a == pod_network(Path("/tmp/a")) and a.ident != b.ident
    assert 16 <= a.octet < 240 and ipaddress.ip_network(a.pod_cidr).is_private
