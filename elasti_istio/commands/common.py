"""What ``status``, ``wake`` and ``sleep`` share: flags, the API connection, reaching the controller."""

from __future__ import annotations

import argparse
import json
from typing import Any

import aiohttp

from elasti_istio import options
from elasti_istio.kube import Kube, KubeError, load_connection

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
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                args.controller_url.rstrip("/") + path,
                data=json.dumps(body),
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=60),
            ) as resp,
        ):
            return resp.status, _json(await resp.text())
    async with kube(args) as k:
        proxy = f"/api/v1/namespaces/{args.controller_namespace}/services/{args.controller_service}:8013/proxy{path}"
        try:
            return 202, await k.request("POST", proxy, body=body, timeout=60)
        except KubeError as exc:
            return exc.status, exc.body if isinstance(exc.body, dict) else {"error": exc.message}


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return {"error": text.strip()}
