"""Istio in the local cluster: istiod (``pilot-discovery``) as a process, its validating webhook, and
Envoy bootstraps for proxies that istiod feeds over plaintext xDS.

istiod runs in this network namespace: its xDS port listens on the pod network's veth address (the
Envoys run inside the pod network), its webhook and debug ports on 127.0.0.1. There is no CA and no
mTLS (``enableAutoMtls: false``): the proxies are upstream Envoy, without pilot-agent or SDS, so
istiod is also told not to send the Istio-only filters (ALPN override, metadata exchange).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

ISTIO_NAMESPACE = "istio-system"
CLUSTER_ID = "Kubernetes"
PROXY_VERSION = "1.31.0"
WEBHOOK_NAME = "elasti-local-istio-validator"
GATEWAY_SERVICE = "istio-ingressgateway"
GATEWAY_LABELS = {"istio": "ingressgateway", "app": "istio-ingressgateway"}
# Where the ingress gateway listens in the pod network. Gateways name port 80 or, as Bookinfo's does,
# 8080; the istio-ingressgateway Service maps both to this target port, as Istio's gateway chart maps
# 80 to 8080, so that istiod binds the gateway's wildcard listener on a port no simulated app uses.
GATEWAY_TARGET_PORT = 18080
SIDECAR_LABEL = "elasti.truefoundry.com/sim-sidecar"

MESH_CONFIG = {
    "rootNamespace": ISTIO_NAMESPACE,
    "enableAutoMtls": False,
    "enableTracing": False,
    "ingressControllerMode": "OFF",
    "defaultConfig": {"discoveryAddress": "unused:15010"},
}

ISTIOD_ENV = {
    "POD_NAMESPACE": ISTIO_NAMESPACE,
    "POD_NAME": "istiod-local",
    "CLUSTER_ID": CLUSTER_ID,
    "ENABLE_CA_SERVER": "false",
    "INJECT_ENABLED": "false",
    "VALIDATION_WEBHOOK_CONFIG_NAME": "",
    "INJECTION_WEBHOOK_CONFIG_NAME": "",
    "PILOT_ENABLE_ALPN_FILTER": "false",
    "PILOT_ENABLE_METADATA_EXCHANGE": "false",
    "PILOT_ENABLE_GATEWAY_API": "false",
    "PILOT_ENABLE_GATEWAY_API_DEPLOYMENT_CONTROLLER": "false",
    "PILOT_ENABLE_GATEWAY_API_STATUS": "false",
    "ENABLE_LEADER_ELECTION": "false",
}


def make_certificates(pki: Path) -> dict[str, Path]:
    """A CA and istiod's serving certificate for 127.0.0.1 (the webhook's address)."""
    pki.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = pki / "istio-ca.key", pki / "istio-ca.crt"
    key, csr, crt, ext = pki / "istiod.key", pki / "istiod.csr", pki / "istiod.crt", pki / "istiod.ext"

    def openssl(*args: str) -> None:
        proc = subprocess.run(["openssl", *args], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"openssl {args[0]} failed: {proc.stderr.strip()}")

    if not crt.exists():
        openssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(ca_key),
            "-out",
            str(ca_crt),
            "-days",
            "3650",
            "-subj",
            "/CN=elasti-local-istio-ca",
        )
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(csr),
            "-subj",
            "/CN=istiod.istio-system.svc",
        )
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:istiod.istio-system.svc\n")
        openssl(
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(ca_crt),
            "-CAkey",
            str(ca_key),
            "-CAcreateserial",
            "-out",
            str(crt),
            "-days",
            "3650",
            "-extfile",
            str(ext),
        )
    return {"ca": ca_crt, "cert": crt, "key": key}


def write_mesh_config(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    mesh, networks = folder / "mesh.yaml", folder / "meshNetworks.yaml"
    mesh.write_text(yaml.safe_dump(MESH_CONFIG, sort_keys=False))
    networks.write_text("networks: {}\n")
    return mesh, networks


def istiod_argv(
    pilot: Path, kubeconfig: Path, conf: Path, certs: dict[str, Path], ports: dict[str, int], xds_host: str
) -> list[str]:
    mesh, networks = write_mesh_config(conf)
    return [
        str(pilot),
        "discovery",
        f"--kubeconfig={kubeconfig}",
        f"--meshConfig={mesh}",
        f"--networksConfig={networks}",
        f"--grpcAddr={xds_host}:{ports['istiod_xds']}",
        "--secureGRPCAddr=",
        f"--httpAddr=127.0.0.1:{ports['istiod_http']}",
        f"--httpsAddr=127.0.0.1:{ports['istiod_webhook']}",
        f"--monitoringAddr=127.0.0.1:{ports['istiod_monitoring']}",
        "--ctrlz_address=127.0.0.1",
        f"--ctrlz_port={ports['istiod_ctrlz']}",
        f"--tlsCertFile={certs['cert']}",
        f"--tlsKeyFile={certs['key']}",
        f"--caCertFile={certs['ca']}",
        "--log_output_level=default:warn",
    ]


def webhook_configuration(url: str, ca_pem: bytes) -> dict[str, Any]:
    """Istio's validating webhook, reached by URL (istiod is not a Pod here)."""
    import base64

    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": WEBHOOK_NAME, "labels": {"app": "istiod"}},
        "webhooks": [
            {
                "name": "rev.validation.istio.io",
                "clientConfig": {"url": url, "caBundle": base64.b64encode(ca_pem).decode()},
                "rules": [
                    {
                        "operations": ["CREATE", "UPDATE"],
                        "apiGroups": [
                            "security.istio.io",
                            "networking.istio.io",
                            "telemetry.istio.io",
                            "extensions.istio.io",
                        ],
                        "apiVersions": ["*"],
                        "resources": ["*"],
                    }
                ],
                "failurePolicy": "Fail",
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                "timeoutSeconds": 10,
            }
        ],
    }


