"""The ``elasti-istio`` command."""

from __future__ import annotations

import argparse
import importlib
import sys

from elasti_istio import __version__, options
from elasti_istio.commands import errors

# Subcommand modules, each with register(subparsers) setting ``func``.
COMMANDS = (
    "elasti_istio.commands.status",
    "elasti_istio.commands.actions",
    "elasti_istio.controller.main",
    "elasti_istio.localcluster.main",
    "elasti_istio.kubelet.main",
    "activator.main",
    "elasti_istio.playground.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="elasti-istio",
        description="Scale-to-zero for Istio-routed HTTP services: requests to a workload at zero replicas "
        "are held by the activator while the controller wakes the workload. Every flag can also be set "
        "by an environment variable, ELASTI_ + the flag name in upper snake case.",
    )
    parser.add_argument("--version", action="version", version=f"elasti-istio {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = options.resolve_repeatable(parser.parse_args(argv))
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        message = errors.explain(exc)
        if message is None:
            raise  # a bug: the traceback says where
        print("error: " + " ".join(message.split()), file=sys.stderr)  # one line, whatever the cause's form
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
