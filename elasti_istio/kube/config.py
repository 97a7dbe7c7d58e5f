"""Where the API server is and how to authenticate: a kubeconfig file, in-cluster, or the default lookup.

Credentials that change are followed, so a long-running controller keeps its access: a token file
(in-cluster, or a kubeconfig's ``tokenFile``) is re-read on every request, and a kubeconfig's ``exec``
plugin is run again when the token it gave expires or the API server refuses it (as client-go does).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import os
import ssl
import threading
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeconfigError(RuntimeError):
    """No usable kubeconfig; the message says which file and what to do."""


EXPIRY_MARGIN = 10.0  # seconds before an exec plugin's expirationTimestamp that it is run again


class ExecPlugin:
    """A kubeconfig ``exec`` credential plugin (``client.authentication.k8s.io``). It is run when there is
    no token yet, within ``EXPIRY_MARGIN`` of the ``expirationTimestamp`` it gave, and after the API
    server refused its token (:meth:`invalidate`). Running it blocks: async callers use
    :meth:`KubeConnection.bearer_async`, which runs it in a thread."""

    def __init__(self, exec_config: dict[str, Any], base_path: str, cluster: dict[str, Any] | None = None) -> None:
        self.exec_config = exec_config
        self.base_path = base_path
        self.cluster = cluster
        self._token: str | None = None
        self._expiry: dt.datetime | None = None
        self._lock = threading.Lock()
        self.runs = 0

    def stale(self) -> bool:
        if self._token is None:
            return True
        if self._expiry is None:
            return False
        return dt.datetime.now(dt.UTC) >= self._expiry - dt.timedelta(seconds=EXPIRY_MARGIN)

    def invalidate(self) -> None:
        with self._lock:
            self._token = None

    def token(self) -> str | None:
        with self._lock:
            if self.stale():
                self._run()
            return self._token

    def _run(self) -> None:
        from kubernetes.config.exec_provider import ExecProvider
        from kubernetes.config.kube_config import ConfigNode

        cluster = ConfigNode("cluster", self.cluster) if self.cluster is not None else None
        status = ExecProvider(ConfigNode("exec", self.exec_config), self.base_path, cluster).run()
        self.runs += 1
        token = status.get("token")
        if not token:
            raise RuntimeError(
                "the kubeconfig's exec plugin gave no token (client certificates from a plugin are not supported)"
            )
        self._token = str(token)
        expiry = status.get("expirationTimestamp")
        self._expiry = dt.datetime.fromisoformat(str(expiry).replace("Z", "+00:00")) if expiry else None
        log.debug("exec credential plugin run (token valid until %s)", self._expiry or "refused")


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
    exec_plugin: ExecPlugin | None = dataclasses.field(default=None, compare=False, repr=False)

    def bearer(self) -> str | None:
        """The current token: a token file is re-read so that rotated tokens work; an exec plugin is run
        when its token is missing or expiring (blocking)."""
        if self.exec_plugin is not None:
            return self.exec_plugin.token()
        if self.token_file:
            try:
                return Path(self.token_file).read_text().strip()
            except OSError:
                return self.token
        return self.token

    async def bearer_async(self) -> str | None:
        """:meth:`bearer` without blocking the event loop on an exec plugin."""
        if self.exec_plugin is not None and self.exec_plugin.stale():
            return await asyncio.to_thread(self.bearer)
        return self.bearer()

    @property
    def refreshable(self) -> bool:
        """Whether a refused token may be followed by another one (worth a second try)."""
        return self.exec_plugin is not None or self.token_file is not None

    def invalidate(self) -> None:
        """The API server refused the token: the next request gets a fresh one."""
        if self.exec_plugin is not None:
            self.exec_plugin.invalidate()

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
        raise KubeconfigError(f"kubeconfig not found: {path}")
    cfg = client.Configuration()
    where = path or os.environ.get("KUBECONFIG") or "~/.kube/config"
    try:
        config.load_kube_config(config_file=path, context=context, client_configuration=cfg)
    except config.ConfigException as exc:
        raise KubeconfigError(
            f"no usable Kubernetes configuration in {where} ({exc}); pass --kubeconfig, set KUBECONFIG or run "
            "in a cluster"
        ) from exc
    except (yaml.YAMLError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise KubeconfigError(f"the kubeconfig {where} cannot be read: {type(exc).__name__}: {exc}") from exc
    header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization")
    token = header.split(" ", 1)[-1] if header else None
    user, base = _kubeconfig_user(path, context)
    token_file = user.get("tokenFile")
    plugin = ExecPlugin(user["exec"], base) if isinstance(user.get("exec"), dict) else None
    return KubeConnection(
        server=cfg.host.rstrip("/"),
        token=token,
        token_file=str(Path(base, token_file)) if isinstance(token_file, str) and token_file else None,
        ca_file=cfg.ssl_ca_cert,
        cert_file=cfg.cert_file,
        key_file=cfg.key_file,
        insecure=not cfg.verify_ssl,
        exec_plugin=plugin,
    )


def _kubeconfig_user(path: str | None, context: str | None) -> tuple[dict[str, Any], str]:
    """The ``user`` entry of the context in use, and the folder its relative paths are resolved from.
    Several files (``$KUBECONFIG``) merge as kubectl merges them: the first file to name a thing wins."""
    if path:
        files = [path]
    else:
        env = os.environ.get("KUBECONFIG", "")
        files = [f for f in env.split(os.pathsep) if f] or [str(Path.home() / ".kube" / "config")]
    current: str | None = context
    contexts: dict[str, dict[str, Any]] = {}
    users: dict[str, tuple[dict[str, Any], str]] = {}
    for f in files:
        try:
            doc = yaml.safe_load(Path(f).read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        base = str(Path(f).resolve().parent)
        current = current or doc.get("current-context")
        for c in doc.get("contexts") or []:
            contexts.setdefault(c.get("name"), c.get("context") or {})
        for u in doc.get("users") or []:
            users.setdefault(u.get("name"), (u.get("user") or {}, base))
    name = contexts.get(current or "", {}).get("user")
    return users.get(name, ({}, ""))
