"""``elasti-istio wake NS/NAME`` and ``elasti-istio sleep NS/NAME``."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from elasti_istio import options
from elasti_istio.commands.common import SYSTEM_NS, add_connection_flags, post_controller, split_ref


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    for verb, summary in (
        ("wake", "scale an ElastiService's target back to minTargetReplicas (as the activator does)"),
        ("sleep", "scale an ElastiService's target to zero now: routes to the activator first, then zero"),
    ):
        p = sub.add_parser(verb, help=summary, description=summary.capitalize() + ".")
        p.add_argument("ref", type=split_ref, metavar="NAMESPACE/NAME", help="the ElastiService")
        add_connection_flags(p)
        options.add(
            p,
            "--controller-url",
            metavar="URL",
            help="the controller's wake address (e.g. http://127.0.0.1:8013); default: through the API "
            "server's service proxy",
        )
        options.add(p, "--controller-namespace", default=SYSTEM_NS, help="namespace of the controller's Service")
        options.add(p, "--controller-service", default="elasti-controller", help="the controller's wake Service")
        options.add(p, "--wake-token-file", metavar="PATH", help="bearer token the controller requires")
        p.set_defaults(func=run, verb=verb)


def run(args: argparse.Namespace) -> int:
    ns, name = args.ref
    token = None
    if args.wake_token_file:
        try:
            token = Path(args.wake_token_file).read_text().strip()
        except OSError as exc:
            print(f"error: cannot read --wake-token-file: {exc}", file=sys.stderr)
            return 2
    status, body = asyncio.run(post_controller(args, f"/v1/{args.verb}", {"namespace": ns, "name": name}, token))
    ok = status == 202
    if args.output == "json":
        print(json.dumps({"status": status, **(body if isinstance(body, dict) else {"body": body})}))
    elif ok:
        print(f"{ns}/{name}: {args.verb} accepted, phase {body.get('phase')}")
    else:
        err = body.get("error") if isinstance(body, dict) else body
        print(f"{ns}/{name}: {args.verb} failed ({status}): {err}", file=sys.stderr)
    return 0 if ok else 1
