"""The project's programs run as local processes, each with its own flags and a log file.

Shared by ``elasti-istio demo`` and the tests: a process is started in its own session (a Ctrl-C at
the terminal reaches only the parent, which then stops its children in order) and, when
``attached``, dies with the process that started it, so a killed parent leaves no stray behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ACTIVATOR_HOST = "elasti-activator.elasti-system.svc.cluster.local"


class ProcError(RuntimeError):
    """A program exited or did not become ready; the message ends with the tail of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_ports(n: int, avoid: tuple[int, ...] = ()) -> list[int]:
    """``n`` distinct free ports (a port just released can be handed out twice in a row)."""
    out: list[int] = []
    while len(out) < n:
        p = free_port()
        if p not in out and p not in avoid:
            out.append(p)
    return out


def _pdeathsig() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The status of one GET, or None when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


class Proc:
    """``python -m elasti_istio <args>`` with stdout and stderr in ``log_path``."""

    def __init__(
        self,
        args: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        *,
        name: str | None = None,
        attached: bool = True,
    ) -> None:
        self.args = args
        self.log_path = Path(log_path)
        self.env = env
        self.name = name or (args[0] if args else "elasti-istio")
        self.attached = attached
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "elasti_istio", *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(self.env or {})},
                start_new_session=True,
                preexec_fn=_pdeathsig if self.attached else None,
            )
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            assert self.proc is not None
            os.kill(self.proc.pid, sig)
            self.proc.wait(30)

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; the exit code (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.logs().splitlines()[-lines:])

    def wait_http(self, url: str, timeout: float = 60, what: str = "ready") -> None:
        """Until ``url`` answers 200; fails at once if the process exits."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                code = self.proc.returncode if self.proc else None
                raise ProcError(f"{self.name} exited with code {code} (log {self.log_path}):\n{self.tail()}")
            if http_status(url) == 200:
                return
            if time.monotonic() > deadline:
                raise ProcError(f"{self.name} not {what} after {timeout:.0f}s (log {self.log_path}):\n{self.tail()}")
            time.sleep(0.05)


class ControllerProc(Proc):
    """``elasti-istio controller`` on loopback ports (0: a free one)."""

    def __init__(
        self,
        kubeconfig: Path,
        namespaces: list[str] | tuple[str, ...] | str | None,
        log_path: Path,
        *extra: str,
        activator_deployment: str | None = None,
        wake_port: int = 0,
        metrics_port: int = 0,
        log_level: str = "info",
    ) -> None:
        self.wake_port = wake_port or free_port()
        self.metrics_port = metrics_port or free_ports(1, avoid=(self.wake_port,))[0]
        args = [
            "controller",
            "--kubeconfig",
            str(kubeconfig),
            "--wake-listen",
            f"127.0.0.1:{self.wake_port}",
            "--metrics-listen",
            f"127.0.0.1:{self.metrics_port}",
            "--activator-host",
            ACTIVATOR_HOST,
            "--activator-deployment",
            activator_deployment or "none",
            "--log-level",
            log_level,
        ]
        if isinstance(namespaces, str):
            namespaces = [namespaces]
        for ns in namespaces or ():
            args += ["--namespace", ns]
        super().__init__([*args, *extra], log_path, name="controller")

    @property
    def wake_url(self) -> str:
        return f"http://127.0.0.1:{self.wake_port}/v1/wake"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.wake_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def wait_ready(self, timeout: float = 60) -> ControllerProc:
        self.wait_http(self.metrics_url + "/readyz", timeout)
        return self


class ActivatorProc(Proc):
    """``elasti-istio activator`` sending upstream requests through its pod's Istio sidecar (or, for the
    benchmarks' throughput figure, through one forward proxy)."""

    def __init__(
        self,
        kubeconfig: Path,
        log_path: Path,
        *extra: str,
        controller_url: str,
        sidecar_address: str | None = None,
        upstream_proxy: str | None = None,
        port: int = 0,
        admin_port: int = 0,
        drain_timeout: float = 30.0,
        log_level: str = "info",
    ) -> None:
        self.port = port or free_port()
        self.admin_port = admin_port or free_ports(1, avoid=(self.port,))[0]
        super().__init__(
            [
                "activator",
                "--kubeconfig",
                str(kubeconfig),
                "--listen",
                f"127.0.0.1:{self.port}",
                "--admin-listen",
                f"127.0.0.1:{self.admin_port}",
                "--controller-url",
                controller_url,
                *(["--sidecar-address", sidecar_address] if sidecar_address else []),
                *(["--upstream-proxy", upstream_proxy] if upstream_proxy else []),
                "--drain-timeout",
                str(drain_timeout),
                "--log-level",
                log_level,
                *extra,
            ],
            log_path,
            name="activator",
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def wait_ready(self, timeout: float = 60) -> ActivatorProc:
        self.wait_http(self.admin_url + "/readyz", timeout, "ready (ElastiServices listed)")
        return self
