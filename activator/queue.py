"""Hold policy, free of I/O: bounded queues per ElastiService, a global cap, and wake cycles.

A wake cycle opens with the first request held while the target is not ready (that request's
caller notifies the controller, once for the whole cycle) and closes when the target is ready,
when the wake failed, or when nothing is held any more; the next held request opens a new one.

A ``WakeFailed`` condition already present when a cycle opens belongs to an earlier wake: it is
"stale" and fails nobody until the controller clears it or reports a different failure.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass

from activator.registry import WakeFailure
from activator.routing import Key


class Admission(enum.Enum):
    ADMITTED = "admitted"
    QUEUE_FULL = "queue_full"  # the ElastiService's queueLimit
    GLOBAL_FULL = "global_full"  # --max-held


class Change(enum.Enum):
    NONE = "none"
    READY = "ready"  # cycle closed: the target is ready
    FAILED = "failed"  # cycle closed: fail held requests with the failure


@dataclass(slots=True)
class _Entry:
    held: int = 0
    cycle: bool = False
    cycle_id: int = 0
    stale: WakeFailure | None = None
    failures: int = 0  # bumped each time held requests are failed
    failure: WakeFailure | None = None


class HoldQueues:
    def __init__(self, max_held: int) -> None:
        self.max_held = max_held
        self.total = 0
        self._entries: dict[Key, _Entry] = {}
        self._cycle_ids = itertools.count(1)

    def pending(self, key: Key) -> int:
        e = self._entries.get(key)
        return e.held if e else 0

    def cycle_open(self, key: Key) -> bool:
        e = self._entries.get(key)
        return bool(e and e.cycle)

    def admit(self, key: Key, limit: int) -> Admission:
        e = self._entries.get(key)
        if e is None:
            e = self._entries[key] = _Entry()
        if e.held >= limit:
            return Admission.QUEUE_FULL
        if self.total >= self.max_held:
            return Admission.GLOBAL_FULL
        e.held += 1
        self.total += 1
        return Admission.ADMITTED

    def leave(self, key: Key) -> bool:
        """One admitted request is done; True when that closed an open cycle (nothing is held any more)."""
        e = self._entries.get(key)
        if e is None or e.held == 0:
            return False
        e.held -= 1
        self.total -= 1
        if e.held == 0 and e.cycle:
            e.cycle = False
            return True
        return False

    def failures(self, key: Key) -> int:
        """A mark to pass to :meth:`failed_since` later."""
        e = self._entries.get(key)
        return e.failures if e else 0

    def failed_since(self, key: Key, mark: int) -> WakeFailure | None:
        """The failure that ended a cycle after ``mark`` was taken, if any."""
        e = self._entries.get(key)
        if e is None or e.failures == mark:
            return None
        return e.failure

    def open_cycle(self, key: Key, current_failure: WakeFailure | None) -> bool:
        """True when this opens a new cycle: the caller notifies the controller."""
        e = self._entries.get(key)
        if e is None:
            e = self._entries[key] = _Entry()
        if e.cycle:
            return False
        e.cycle = True
        e.cycle_id = next(self._cycle_ids)
        e.stale = current_failure
        return True

    def cycle_id(self, key: Key) -> int:
        """The open cycle's id (unique over all keys), 0 when none is open."""
        e = self._entries.get(key)
        return e.cycle_id if e and e.cycle else 0

    def fail_cycle(self, key: Key, cycle_id: int, failure: WakeFailure) -> bool:
        """The controller refused the wake of cycle ``cycle_id``: True when that cycle was still open."""
        e = self._entries.get(key)
        if e is None or not e.cycle or e.cycle_id != cycle_id:
            return False
        e.cycle = False
        e.failures += 1
        e.failure = failure
        return True

    def observe(self, key: Key, ready: bool, failure: WakeFailure | None) -> Change:
        """A new status for ``key``: what it means for the open cycle."""
        e = self._entries.get(key)
        if e is None:
            return Change.NONE
        if failure is None:
            e.stale = None
        if not e.cycle:
            return Change.NONE
        if ready:
            e.cycle = False
            return Change.READY
        if failure is not None and failure != e.stale:
            e.cycle = False
            e.failures += 1
            e.failure = failure
            e.stale = failure
            return Change.FAILED
        return Change.NONE

    def forget(self, key: Key) -> None:
        """The ElastiService is gone; its held requests leave on their own."""
        e = self._entries.get(key)
        if e is not None:
            e.cycle = False
            if e.held == 0:
                del self._entries[key]

    def prune(self, key: Key) -> None:
        e = self._entries.get(key)
        if e is not None and e.held == 0 and not e.cycle and e.stale is None:
            del self._entries[key]
