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
    request = {"namespace": ns, "name": name, **({"by": "cli"} if args.verb == "wake" else {})}
    status, body = asyncio.run(post_controller(args, f"/v1/{args.verb}", request, token))
    ok = status == 202
    if args.output == "json":
        print(json.dumps({"status": status, **(body if isinstance(body, dict) else {"body": body})}))
    elif ok:
        print(f"{ns}/{name}: {args.verb} accepted, phase {body.get('phase')}")
    else:
        print(f"{ns}/{name}: {args.verb} failed ({status}): {failure(body)}", file=sys.stderr)
    return 0 if ok else 1


def failure(body: object) -> str:
    """The server's own words: the controller's ``error`` (and ``reason``), or the API server's Status
    ``message`` when the service proxy answered (no controller Service, no permission to proxy)."""
    if not isinstance(body, dict):
        return str(body)
    if body.get("error"):
        return f"{body['error']}" + (f" ({body['reason']})" if body.get("reason") else "")
    if body.get("kind") == "Status" and body.get("message"):
        via = "through the API server's service proxy; --controller-url reaches the controller directly"
        return f"{body['message']} ({via})"
    return json.dumps(body)
