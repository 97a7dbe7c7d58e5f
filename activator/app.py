"""Wiring and lifecycle: sessions, registry, proxy and admin listeners, and the drain on shutdown."""

from __future__ import annotations

import logging

import aiohttp
from aiohttp import web

from activator.config import Config
from activator.forward import Forwarder
from activator.h2client import H2Pool
from activator.h2proxy import H2Forwarder, H2Front
from activator.hold import Holds
from activator.metrics import Metrics
from activator.protocol import JsonErrorServer
from activator.registry import Registry
from activator.server import Admin, Proxy
from activator.upstream import UpstreamClient
from activator.wake import WakeNotifier
from elasti_istio.kube import Kube, load_connection

log = logging.getLogger(__name__)


class Activator:
    """One activator process. ``registry`` may be given (fed by hand in tests); otherwise it watches the API."""

    def __init__(self, cfg: Config, registry: Registry | None = None, *, wake_token_file: str | None = None) -> None:
        self.cfg = cfg
        self.registry = registry if registry is not None else Registry(cfg.cluster_domain)
        self._watch = registry is None
        self.wake_token_file = wake_token_file or cfg.wake_token_file
        self.metrics = Metrics()
        self.kube: Kube | None = None
        self._proxy_runner: web.BaseRunner | None = None
        self._admin_runner: web.BaseRunner | None = None

    async def start(self) -> None:
        cfg = self.cfg
        # One pooled keep-alive session for every upstream request; nothing is added or decoded on the way.
        self.upstream = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=0, limit_per_host=cfg.upstream_connections, keepalive_timeout=30, ttl_dns_cache=10
            ),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            trust_env=False,
        )
        self.control = aiohttp.ClientSession(trust_env=False)
        if self._watch:
            self.kube = Kube(load_connection(cfg.kubeconfig), user_agent="elasti-activator")
            self.registry.start(self.kube, cfg.namespaces)
        self.notifier = WakeNotifier(
            self.control, cfg.controller_url, self.metrics, token_file=self.wake_token_file, wait=cfg.wake_wait
        )
        self.holds = Holds(self.registry, self.notifier, self.metrics, cfg.max_held)
        self.fast_upstream = UpstreamClient(cfg.upstream_proxy, cfg.upstream_connections, sidecar=cfg.sidecar_address)
        self.forwarder = Forwarder(
            self.upstream,
            cfg.upstream_proxy,
            cfg.cold_start_header,
            self.fast_upstream,
            sidecar=cfg.sidecar_address,
            websocket_max_message=cfg.websocket_max_message,
            http1_trailers=cfg.http1_trailers,
        )
        self.proxy = Proxy(cfg, self.registry, self.holds, self.forwarder, self.metrics)
        self.h2_pool = H2Pool()
        self.h2 = H2Front(
            self.proxy, H2Forwarder(self.h2_pool, cfg.upstream_proxy, cfg.sidecar_address, cfg.cold_start_header)
        )
        self.admin = Admin(self.registry, self.holds, self.metrics, self.proxy.route_keys)

        # The low-level server: no router or middlewares on the hot path. Handler cancellation turns a
        # client that goes away while held into a CancelledError, so it is dequeued at once.
        server = JsonErrorServer(
            self.proxy.handle,
            on_rejected=self.metrics.rejected_unrouted,
            handler_cancellation=True,
            access_log=None,
            header_timeout=cfg.header_timeout,
            max_connections=cfg.max_connections,
            on_refused=self.metrics.connection_refused,
            keepalive_timeout=cfg.keepalive_timeout,
            max_line_size=cfg.max_line_size,
            max_field_size=cfg.max_field_size,
            max_headers=cfg.max_headers,
            h2_handler=self.h2.handle,
            h2_max_streams=cfg.max_concurrent_streams,
            http1_trailers=cfg.http1_trailers,
        )
        self._proxy_runner = web.ServerRunner(server, shutdown_timeout=max(cfg.drain_timeout, 0.1))
        await self._proxy_runner.setup()
        await web.TCPSite(self._proxy_runner, *cfg.listen, reuse_address=True, backlog=1024).start()
        self._admin_runner = web.AppRunner(self.admin.app(), access_log=None)
        await self._admin_runner.setup()
        await web.TCPSite(self._admin_runner, *cfg.admin_listen, reuse_address=True).start()
        log.info(
            "proxy on %s, admin on %s, controller %s, upstream %s, namespaces %s",
            _fmt(self.proxy_address),
            _fmt(self.admin_address),
            cfg.controller_url,
            f"through the sidecar at {cfg.sidecar_address}:<origin port>"
            if cfg.sidecar_address
            else f"through proxy {cfg.upstream_proxy}"
            if cfg.upstream_proxy
            else "direct",
            ",".join(cfg.namespaces) or "all",
        )

    @property
    def proxy_address(self) -> tuple[str, int]:
        assert self._proxy_runner is not None
        return tuple(self._proxy_runner.addresses[0][:2])  # type: ignore[return-value]

    @property
    def admin_address(self) -> tuple[str, int]:
        assert self._admin_runner is not None
        return tuple(self._admin_runner.addresses[0][:2])  # type: ignore[return-value]

    async def drain(self) -> None:
        """SIGTERM: not ready, no new connections, held and in-flight requests finish within the drain timeout."""
        self.admin.draining = True
        log.info("draining: %d held, up to %.0fs", self.holds.queues.total, self.cfg.drain_timeout)
        self.proxy.start_drain(self.cfg.drain_timeout)
        await self.close()

    async def close(self) -> None:
        if self._proxy_runner is not None:
            await self._proxy_runner.cleanup()  # stops listening, then waits for the handlers
            self._proxy_runner = None
        await self.holds.close()
        await self.registry.stop()
        if self.kube is not None:
            await self.kube.close()
        await self.upstream.close()
        await self.fast_upstream.close()
        await self.h2_pool.close()
        await self.control.close()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
            self._admin_runner = None


def _fmt(addr: tuple[str, int]) -> str:
    return f"{addr[0]}:{addr[1]}"
