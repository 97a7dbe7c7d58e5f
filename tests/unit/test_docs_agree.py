"""The docs name what the code does: every condition reason and Event reason the controller writes is
in docs/controller.md, and every flag of the two programs is in their flag tables."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from elasti_istio.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
# Kinds, label-selector operators, and the workload conditions the controller reads (not writes).
NOT_REASONS = {"ElastiService", "ReplicaSet", "StatefulSet", "ScaledObject", "DoesNotExist", "NotIn"}
NOT_REASONS |= {"NotProgressing", "ReplicaFailure"}


def reasons_in_code() -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "elasti_istio" / "controller").glob("*.py"):
        found |= set(re.findall(r'"([A-Z][a-z]+(?:[A-Z][a-z]+)+)"', path.read_text()))
    return found - NOT_REASONS


def test_every_reason_is_documented() -> None:
    docs = (ROOT / "docs" / "controller.md").read_text()
    missing = sorted(r for r in reasons_in_code() if f"`{r}`" not in docs)
    assert missing == []


def flags(command: str) -> set[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    parser = sub.choices[command]  # type: ignore[attr-defined]
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--") and s not in ("--help",)}


@pytest.mark.parametrize(("command", "doc"), [("activator", "activator.md"), ("controller", "controller.md")])
def test_every_flag_is_in_the_flag_table(command: str, doc: str) -> None:
    text = (ROOT / "docs" / doc).read_text()
    table = "\n".join(line for line in text.splitlines() if line.startswith("| `--"))
    missing = sorted(f for f in flags(command) if not f.startswith("--no-") and f"`{f}" not in table)
    assert missing == []
