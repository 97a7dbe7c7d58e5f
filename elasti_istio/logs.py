"""Readable logs: one line per event, time, level, component, message."""

from __future__ import annotations

import logging
import sys


def setup(level: str = "info", component: str = "elasti") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)-7s {component} %(name)s: %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("aiohttp.access", "kubernetes", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # kopf logs every handler call on every watched object; keep its warnings and errors only.
    for chatty in ("kopf.objects", "kopf._core", "kopf._cogs", "kopf.activities"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.getLogger().level))
