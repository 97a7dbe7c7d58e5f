"""Command-line flags that also read ``ELASTI_*`` environment variables.

Every flag ``--some-flag`` can be set by ``ELASTI_SOME_FLAG``; the flag wins over the variable and
the variable over the default. Repeatable flags take a comma-separated list in the variable.
``--help`` shows the variable and the default next to each flag.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

ENV_PREFIX = "ELASTI_"


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def parse_bool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {value!r} (use true/false)")


def host_port(value: str) -> tuple[str, int]:
    """Parses ``HOST:PORT`` (``[v6]:PORT`` too) for the listen flags."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    host = host.strip("[]") or "0.0.0.0"
    p = int(port)
    if not 0 <= p <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range in {value!r}")
    return host, p


def add(
    parser: argparse.ArgumentParser | Any,
    flag: str,
    *,
    default: Any = None,
    type: Callable[[str], Any] = str,
    help: str = "",
    repeatable: bool = False,
    boolean: bool = False,
    metavar: str | None = None,
) -> None:
    """Adds ``flag`` to ``parser`` with its environment-variable equivalent."""
    env = env_name(flag)
    raw = os.environ.get(env)
    shown_default = default
    if boolean:
        value = default if raw is None else parse_bool(raw)
        parser.add_argument(
            flag,
            action=argparse.BooleanOptionalAction,
            default=value,
            help=f"{help} [env {env}; default {'on' if shown_default else 'off'}]",
        )
        return
    if repeatable:
        value = default if raw is None else [type(v.strip()) for v in raw.split(",") if v.strip()]
        parser.add_argument(
            flag,
            action="append",
            type=type,
            default=None,
            metavar=metavar,
            help=f"{help} (repeatable) [env {env}, comma-separated; default {_show(shown_default)}]",
        )
        parser.set_defaults(**{_dest(flag) + "__env": value})
        return
    value = default if raw is None else type(raw)
    parser.add_argument(
        flag, type=type, default=value, metavar=metavar, help=f"{help} [env {env}; default {_show(shown_default)}]"
    )


def resolve_repeatable(args: argparse.Namespace) -> argparse.Namespace:
    """Fills repeatable flags that were not given on the command line from their env/default value."""
    for key in list(vars(args)):
        if key.endswith("__env"):
            dest = key[: -len("__env")]
            if getattr(args, dest, None) is None:
                setattr(args, dest, getattr(args, key))
            delattr(args, key)
    return args


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _show(value: Any) -> str:
    if value is None or value == []:
        return "unset"
    if isinstance(value, tuple) and len(value) == 2:
        return f"{value[0]}:{value[1]}"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)
