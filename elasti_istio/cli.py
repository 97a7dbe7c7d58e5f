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
# The local cluster's subcommands, by module: the image leaves their packages out and a source checkout
# without the ``local`` extra lacks their gRPC dependencies, so they may be missing; the rest never is.
LOCAL_COMMANDS = {
    "elasti_istio.localcluster.main": "cluster",
    "elasti_istio.kubelet.main": "kubelet",
    "elasti_istio.playground.demo": "demo",
}
LOCAL_PACKAGES = ("elasti_istio.localcluster", "elasti_istio.kubelet", "elasti_istio.playground")
LOCAL_DEPENDENCIES = ("grpc", "grpc_health", "grpc_reflection")  # the ``local`` extra's modules


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
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if name not in LOCAL_COMMANDS:
                raise
            _register_missing(sub, LOCAL_COMMANDS[name], exc)
        else:
            module.register(sub)
    return parser


def _register_missing(sub: argparse._SubParsersAction, command: str, exc: ModuleNotFoundError) -> None:  # type: ignore[type-arg]
    """Keep a local subcommand that cannot be imported, so that it fails in one line saying why (whatever
    its arguments, ``--help`` included) instead of as an unknown command or a traceback."""
    missing = exc.name or ""
    if missing.startswith(LOCAL_PACKAGES):
        short = "not in this image"
        why = (
            f"`elasti-istio {command}` is not in this image, which holds the controller and the activator only; "
            "the local cluster, its kubelet stand-in and the demo run from a source checkout "
            "(pip install -e '.[local]')"
        )
    elif missing.split(".")[0] in LOCAL_DEPENDENCIES:
        short = "needs the local extra"
        why = f"`elasti-istio {command}` needs the local extra (no module {missing}): pip install -e '.[local]'"
    else:
        raise exc
    # No option prefix: every argument, --help included, is taken as a plain word and ignored.
    p = sub.add_parser(command, help=short, add_help=False, prefix_chars="\0")
    p.add_argument("ignored", nargs="*", help=argparse.SUPPRESS)
    p.set_defaults(func=lambda _args: _fail(why))


def _fail(message: str) -> int:
    print("error: " + message, file=sys.stderr)
    return 1


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
