"""Wake and sleep asked for on the ElastiService itself: the annotation
``elasti.truefoundry.com/wake-requested`` or ``elasti.truefoundry.com/sleep-requested``, any value.

Asking needs only ``patch`` on ElastiServices (a tenant's ``edit`` role) and no network path to the
controller, which acts as on ``POST /v1/wake`` and ``POST /v1/sleep``, writes the outcome to
``status.lastWakeRequest`` / ``status.lastSleepRequest`` and an Event, then removes the annotation
(only while it still holds the value acted on, so a newer request is never lost). An annotation set
while no controller runs is acted on when one does.

Pure: what the annotations ask for, what an outcome looks like, and how ``elasti-istio wake`` and
``sleep`` read it back.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from elasti_istio.resources import ANN_SLEEP_REQUESTED, ANN_WAKE_REQUESTED

WAKE, SLEEP = "wake", "sleep"
ANNOTATIONS = {WAKE: ANN_WAKE_REQUESTED, SLEEP: ANN_SLEEP_REQUESTED}
STATUS_FIELDS = {WAKE: "lastWakeRequest", SLEEP: "lastSleepRequest"}
CLI_PREFIX = "cli/"  # the values elasti-istio writes: its Events say the command asked
MAX_ID = 253  # characters of the value kept in the status record


@dataclasses.dataclass(frozen=True)
class Ask:
    """One request found on an ElastiService."""

    action: str  # wake or sleep
    token: str  # the annotation's value, as found
    dropped: bool = False  # a sleep asked together with a wake: the wake wins, the sleep is refused

    @property
    def annotation(self) -> str:
        return ANNOTATIONS[self.action]

    @property
    def by(self) -> str:
        """Who asked, as the wake's Event says it: ``cli`` (``elasti-istio``) or ``annotation``."""
        return "cli" if self.token.startswith(CLI_PREFIX) else "annotation"

    @property
    def why(self) -> str:
        source = f"elasti-istio {self.action}" if self.by == "cli" else f"annotation {self.annotation}"
        return f"asked to {self.action} ({source})"


@dataclasses.dataclass(frozen=True)
class Result:
    """What came of one request."""

    done: bool
    reason: str
    message: str
    phase: str | None = None


@dataclasses.dataclass(frozen=True)
class Notice:
    """An Event to post about a request (the operations post their own when they scale)."""

    type: str
    reason: str
    message: str


def pending(es: dict[str, Any]) -> list[Ask]:
    """The requests on ``es``, the wake first. Both at once is ambiguous: the wake is done and the sleep
    refused (a workload is never scaled down on a request that also asked to keep it up)."""
    ann = (es.get("metadata") or {}).get("annotations") or {}
    wake, sleep = ann.get(ANN_WAKE_REQUESTED), ann.get(ANN_SLEEP_REQUESTED)
    out = []
    if wake is not None:
        out.append(Ask(WAKE, str(wake)))
    if sleep is not None:
        out.append(Ask(SLEEP, str(sleep), dropped=wake is not None))
    return out


def done(ask: Ask, phase: str, acted: bool) -> Result:
    """``acted``: the operation scaled the target (it posted ``Woken`` or ``ScaledToZeroOnRequest``)."""
    if ask.action == WAKE:
        if acted:
            return Result(True, "Woken", f"the target is scaled up to minTargetReplicas (phase {phase})", phase)
        return Result(True, "AlreadyAwake", f"the target already has minTargetReplicas (phase {phase})", phase)
    if acted:
        return Result(
            True,
            "ScaledToZeroOnRequest",
            f"routes moved to the activator, then the target scaled to 0 (phase {phase})",
            phase,
        )
    return Result(True, "AlreadyAsleep", f"the target is already at 0 replicas (phase {phase})", phase)


def refused(reason: str, message: str) -> Result:
    return Result(False, reason, message)


def conflicting() -> Result:
    return refused(
        "ConflictingRequests",
        f"{ANN_WAKE_REQUESTED} and {ANN_SLEEP_REQUESTED} were set together: the wake was done, the sleep not",
    )


def notice(ask: Ask, result: Result, posted: bool) -> Notice | None:
    """The Event for ``result``; None when the operation posted its own (a scale)."""
    if posted:
        return None
    if result.done:
        return Notice("Normal", result.reason, f"{ask.why}: {result.message}")
    return Notice("Warning", result.reason, f"{ask.why}: refused: {result.message}")


def record(ask: Ask, result: Result, now: str) -> dict[str, Any]:
    """The status record of a request: ``elasti-istio`` finds its own by ``id``."""
    out: dict[str, Any] = {
        "id": ask.token[:MAX_ID],
        "result": "Done" if result.done else "Refused",
        "reason": result.reason,
        "message": result.message,
        "time": now,
    }
    if result.phase is not None:
        out["phase"] = result.phase
    return out


# ---- read back by elasti-istio wake / sleep ------------------------------------------------------


def new_token(now: dt.datetime, nonce: str) -> str:
    return f"{CLI_PREFIX}{now.strftime('%Y-%m-%dT%H:%M:%SZ')}/{nonce}"


@dataclasses.dataclass(frozen=True)
class Answer:
    # asked (set, not waited for); waiting; done; refused; replaced: the annotation was gone before it was
    # acted on, and ``record`` is the last request acted on (one that overwrote it, as a rule); withdrawn:
    # gone, and no record at all
    state: str
    record: dict[str, Any] | None = None


def answer(es: dict[str, Any], action: str, token: str) -> Answer:
    """What came of the request ``token`` as ``es`` shows it. The record is written before the annotation
    is removed, so one read of the object holds both."""
    ann = (es.get("metadata") or {}).get("annotations") or {}
    rec = (es.get("status") or {}).get(STATUS_FIELDS[action])
    rec = rec if isinstance(rec, dict) else None
    if rec is not None and rec.get("id") == token[:MAX_ID]:
        return Answer("done" if rec.get("result") == "Done" else "refused", rec)
    if ANNOTATIONS[action] in ann:
        return Answer("waiting")
    return Answer("withdrawn" if rec is None else "replaced", rec)
