"""``elasti-istio kubelet``: runs the kubelet stand-in (started by ``cluster up``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import signal
from pathlib import Path

from elasti_istio import logs, options
from elasti_istio.kube import Kube, load_connection
from elasti_istio.kubelet.sidecar import DEFAULT_PORTS, SidecarConfig, parse_ports


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "kubelet",
        help="run the kubelet stand-in of the local cluster (started by `cluster up`)",
        description="Plays one node: binds pending Pods, gives each an address of the pod range, serves an app on "
        "every container port (Bookinfo stand-ins for examples-bookinfo-* images, a generic test app otherwise, a TCP "
        "forwarder for pods annotated elasti.truefoundry.com/sim-forward) and reports the Pods Running and Ready "
        "after a startup delay (or, with elasti.truefoundry.com/sim-readiness-url, while that URL answers: 200 for "
        "http://, SERVING to the gRPC health check for grpc://HOST:PORT/SERVICE, a connection for tcp://HOST:PORT). "
        "Container ports named grpc* serve gRPC (health, reflection, elasti.echo.v1.Echo). A pod "
        "that asks for an Istio sidecar (sidecar.istio.io/inject) gets a real Envoy fed by istiod.",
    )
    options.add(p, "--kubeconfig", help="kubeconfig of an identity that may bind and update Pods")
    options.add(p, "--node-name", default="elasti-sim-node", help="name of the Node to register")
    options.add(p, "--pod-cidr", default="10.244.0.0/17", help="range of pod addresses")
    options.add(
        p,
        "--netns",
        help="network namespace (a path such as /run/netns/elasti-x) in which the pod range is local and apps "
        "listen; unset: this process's own",
    )
    options.add(
        p,
        "--startup-seconds",
        type=float,
        default=1.0,
        help="delay before a Pod turns Ready (per Pod: annotation elasti.truefoundry.com/sim-startup-seconds)",
    )
    options.add(p, "--envoy", help="Envoy binary for the sidecars of pods that ask for one (unset: no sidecars)")
    options.add(
        p, "--xds-address", type=options.host_port, help="istiod's plaintext xDS address (HOST:PORT) the sidecars use"
    )
    options.add(p, "--run-dir", default=".elasti/sidecars", help="folder for the sidecars' bootstraps and logs")
    options.add(
        p,
        "--sidecar-ports",
        default=",".join(str(x) for x in DEFAULT_PORTS),
        help="ports the sidecars listen on, one HTTP egress listener each (per pod: annotation "
        "elasti.truefoundry.com/sim-sidecar-ports)",
    )
    options.add(
        p,
        "--app-timeout",
        type=float,
        default=30.0,
        help="timeout in seconds of an app's call to another service (real Bookinfo uses 3)",
    )
    options.add(
        p,
        "--readiness-interval",
        type=float,
        default=0.15,
        help="seconds between probes of a pod's elasti.truefoundry.com/sim-readiness-url",
    )
    options.add(p, "--log-level", default="info", help="debug, info, warning or error")
    p.set_defaults(func=run)


def sidecar_config(args: argparse.Namespace) -> SidecarConfig | None:
    if not args.envoy:
        return None
    if not args.xds_address:
        raise SystemExit("error: --envoy needs --xds-address (istiod's plaintext xDS HOST:PORT)")
    try:
        ports = parse_ports(args.sidecar_ports)
    except ValueError as exc:
        raise SystemExit(f"error: --sidecar-ports: {exc}") from None
    run_dir = Path(args.run_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    return SidecarConfig(
        envoy=Path(args.envoy),
        xds=args.xds_address,
        run_dir=run_dir,
        netns=args.netns,
        pods_net=ipaddress.ip_network(args.pod_cidr),  # type: ignore[arg-type]
        ports=ports,
    )


def run(args: argparse.Namespace) -> int:
    logs.setup(args.log_level, "kubelet")
    # Sidecars start by fork and exec while the pods' gRPC servers run: the children never use gRPC, so
    # its fork handlers have nothing to do (they would only log that they skip). Read when grpc loads.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    return asyncio.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    from elasti_istio.kubelet.node import Kubelet  # loads grpc: not for the other commands

    kube = Kube(load_connection(args.kubeconfig), user_agent="elasti-kubelet")
    kubelet = Kubelet(
        kube,
        args.node_name,
        args.pod_cidr,
        args.startup_seconds,
        sidecars=sidecar_config(args),
        app_timeout=args.app_timeout,
        readiness_interval=args.readiness_interval,
        netns=args.netns,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(kubelet.run())
    await asyncio.wait([task, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await kubelet.shutdown()
    await kube.close()
    return 0
