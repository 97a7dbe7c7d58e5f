from __future__ import annotations

import argparse

import pytest

from elasti_istio import options
from elasti_istio.cli import build_parser


def parser_with(**env: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    options.add(p, "--activator-port", type=int, default=8012, help="port")
    options.add(p, "--namespace", repeatable=True, default=[], help="ns")
    options.add(p, "--leader-election", boolean=True, default=False, help="le")
    options.add(p, "--wake-listen", type=options.host_port, default="0.0.0.0:8013", help="listen")
    return p


def test_env_names() -> None:
    assert options.env_name("--activator-deployment") == "ELASTI_ACTIVATOR_DEPLOYMENT"


def test_defaults_env_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    args = options.resolve_repeatable(parser_with().parse_args([]))
    assert (args.activator_port, args.namespace, args.leader_election, args.wake_listen) == (
        8012,
        [],
        False,
        ("0.0.0.0", 8013),
    )
    monkeypatch.setenv("ELASTI_ACTIVATOR_PORT", "9000")
    monkeypatch.setenv("ELASTI_NAMESPACE", "a, b")
    monkeypatch.setenv("ELASTI_LEADER_ELECTION", "true")
    monkeypatch.setenv("ELASTI_WAKE_LISTEN", "127.0.0.1:1")
    args = options.resolve_repeatable(parser_with().parse_args([]))
    assert (args.activator_port, args.namespace, args.leader_election, args.wake_listen) == (
        9000,
        ["a", "b"],
        True,
        ("127.0.0.1", 1),
    )
    args = options.resolve_repeatable(
        parser_with().parse_args(
            ["--activator-port", "1", "--namespace", "x", "--namespace", "y", "--no-leader-election"]
        )
    )
    assert (args.activator_port, args.namespace, args.leader_election) == (1, ["x", "y"], False)


def test_help_shows_env_and_default() -> None:
    text = parser_with().format_help()
    assert "ELASTI_ACTIVATOR_PORT" in text and "default 8012" in text and "default 0.0.0.0:8013" in text


@pytest.mark.parametrize("bad", ["8012", "host:", "h:99999", "h:x"])
def test_host_port_rejects_bad_values(bad: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        options.host_port(bad)


def test_top_level_help_lists_subcommands() -> None:
    text = build_parser().format_help()
    for sub in ("cluster", "kubelet"):
        assert sub in text
