"""What ``status``, ``wake`` and ``sleep`` share: flags, the API connection, reaching the controller."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable
from typing import Any, TypeVar

import aiohttp

from elasti_istio import options
from elasti_istio.commands.errors import UnreachableError
from elasti_istio.kube import Kube, KubeError, load_connection

T = TypeVar("T")
NETWORK_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError)

SYSTEM_NS = "elasti-system"


def add_connection_flags(p: argparse.ArgumentParser) -> None:
    options.add(p, "--kubeconfig", metavar="PATH", help="kubeconfig; default: in-cluster, then $KUBECONFIG")
    options.add(p, "--output", default="table", type=_output, metavar="table|json", help="output format")


def _output(value: str) -> str:
    if value not in ("table", "json"):
        raise argparse.ArgumentTypeError("use table or json")
    return value


def kube(args: argparse.Namespace) -> Kube:
    return Kube(load_connection(args.kubeconfig), user_agent="elasti-istio-cli")


async def reaching(what: str, fix: str, call: Awaitable[T]) -> T:
    """``call``, with a network failure turned into one line naming ``what`` could not be reached."""
    try:
        return await call
    except aiohttp.InvalidURL as exc:
        raise UnreachableError(f"{what}: not a valid URL ({exc}); {fix}") from exc
    except NETWORK_ERRORS as exc:
        reason = getattr(getattr(exc, "os_error", None), "strerror", None) or str(exc) or type(exc).__name__
        raise UnreachableError(f"cannot reach {what} ({reason}); {fix}") from exc


async def with_api(args: argparse.Namespace, work: Any) -> Any:
    """Runs ``work(kube)`` against the API server of ``--kubeconfig``; unreachable: one clear line."""
    async with kube(args) as k:
        fix = "is the cluster up, and is --kubeconfig (or KUBECONFIG) the right one?"
        return await reaching(f"the API server at {k.conn.server}", fix, work(k))


def split_ref(ref: str) -> tuple[str, str]:
    ns, sep, name = ref.partition("/")
    if not sep or not ns or not name:
        raise argparse.ArgumentTypeError(f"expected NAMESPACE/NAME, got {ref!r}")
    return ns, name


async def post_controller(
    args: argparse.Namespace, path: str, body: dict[str, Any], token: str | None
) -> tuple[int, Any]:
    """POSTs to the controller: at ``--controller-url`` when given, otherwise through the API server's
    service proxy to ``elasti-system/elasti-controller:8013`` (needs services/proxy permission)."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if args.controller_url:
        url = args.controller_url.rstrip("/") + path

        async def post() -> tuple[int, Any]:
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    url, data=json.dumps(body), headers=headers, timeout=aiohttp.ClientTimeout(total=60)
                ) as resp,
            ):
                return resp.status, _json(await resp.text())

        return await reaching(f"the controller at {args.controller_url}", "check --controller-url", post())

    async def through_proxy(k: Kube) -> tuple[int, Any]:
        proxy = f"/api/v1/namespaces/{args.controller_namespace}/services/{args.controller_service}:8013/proxy{path}"
        try:
            return 202, await k.request("POST", proxy, body=body, timeout=60)
        except KubeError as exc:
            return exc.status, exc.body if isinstance(exc.body, dict) else {"error": exc.message}

    return await with_api(args, through_proxy)  # type: ignore[no-any-return]


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return {"error": text.strip()}
