"""``--log-format json``: one JSON object per line, exceptions included; text stays one readable line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SNIPPET = """
import logging
from elasti_istio import logs
logs.setup("info", "activator", "{fmt}")
log = logging.getLogger("activator.proxy")
log.info("held %d request(s) for %s", 3, "shop/details")
try:
    raise ValueError("boom")
except ValueError:
    log.exception("forward failed")
log.debug("not shown at info")
"""


def run(fmt: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", SNIPPET.format(fmt=fmt)], capture_output=True, text=True, timeout=60, check=True
    )
    return out.stderr.splitlines()


def test_json_lines() -> None:
    lines = run("json")
    assert len(lines) == 2, lines  # the traceback stays inside its line
    first, second = (json.loads(line) for line in lines)
    assert {k: first[k] for k in ("level", "component", "logger", "message")} == {
        "level": "info",
        "component": "activator",
        "logger": "activator.proxy",
        "message": "held 3 request(s) for shop/details",
    }
    assert first["time"].endswith("Z") and "exception" not in first
    assert second["level"] == "error" and "ValueError: boom" in second["exception"]


def test_text_lines() -> None:
    lines = run("text")
    assert "INFO    activator activator.proxy: held 3 request(s) for shop/details" in lines[0]
    assert any("ValueError: boom" in line for line in lines)


@pytest.mark.parametrize("command", ["activator", "controller"])
def test_the_flag_refuses_other_formats(command: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "elasti_istio", command, "--log-format", "xml"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "use one of text, json" in out.stderr
