"""What the benchmarks run besides the project: wrk, nginx, h2load, taskset, a bare Envoy and a gRPC origin;
limits, machine facts, process stats."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

TOOLS = ("wrk", "nginx", "h2load", "taskset")
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
        "h2load": _tool_version(["h2load", "--version"]),
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


def _wait_listening(proc: subprocess.Popen[bytes], port: int, what: str, log: Path, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = log.read_text(errors="replace")[-800:] if log.exists() else ""
            raise BenchError(f"{what} exited ({proc.returncode}): {text}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise BenchError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


def _stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# ---- gRPC: h2load, a bare Envoy, the origin --------------------------------------------------------
GRPC_HEADERS = {"content-type": "application/grpc", "te": "trailers"}


def grpc_frame(message: bytes) -> bytes:
    """One gRPC length-prefixed message (uncompressed): what a unary call's request body is."""
    return b"\x00" + struct.pack(">I", len(message)) + message


@dataclass
class H2loadResult:
    rps: float
    p50_ms: float
    p99_ms: float
    done: int
    succeeded: int
    failed: int  # failed + errored + timed out
    status_2xx: int
    non_2xx: int  # 3xx, 4xx and 5xx answers
    data_bytes: int  # response DATA received: every answered call's one message, nothing else

    @property
    def errors(self) -> int:
        """Calls answered with another status than 2xx, or failed, reset or timed out. (``done`` is not
        compared with the statuses: h2load counts the status of a call still in flight when the run ends
        but not the call, so 2xx may exceed ``done``.)"""
        return self.non_2xx + self.failed

    def unanswered(self, message_size: int) -> int:
        """:attr:`errors`, and the calls done without their one response message of ``message_size``."""
        return self.errors + max(0, self.done - self.data_bytes // message_size)


def h2load(
    url: str,
    *,
    seconds: float,
    connections: int,
    streams: int,
    cpus: str,
    data: Path,
    headers: dict[str, str],
    log: Path,
) -> H2loadResult:
    """One closed-loop h2load run (h2c with prior knowledge, one thread, ``connections`` x ``streams``
    calls in flight) POSTing ``data`` on every stream, pinned to ``cpus``; percentiles from its per-request
    log."""
    cmd = ["taskset", "-c", cpus, "h2load", "-D", str(max(1, round(seconds))), "-t", "1"]
    cmd += ["-c", str(connections), "-m", str(streams), "-d", str(data), "--log-file", str(log)]
    for name, value in headers.items():
        cmd += ["-H", f"{name}: {value}"]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=False, timeout=seconds + 60)
    text = out.stdout
    m_rps = re.search(r"finished in \S+, ([\d.]+) req/s", text)
    m_req = re.search(
        r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout",
        text,
    )
    m_codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    m_data = re.search(r"\((\d+)\) data", text)
    if out.returncode != 0 or not (m_rps and m_req and m_codes and m_data):
        raise BenchError(f"h2load failed ({out.returncode}): {text[-800:]} {out.stderr[-500:]}")
    lat = sorted(int(line.split("\t")[2]) / 1000 for line in log.read_text().splitlines() if line.count("\t") >= 2)
    done, ok, failed, errored, timeouts = (int(x) for x in m_req.groups())

    def q(p: float) -> float:
        return lat[min(len(lat) - 1, max(0, int(p * len(lat) + 0.999999) - 1))] if lat else float("nan")

    return H2loadResult(
        rps=float(m_rps.group(1)),
        p50_ms=q(0.5),
        p99_ms=q(0.99),
        done=done,
        succeeded=ok,
        failed=failed + errored + timeouts,
        status_2xx=int(m_codes.group(1)),
        non_2xx=sum(int(m_codes.group(i)) for i in (2, 3, 4)),
        data_bytes=int(m_data.group(1)),
    )


def envoy_grpc_proxy(port: int, admin_port: int, upstream_port: int) -> dict[str, object]:
    """A static Envoy bootstrap: an HTTP listener that takes HTTP/1.1 and h2c (codec AUTO) and routes
    everything to one cluster spoken to in HTTP/2 (the origin on loopback), no timeout, no access log."""

    def address(p: int) -> dict[str, object]:
        return {"socket_address": {"address": "127.0.0.1", "port_value": p}}

    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
        "HttpConnectionManager",
        "stat_prefix": "grpc",
        "codec_type": "AUTO",
        "route_config": {
            "name": "origin",
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "origin", "timeout": "0s"}}],
                }
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            }
        ],
    }
    return {
        "admin": {"address": address(admin_port)},
        "static_resources": {
            "listeners": [
                {
                    "name": "grpc",
                    "address": address(port),
                    "filter_chains": [
                        {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "origin",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "origin",
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address(upstream_port)}}]}],
                    },
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                }
            ],
        },
        "layered_runtime": {
            "layers": [{"name": "static", "static_layer": {"overload.global_downstream_max_connections": 100000}}]
        },
    }


