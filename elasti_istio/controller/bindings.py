"""VirtualServices annotated ``elasti.truefoundry.com/elastiservice`` for an ElastiService that does not
exist: their routes are managed by nobody, so the VirtualService gets a Warning Event
(``ElastiServiceNotFound``) and the log a line.

Once per change: what was checked is remembered by (VirtualService uid, annotation value), so resyncs and
the controller's own rewrites of the VirtualService post nothing; the annotation changed, or an
ElastiService it names deleted, is checked again. The Event's name is derived from what it says, so a
restarted controller finds it and does not post it again. A check waits ``GRACE`` seconds (an
ElastiService applied together with its VirtualService has arrived by then) and for the controller to
lead.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from elasti_istio.controller import spec as es_spec
from elasti_istio.controller.events import Recorder
from elasti_istio.controller.indexes import Indexes, Key, ObjKey, es_key
from elasti_istio.kube import Kube, KubeError
from elasti_istio.resources import ANN_BIND, ELASTISERVICES, VIRTUALSERVICES

log = logging.getLogger("elasti.controller")
GRACE = 5.0
MAX_REMEMBERED = 10000


def missing_message(vk: ObjKey, value: str, missing: list[Key]) -> str:
    names = ", ".join(missing)
    return (
        f"VirtualService {vk[0]}/{vk[1]} is annotated {ANN_BIND}={value}, but ElastiService {names} does not "
        "exist: its routes are not managed (create it, or fix the annotation)"
    )


class BindingCheck:
    def __init__(self, kube: Kube, recorder: Recorder, idx: Indexes, active: asyncio.Event) -> None:
        self.kube, self.recorder, self.idx = kube, recorder, idx
        self.active = active  # set while this replica acts (seeded and leading)
        self._seen: dict[tuple[str, str], set[Key]] = {}  # (uid, value) -> ElastiServices already warned of
        self._pending: dict[ObjKey, asyncio.Task[None]] = {}

    def saw(self, obj: dict[str, Any], deleted: bool = False) -> None:
        """A VirtualService event: checked when its annotation is new or changed."""
        meta = obj.get("metadata") or {}
        vk = (meta.get("namespace", ""), meta.get("name", ""))
        if deleted:
            self._cancel(vk)
            self._seen = {k: v for k, v in self._seen.items() if k[0] != meta.get("uid")}
            return
        value = (meta.get("annotations") or {}).get(ANN_BIND)
        if not value or (meta.get("uid", ""), value) in self._seen:
            return
        self._schedule(vk)

    def es_gone(self, key: Key) -> None:
        """An ElastiService was deleted: the VirtualServices still annotated for it are checked again."""
        for vk, keys in self.idx.vs_annotated.items():
            if key in keys:
                self._schedule(vk)

    def _schedule(self, vk: ObjKey) -> None:
        if vk in self._pending:
            return
        task = asyncio.create_task(self._check_later(vk), name=f"binding-{vk[0]}/{vk[1]}")
        self._pending[vk] = task
        task.add_done_callback(lambda _t: self._pending.pop(vk, None))

    def _cancel(self, vk: ObjKey) -> None:
        task = self._pending.pop(vk, None)
        if task is not None:
            task.cancel()

    async def stop(self) -> None:
        tasks = list(self._pending.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _check_later(self, vk: ObjKey) -> None:
        await asyncio.sleep(GRACE)
        await self.active.wait()
        try:
            await self.check(vk)
        except (KubeError, OSError, TimeoutError) as exc:  # looked at again on its next change
            log.debug("VirtualService %s/%s: binding check failed: %s", vk[0], vk[1], exc)

    async def check(self, vk: ObjKey) -> None:
        """Warns of the ElastiServices the VirtualService's annotation names that do not exist (as the
        VirtualService is now, from the watch)."""
        vs = self.idx.vs_objects.get(vk)
        if vs is None:
            return  # deleted meanwhile
        meta = vs.get("metadata") or {}
        value = (meta.get("annotations") or {}).get(ANN_BIND)
        if not value:
            return
        missing = []
        for ns, name in sorted(es_spec.parse_binding_annotation(value, vk[0])):
            key = es_key(ns, name)
            if key in self.idx.all_es():
                continue
            try:
                found = await self.kube.get_or_none(ELASTISERVICES, name, ns)
            except KubeError as exc:
                if exc.status != 403:
                    raise
                continue  # a namespace this controller may not read: not its to judge
            if found is None:
                missing.append(key)
        seen = (meta.get("uid", ""), value)
        warned = self._seen.setdefault(seen, set())
        new = [k for k in missing if k not in warned]
        if len(self._seen) > MAX_REMEMBERED:
            self._seen = {seen: warned}
        if not new:
            return
        warned.update(new)
        message = missing_message(vk, value, missing)
        log.warning("%s", message)
        involved = dict(vs, apiVersion=VIRTUALSERVICES.api_version, kind=VIRTUALSERVICES.kind)
        self.recorder.emit(involved, "Warning", "ElastiServiceNotFound", message, once=True)
