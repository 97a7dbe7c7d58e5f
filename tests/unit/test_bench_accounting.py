"""How the benchmarks count h2load's calls: a call still in flight when a timed run ends has its status
counted but is not done, which must not read as a failure (nor hide one)."""

from __future__ import annotations

from benchmarks.tools import H2loadResult


def result(done: int, ok2xx: int, non2xx: int = 0, failed: int = 0, data: int | None = None) -> H2loadResult:
    return H2loadResult(1.0, 1.0, 1.0, done, done - failed, failed, ok2xx, non2xx, 19 * done if data is None else data)


def test_a_status_counted_for_a_call_in_flight_is_not_an_error() -> None:
    r = result(done=933, ok2xx=934, data=19 * 934)
    assert r.errors == 0 and r.unanswered(19) == 0


def test_errors_and_calls_without_their_message_are_counted() -> None:
    assert result(done=10, ok2xx=9, non2xx=1).errors == 1
    assert result(done=10, ok2xx=10, failed=2).errors == 2
    assert result(done=10, ok2xx=10, data=19 * 8).unanswered(19) == 2
