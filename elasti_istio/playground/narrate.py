"""Plain terminal narration: numbered steps with timings, a progress line while waiting, a timeline.

On a terminal the progress line is rewritten in place; without one (a pipe, CI) a line is printed
each time the progress text changes, so the output reads the same in a log.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TextIO

SPINNER = "|/-\\"


class StepFailed(Exception):
    def __init__(self, title: str, reason: str) -> None:
        super().__init__(f"{title}: {reason}")
        self.title = title
        self.reason = reason


@dataclass
class Step:
    number: int
    title: str
    start: float
    duration: float = 0.0
    result: str = "running"
    events: list[tuple[float, str]] = field(default_factory=list)


class Narrator:
    def __init__(self, out: TextIO, tty: bool | None = None) -> None:
        self.out = out
        self.tty = out.isatty() if tty is None else tty
        self.t0 = time.monotonic()
        self.steps: list[Step] = []
        self._shown = ""
        self._line_open = False
        self._spin = 0

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def say(self, text: str = "") -> None:
        self._clear()
        print(text, file=self.out, flush=True)

    def detail(self, text: str) -> None:
        self.say("      " + text)

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[Step]:
        step = Step(len(self.steps) + 1, title, self.elapsed())
        self.steps.append(step)
        self.say(f"[{step.number}] {title}")
        t = time.monotonic()
        try:
            yield step
        except KeyboardInterrupt:
            step.duration, step.result = time.monotonic() - t, "interrupted"
            raise
        except StepFailed as exc:
            step.duration, step.result = time.monotonic() - t, "FAILED"
            self.detail(f"FAILED after {step.duration:.1f}s: {exc.reason}")
            raise StepFailed(title, exc.reason) from exc
        except Exception as exc:
            step.duration, step.result = time.monotonic() - t, "FAILED"
            reason = str(exc) or type(exc).__name__
            self.detail(f"FAILED after {step.duration:.1f}s: {reason}")
            raise StepFailed(title, reason) from exc
        step.duration, step.result = time.monotonic() - t, "ok"
        self.detail(f"ok ({step.duration:.1f}s)")

    def event(self, step: Step, offset: float, text: str) -> None:
        """A timed event inside a step (offset in seconds from a moment the step chose)."""
        step.events.append((offset, text))
        self.detail(f"+{offset:5.2f}s  {text}")

    def progress(self, text: str, since: float) -> None:
        waited = time.monotonic() - since
        if self.tty:
            self._spin = (self._spin + 1) % len(SPINNER)
            line = f"      {SPINNER[self._spin]} {waited:5.1f}s  {text}"
            self.out.write("\r" + line[:119].ljust(119))
            self.out.flush()
            self._line_open = True
        elif text != self._shown:
            print(f"      ... {waited:5.1f}s  {text}", file=self.out, flush=True)
        self._shown = text

    def wait(self, probe: Callable[[], tuple[bool, str]], timeout: float, what: str, interval: float = 0.1) -> None:
        """Polls ``probe`` (done, progress text) until done; StepFailed after ``timeout`` with the last text."""
        since = time.monotonic()
        text = what
        while True:
            try:
                done, text = probe()
            except Exception as exc:
                done, text = False, f"{what} ({exc})"
            if done:
                self._clear()
                return
            if time.monotonic() - since > timeout:
                self._clear()
                raise StepFailed(what, f"timed out after {timeout:.0f}s waiting for {what}; last seen: {text}")
            self.progress(text or what, since)
            time.sleep(interval)

    def timeline(self) -> None:
        self.say()
        self.say("Timeline")
        self.say(f"  {'#':>2}  {'step':58} {'at':>7} {'took':>7}  result")
        for s in self.steps:
            self.say(f"  {s.number:>2}  {s.title[:58]:58} {s.start:6.1f}s {s.duration:6.1f}s  {s.result}")
        self.say(f"  total {self.elapsed():.1f}s")

    def _clear(self) -> None:
        if self._line_open:
            self.out.write("\r" + " " * 119 + "\r")
            self.out.flush()
            self._line_open = False
        self._shown = ""
