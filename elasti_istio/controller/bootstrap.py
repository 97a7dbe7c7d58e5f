"""The wake token and route key Secrets, created by the controller when they do not exist.

Kustomize cannot make a random value, and a base that needs a generated file cannot be applied from a
fresh clone or as a remote base. So the manifests carry no Secret: with ``--create-secrets`` the
controller creates each one in its own namespace at start, with a random value, when it is missing,
and never changes one that exists (a user's own, a rotated one). Two replicas starting together both
try; the second create fails with 409 and reads what the first made, so they agree.

The pods mount the Secrets as optional volumes, which the kubelet fills a minute or so after the
Secret is created. Until then the controller signs routes and checks wake calls with the values it
created or read through the API; both programs keep looking at the files.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import logging
import secrets
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

import aiohttp

from elasti_istio.kube import Kube, KubeError, Resource

if TYPE_CHECKING:
    from elasti_istio.controller.config import ControllerConfig
    from elasti_istio.controller.operator import Controller

log = logging.getLogger("elasti.controller")

SECRETS = Resource("", "v1", "secrets", kind="Secret")
LABELS = {"app.kubernetes.io/name": "elasti-istio", "app.kubernetes.io/part-of": "elasti-istio"}
RETRY = (0.5, 30.0)  # first and longest pause between attempts while the API server refuses or fails


@dataclasses.dataclass(frozen=True)
class Wanted:
    """A Secret the controller provides: ``key`` is the name of the file its mount gives."""

    namespace: str
    name: str
    key: str


def random_value() -> str:
    return secrets.token_hex(32)


def wanted(cfg: ControllerConfig) -> tuple[Wanted | None, Wanted | None]:
    """The wake token's and the route key's Secret, each only when its file flag is set."""

    def one(path: str | None, name: str) -> Wanted | None:
        return Wanted(cfg.secrets_namespace, name, PurePath(path).name) if path else None

    return one(cfg.wake_token_file, cfg.wake_token_secret), one(cfg.route_key_file, cfg.route_key_secret)


def value_of(secret: dict[str, Any], key: str) -> str | None:
    raw = (secret.get("data") or {}).get(key)
    if not raw:
        return None
    try:
        return base64.b64decode(raw, validate=True).decode().strip() or None
    except (binascii.Error, UnicodeDecodeError):
        return None


async def ensure(kube: Kube, want: Wanted) -> tuple[str | None, bool]:
    """(the Secret's value, whether this call created it). An existing Secret is only read; one
    without ``want.key`` gives None (it is left as it is: its file will be the only source)."""
    for _ in range(5):  # absent, created by someone else, deleted again...: a few rounds at most
        found = await kube.get_or_none(SECRETS, want.name, want.namespace)
        if found is not None:
            return value_of(found, want.key), False
        value = random_value()
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": want.name, "namespace": want.namespace, "labels": LABELS},
            "type": "Opaque",
            "data": {want.key: base64.b64encode(value.encode()).decode()},
        }
        try:
            await kube.create(SECRETS, body, want.namespace)
        except KubeError as exc:
            if not exc.conflict:
                raise
            continue  # another replica (or a user) was first: read theirs
        return value, True
    raise KubeError(409, "Conflict", f"Secret {want.namespace}/{want.name} kept appearing and disappearing")


async def provide(kube: Kube, wants: list[Wanted]) -> dict[Wanted, str | None]:
    """Every wanted Secret ensured, retried with backoff until the API server lets it happen."""
    got: dict[Wanted, str | None] = {}
    pause = RETRY[0]
    while len(got) < len(wants):
        for want in wants:
            if want in got:
                continue
            try:
                value, created = await ensure(kube, want)
            except (KubeError, aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                log.warning("Secret %s/%s: %s; trying again in %.1fs", want.namespace, want.name, exc, pause)
                continue
            got[want] = value
            if created:
                log.info("Secret %s/%s created with a random %s", want.namespace, want.name, want.key)
            elif value is None:
                log.warning(
                    "Secret %s/%s exists without the key %s: left as it is", want.namespace, want.name, want.key
                )
            else:
                log.info("Secret %s/%s exists: kept as it is", want.namespace, want.name)
        if len(got) < len(wants):
            await asyncio.sleep(pause)
            pause = min(pause * 2, RETRY[1])
    return got


async def run(ctrl: Controller) -> None:
    """The controller's side: the Secrets made or read, their values used until the files are there."""
    wake, route = wanted(ctrl.cfg)
    wants = [w for w in (wake, route) if w is not None]
    if not wants:
        log.info("--create-secrets: neither --wake-token-file nor --route-key-file is set; nothing to create")
        return
    try:
        async with Kube(ctrl.conn, user_agent="elasti-controller", limit=2) as kube:
            got = await provide(kube, wants)
    except Exception:  # the controller runs on without them: the files, once mounted, are enough
        log.exception("the wake token and route key Secrets could not be provided")
        return
    token = got.get(wake) if wake is not None else None
    if token:
        ctrl.waker.use_token_until_read(token)
    key = got.get(route) if route is not None else None
    keys = ctrl.reconciler.route_keys
    if key and keys is not None and keys.use_until_read(key) and ctrl.seeded.is_set():
        ctrl.enqueue(ctrl.idx.all_es())  # before seeding, seeding queues every ElastiService itself
