"""The activator's flags (each also an ``ELASTI_*`` environment variable) and the settings built from them."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from elasti_istio import options

DEFAULT_CONTROLLER_URL = "http://elasti-controller.elasti-system.svc.cluster.local:8013"


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
        help="request bodies up to this size are kept so that a not-yet-ready forward can be retried",
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
        "--upstream-proxy",
        metavar="URL",
        help="send every upstream request to this HTTP forward proxy in absolute-URI form",
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
    options.add(p, "--log-level", default="info", help="debug, info, warning or error")


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
    cold_start_header: bool = True
    upstream_proxy: str | None = None
    cluster_domain: str = "cluster.local"
    wake_token_file: str | None = None
    log_level: str = "info"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        if args.max_held < 1:
            raise SystemExit("--max-held must be at least 1")
        if args.drain_timeout < 0 or args.retry_body_limit < 0:
            raise SystemExit("--drain-timeout and --retry-body-limit must not be negative")
        return cls(
            listen=args.listen,
            admin_listen=args.admin_listen,
            controller_url=args.controller_url.rstrip("/"),
            kubeconfig=args.kubeconfig,
            namespaces=tuple(dict.fromkeys(args.namespace or ())),
            max_held=args.max_held,
            drain_timeout=args.drain_timeout,
            retry_body_limit=args.retry_body_limit,
            cold_start_header=args.cold_start_header,
            upstream_proxy=args.upstream_proxy or None,
            cluster_domain=args.cluster_domain.strip("."),
            wake_token_file=args.wake_token_file or None,
            log_level=args.log_level,
        )
