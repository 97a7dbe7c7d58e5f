"""The controller's flags (each with its ELASTI_* environment variable)."""

from __future__ import annotations

import argparse
import dataclasses

from elasti_istio import logs, options
from elasti_istio.controller.triggers import Allow, parse_allow


@dataclasses.dataclass(frozen=True)
class ControllerConfig:
    namespaces: tuple[str, ...] = ()
    activator_host: str = "elasti-activator.elasti-system.svc.cluster.local"
    activator_port: int = 8012
    activator_deployment: tuple[str, str] | None = ("elasti-system", "elasti-activator")
    wake_listen: tuple[str, int] = ("0.0.0.0", 8013)
    metrics_listen: tuple[str, int] = ("0.0.0.0", 8080)
    kubeconfig: str | None = None
    leader_election: bool = False
    leader_election_namespace: str = "elasti-system"
    leader_election_id: str = "elasti-controller"
    lease_seconds: float = 15.0
    cluster_domain: str = "cluster.local"
    istio_root_namespace: str = "istio-system"
    trigger_allow: Allow = dataclasses.field(default_factory=Allow)
    route_key_file: str | None = None
    workers: int = 8
    identity: str = ""
    wake_token_file: str | None = None
    idle_check_interval: float = 15.0
    route_settle_seconds: float = 2.0
    fail_open_wakes_per_second: float = 2.0
    fail_open_burst: int = 10
    pod_watches: int = 50
    create_secrets: bool = False
    secrets_namespace: str = "elasti-system"
    wake_token_secret: str = "elasti-wake-token"
    route_key_secret: str = "elasti-route-key"


def parse_deployment_ref(value: str) -> tuple[str, str] | None:
    if value.strip().lower() == "none":
        return None
    ns, sep, name = value.partition("/")
    if not sep or not ns or not name:
        raise argparse.ArgumentTypeError(f"expected NAMESPACE/NAME or none, got {value!r}")
    return ns, name


def add_flags(p: argparse.ArgumentParser) -> None:
    d = ControllerConfig()
    _process_flags(p.add_argument_group("where it runs and how it is elected"), d)
    _routing_flags(p.add_argument_group("routes to the activator"), d)
    _endpoint_flags(p.add_argument_group("what it serves"), d)
    _scaling_flags(p.add_argument_group("wakes and scale-downs"), d)
    _secret_flags(p.add_argument_group("the wake token and route key Secrets"), d)


def _process_flags(p: argparse._ArgumentGroup, d: ControllerConfig) -> None:
    options.add(
        p,
        "--namespace",
        repeatable=True,
        default=[],
        metavar="NS",
        help="watch only this namespace; default: all namespaces",
    )
    options.add(
        p,
        "--kubeconfig",
        default=None,
        metavar="PATH",
        help="kubeconfig file; default: in-cluster, then $KUBECONFIG or ~/.kube/config",
    )
    options.add(p, "--cluster-domain", default=d.cluster_domain, help="DNS suffix of Service hosts")
    options.add(
        p,
        "--leader-election",
        boolean=True,
        default=False,
        help="act only while holding a coordination.k8s.io Lease (run several replicas)",
    )
    options.add(
        p, "--leader-election-namespace", default=d.leader_election_namespace, help="namespace of the leader Lease"
    )
    options.add(p, "--leader-election-id", default=d.leader_election_id, help="name of the leader Lease")
    options.add(
        p,
        "--lease-seconds",
        type=float,
        default=d.lease_seconds,
        help="how long a Lease is held without renewal before another replica takes over",
    )
    options.add(p, "--workers", type=int, default=d.workers, help="ElastiServices reconciled concurrently")
    logs.add_flags(p)


def _routing_flags(p: argparse._ArgumentGroup, d: ControllerConfig) -> None:
    options.add(
        p,
        "--activator-host",
        default=d.activator_host,
        help="host of the activator Service that proxy-mode routes send traffic to",
    )
    options.add(p, "--activator-port", type=int, default=d.activator_port, help="port of the activator Service")
    options.add(
        p,
        "--activator-deployment",
        type=parse_deployment_ref,
        default="elasti-system/elasti-activator",
        metavar="NS/NAME",
        help="the activator Deployment; without a ready replica routes stay in serve mode and sleeping "
        "targets are woken (fail open); 'none' disables the check",
    )
    options.add(
        p,
        "--istio-root-namespace",
        default=d.istio_root_namespace,
        help="Istio's root configuration namespace (meshConfig.rootNamespace): its DestinationRules apply to "
        "every namespace, after the client's and the Service's",
    )
    options.add(
        p,
        "--route-key-file",
        default=None,
        metavar="PATH",
        help="the route key (a mounted Secret, one key per line, the first signs): proxy-mode routes carry an "
        "elasti-token the activator checks, so only the mesh route can use it; re-read when the file changes",
    )