class Envoy:
    """One Envoy process (``--concurrency 1``: one worker) with a static bootstrap, pinned to ``cpus``."""

    def __init__(self, workdir: Path, binary: Path, cpus: str) -> None:
        self.dir = workdir
        self.binary = binary
        self.cpus = cpus
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, port: int, bootstrap: dict[str, object]) -> Envoy:
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "envoy.json"
        conf.write_text(json.dumps(bootstrap, indent=1))
        log = self.dir / "envoy.log"
        argv = [str(self.binary), "-c", str(conf), "--disable-hot-restart", "--concurrency", "1"]
        argv += ["--log-level", "warning", "--drain-time-s", "1", "--parent-shutdown-time-s", "2"]
        self.proc = subprocess.Popen(
            ["taskset", "-c", self.cpus, *argv],
            stdout=subprocess.DEVNULL,
            stderr=log.open("ab"),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        _wait_listening(self.proc, port, "envoy", log)
        return self

    def stop(self) -> None:
        _stop(self.proc)


GRPC_ORIGIN_SRC = Path(__file__).with_name("grpc-origin")


def grpc_go_version() -> str:
    """The grpc-go release the Go origin is built with (from its go.mod)."""
    m = re.search(r"google\.golang\.org/grpc (v\S+)", (GRPC_ORIGIN_SRC / "go.mod").read_text())
    return m.group(1) if m else "?"


def go_grpc_origin(log: Callable[[str], None] = print) -> Path | None:
    """The Go gRPC origin (``benchmarks/grpc-origin``), built once into the binaries' cache and again when
    its sources change; None when no Go toolchain is found or the build fails (the caller falls back)."""
    from elasti_istio.localcluster.binaries import cache_dir

    sources = [GRPC_ORIGIN_SRC / n for n in ("main.go", "go.mod", "go.sum")]
    stamp = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    out = cache_dir() / "bin" / "bench-grpc-origin"
    version = out.with_name(out.name + ".version")
    if out.is_file() and os.access(out, os.X_OK) and version.exists() and version.read_text().strip() == stamp:
        return out
    go = shutil.which("go") or ("/usr/local/go/bin/go" if os.access("/usr/local/go/bin/go", os.X_OK) else None)
    if go is None:
        log("  no Go toolchain: the gRPC origin is grpcio's server")
        return None
    build = cache_dir() / "build"
    build.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, GOFLAGS="-mod=readonly", CGO_ENABLED="0", GOTOOLCHAIN="local")
    env.setdefault("GOCACHE", str(build / "gocache"))
    log(f"  building the gRPC origin (Go, grpc-go {grpc_go_version()}) into {out}")
    tmp = out.with_name(out.name + ".tmp")
    res = subprocess.run(
        [go, "build", "-trimpath", "-ldflags", "-s -w", "-o", str(tmp), "."],
        cwd=GRPC_ORIGIN_SRC,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    if res.returncode != 0:
        log(f"  the Go build failed, the gRPC origin is grpcio's server: {res.stderr.strip()[-500:]}")
        return None
    tmp.replace(out)
    version.write_text(stamp + "\n")
    return out


class GrpcOrigin:
    """The gRPC origin, pinned to ``cpus``: every unary call is answered with its request message and
    status OK. Go's grpc-go server when it can be built, else grpcio's (``benchmarks.grpc_origin``)."""

    def __init__(self, workdir: Path, cpus: str, log: Callable[[str], None] = print) -> None:
        self.dir = workdir
        self.cpus = cpus
        self.binary = go_grpc_origin(log)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def label(self) -> str:
        if self.binary is not None:
            return f"Go grpc-go {grpc_go_version()}"
        return f"Python grpcio {_dist_version('grpcio')}"

    def start(self, port: int) -> GrpcOrigin:
        self.dir.mkdir(parents=True, exist_ok=True)
        log = self.dir / "grpc-origin.log"
        if self.binary is not None:
            argv = [str(self.binary), "-addr", f"127.0.0.1:{port}"]
        else:
            argv = [sys.executable, "-m", "benchmarks.grpc_origin", "--port", str(port)]
        self.proc = _pinned(argv, self.cpus, log)
        _wait_listening(self.proc, port, "the gRPC origin", log, timeout=30)
        return self

    def stop(self) -> None:
        _stop(self.proc)


class H2ServerProc:
    """One of the HTTP/2 server stacks of ``benchmarks.h2_servers`` in a process of its own, pinned to ``cpus``."""

    def __init__(self, workdir: Path, server: str, cpus: str) -> None:
        self.dir, self.server, self.cpus = workdir, server, cpus
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, port: int) -> H2ServerProc:
        self.dir.mkdir(parents=True, exist_ok=True)
        log = self.dir / f"h2-server-{self.server}.log"
        argv = [sys.executable, "-m", "benchmarks.h2_servers", "--server", self.server, "--port", str(port)]
        self.proc = _pinned(argv, self.cpus, log)
        _wait_listening(self.proc, port, f"the {self.server} HTTP/2 server", log, timeout=30)
        return self

    def stop(self) -> None:
        _stop(self.proc)


def _pinned(argv: list[str], cpus: str, log: Path) -> subprocess.Popen[bytes]:
    """``argv`` started from the project's root on ``cpus``, its output appended to ``log``."""
    return subprocess.Popen(
        ["taskset", "-c", cpus, *argv],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        cwd=_root(),
    )


def _dist_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"
