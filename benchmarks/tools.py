"""What the benchmarks run besides the project: wrk, nginx, taskset; limits, machine facts, process stats."""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

TOOLS = ("wrk", "nginx", "taskset")
INSTALL_SCRIPT = Path(__file__).with_name("install-tools.sh")


class BenchError(RuntimeError):
    """A benchmark could not run as intended; the message says why."""


def missing_tools() -> list[str]:
    return [t for t in TOOLS if _which(t) is None]


def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/sbin") / name) if p.exists()), None
    )


def raise_nofile() -> dict[str, int]:
    """Soft open-files limit up to the hard one (inherited by every process started afterwards)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    new_soft, new_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {"nofile_soft_before": soft, "nofile_hard": hard, "nofile_soft": new_soft, "nofile_hard_after": new_hard}


def machine() -> dict[str, object]:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "cpu_model": model,
        "cores": os.cpu_count() or 0,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": version("aiohttp"),
        "kopf": version("kopf"),
        "uvloop": version("uvloop"),
        "wrk": _tool_version(["wrk", "-v"]),
        "nginx": _tool_version(["nginx", "-v"]),
        "loadavg_at_start": os.getloadavg()[0],
    }


def _tool_version(cmd: list[str]) -> str:
    if _which(cmd[0]) is None:
        return "not installed"
    out = subprocess.run([_which(cmd[0]) or cmd[0], *cmd[1:]], capture_output=True, text=True, check=False)
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0] if text else ""


def pin(pid: int, cpus: str) -> None:
    """Moves every thread of ``pid`` to ``cpus`` (taskset's list syntax)."""
    subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], check=True, capture_output=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` memory field (VmRSS, VmHWM) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak_rss(pid: int) -> bool:
    """Resets VmHWM (Linux: writing 5 to clear_refs), so a later read is the peak from now on."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


# ---- wrk -------------------------------------------------------------------------------------------
@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    non_2xx: int


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        return float("nan")
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk(
    url: str, *, seconds: float, connections: int, cpus: str, lua: Path | None = None, threads: int = 1
) -> WrkResult:
    """One closed-loop wrk run on keep-alive connections, pinned to ``cpus``."""
    cmd = ["taskset", "-c", cpus, "wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s"]
    cmd += ["--latency", "--timeout", "10s"]
    if lua is not None:
        cmd += ["-s", str(lua)]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=False, timeout=seconds + 60)
    text = out.stdout
    if out.returncode != 0 or "Requests/sec" not in text:
        raise BenchError(f"wrk failed ({out.returncode}): {text[-500:]} {out.stderr[-500:]}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"^\s+50%\s+(\S+)", text, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", text, re.M)
    reqs = int(re.search(r"(\d+) requests in", text).group(1))  # type: ignore[union-attr]
    err = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    non2 = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return WrkResult(
        rps=rps,
        p50_ms=_ms(p50.group(1)) if p50 else float("nan"),
        p99_ms=_ms(p99.group(1)) if p99 else float("nan"),
        requests=reqs,
        errors=sum(int(x) for x in err.groups()) if err else 0,
        non_2xx=int(non2.group(1)) if non2 else 0,
    )


def wrk_script(path: Path, *, headers: dict[str, str], target: str | None = None) -> Path:
    """A wrk Lua script that sets headers and, for a forward proxy, an absolute-URI request target."""
    lines = [f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()]
    if target is not None:
        lines.append(f"wrk.path = {json.dumps(target)}")
    path.write_text("\n".join(lines) + "\n")
    return path


# ---- nginx -----------------------------------------------------------------------------------------
NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
{body}
}}
"""

BACKEND = """\
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{ return 200 "ok\\n"; }}
  }}"""

PROXY = """\
  upstream backend {{
    server 127.0.0.1:{upstream};
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $remote_addr;
    }}
  }}"""


class Nginx:
    """One nginx process (one worker, no master: no user switch, nothing left behind) on loopback."""

    def __init__(self, workdir: Path, body: str, cpus: str) -> None:
        self.dir = workdir
        self.body = body
        self.cpus = cpus
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, port: int) -> Nginx:
        for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.dir / d).mkdir(parents=True, exist_ok=True)
        conf = self.dir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=self.dir, body=self.body))
        nginx = _which("nginx") or "nginx"
        self.proc = subprocess.Popen(
            ["taskset", "-c", self.cpus, nginx, "-c", str(conf), "-p", str(self.dir)],
            stdout=subprocess.DEVNULL,
            stderr=(self.dir / "stderr.log").open("ab"),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        import socket

        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"nginx exited: {(self.dir / 'stderr.log').read_text()[-500:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return self
            time.sleep(0.05)
        raise BenchError("nginx did not listen within 10s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# ---- the load generator ----------------------------------------------------------------------------
def loadgen_cmd(cpus: str, *args: str) -> list[str]:
    return ["taskset", "-c", cpus, sys.executable, "-m", "benchmarks.loadgen", *args]


def run_loadgen(cpus: str, *args: str, timeout: float = 300) -> dict[str, object]:
    out = subprocess.run(
        loadgen_cmd(cpus, *args), capture_output=True, text=True, check=False, timeout=timeout, cwd=_root()
    )
    if out.returncode != 0:
        raise BenchError(f"load generator failed ({out.returncode}): {out.stderr[-800:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _root() -> str:
    return str(Path(__file__).resolve().parents[1])
