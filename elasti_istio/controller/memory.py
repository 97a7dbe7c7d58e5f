"""What the controller remembers of each ElastiService between reconciles: one record per
ElastiService, so that forgetting one is one deletion. Everything else is read from the cluster again
on every reconcile (the VirtualServices carry their own restore data)."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from elasti_istio.controller.world import Memory


@dataclasses.dataclass
class Record:
    # What the rules use (a snapshot goes into the World as :class:`Memory`).
    sleeping: bool = False
    waking: bool = False
    wake_failure: tuple[str, str] | None = None
    last_wake: str | None = None
    triggers: tuple[bool, str, str] | None = None
    # The named shortcuts and timings around the rules.
    event_time: float | None = None  # when a target event the next switch answers was seen (monotonic)
    went_to_zero: bool = False  # a watch event showed the target going to 0: switch before reading
    switched_early: float | None = None  # when that early switch rewrote the routes
    endpoints_wait: float | None = None  # since when the routes wait for the woken target's EndpointSlice
    finalize_restored: float | None = None  # a deleted ElastiService: when its routes were restored
    routing: tuple[int, Any] | None = None  # the routing target, cached with a hash of what it came from
    protocol_refused: bool = False  # the last reconcile kept the routes in serve mode for their protocol
    conflict_refused: bool = False  # ... or because an earlier ElastiService claims its destinations
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)

    def snapshot(self) -> Memory:
        return Memory(self.sleeping, self.waking, self.wake_failure, self.last_wake, self.triggers)

    def keep(self, memory: Memory) -> None:
        self.sleeping, self.waking = memory.sleeping, memory.waking
        self.wake_failure, self.last_wake, self.triggers = memory.wake_failure, memory.last_wake, memory.triggers


class Memories:
    def __init__(self) -> None:
        self._records: dict[str, Record] = {}

    def __getitem__(self, key: str) -> Record:
        rec = self._records.get(key)
        if rec is None:
            rec = self._records[key] = Record()
        return rec

    def peek(self, key: str) -> Record | None:
        return self._records.get(key)

    def forget(self, key: str) -> None:
        self._records.pop(key, None)

    def __len__(self) -> int:
        return len(self._records)
