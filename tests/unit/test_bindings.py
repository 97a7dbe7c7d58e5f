"""A VirtualService annotated for an ElastiService that does not exist: one Warning Event on the
VirtualService per change of the annotation, never one per resync."""

from __future__ import annotations

import asyncio
from typing import Any

from elasti_istio.controller import bindings
from elasti_istio.controller.bindings import BindingCheck
from elasti_istio.controller.indexes import Indexes
from elasti_istio.kube import KubeError
from elasti_istio.resources import ANN_BIND


def vs(value: str | None, uid: str = "u1", rv: str = "1") -> dict[str, Any]:
    meta: dict[str, Any] = {"namespace": "shop", "name": "details", "uid": uid, "resourceVersion": rv}
    if value is not None:
        meta["annotations"] = {ANN_BIND: value}
    return {"metadata": meta, "spec": {}}


class Kube:
    def __init__(self, existing: set[str], forbidden: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.existing, self.forbidden = existing, forbidden
        self.gets: list[str] = []

    async def get_or_none(self, res: Any, name: str, ns: str) -> Any:
        self.gets.append(f"{ns}/{name}")
        if f"{ns}/{name}" in self.forbidden:
            raise KubeError(403, "Forbidden", "no")
        return {"metadata": {"name": name}} if f"{ns}/{name}" in self.existing else None


class Recorder:
    def __init__(self) -> None:
        self.posted: list[tuple[str, str, str, str, bool]] = []

    def emit(self, obj: dict[str, Any], etype: str, reason: str, message: str, *, once: bool = False) -> None:
        self.posted.append((obj["kind"], etype, reason, message, once))


def setup(existing: set[str] | None = None, **kw: Any) -> tuple[BindingCheck, Indexes, Kube, Recorder]:
    idx, kube, rec = Indexes(), Kube(existing or set(), **kw), Recorder()
    active = asyncio.Event()
    active.set()
    return BindingCheck(kube, rec, idx, active), idx, kube, rec  # type: ignore[arg-type]


def seen(check: BindingCheck, idx: Indexes, obj: dict[str, Any]) -> None:
    """What the controller does with a VirtualService event."""
    idx.update_vs(obj)
    check.saw(obj)


async def settle(check: BindingCheck) -> None:
    while check._pending:
        await asyncio.gather(*check._pending.values())


async def test_a_missing_elastiservice_is_warned_once_per_change(monkeypatch: Any) -> None:
    monkeypatch.setattr(bindings, "GRACE", 0.0)
    check, idx, kube, rec = setup()
    seen(check, idx, vs("details, other/x"))
    await settle(check)
    message = (
        f"VirtualService shop/details is annotated {ANN_BIND}=details, other/x, but ElastiService other/x, "
        "shop/details does not exist: its routes are not managed (create it, or fix the annotation)"
    )
    assert rec.posted == [("VirtualService", "Warning", "ElastiServiceNotFound", message, True)]
    # Resyncs and our own rewrites (a new resourceVersion, the same annotation): nothing read, nothing posted.
    gets = len(kube.gets)
    for rv in ("2", "3"):
        seen(check, idx, vs("details, other/x", rv=rv))
    await settle(check)
    assert len(rec.posted) == 1 and len(kube.gets) == gets
    # The annotation changed: checked again, and warned of in its new words.
    seen(check, idx, vs("web", rv="4"))
    await settle(check)
    assert len(rec.posted) == 2 and "=web, but ElastiService shop/web does not exist" in rec.posted[1][3]
    # Deleted: forgotten with its uid.
    idx.update_vs(vs("web"), deleted=True)
    check.saw(vs("web"), deleted=True)
    assert check._seen == {}


async def test_an_existing_or_unreadable_elastiservice_is_no_warning(monkeypatch: Any) -> None:
    monkeypatch.setattr(bindings, "GRACE", 0.0)
    check, idx, kube, rec = setup({"shop/details"}, forbidden={"other/x"})
    seen(check, idx, vs("details,other/x"))
    await settle(check)
    assert rec.posted == [] and kube.gets == ["other/x", "shop/details"]
    idx.update_es({"metadata": {"namespace": "shop", "name": "known"}, "spec": {}})
    seen(check, idx, vs("known", rv="2"))
    await settle(check)
    assert rec.posted == [] and "shop/known" not in kube.gets, "one the controller knows is not read"


async def test_the_elastiservice_deleted_is_checked_again(monkeypatch: Any) -> None:
    monkeypatch.setattr(bindings, "GRACE", 0.0)
    check, idx, kube, rec = setup({"shop/details"})
    seen(check, idx, vs("details"))
    await settle(check)
    assert rec.posted == []
    kube.existing.clear()
    check.es_gone("shop/details")
    await settle(check)
    assert [p[2] for p in rec.posted] == ["ElastiServiceNotFound"]


async def test_nothing_while_this_replica_does_not_act(monkeypatch: Any) -> None:
    monkeypatch.setattr(bindings, "GRACE", 0.0)
    check, idx, kube, rec = setup()
    check.active.clear()
    seen(check, idx, vs("details"))
    await asyncio.sleep(0.05)
    assert rec.posted == [] and kube.gets == []
    check.active.set()  # it leads now
    await settle(check)
    assert len(rec.posted) == 1


async def test_a_deleted_virtualservice_is_not_checked(monkeypatch: Any) -> None:
    monkeypatch.setattr(bindings, "GRACE", 0.0)
    check, idx, _, rec = setup()
    check.active.clear()
    seen(check, idx, vs("details"))
    idx.update_vs(vs("details"), deleted=True)
    check.saw(vs("details"), deleted=True)
    check.active.set()
    await asyncio.sleep(0.05)
    assert rec.posted == [] and not check._pending
