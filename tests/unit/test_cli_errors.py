"""The client commands fail in one ``error:`` line that says what to do, with a non-zero exit code, for
what a person can fix: no kubeconfig, a missing or unreadable one, an API server or a controller that
cannot be reached."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from elasti_istio.commands.actions import failure


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "ELASTI_"))}
    env["HOME"] = str(tmp_path)  # no ~/.kube/config
    return subprocess.run(
        [sys.executable, "-m", "elasti_istio", *args], capture_output=True, text=True, timeout=60, env=env
    )


def one_error_line(result: subprocess.CompletedProcess[str], says: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, result
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    assert says in lines[0], lines[0]


def kubeconfig(tmp_path: Path, server: str) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": server}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    return path


@pytest.mark.parametrize("command", [["status"], ["wake", "shop/details"], ["sleep", "shop/details"]])
def test_no_kubeconfig(tmp_path: Path, command: list[str]) -> None:
    one_error_line(cli(tmp_path, *command), "pass --kubeconfig, set KUBECONFIG or run in a cluster")


def test_a_missing_kubeconfig(tmp_path: Path) -> None:
    one_error_line(cli(tmp_path, "status", "--kubeconfig", str(tmp_path / "nope")), "kubeconfig not found")


@pytest.mark.parametrize(
    ("content", "says"),
    [("{{{ not yaml", "cannot be read"), ("apiVersion: v1\nkind: Config\n", "no usable Kubernetes configuration")],
)
def test_an_unreadable_kubeconfig(tmp_path: Path, content: str, says: str) -> None:
    (tmp_path / "bad").write_text(content)
    one_error_line(cli(tmp_path, "status", "--kubeconfig", str(tmp_path / "bad")), says)


def test_an_unreachable_api_server(tmp_path: Path) -> None:
    server = f"http://127.0.0.1:{free_port()}"
    result = cli(tmp_path, "status", "--kubeconfig", str(kubeconfig(tmp_path, server)))
    one_error_line(result, f"cannot reach the API server at {server}")
    assert "is the cluster up" in result.stderr
    result = cli(tmp_path, "wake", "shop/details", "--kubeconfig", str(kubeconfig(tmp_path, server)))
    one_error_line(result, f"cannot reach the API server at {server}")


@pytest.mark.parametrize("url", ["not a url", "ftp://127.0.0.1:1", "http://127.0.0.1:{port}"])
def test_a_bad_controller_url(tmp_path: Path, url: str) -> None:
    url = url.format(port=free_port())
    result = cli(tmp_path, "wake", "shop/details", "--controller-url", url)
    one_error_line(result, "the controller at")
    assert "--controller-url" in result.stderr


def test_the_servers_own_words_are_kept() -> None:
    assert failure({"error": "ElastiService shop/x not found"}) == "ElastiService shop/x not found"
    assert failure({"error": "refused", "reason": "PausedByOwner"}) == "refused (PausedByOwner)"
    status = {"kind": "Status", "message": 'services "elasti-controller" not found', "code": 404}
    assert failure(status).startswith('services "elasti-controller" not found (through the API server')
