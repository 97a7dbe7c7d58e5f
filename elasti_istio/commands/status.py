"""``elasti-istio status``: ElastiServices at a glance, with the requests held right now."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import aiohttp

from elasti_istio import options
from elasti_istio.commands.common import SYSTEM_NS, add_connection_flags, with_api
from elasti_istio.kube import Kube, KubeError
from elasti_istio.resources import DEPLOYMENTS, ELASTISERVICES, PODS

COLUMNS = (
    "NAMESPACE", "NAME", "SERVICE", "PHASE", "MODE", "READY", "REASON", "REPLICAS",
    "VIRTUALSERVICES", "LAST WAKE", "HELD",
)  # fmt: skip


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "status",
        help="show ElastiServices: phase, mode, Ready and why, ready replicas, bound routes, held requests",
        description="Lists ElastiServices with their phase, mode, Ready condition and its reason, ready "
        "replicas, bound VirtualServices, last wake and the requests held right now, summed over the activator "
        "replicas (read from each replica's admin port through the API server's pod proxy, or "
        "from --activator-admin).",
    )
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", help="one namespace (default: the current context's, else default)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")
    add_connection_flags(p)
    options.add(
        p,
        "--activator-admin",
        repeatable=True,
        default=[],
        metavar="URL",
        help="admin address of an activator replica (e.g. http://127.0.0.1:9091); default: every pod of "
        "the activator Deployment through the API server's pod proxy",
    )
    options.add(
        p,
        "--activator-deployment",
        default=f"{SYSTEM_NS}/elasti-activator",
        metavar="NS/NAME",
        help="the activator Deployment whose pods are asked",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rows, warning = asyncio.run(collect(args))
    if warning:
        print(f"note: {warning}", file=sys.stderr)
    if args.output == "json":
        print(json.dumps(rows, indent=2))
        return 0
    table = [COLUMNS] + [tuple(_cell(r, c) for c in COLUMNS) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    for row in table:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    if not rows:
        print("no ElastiServices found", file=sys.stderr)
    return 0


def _cell(row: dict[str, Any], column: str) -> str:
    key = {
        "NAMESPACE": "namespace",
        "NAME": "name",
        "SERVICE": "service",
        "PHASE": "phase",
        "MODE": "mode",
        "READY": "ready",
        "REASON": "reason",
        "REPLICAS": "readyReplicas",
        "VIRTUALSERVICES": "boundVirtualServices",
        "LAST WAKE": "lastWakeTime",
        "HELD": "held",
    }[column]
    value = row.get(key)
    if value is None:
        return "?" if key == "held" else "-"
    if isinstance(value, list):
        return ",".join(value) or "-"
    return str(value)


async def collect(args: argparse.Namespace) -> tuple[list[dict[str, Any]], str | None]:
    return await with_api(args, lambda k: _collect(k, args))  # type: ignore[no-any-return]


async def _collect(k: Kube, args: argparse.Namespace) -> tuple[list[dict[str, Any]], str | None]:
    ns = None if args.all_namespaces else (args.namespace or k.conn.namespace or "default")
    items = (await k.list(ELASTISERVICES, ns)).get("items") or []
    rows = []
    for es in sorted(items, key=lambda o: (o["metadata"]["namespace"], o["metadata"]["name"])):
        st = es.get("status") or {}
        ready = next((c for c in st.get("conditions") or [] if c.get("type") == "Ready"), {})
        rows.append(
            {
                "namespace": es["metadata"]["namespace"],
                "name": es["metadata"]["name"],
                "service": (es.get("spec") or {}).get("service"),
                "phase": st.get("phase"),
                "mode": st.get("mode"),
                "ready": ready.get("status"),
                "reason": ready.get("reason"),
                "readyReplicas": st.get("readyReplicas"),
                "boundVirtualServices": st.get("boundVirtualServices", []),
                "lastWakeTime": st.get("lastWakeTime"),
                "held": None,
            }
        )
    warning = await fill_held(k, args, rows)
    return rows, warning


async def fill_held(k: Kube, args: argparse.Namespace, rows: list[dict[str, Any]]) -> str | None:
    """Sums ``/v1/pending/<ns>/<name>`` over the activator replicas; leaves ``held`` None when unknown."""
    if not rows:
        return None

    async def direct(session: aiohttp.ClientSession, base: str, row: dict[str, Any]) -> int:
        url = f"{base.rstrip('/')}/v1/pending/{row['namespace']}/{row['name']}"
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
            if resp.status == 404:
                return 0
            resp.raise_for_status()
            return int((await resp.json())["pending"])

    async def proxied(pod: str, pod_ns: str, row: dict[str, Any]) -> int:
        path = f"/api/v1/namespaces/{pod_ns}/pods/{pod}:9091/proxy/v1/pending/{row['namespace']}/{row['name']}"
        try:
            return int((await k.request("GET", path, timeout=5))["pending"])
        except KubeError as exc:
            if exc.status == 404 and "pending" not in exc.message:
                return 0
            raise

    try:
        if args.activator_admin:
            async with aiohttp.ClientSession() as session:
                for row in rows:
                    counts = await asyncio.gather(*(direct(session, b, row) for b in args.activator_admin))
                    row["held"] = sum(counts)
            return None
        ans, _, aname = args.activator_deployment.partition("/")
        dep = await k.get_or_none(DEPLOYMENTS, aname, ans)
        if dep is None:
            return f"activator Deployment {args.activator_deployment} not found: HELD unknown"
        labels = ((dep.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        sel = ",".join(f"{a}={b}" for a, b in sorted(labels.items()))
        pods = [
            p["metadata"]["name"]
            for p in (await k.list(PODS, ans, labelSelector=sel)).get("items") or []
            if (p.get("status") or {}).get("phase") == "Running"
        ]
        for row in rows:
            row["held"] = sum(await asyncio.gather(*(proxied(p, ans, row) for p in pods)))
        return None
    except (KubeError, aiohttp.ClientError, OSError, ValueError, KeyError) as exc:
        for row in rows:
            row["held"] = None
        return f"held requests unknown ({exc}); pass --activator-admin URL to ask the activators directly"
