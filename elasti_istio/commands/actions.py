"""``elasti-istio wake NS/NAME`` and ``elasti-istio sleep NS/NAME``.

By default the request is an annotation on the ElastiService (:mod:`elasti_istio.controller.requested`):
it needs ``patch`` on ElastiServices and nothing else, works where NetworkPolicies keep people off the
controller, and is acted on by the controller that leads. ``--via http`` (or ``--controller-url``)
calls the controller's endpoint instead, as the activator does.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import http
import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from elasti_istio import options
from elasti_istio.commands.common import SYSTEM_NS, add_connection_flags, post_controller, split_ref, with_api
from elasti_istio.controller import requested
from elasti_istio.kube import Kube, KubeError
from elasti_istio.resources import ELASTISERVICES

DEFAULT_TIMEOUT = 60.0
POLL = 0.5  # seconds between looks when the ElastiService cannot be watched


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    for verb, summary in (
        ("wake", "scale an ElastiService's target back to minTargetReplicas (as the activator does)"),
        ("sleep", "scale an ElastiService's target to zero now: routes to the activator first, then zero"),
    ):
        p = sub.add_parser(
            verb,
            help=summary,
            description=summary.capitalize() + ". The request is the annotation "
            f"{requested.ANNOTATIONS[verb]} on the ElastiService (needs only patch on elastiservices); the "
            "command waits for the controller to act on it and prints the outcome. --via http calls the "
            "controller's endpoint instead.",
        )
        p.add_argument("ref", type=split_ref, metavar="NAMESPACE/NAME", help="the ElastiService")
        add_connection_flags(p)
        options.add(
            p,
            "--via",
            default="annotation",
            type=_via,
            metavar="annotation|http",
            help="annotation: set the request annotation and wait for the controller to act on it; http: POST to "
            "the controller's endpoint (through the API server's service proxy, or at --controller-url)",
        )
        options.add(
            p,
            "--timeout",
            default=DEFAULT_TIMEOUT,
            type=_seconds,
            metavar="SECONDS",
            help="with --via annotation: how long to wait for the controller to act (0: set it and return)",
        )
        options.add(
            p,
            "--controller-url",
            metavar="URL",
            help="the controller's wake address (e.g. http://127.0.0.1:8013); implies --via http",
        )
        options.add(p, "--controller-namespace", default=SYSTEM_NS, help="namespace of the controller's Service")
        options.add(p, "--controller-service", default="elasti-controller", help="the controller's wake Service")
        options.add(p, "--wake-token-file", metavar="PATH", help="bearer token the controller requires (--via http)")
        p.set_defaults(func=run, verb=verb)


def _via(value: str) -> str:
    if value not in ("annotation", "http"):
        raise argparse.ArgumentTypeError("use annotation or http")
    return value


def _seconds(value: str) -> float:
    try:
        secs = float(value)
    except ValueError:
        secs = -1.0
    if not 0 <= secs <= 3600:
        raise argparse.ArgumentTypeError(f"expected seconds from 0 to 3600, got {value!r}")
    return secs


def run(args: argparse.Namespace) -> int:
    if args.controller_url or args.via == "http":
        return run_http(args)
    return run_annotation(args)


# ---- the annotation ------------------------------------------------------------------------------


def run_annotation(args: argparse.Namespace) -> int:
    ns, name = args.ref
    verb = args.verb
    token = requested.new_token(dt.datetime.now(dt.UTC), secrets.token_hex(4))
    found, ans = asyncio.run(with_api(args, lambda k: ask(k, ns, name, verb, token, args.timeout)))
    if not found:
        return report(args, 1, {"error": f"ElastiService {ns}/{name} not found"}, f"{verb} failed: not found")
    assert ans is not None
    out: dict[str, Any] = {"namespace": ns, "name": name, "action": verb, "id": token, "state": ans.state}
    rec = ans.record or {}
    if ans.record is not None:
        out["outcome"] = ans.record
    if ans.state == "asked":
        return report(args, 0, out, f"{verb} asked ({requested.ANNOTATIONS[verb]}={token}); not waiting")
    if ans.state == "waiting":
        return report(
            args,
            1,
            out,
            f"{verb} not acted on within {args.timeout:g}s: is the controller running? The annotation "
            f"{requested.ANNOTATIONS[verb]} stays and is acted on when it runs (remove it to cancel: kubectl -n "
            f"{ns} annotate es {name} {requested.ANNOTATIONS[verb]}-)",
        )
    if ans.state == "withdrawn":
        return report(
            args,
            1,
            out,
            f"{verb} withdrawn: the annotation (or the ElastiService) was removed before the controller acted",
        )
    line = f"{verb} {'done' if rec.get('result') == 'Done' else 'refused'} ({rec.get('reason')}): {rec.get('message')}"
    if ans.state == "replaced":
        line = f"{line} [request {rec.get('id')} of {rec.get('time')}, which replaced this one]"
    return report(args, 0 if rec.get("result") == "Done" else 1, out, line)


def report(args: argparse.Namespace, code: int, out: dict[str, Any], line: str) -> int:
    ns, name = args.ref
    if args.output == "json":
        print(json.dumps(out))
    elif code == 0:
        print(f"{ns}/{name}: {line}")
    else:
        print(f"{ns}/{name}: {line}", file=sys.stderr)
    return code


async def ask(
    k: Kube, ns: str, name: str, verb: str, token: str, timeout: float
) -> tuple[bool, requested.Answer | None]:
    """Sets the annotation, then waits for the controller to act on it: (the ElastiService exists, what came
    of it; ``asked`` when not waiting, ``waiting`` when ``timeout`` passed first)."""
    body = {"metadata": {"annotations": {requested.ANNOTATIONS[verb]: token}}}
    try:
        es = await k.patch(ELASTISERVICES, name, body, ns)
    except KubeError as exc:
        if exc.not_found:
            return False, None
        raise
    if timeout <= 0:
        return True, requested.Answer("asked")
    ans = requested.answer(es, verb, token)
    deadline = time.monotonic() + timeout
    while ans.state == "waiting":
        left = deadline - time.monotonic()
        if left <= 0:
            break
        es, ans = await _next(k, ns, name, verb, token, es, left)
    return True, ans


async def _next(
    k: Kube, ns: str, name: str, verb: str, token: str, es: dict[str, Any], left: float
) -> tuple[dict[str, Any], requested.Answer]:
    """The ElastiService at its next change (watched; looked at every ``POLL`` when it may not be watched),
    or as it is once ``left`` seconds passed."""
    rv = es["metadata"].get("resourceVersion")
    try:
        async with asyncio.timeout(left):
            async for etype, obj in k.watch(
                ELASTISERVICES, ns, resource_version=rv, timeout_seconds=max(1, int(left)),
                fieldSelector=f"metadata.name={name}",
            ):  # fmt: skip
                if etype == "DELETED":
                    return obj, requested.Answer("withdrawn")
                if etype in ("ADDED", "MODIFIED"):
                    ans = requested.answer(obj, verb, token)
                    if ans.state != "waiting":
                        return obj, ans
                    es = obj
    except TimeoutError:
        return es, requested.answer(es, verb, token)
    except KubeError as exc:
        if exc.status not in (403, 410):
            raise
        await asyncio.sleep(min(POLL, left))
    cur = await k.get(ELASTISERVICES, name, ns)
    return cur, requested.answer(cur, verb, token)


# ---- the endpoint --------------------------------------------------------------------------------


def run_http(args: argparse.Namespace) -> int:
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
        print(f"{ns}/{name}: {args.verb} failed ({status}): {failure(body, status)}", file=sys.stderr)
    return 0 if ok else 1


def failure(body: object, status: int | None = None) -> str:
    """The server's own words: the controller's ``error`` (and ``reason``), a JSON ``detail`` or
    ``message``, or the API server's Status ``message`` when the service proxy answered (no controller
    Service, no permission to proxy); the status's own phrase when the answer had none."""
    if isinstance(body, dict):
        said = next((body[f] for f in ("error", "detail", "message") if body.get(f)), None)
        if said is not None and body.get("kind") == "Status":
            via = "through the API server's service proxy; --controller-url reaches the controller directly"
            return f"{said} ({via})"
        if said is not None:
            text = said if isinstance(said, str) else json.dumps(said)
            return text + (f" ({body['reason']})" if body.get("reason") and body.get("kind") != "Status" else "")
        if body:
            return json.dumps(body)
    elif isinstance(body, str) and body.strip():
        return body.strip()
    return _phrase(status) + ", with no message"


def _phrase(status: int | None) -> str:
    try:
        return http.HTTPStatus(status or 0).phrase
    except ValueError:
        return "no answer" if status is None else f"HTTP {status}"
