"""Durations: the ElastiService grammar is exactly the CRD's pattern; Istio's is Go's."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from activator.registry import target_from
from elasti_istio import duration
from elasti_istio.controller import spec as es_spec
from elasti_istio.duration import parse_go
from tests.activator_stubs import elastiservice

CRD = Path(__file__).resolve().parents[2] / "crds" / "elastiservice.yaml"


def crd_duration_patterns() -> set[str]:
    """The pattern of every duration field of the ElastiService CRD."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "pattern" in node and "ms|s|m|h" in node["pattern"]:
                found.add(node["pattern"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(yaml.safe_load(CRD.read_text()))
    return found


def test_the_grammar_is_the_crds() -> None:
    assert crd_duration_patterns() == {duration.ELASTI_PATTERN}


@pytest.mark.parametrize(
    ("text", "seconds"), [("60s", 60), ("100ms", 0.1), ("1m30s", 90), ("1.5h", 5400), ("2h45m", 9900), ("0s", 0)]
)
def test_elastiservice_durations(text: str, seconds: float) -> None:
    assert duration.parse(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "0", ".5s", "500us", "10ns", "-1s", "+1s", " 1s", "1s ", "60", "1.s", "1d"])
def test_what_the_crd_refuses_is_refused(text: str) -> None:
    assert re.fullmatch(duration.ELASTI_PATTERN, text) is None
    with pytest.raises(ValueError):
        duration.parse(text)


@settings(max_examples=400, database=None)
@given(st.text(alphabet="0123456789.msuh +-µ", max_size=12))
def test_parse_accepts_exactly_what_the_crd_accepts(text: str) -> None:
    accepted = re.fullmatch(duration.ELASTI_PATTERN, text) is not None
    try:
        duration.parse(text)
        parsed = True
    except ValueError:
        parsed = False
    assert parsed == accepted, text


def test_controller_and_activator_read_the_same_durations() -> None:
    """The same ElastiService read by both programs gives the same hold time and retry interval. What the
    CRD refuses (the activator once took ``0``, ``500us``, ``.5s``) the controller reports as a spec error
    and the activator reads as not set (its defaults)."""
    from activator.registry import DEFAULT_HOLD_TIMEOUT, DEFAULT_RETRY_INTERVAL

    for hold, retry in (("1m30s", "250ms"), ("2.5s", "1s"), ("0", "1s"), ("60s", ".5s"), ("500us", "1m")):
        es = elastiservice("shop", "details", hold_timeout=hold, retry_interval=retry)
        act = target_from(es)
        if re.fullmatch(duration.ELASTI_PATTERN, hold):
            assert act.hold_timeout == pytest.approx(es_spec.parse(es).hold_timeout), hold
        else:
            with pytest.raises(es_spec.SpecError):  # the controller reads holdTimeout; retryInterval is the activator's
                es_spec.parse(es)
            assert act.hold_timeout == pytest.approx(DEFAULT_HOLD_TIMEOUT), hold
        expected_retry = (
            duration.parse(retry) if re.fullmatch(duration.ELASTI_PATTERN, retry) else DEFAULT_RETRY_INTERVAL
        )
        assert act.retry_interval == pytest.approx(expected_retry), retry


# --- Go durations, as Istio writes route timeouts ---------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("60s", 60.0),
        ("1.5s", 1.5),
        ("100ms", 0.1),
        ("1m30s", 90.0),
        ("2h", 7200.0),
        ("0", 0.0),
        ("0s", 0.0),
        (".5s", 0.5),
        ("1h2m3.5s", 3723.5),
        ("250us", 0.00025),
        ("1\u00b5s", 1e-6),
        ("1\u03bcs", 1e-6),
        ("10ns", 1e-8),
        ("+3s", 3.0),
        ("-1.5m", -90.0),
    ],
)
def test_parse_go(text: str, seconds: float) -> None:
    assert parse_go(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "s", ".s", "1", "1.5", "10", "00", "abc", "1x", " 1s", "1s ", "1d", "-", "1.2.3s"]
)
def test_parse_go_rejects_junk(text: str) -> None:
    with pytest.raises(ValueError):
        parse_go(text)