def _endpoint_flags(p: argparse._ArgumentGroup, d: ControllerConfig) -> None:
    options.add(
        p,
        "--wake-listen",
        type=options.host_port,
        default="0.0.0.0:8013",
        metavar="HOST:PORT",
        help="where POST /v1/wake is served",
    )
    options.add(
        p,
        "--metrics-listen",
        type=options.host_port,
        default="0.0.0.0:8080",
        metavar="HOST:PORT",
        help="where /metrics, /healthz and /readyz are served",
    )
    options.add(
        p,
        "--wake-token-file",
        default=None,
        metavar="PATH",
        help="accept POST /v1/wake only with the bearer token in this file (re-read when it changes, so a "
        "mounted Secret can rotate); default: no authentication",
    )


def _scaling_flags(p: argparse._ArgumentGroup, d: ControllerConfig) -> None:
    options.add(
        p,
        "--trigger-allow",
        default="",
        metavar="HOSTS_AND_CIDRS",
        help="comma-separated Prometheus hosts (exact names) and networks (for IP addresses) that idle triggers "
        "may query; empty: any http(s) address without credentials, query or fragment",
    )
    options.add(
        p,
        "--idle-check-interval",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="how often ElastiServices with triggers are checked for idleness",
    )
    options.add(
        p,
        "--route-settle-seconds",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="in a scale-down the controller makes (idle triggers, sleep), the time between moving the routes to "
        "the activator and scaling the target to 0, so every Envoy has the new routes before the endpoints go; "
        "its last quarter (at most 0.5 s) after status.readyReplicas was set to 0, so the activators hold "
        "instead of forwarding to the pods about to stop",
    )
    options.add(
        p,
        "--fail-open-wakes-per-second",
        type=float,
        default=2.0,
        metavar="RATE",
        help="with the activator unavailable, sleeping targets are woken at most this fast",
    )
    options.add(
        p,
        "--fail-open-burst",
        type=int,
        default=10,
        metavar="N",
        help="fail-open wakes allowed at once before the rate applies",
    )
    options.add(
        p,
        "--pod-watches",
        type=int,
        default=d.pod_watches,
        metavar="N",
        help="the pods of a target waking from zero are watched (at most N targets at once) so that held "
        "requests are released at its first ready pod, before the workload's status says so; 0: wait for "
        "the workload's status",
    )


def _secret_flags(p: argparse._ArgumentGroup, d: ControllerConfig) -> None:
    options.add(
        p,
        "--create-secrets",
        boolean=True,
        default=False,
        help="at start, create the Secrets of --wake-token-file and --route-key-file (the file's name is the "
        "Secret's key) with a random value when they do not exist; an existing one is never changed. Until the "
        "mounted file appears, the value created or read through the API is used",
    )
    options.add(
        p,
        "--secrets-namespace",
        default="",
        metavar="NS",
        help="where those Secrets are; default: $POD_NAMESPACE, else --leader-election-namespace",
    )
    options.add(p, "--wake-token-secret", default=d.wake_token_secret, help="the wake token's Secret")
    options.add(p, "--route-key-secret", default=d.route_key_secret, help="the route key's Secret")


def from_args(args: argparse.Namespace) -> ControllerConfig:
    import os
    import socket

    try:
        trigger_allow = parse_allow(args.trigger_allow or "")
    except ValueError as exc:
        raise SystemExit(f"--trigger-allow: {exc}") from None
    return ControllerConfig(
        namespaces=tuple(args.namespace or ()),
        activator_host=args.activator_host,
        activator_port=args.activator_port,
        activator_deployment=args.activator_deployment,
        wake_listen=args.wake_listen,
        metrics_listen=args.metrics_listen,
        kubeconfig=args.kubeconfig,
        leader_election=args.leader_election,
        leader_election_namespace=args.leader_election_namespace,
        leader_election_id=args.leader_election_id,
        lease_seconds=args.lease_seconds,
        cluster_domain=args.cluster_domain,
        istio_root_namespace=args.istio_root_namespace,
        trigger_allow=trigger_allow,
        route_key_file=args.route_key_file or None,
        workers=max(1, args.workers),
        wake_token_file=args.wake_token_file or None,
        idle_check_interval=max(0.2, args.idle_check_interval),
        route_settle_seconds=max(0.0, args.route_settle_seconds),
        fail_open_wakes_per_second=max(0.001, args.fail_open_wakes_per_second),
        fail_open_burst=max(1, args.fail_open_burst),
        pod_watches=max(0, args.pod_watches),
        create_secrets=args.create_secrets,
        secrets_namespace=args.secrets_namespace or os.environ.get("POD_NAMESPACE") or args.leader_election_namespace,
        wake_token_secret=args.wake_token_secret,
        route_key_secret=args.route_key_secret,
        identity=f"{os.environ.get('POD_NAME') or socket.gethostname()}_{os.getpid()}",
    )
