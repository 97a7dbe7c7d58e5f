"""``elasti-istio controller``."""

from __future__ import annotations

import argparse
import asyncio
import signal

from elasti_istio import logs
from elasti_istio.controller import config
from elasti_istio.controller.operator import Controller


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "controller",
        help="run the controller (kopf operator) that switches VirtualServices and wakes targets",
        description="Watches ElastiServices. When a target is scaled to zero its VirtualService routes move to "
        "the activator; POST /v1/wake scales it back to minTargetReplicas; once a replica is ready the "
        "original routes come back exactly.",
    )
    config.add_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logs.setup(args.log_level, "controller", args.log_format)
    cfg = config.from_args(args)
    return asyncio.run(_main(cfg))


async def _main(cfg: config.ControllerConfig) -> int:
    ctrl = Controller(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, ctrl.stop_flag.set)
    await ctrl.run()
    return 0
