"""``elasti-istio activator``: holds requests for workloads at zero replicas and forwards them once awake."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from activator.app import Activator
from activator.config import Config, add_flags
from elasti_istio import logs

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "activator",
        help="run the activator (the proxy that holds requests while a workload wakes up)",
        description="Receives requests the mesh routes to it in proxy mode, holds them per ElastiService "
        "(named by the elasti-service header), asks the controller to wake the workload and forwards the "
        "requests to its origin Service as soon as the ElastiService status says it is ready. Runs on uvloop "
        "when it is installed (pip install 'elasti-istio[fast]'), on asyncio's own event loop otherwise.",
    )
    add_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logs.setup(args.log_level, "activator", args.log_format)
    cfg = Config.from_args(args)
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        log.info("event loop: asyncio (install uvloop for a faster one)")
        return asyncio.run(serve(cfg))
    log.info("event loop: uvloop %s", getattr(uvloop, "__version__", ""))
    return int(uvloop.run(serve(cfg)))


async def serve(cfg: Config) -> int:
    activator = Activator(cfg)
    await activator.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await activator.drain()
    log.info("stopped")
    return 0
