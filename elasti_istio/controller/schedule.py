"""``enabledPeriod``: a five-field cron schedule (UTC) and a duration: pure functions.

Scale to zero is allowed from each time the schedule fires until the duration has passed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

_MONTHS = {
    m: i
    for i, m in enumerate(("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), start=1)
}
_DAYS = {d: i for i, d in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
MAX_DURATION = 31 * 24 * 3600.0


class CronError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Cron:
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    day_restricted: bool
    weekday_restricted: bool

    def day_matches(self, t: dt.datetime) -> bool:
        if t.month not in self.months:
            return False
        dom = t.day in self.days
        dow = (t.isoweekday() % 7) in self.weekdays
        # As in cron: when both fields are restricted, either may match.
        if self.day_restricted and self.weekday_restricted:
            return dom or dow
        return dom and dow

    def matches(self, t: dt.datetime) -> bool:
        return t.minute in self.minutes and t.hour in self.hours and self.day_matches(t)


def _field(text: str, lo: int, hi: int, names: dict[str, int] | None, what: str) -> frozenset[int]:
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            raise CronError(f"empty {what} entry in {text!r}")
        step = 1
        if "/" in part:
            part, _, step_s = part.partition("/")
            if not step_s.isdigit() or int(step_s) < 1:
                raise CronError(f"bad step {step_s!r} in {what} field {text!r}")
            step = int(step_s)
        if part == "*":
            start, end = lo, hi
        elif "-" in part:
            a, _, b = part.partition("-")
            start, end = _value(a, names, what), _value(b, names, what)
        else:
            start = _value(part, names, what)
            end = hi if step > 1 else start
        if not (lo <= start <= hi and lo <= end <= hi) or start > end:
            raise CronError(f"{what} {part!r} out of range {lo}-{hi}")
        out.update(range(start, end + 1, step))
    if what == "day-of-week" and 7 in out:  # 7 is Sunday too
        out = (out - {7}) | {0}
    return frozenset(out)


def _value(s: str, names: dict[str, int] | None, what: str) -> int:
    if s.isdigit():
        return int(s)
    if names and s[:3] in names and len(s) == 3:
        return names[s]
    raise CronError(f"bad {what} value {s!r}")


def parse_cron(expr: str) -> Cron:
    fields = expr.split()
    if len(fields) != 5:
        raise CronError(f"a cron schedule has 5 fields (minute hour day-of-month month day-of-week), got {expr!r}")
    m, h, dom, mon, dow = fields
    return Cron(
        minutes=_field(m, 0, 59, None, "minute"),
        hours=_field(h, 0, 23, None, "hour"),
        days=_field(dom, 1, 31, None, "day-of-month"),
        months=_field(mon, 1, 12, _MONTHS, "month"),
        weekdays=_field(dow, 0, 7, _DAYS, "day-of-week"),
        day_restricted=dom.strip() != "*",
        weekday_restricted=dow.strip() != "*",
    )


def in_period(cron: Cron, duration: float, now: dt.datetime) -> bool:
    """True when the schedule fired at some minute t with t <= now < t + duration."""
    duration = min(duration, MAX_DURATION)
    t = now.replace(second=0, microsecond=0)
    earliest = now - dt.timedelta(seconds=duration)
    while t > earliest:
        if not cron.day_matches(t):
            t = t.replace(hour=23, minute=59) - dt.timedelta(days=1)
            continue
        if t.hour not in cron.hours:
            t = t.replace(minute=59) - dt.timedelta(hours=1)
            continue
        if t.minute in cron.minutes:
            return True
        t -= dt.timedelta(minutes=1)
    return False
