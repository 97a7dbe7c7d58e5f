"""Readable logs: one line per event, time, level, component, message; or one JSON object per line
(``--log-format json``) for log pipelines."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys

from elasti_istio import options

FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "component", "logger", "message"}`` (and ``"exception"``), one per line."""

    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "level": record.levelname.lower(),
            "component": self.component,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def _log_format(value: str) -> str:
    if value not in FORMATS:
        raise argparse.ArgumentTypeError(f"use one of {', '.join(FORMATS)}")
    return value


def add_flags(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    options.add(p, "--log-level", default="info", help="debug, info, warning or error")
    options.add(
        p,
        "--log-format",
        default="text",
        type=_log_format,
        metavar="text|json",
        help="text: one readable line per event; json: one JSON object per line (time, level, component, "
        "logger, message, exception)",
    )


def setup(level: str = "info", component: str = "elasti", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(component))
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)-7s {component} %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
        )
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True)
    # hpack logs every header it encodes at debug level; h2 every frame.
    for noisy in ("aiohttp.access", "kubernetes", "urllib3", "hpack", "h2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # kopf logs every handler call on every watched object; keep its warnings and errors only.
    for chatty in ("kopf.objects", "kopf._core", "kopf._cogs", "kopf.activities"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.getLogger().level))
