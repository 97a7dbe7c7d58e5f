"""``cluster`` errors that need no binaries: stale state, busy port, nothing to stop."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "elasti_istio", *args], capture_output=True, text=True, timeout=60)


def test_stale_state_dir_gets_a_clear_message(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text(
        json.dumps(
            {
                "server": "https://127.0.0.1:1",
                "tokens": {"admin": "x"},
                "pod_cidr": "127.9.0.0/16",
                "node_name": "n",
                "procs": {"etcd": {"pid": 999999, "match": "etcd"}},
            }
        )
    )
    result = cli("cluster", "up", "--state-dir", str(tmp_path))
    assert result.returncode == 1
    assert "stale state dir" in result.stderr and "cluster down --state-dir" in result.stderr
    down = cli("cluster", "down", "--state-dir", str(tmp_path))
    assert down.returncode == 0 and not tmp_path.exists()


def test_port_in_use_gets_a_clear_message(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = cli("cluster", "up", "--state-dir", str(tmp_path / "c"), "--apiserver-port", str(port))
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is in use" in result.stderr


def test_down_without_a_cluster_says_so(tmp_path: Path) -> None:
    result = cli("cluster", "down", "--state-dir", str(tmp_path / "none"))
    assert result.returncode == 0 and "no cluster" in result.stderr


def test_status_without_a_cluster_fails(tmp_path: Path) -> None:
    result = cli("cluster", "status", "--state-dir", str(tmp_path / "none"))
    assert result.returncode == 1 and "no cluster" in result.stdout