def gateway_service() -> dict[str, Any]:
    """The Service that tells istiod the gateway's port 80 is its target port (no Pod behind it)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": GATEWAY_SERVICE, "namespace": ISTIO_NAMESPACE, "labels": dict(GATEWAY_LABELS)},
        "spec": {
            "selector": {"istio": "ingressgateway"},
            "ports": [
                {"name": "http2", "port": 80, "targetPort": GATEWAY_TARGET_PORT},
                {"name": "http-alt", "port": 8080, "targetPort": GATEWAY_TARGET_PORT},
            ],
        },
    }


def envoy_bootstrap(
    *,
    kind: str,
    ip: str,
    pod: str,
    namespace: str,
    labels: dict[str, str],
    xds: tuple[str, int],
    admin: tuple[str, int],
    static_labels: dict[str, str] | None = None,
    workload: str | None = None,
) -> dict[str, Any]:
    """What pilot-agent would hand Envoy: the node identity istiod keys on and the xDS cluster.

    ``kind`` is ``router`` (a gateway) or ``sidecar``; sidecars do not capture traffic
    (``INTERCEPTION_MODE: NONE``): their listeners come from a ``Sidecar`` with ``bind`` addresses.
    """
    metadata: dict[str, Any] = {
        "ISTIO_VERSION": PROXY_VERSION,
        "NAMESPACE": namespace,
        "CLUSTER_ID": CLUSTER_ID,
        "INSTANCE_IPS": ip,
        "LABELS": {**labels, **(static_labels or {})},
        "WORKLOAD_NAME": workload or pod,
    }
    if static_labels:
        metadata["STATIC_LABELS"] = static_labels
    if kind == "sidecar":
        metadata["INTERCEPTION_MODE"] = "NONE"

    def address(host: str, port: int) -> dict[str, Any]:
        return {"socket_address": {"address": host, "port_value": port}}

    return {
        "node": {
            "id": f"{kind}~{ip}~{pod}.{namespace}~{namespace}.svc.cluster.local",
            "cluster": f"{workload or pod}.{namespace}",
            "metadata": metadata,
        },
        "admin": {"address": address(*admin)},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}],
            },
            "cds_config": {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"},
        },
        "static_resources": {
            "clusters": [
                {
                    "name": "xds-grpc",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "xds-grpc",
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address(*xds)}}]}],
                    },
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                }
            ]
        },
        # Istio's tags: a cluster's statistics are labelled cluster_name="outbound|80||web.ns.svc.cluster.local"
        # (istiod ends each cluster's stat name with ';' for this pattern), not split at its dots.
        "stats_config": {
            "use_all_default_tags": False,
            "stats_tags": [
                {"tag_name": "cluster_name", "regex": "^cluster(\\.(.+);)"},
                {"tag_name": "response_code", "regex": "_rq(_(\\d{3}))$"},
                {"tag_name": "response_code_class", "regex": "_rq(_(\\dxx))$"},
            ],
        },
        "layered_runtime": {
            "layers": [{"name": "static", "static_layer": {"overload.global_downstream_max_connections": 100000}}]
        },
    }


def envoy_argv(envoy: Path, bootstrap: Path, *, log_level: str = "warning") -> list[str]:
    return [
        str(envoy),
        "-c",
        str(bootstrap),
        "--disable-hot-restart",
        "--concurrency",
        "1",
        "--log-level",
        log_level,
        "--drain-time-s",
        "1",
        "--parent-shutdown-time-s",
        "2",
    ]


def write_json(path: Path, doc: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    return path


def synced(syncz: list[dict[str, Any]], proxy_id: str) -> bool:
    """istiod's view (``/debug/syncz``): every type it sent this proxy is acked, none NACKed."""
    for entry in syncz:
        if entry.get("proxy") != proxy_id:
            continue
        resources = entry.get("resources") or {}
        if not resources:
            return False
        return all(
            r.get("sent") and r.get("acked") == r.get("sent") and not r.get("lastError") for r in resources.values()
        )
    return False
