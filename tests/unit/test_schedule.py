import datetime as dt

import pytest

from elasti_istio.controller.schedule import CronError, in_period, parse_cron

UTC = dt.UTC


def at(s: str) -> dt.datetime:
    return dt.datetime.fromisoformat(s).replace(tzinfo=UTC)


def test_weekday_office_hours() -> None:
    cron = parse_cron("0 8 * * mon-fri")
    ten_hours = 10 * 3600
    assert in_period(cron, ten_hours, at("2026-11-23T08:00:30"))  # Monday 08:00
    assert in_period(cron, ten_hours, at("2026-11-23T17:59:00"))
    assert not in_period(cron, ten_hours, at("2026-11-23T18:00:00"))
    assert not in_period(cron, ten_hours, at("2026-11-23T07:59:00"))
    assert not in_period(cron, ten_hours, at("2026-11-22T12:00:00"))  # Sunday


def test_period_across_midnight_and_steps() -> None:
    cron = parse_cron("30 22 * * *")
    assert in_period(cron, 4 * 3600, at("2026-11-22T01:00:00"))
    assert not in_period(cron, 4 * 3600, at("2026-11-22T02:31:00"))
    every15 = parse_cron("*/15 * * * *")
    assert in_period(every15, 60, at("2026-11-22T10:45:59")) and not in_period(every15, 60, at("2026-11-22T10:46:00"))


def test_names_lists_and_sunday_as_7() -> None:
    assert parse_cron("0 0 1,15 jan-mar sun").months == frozenset({1, 2, 3})
    assert parse_cron("0 0 * * 7").weekdays == frozenset({0})
    assert parse_cron("0 0 * * 5-7").weekdays == frozenset({0, 5, 6})


def test_day_of_month_or_day_of_week_when_both_restricted() -> None:
    cron = parse_cron("0 12 1 * mon")
    assert in_period(cron, 60, at("2026-12-01T12:00:00"))  # Tuesday the 1st
    assert in_period(cron, 60, at("2026-11-23T12:00:00"))  # a Monday


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "* * * *",
        "60 * * * *",
        "* 24 * * *",
        "* * 0 * *",
        "* * * 13 *",
        "*/0 * * * *",
        "a * * * *",
        "5-1 * * * *",
        "* * * * funday",
    ],
)
def test_invalid_schedules_are_refused(bad: str) -> None:
    with pytest.raises(CronError):
        parse_cron(bad)
