"""Where the API server is and how to authenticate: a kubeconfig file, in-cluster, or the default lookup."""

from __future__ import annotations

import dataclasses
import os
import ssl
from pathlib import Path

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


@dataclasses.dataclass(frozen=True)
class KubeConnection:
    server: str
    token: str | None = None
    token_file: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False
    namespace: str | None = None

    def bearer(self) -> str | None:
        """The current token; a token file is re-read so that rotated service-account tokens work."""
        if self.token_file:
            try:
                return Path(self.token_file).read_text().strip()
            except OSError:
                return self.token
        return self.token

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.server.startswith("https"):
            return False
        ctx = ssl.create_default_context(cafile=self.ca_file) if self.ca_file else ssl.create_default_context()
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


def load_connection(kubeconfig: str | None = None, context: str | None = None) -> KubeConnection:
    """Kubeconfig when given; otherwise in-cluster, then ``$KUBECONFIG`` / ``~/.kube/config``."""
    if kubeconfig:
        return _from_kubeconfig(kubeconfig, context)
    if os.environ.get("KUBERNETES_SERVICE_HOST") and (SA_DIR / "token").exists():
        host = os.environ["KUBERNETES_SERVICE_HOST"]
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if ":" in host:
            host = f"[{host}]"
        ns_file = SA_DIR / "namespace"
        return KubeConnection(
            server=f"https://{host}:{port}",
            token_file=str(SA_DIR / "token"),
            ca_file=str(SA_DIR / "ca.crt"),
            namespace=ns_file.read_text().strip() if ns_file.exists() else None,
        )
    return _from_kubeconfig(None, context)


def _from_kubeconfig(path: str | None, context: str | None) -> KubeConnection:
    from kubernetes import client, config  # imported lazily: only reading kubeconfig needs it

    if path and not Path(path).exists():
        raise FileNotFoundError(f"kubeconfig not found: {path}")
    cfg = client.Configuration()
    try:
        config.load_kube_config(config_file=path, context=context, client_configuration=cfg)
    except config.ConfigException as exc:
        raise RuntimeError(
            f"no usable Kubernetes configuration ({exc}); pass --kubeconfig or run in a cluster"
        ) from exc
    header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization")
    token = header.split(" ", 1)[-1] if header else None
    return KubeConnection(
        server=cfg.host.rstrip("/"),
        token=token,
        ca_file=cfg.ssl_ca_cert,
        cert_file=cfg.cert_file,
        key_file=cfg.key_file,
        insecure=not cfg.verify_ssl,
    )
