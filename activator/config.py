"""The activator's flags (each also an ``ELASTI_*`` environment variable) and the settings built from them."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from activator import trailers
from elasti_istio import logs, options

DEFAULT_CONTROLLER_URL = "http://elasti-controller.elasti-system.svc.cluster.local:8013"
# Above what an Istio sidecar lets through by default (60 KiB of headers, 100 of them) plus the few
# headers it adds itself, so that the activator never refuses a request that reached it through the mesh.
DEFAULT_MAX_LINE = 64 * 1024
DEFAULT_MAX_FIELD = 64 * 1024
DEFAULT_MAX_HEADERS = 128
# Each held request has a client connection already; an upstream connection apiece on release would
# double the file descriptors (10,000 held: past a 20,000 open-files limit) for no gain in speed.
DEFAULT_UPSTREAM_CONNECTIONS = 1000


def add_flags(p: argparse.ArgumentParser) -> None:
    options.add(
        p,
        "--listen",
        default=("0.0.0.0", 8012),
        type=options.host_port,
        metavar="HOST:PORT",
        help="where the proxy listens for requests routed by the mesh",
    )
    options.add(
        p,
        "--admin-listen",
        default=("0.0.0.0", 9091),
        type=options.host_port,
        metavar="HOST:PORT",
        help="where /healthz, /readyz, /metrics and /v1/pending/<namespace>/<name> are served",
    )
    options.add(
        p,
        "--controller-url",
        default=DEFAULT_CONTROLLER_URL,
        metavar="URL",
        help="the controller, told to wake a workload by POST <url>/v1/wake",
    )
    options.add(
        p,
        "--wake-wait",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="a wake call asks the controller to answer when the workload has a ready replica, within this "
        "long: held requests then go out as soon as the controller knows, before the ElastiService status "
        "says so (0: the status alone)",
    )
    options.add(
        p,
        "--kubeconfig",
        metavar="PATH",
        help="kubeconfig for reading ElastiServices (default: in-cluster, then $KUBECONFIG)",
    )
    options.add(
        p,
        "--namespace",
        repeatable=True,
        default=[],
        metavar="NS",
        help="watch ElastiServices in this namespace only (default: all namespaces)",
    )
    options.add(
        p,
        "--max-held",
        type=int,
        default=10000,
        metavar="N",
        help="requests held at once over all ElastiServices; beyond it: 503 with Retry-After",
    )
    options.add(
        p,
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM, how long held and in-flight requests may take to finish",
    )
    options.add(
        p,
        "--retry-body-limit",
        type=int,
        default=1024 * 1024,
        metavar="BYTES",
        help="request bodies up to this size are kept in memory, larger ones on disk (--spool-dir), so that a "
        "forward the mesh answered 'not ready' is sent again whole",
    )
    options.add(
        p,
        "--header-timeout",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="a new connection must send a whole request line and headers within this many seconds, else 408 "
        "and it is closed; 0: no limit",
    )
    options.add(
        p,
        "--keepalive-timeout",
        type=float,
        default=3630.0,
        metavar="SECONDS",
        help="an idle keep-alive connection (between requests) is closed after this many seconds; longer than "
        "Envoy's upstream idle timeout (Istio: 1 h) so that Envoy closes idle connections, not the activator: a "
        "request Envoy sends as the activator closes would fail",
    )
    options.add(
        p,
        "--max-concurrent-streams",
        type=int,
        default=1000,
        metavar="N",
        help="HTTP/2 streams (gRPC calls) one client connection may have open at once, as told to the client in "
        "its SETTINGS (1-2147483647)",
    )
    options.add(
        p,
        "--max-connections",
        type=int,
        default=20000,
        metavar="N",
        help="open client connections at most; a further one is answered 503 (too many connections) with "
        "Retry-After and closed; 0: no limit (the process's open-file limit applies)",
    )
    options.add(
        p,
        "--spool-dir",
        default=None,
        metavar="PATH",
        help="where request bodies larger than --retry-body-limit are kept (unnamed files, gone when the request "
        "ends) so that they can be sent again; default: the system's temporary directory",
    )
    options.add(
        p,
        "--spool-limit",
        type=int,
        default=1024 * 1024 * 1024,
        metavar="BYTES",
        help="bytes of request bodies kept on disk at once by this activator; a body that would pass it gets 503 "
        "with Retry-After; 0: no limit",
    )
    options.add(
        p,
        "--max-body-size",
        type=int,
        default=0,
        metavar="BYTES",
        help="refuse request bodies larger than this with 413, from Content-Length up front or while a chunked "
        "body streams in; 0: no limit (bodies are streamed, so their size costs no memory)",
    )
    options.add(
        p,
        "--websocket-max-message",
        type=int,
        default=4 * 1024 * 1024,
        metavar="BYTES",
        help="largest websocket message relayed either way (each is held whole in memory); a larger one closes "
        "both legs with 1009 (message too big); 0: no limit",
    )
    options.add(
        p,
        "--request-body-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="the whole request body must arrive within this many seconds from when the activator starts reading "
        "it (at once, or when a held request is released), else 408; 0: no limit",
    )
    options.add(
        p,
        "--max-line-size",
        type=int,
        default=DEFAULT_MAX_LINE,
        metavar="BYTES",
        help="longest request line (method, target, version) accepted; longer: 431",
    )
    options.add(
        p,
        "--max-field-size",
        type=int,
        default=DEFAULT_MAX_FIELD,
        metavar="BYTES",
        help="longest header field (name and value) accepted; longer: 431",
    )
    options.add(
        p,
        "--max-headers",
        type=int,
        default=DEFAULT_MAX_HEADERS,
        metavar="N",
        help="most header fields accepted in one request; more: 431",
    )
    options.add(
        p,
        "--cold-start-header",
        boolean=True,
        default=True,
        help="add 'X-Elasti-Cold-Start: true' to responses of requests that were held",
    )
    options.add(
        p,
        "--http1-trailers",
        boolean=True,
        default=False,
        help="carry HTTP/1.1 trailers (the fields after a chunked body) both ways; costs CPU per HTTP/1.1 "
        "request (aiohttp's Python parser reads them); sidecars drop them unless Envoy's enable_trailers is set",
    )
    options.add(
        p,
        "--upstream-proxy",
        metavar="URL",
        help="send every upstream request to this HTTP forward proxy in absolute-URI form",
    )
    options.add(
        p,
        "--sidecar-address",
        metavar="HOST",
        help="the activator's Istio sidecar does not capture traffic (a Sidecar resource with captureMode NONE "
        "binding its egress listeners on HOST, one per Service port): send each upstream request to HOST at the "
        "origin's port, in absolute-URI form",
    )
    options.add(
        p,
        "--upstream-connections",
        type=int,
        default=DEFAULT_UPSTREAM_CONNECTIONS,
        metavar="N",
        help="most connections open at once to one origin (kept alive and reused); when a large queue is "
        "released, requests beyond it wait for a free connection instead of each opening its own",
    )
    options.add(
        p,
        "--cluster-domain",
        default="cluster.local",
        metavar="DOMAIN",
        help="the cluster's DNS domain, for origin addresses <service>.<namespace>.svc.<domain>",
    )
    options.add(
        p,
        "--wake-token-file",
        metavar="PATH",
        help="send the token in this file as a bearer token with every wake call (re-read each call, so a "
        "mounted Secret can rotate); must match the controller's --wake-token-file",
    )
    options.add(
        p,
        "--route-key-file",
        metavar="PATH",
        help="the route key file the controller signs with (a mounted Secret, one key per line, every line "
        "accepted): a request whose elasti-token is not the token of its elasti-service is refused with 403; "
        "unset: no check (any pod that reaches the activator can name any ElastiService)",
    )
    logs.add_flags(p)


@dataclass(frozen=True)
class Config:
    listen: tuple[str, int] = ("0.0.0.0", 8012)
    admin_listen: tuple[str, int] = ("0.0.0.0", 9091)
    controller_url: str = DEFAULT_CONTROLLER_URL
    kubeconfig: str | None = None
    namespaces: tuple[str, ...] = ()
    max_held: int = 10000
    drain_timeout: float = 30.0
    retry_body_limit: int = 1024 * 1024
    max_body_size: int = 0
    header_timeout: float = 15.0
    keepalive_timeout: float = 3630.0
    max_connections: int = 20000
    max_concurrent_streams: int = 1000
    spool_dir: str | None = None
    spool_limit: int = 1024 * 1024 * 1024
    websocket_max_message: int = 4 * 1024 * 1024
    request_body_timeout: float = 60.0
    max_line_size: int = DEFAULT_MAX_LINE
    max_field_size: int = DEFAULT_MAX_FIELD
    max_headers: int = DEFAULT_MAX_HEADERS
    cold_start_header: bool = True
    http1_trailers: bool = False
    upstream_proxy: str | None = None
    sidecar_address: str | None = None
    upstream_connections: int = DEFAULT_UPSTREAM_CONNECTIONS
    cluster_domain: str = "cluster.local"
    wake_token_file: str | None = None
    route_key_file: str | None = None
    wake_wait: float = 30.0
    log_level: str = "info"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        if args.max_held < 1 or args.upstream_connections < 1:
            raise SystemExit("--max-held and --upstream-connections must be at least 1")
        sizes = (args.drain_timeout, args.retry_body_limit, args.max_body_size, args.request_body_timeout)
        if min(*sizes, args.websocket_max_message, args.spool_limit, args.header_timeout, args.max_connections) < 0:
            raise SystemExit(
                "--drain-timeout, --retry-body-limit, --max-body-size, --websocket-max-message, --spool-limit, "
                "--header-timeout, --max-connections and --request-body-timeout must not be negative"
            )
        if not 1 <= args.max_concurrent_streams <= 2**31 - 1:
            raise SystemExit("--max-concurrent-streams must be from 1 to 2147483647")
        if args.upstream_proxy and args.sidecar_address:
            raise SystemExit("--upstream-proxy and --sidecar-address are exclusive: give one of them")
        if not 0 <= args.wake_wait <= 60:
            raise SystemExit("--wake-wait must be from 0 to 60 seconds")
        if min(args.max_line_size, args.max_field_size) < 256 or args.max_headers < 8:
            raise SystemExit("--max-line-size and --max-field-size must be at least 256, --max-headers at least 8")
        if args.http1_trailers and not trailers.parser_keeps_trailers():
            raise SystemExit(
                "--http1-trailers: this aiohttp release's HTTP/1.1 parser skips request trailers; "
                "upgrade aiohttp or leave the option off"
            )
        return cls(
            listen=args.listen,
            admin_listen=args.admin_listen,
            controller_url=args.controller_url.rstrip("/"),
            kubeconfig=args.kubeconfig,
            namespaces=tuple(dict.fromkeys(args.namespace or ())),
            max_held=args.max_held,
            drain_timeout=args.drain_timeout,
            retry_body_limit=args.retry_body_limit,
            max_body_size=args.max_body_size,
            header_timeout=args.header_timeout,
            keepalive_timeout=max(0.1, args.keepalive_timeout),
            max_connections=args.max_connections,
            max_concurrent_streams=args.max_concurrent_streams,
            spool_dir=args.spool_dir or None,
            spool_limit=args.spool_limit,
            websocket_max_message=args.websocket_max_message,
            request_body_timeout=args.request_body_timeout,
            max_line_size=args.max_line_size,
            max_field_size=args.max_field_size,
            max_headers=args.max_headers,
            cold_start_header=args.cold_start_header,
            http1_trailers=args.http1_trailers,
            upstream_proxy=args.upstream_proxy or None,
            sidecar_address=args.sidecar_address or None,
            upstream_connections=args.upstream_connections,
            cluster_domain=args.cluster_domain.strip("."),
            wake_token_file=args.wake_token_file or None,
            route_key_file=args.route_key_file or None,
            wake_wait=args.wake_wait,
            log_level=args.log_level,
        )
