"""Wake and sleep asked for by annotation: what the annotations ask for, what the controller records and
posts, when it removes them, and how ``elasti-istio wake``/``sleep`` read the outcome back."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from elasti_istio.commands.actions import failure
from elasti_istio.controller import requested
from elasti_istio.controller.operations import Operations
from elasti_istio.controller.world import Blocked
from elasti_istio.kube import KubeError

WAKE = "elasti.truefoundry.com/wake-requested"
SLEEP = "elasti.truefoundry.com/sleep-requested"


def es(annotations: dict[str, str] | None = None, status: dict[str, Any] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"namespace": "shop", "name": "details", "resourceVersion": "7"}
    if annotations is not None:
        meta["annotations"] = annotations
    return {"metadata": meta, "spec": {}, "status": status or {}}


# ---- what the annotations ask for ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("annotations", "asks"),
    [
        (None, []),
        ({"other": "x"}, []),
        ({WAKE: "2026-12-02T12:00:00Z"}, [("wake", "2026-12-02T12:00:00Z", False)]),
        ({WAKE: ""}, [("wake", "", False)]),  # `kubectl annotate es x ...wake-requested=` asks too
        ({SLEEP: "now"}, [("sleep", "now", False)]),
        ({SLEEP: "b", WAKE: "a"}, [("wake", "a", False), ("sleep", "b", True)]),  # both: the wake wins
    ],
)
def test_pending(annotations: dict[str, str] | None, asks: list[tuple[str, str, bool]]) -> None:
    assert [(a.action, a.token, a.dropped) for a in requested.pending(es(annotations))] == asks


def test_who_asked() -> None:
    cli = requested.Ask("wake", requested.new_token(dt.datetime(2026, 12, 2, tzinfo=dt.UTC), "ab12"))
    assert cli.token == "cli/2026-12-02T00:00:00Z/ab12" and cli.by == "cli"
    assert cli.why == "asked to wake (elasti-istio wake)"
    by_hand = requested.Ask("sleep", "2026-12-02T00:00:00Z")
    assert by_hand.by == "annotation" and by_hand.why == f"asked to sleep (annotation {SLEEP})"


@pytest.mark.parametrize(
    ("action", "acted", "reason", "event"),
    [
        ("wake", True, "Woken", None),  # the scale posted its own Woken Event
        ("wake", False, "AlreadyAwake", ("Normal", "AlreadyAwake")),
        ("sleep", True, "ScaledToZeroOnRequest", None),
        ("sleep", False, "AlreadyAsleep", ("Normal", "AlreadyAsleep")),
    ],
)
def test_done(action: str, acted: bool, reason: str, event: tuple[str, str] | None) -> None:
    ask = requested.Ask(action, "t")
    result = requested.done(ask, "Serving", acted)
    assert (result.done, result.reason, result.phase) == (True, reason, "Serving")
    note = requested.notice(ask, result, posted=acted)
    assert ((note.type, note.reason) if note else None) == event
    rec = requested.record(ask, result, "2026-12-02T12:00:00Z")
    assert rec == {
        "id": "t",
        "result": "Done",
        "reason": reason,
        "message": result.message,
        "phase": "Serving",
        "time": "2026-12-02T12:00:00Z",
    }


def test_a_refusal_is_a_warning_with_its_reason() -> None:
    ask = requested.Ask("sleep", "cli/x/y")
    result = requested.refused("UnsupportedProtocol", "not scaling to zero: port 5432 is TCP")
    note = requested.notice(ask, result, posted=False)
    assert note == requested.Notice(
        "Warning",
        "UnsupportedProtocol",
        "asked to sleep (elasti-istio sleep): refused: not scaling to zero: port 5432 is TCP",
    )
    assert requested.record(ask, result, "t")["result"] == "Refused"
    assert "phase" not in requested.record(ask, result, "t")


# ---- reading the outcome back --------------------------------------------------------------------


def rec(token: str, result: str = "Done") -> dict[str, Any]:
    return {"id": token, "result": result, "reason": "Woken", "message": "m", "time": "2026-12-02T12:00:00Z"}


@pytest.mark.parametrize(
    ("obj", "state"),
    [
        (es({WAKE: "mine"}), "waiting"),
        (es({WAKE: "mine"}, {"lastWakeRequest": rec("older")}), "waiting"),
        (es({WAKE: "theirs"}), "waiting"),  # overwritten before it was acted on: the other one is waited for
        (es({}, {"lastWakeRequest": rec("mine")}), "done"),
        (es({}, {"lastWakeRequest": rec("mine", "Refused")}), "refused"),
        (es({WAKE: "next"}, {"lastWakeRequest": rec("mine")}), "done"),  # a newer request does not hide it
        (es({}, {"lastWakeRequest": rec("theirs")}), "replaced"),
        (es({}, {"lastSleepRequest": rec("mine")}), "withdrawn"),  # the sleep's record is not the wake's
        (es({}), "withdrawn"),
    ],
)
def test_answer(obj: dict[str, Any], state: str) -> None:
    assert requested.answer(obj, "wake", "mine").state == state


def test_a_long_value_is_found_by_its_kept_prefix() -> None:
    token = "x" * 400
    ask = requested.Ask("wake", token)
    record = requested.record(ask, requested.done(ask, "Serving", False), "t")
    assert len(record["id"]) == requested.MAX_ID
    assert requested.answer(es({}, {"lastWakeRequest": record}), "wake", token).state == "done"


# ---- the controller's side, its calls stood in for ---------------------------------------------


class FakeKube:
    def __init__(self, obj: dict[str, Any]) -> None:
        self.obj = obj
        self.patches: list[dict[str, Any]] = []
        self.conflict_once = False

    async def get_or_none(self, res: Any, name: str, ns: str) -> dict[str, Any]:
        return self.obj

    async def patch(self, res: Any, name: str, body: dict[str, Any], ns: str, sub: str | None = None) -> Any:
        if self.conflict_once:
            self.conflict_once = False
            raise KubeError(409, "Conflict", "the object has been modified")
        self.patches.append(body)
        ann = self.obj["metadata"].setdefault("annotations", {})
        for k, v in body["metadata"]["annotations"].items():
            if v is None:
                ann.pop(k, None)
        return self.obj


class Events:
    def __init__(self) -> None:
        self.posted: list[tuple[str, str, str]] = []

    def emit(self, obj: dict[str, Any], etype: str, reason: str, message: str) -> None:
        self.posted.append((etype, reason, message))


class Ops(Operations):
    def __init__(self, obj: dict[str, Any], outcome: Any) -> None:  # no Base.__init__: no clients
        self.kube = FakeKube(obj)  # type: ignore[assignment]
        self.recorder = Events()  # type: ignore[assignment]
        self.outcome = outcome
        self.status: list[dict[str, Any]] = []
        self.calls: list[tuple[str, str]] = []

    async def _wake(self, namespace: str, name: str, by: str) -> tuple[str, bool]:
        self.calls.append(("wake", by))
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome  # type: ignore[no-any-return]

    async def _sleep(self, namespace: str, name: str, reason: str, why: str) -> str:
        self.calls.append(("sleep", why))
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome[0]  # type: ignore[no-any-return]

    async def patch_status(self, es: dict[str, Any], patch: dict[str, Any]) -> None:
        self.status.append(patch)


async def test_nothing_asked_nothing_done() -> None:
    ops = Ops(es({"other": "x"}), ("Serving", False))
    assert await ops.act_on_requests(ops.kube.obj) is False  # type: ignore[attr-defined]
    assert ops.calls == [] and ops.status == []


async def test_a_wake_is_done_recorded_then_the_annotation_goes() -> None:
    obj = es({WAKE: "cli/2026-12-02T12:00:00Z/ab12"})
    ops = Ops(obj, ("ScalingUp", True))
    assert await ops.act_on_requests(obj) is True
    assert ops.calls == [("wake", "cli")]
    [status] = ops.status
    assert status["lastWakeRequest"]["id"] == "cli/2026-12-02T12:00:00Z/ab12"
    assert status["lastWakeRequest"]["reason"] == "Woken"
    assert ops.recorder.posted == []  # type: ignore[attr-defined]  # the scale posted Woken itself
    assert ops.kube.patches == [{"metadata": {"annotations": {WAKE: None}, "resourceVersion": "7"}}]  # type: ignore[attr-defined]
    assert WAKE not in obj["metadata"]["annotations"]


async def test_a_refused_sleep_is_recorded_and_warned_and_the_annotation_goes() -> None:
    obj = es({SLEEP: "now"})
    ops = Ops(obj, Blocked("ScaleToZeroAllowed", "OutsideEnabledPeriod", "scale to zero is not allowed now"))
    await ops.act_on_requests(obj)
    assert ops.status[0]["lastSleepRequest"]["result"] == "Refused"
    assert ops.recorder.posted == [  # type: ignore[attr-defined]
        (
            "Warning",
            "OutsideEnabledPeriod",
            f"asked to sleep (annotation {SLEEP}): refused: scale to zero is not allowed now",
        )
    ]
    assert SLEEP not in obj["metadata"]["annotations"]


async def test_a_scale_the_api_server_refuses_is_an_outcome() -> None:
    obj = es({WAKE: "x"})
    ops = Ops(obj, KubeError(403, "Forbidden", "cannot patch deployments/scale"))
    await ops.act_on_requests(obj)
    assert ops.status[0]["lastWakeRequest"]["reason"] == "ScaleRefused"
    assert WAKE not in obj["metadata"]["annotations"]


async def test_a_passing_failure_keeps_the_annotation_for_the_retry() -> None:
    obj = es({WAKE: "x"})
    ops = Ops(obj, KubeError(503, "ServiceUnavailable", "etcd is slow"))
    with pytest.raises(KubeError):
        await ops.act_on_requests(obj)
    assert ops.status == [] and obj["metadata"]["annotations"] == {WAKE: "x"}


async def test_wake_and_sleep_together_the_sleep_is_refused() -> None:
    obj = es({WAKE: "a", SLEEP: "b"})
    ops = Ops(obj, ("Serving", False))
    await ops.act_on_requests(obj)
    assert ops.calls == [("wake", "annotation")]
    assert ops.status[0]["lastSleepRequest"]["reason"] == "ConflictingRequests"
    assert obj["metadata"]["annotations"] == {}


class Replacing(FakeKube):
    """A newer request arrives between the act and the removal."""

    async def get_or_none(self, res: Any, name: str, ns: str) -> dict[str, Any]:
        self.obj["metadata"]["annotations"][WAKE] = "newer"
        return self.obj


async def test_a_newer_value_is_not_removed() -> None:
    obj = es({WAKE: "older"})
    ops = Ops(obj, ("Serving", False))
    ops.kube = Replacing(obj)  # type: ignore[assignment]
    await ops.act_on_requests(obj)
    assert ops.kube.patches == []  # type: ignore[attr-defined]
    assert obj["metadata"]["annotations"] == {WAKE: "newer"}  # acted on by the next reconcile


async def test_the_removal_is_retried_on_a_conflict() -> None:
    obj = es({WAKE: "x"})
    ops = Ops(obj, ("Serving", False))
    ops.kube.conflict_once = True  # type: ignore[attr-defined]
    await ops.act_on_requests(obj)
    assert WAKE not in obj["metadata"]["annotations"]


# ---- the endpoint's answers, in the server's words ---------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"error": "ElastiService shop/x not found", "namespace": "shop"}, 404, "ElastiService shop/x not found"),
        ({"detail": "Not Found"}, 404, "Not Found"),
        ({"message": "upstream gone"}, 503, "upstream gone"),
        (None, 404, "Not Found, with no message"),
        ("", 502, "Bad Gateway, with no message"),
        ("plain text from a proxy", 502, "plain text from a proxy"),
        ({}, 404, "Not Found, with no message"),
    ],
)
def test_a_failed_call_says_what_the_server_said(body: object, status: int, says: str) -> None:
    assert failure(body, status) == says
    assert "None" not in failure(body, status)
