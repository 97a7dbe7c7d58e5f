"""``elasti-istio mesh``: the mesh stand-in (ingress gateway + sidecar outbound proxy + metrics)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
from typing import Any

import aiohttp
from aiohttp import web

from elasti_istio import logs, options
from elasti_istio.kube import Kube, load_connection
from elasti_istio.mesh import routing
from elasti_istio.mesh.metrics import Metrics
from elasti_istio.mesh.proxy import INGRESS, OUTBOUND, Proxy
from elasti_istio.mesh.routing import Destination
from elasti_istio.mesh.state import MeshState

log = logging.getLogger("elasti.mesh")


def labels(value: str) -> dict[str, str]:
    """``k=v,k2=v2`` → dict (empty string → no labels)."""
    out = {}
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        k, sep, v = part.partition("=")
        if not sep or not k:
            raise argparse.ArgumentTypeError(f"expected key=value, got {part!r}")
        out[k.strip()] = v.strip()
    return out


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "mesh",
        help="run the mesh stand-in: an Istio-like ingress gateway and sidecar proxy (tests, playground)",
        description="Routes HTTP by the live VirtualServices, DestinationRules and Gateways to the ready "
        "endpoints of EndpointSlices, answering its own errors as Envoy does. The ingress plays the "
        "Gateways selected by --gateway-selector (and any named by --gateway); the outbound listener is "
        "the sidecar every simulated pod and the activator send through (as an HTTP proxy, requests in "
        "absolute-URI form, or with a Host header). A caller's namespace, for short host names, is "
        "that of the pod whose IP the connection comes from; other callers get --default-namespace.",
    )
    options.add(p, "--kubeconfig", help="kubeconfig of an identity that may list and watch the watched kinds")
    options.add(p, "--ingress-listen", type=options.host_port, default=("127.0.0.1", 8080), help="ingress gateway")
    options.add(
        p, "--outbound-listen", type=options.host_port, default=("127.0.0.1", 15001), help="sidecar outbound proxy"
    )
    options.add(
        p,
        "--metrics-listen",
        type=options.host_port,
        default=("127.0.0.1", 15090),
        help="/metrics (Prometheus), /healthz, /readyz and /debug/routes",
    )
    options.add(
        p,
        "--gateway-selector",
        type=labels,
        default="istio=ingressgateway",
        metavar="K=V,...",
        help="labels of the ingress: it plays every Gateway whose selector they satisfy (empty: none)",
    )
    options.add(
        p,
        "--gateway",
        repeatable=True,
        default=[],
        metavar="[NS/]NAME",
        help="a Gateway the ingress plays whatever its selector",
    )
    options.add(p, "--cluster-domain", default=routing.DEFAULT_DOMAIN, help="DNS domain of the cluster")
    options.add(
        p,
        "--default-namespace",
        default="default",
        help="namespace short host names resolve in for callers that are not pods (e.g. local processes)",
    )
    options.add(
        p, "--connect-retries", type=int, default=2, help="extra attempts on another endpoint after a connect failure"
    )
    options.add(
        p,
        "--endpoint-removal-delay",
        type=float,
        default=0.1,
        metavar="SECONDS",
        help="endpoints that go away reach the proxies this much later, as istiod's debounce "
        "(PILOT_DEBOUNCE_AFTER, 100 ms) delays its pushes to Envoy; new endpoints apply at once",
    )
    options.add(p, "--log-level", default="info", help="debug, info, warning or error")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logs.setup(args.log_level, "mesh")
    return asyncio.run(_main(args))


def _endpoint_count(state: MeshState, dest: Destination) -> int | None:
    """Ready endpoints the destination would send to now; None when it has no cluster (no Service,
    port or subset)."""
    up = state.upstream(dest, None, None)
    return None if isinstance(up, str) else len(state.endpoints(*up.service, up.port_name, up.labels))


def _describe(state: MeshState) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for role in ("ingress", "mesh"):
        table = state.table(role)
        hosts = {**table.hosts.exact, **table.hosts.wild}
        out[role] = {
            "gateways": sorted(table.gateways),
            "hosts": {
                h: [
                    {
                        "route": r.name,
                        "destinations": [
                            {
                                "host": d.host,
                                "subset": d.subset,
                                "port": d.port,
                                "weight": d.weight,
                                "endpoints": _endpoint_count(state, d),
                            }
                            for d in r.destinations
                        ],
                    }
                    for r in routes
                ]
                for h, routes in sorted(hosts.items())
            },
        }
    return out


def admin_app(state: MeshState, metrics: Metrics) -> web.Application:
    async def metrics_h(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), content_type="text/plain", charset="utf-8")

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        if state.synced():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="informers not synced\n")

    async def routes(request: web.Request) -> web.Response:
        return web.Response(text=json.dumps(_describe(state), indent=2), content_type="application/json")

    app = web.Application()
    app.router.add_get("/metrics", metrics_h)
    app.router.add_get("/stats/prometheus", metrics_h)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/debug/routes", routes)
    return app


class Mesh:
    """The three listeners over one shared state, client session and metrics registry."""

    def __init__(self, kube: Kube, args: argparse.Namespace) -> None:
        self.kube = kube
        self.args = args
        self.state = MeshState(
            kube,
            domain=args.cluster_domain,
            gateway_labels=args.gateway_selector,
            gateway_names=tuple(args.gateway or ()),
            default_namespace=args.default_namespace,
            removal_delay=args.endpoint_removal_delay,
        )
        self.metrics = Metrics()
        self.runners: list[web.BaseRunner] = []
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30, use_dns_cache=False)
        self.session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        await self.state.start()
        a = self.args
        for role, (host, port) in ((INGRESS, a.ingress_listen), (OUTBOUND, a.outbound_listen)):
            proxy = Proxy(self.state, self.metrics, self.session, role=role, retries=a.connect_retries)
            server = web.Server(proxy.handle, handler_cancellation=True, access_log=None)
            runner = web.ServerRunner(server)
            await runner.setup()
            await web.TCPSite(runner, host, port, reuse_address=True, backlog=1024).start()
            self.runners.append(runner)
            log.info("%s listening on %s:%s", role, host, port)
        runner = web.AppRunner(admin_app(self.state, self.metrics), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, a.metrics_listen[0], a.metrics_listen[1], reuse_address=True).start()
        self.runners.append(runner)
        log.info("metrics on %s:%s", *a.metrics_listen)

    async def stop(self) -> None:
        for runner in self.runners:
            with contextlib.suppress(Exception):
                await runner.cleanup()
        await self.state.stop()
        if self.session is not None:
            await self.session.close()


async def _main(args: argparse.Namespace) -> int:
    args = options.resolve_repeatable(args)
    kube = Kube(load_connection(args.kubeconfig), user_agent="elasti-mesh")
    mesh = Mesh(kube, args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await mesh.start()
    except OSError as exc:
        log.error("cannot listen: %s", exc)
        await mesh.stop()
        await kube.close()
        return 1
    synced = asyncio.create_task(mesh.state.wait_synced())
    synced.add_done_callback(lambda _t: log.info("mesh ready: watching the cluster"))
    await stop.wait()
    synced.cancel()
    await mesh.stop()
    await kube.close()
    return 0
