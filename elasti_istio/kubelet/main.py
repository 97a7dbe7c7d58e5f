"""``elasti-istio kubelet``: runs the kubelet stand-in (started by ``cluster up``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from elasti_istio import logs, options
from elasti_istio.kube import Kube, load_connection
from elasti_istio.kubelet.node import Kubelet


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "kubelet",
        help="run the kubelet stand-in of the local cluster (started by `cluster up`)",
        description="Plays one node: binds pending Pods, gives each a 127.x.y.z address, serves an app on every "
        "container port (Bookinfo stand-ins for examples-bookinfo-* images, a generic test app otherwise, a TCP "
        "forwarder for pods annotated elasti.truefoundry.com/sim-forward) and reports the Pods Running and Ready "
        "after a startup delay (or, with elasti.truefoundry.com/sim-readiness-url, while that URL answers 200).",
    )
    options.add(p, "--kubeconfig", help="kubeconfig of an identity that may bind and update Pods")
    options.add(p, "--node-name", default="elasti-sim-node", help="name of the Node to register")
    options.add(p, "--pod-cidr", default="127.1.0.0/16", help="loopback range for pod addresses")
    options.add(
        p,
        "--startup-seconds",
        type=float,
        default=1.0,
        help="delay before a Pod turns Ready (per Pod: annotation elasti.truefoundry.com/sim-startup-seconds)",
    )
    options.add(
        p,
        "--mesh-proxy",
        help="URL of the mesh's outbound proxy (elasti-istio mesh --outbound-listen) that apps send every call "
        "to another service through, e.g. http://127.0.0.1:15001; unset: such calls fail",
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


def run(args: argparse.Namespace) -> int:
    logs.setup(args.log_level, "kubelet")
    return asyncio.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    kube = Kube(load_connection(args.kubeconfig), user_agent="elasti-kubelet")
    kubelet = Kubelet(
        kube,
        args.node_name,
        args.pod_cidr,
        args.startup_seconds,
        mesh_proxy=args.mesh_proxy,
        app_timeout=args.app_timeout,
        readiness_interval=args.readiness_interval,
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
