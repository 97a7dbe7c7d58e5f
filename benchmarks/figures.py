"""Figures 1-5 of the benchmark (figure 6, gRPC, is in ``grpc_figures``); each adds numbers to ``results``
and rows to the printed table."""

from __future__ import annotations

import gc
import json
import statistics
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import system as S
from benchmarks import tools as T
from elasti_istio import routekey
from elasti_istio.controller.workloads import pod_is_ready
from elasti_istio.playground.procs import ActivatorProc, free_ports
from elasti_istio.playground.stack import Playground

PROXY_CPU, CLIENT_CPU = "0", "1"


@dataclass
class Settings:
    cycles: int = 20
    bursts: tuple[int, ...] = (1000, 10000)
    burst_startup: float = 6.0
    wrk_seconds: float = 5.0
    wrk_connections: int = 50
    rounds: int = 3
    rate: float = 1000.0
    rate_seconds: float = 10.0
    warm_seconds: float = 3.0
    warm_rounds: int = 5
    settle: float = 0.3  # after a switch, for istiod's push (debounced 100 ms) to reach the Envoys
    grpc_connections: int = 10  # figure 6: h2load's connections, each with grpc_streams calls in flight
    grpc_streams: int = 10

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            cycles=2,
            bursts=(50,),
            burst_startup=1.5,
            wrk_seconds=1.0,
            wrk_connections=16,
            rounds=1,
            rate=200.0,
            rate_seconds=1.0,
            warm_seconds=1.0,
            warm_rounds=1,
        )


@dataclass
class Context:
    pg: Playground
    settings: Settings
    workdir: Path
    results: dict[str, Any] = field(default_factory=dict)
    rows: list[tuple[str, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    log: Callable[[str], None] = print

    @property
    def bench(self) -> S.Bench:
        assert self.pg.api is not None
        return S.Bench(self.pg.api)

    @property
    def kubelet_log(self) -> Path:
        return self.pg.logs_dir / "kubelet.log"

    def put(self, name: str, value: float | int) -> None:
        self.results[name] = round(value, 4) if isinstance(value, float) else value

    def row(self, figure: str, value: str, target: str = "") -> None:
        self.rows.append((figure, value, target))


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (with 20 samples p99 is the largest one)."""
    s = sorted(values)
    if not s:
        return float("nan")
    import math

    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def ms(v: float) -> str:
    return f"{v * 1000:.1f} ms"


# ---- figures 1 and 2: cold starts and switches ------------------------------------------------------
def put_to_sleep(ctx: Context, rec: S.Recorder, name: str) -> float | None:
    """Scales ``name`` to zero and waits for a clean sleep.

    Returns the proxy switch latency: from just before the scale request is sent to the watch event of
    the VirtualService in proxy mode (the request's own trip and the watch delivery count against us).
    """
    t0 = time.time()
    ctx.bench.scale(name, 0)
    S.until(lambda: ctx.bench.asleep(name), f"{name} asleep (proxy mode, no pod left)", timeout=120)
    t_vs = rec.first(t0, "VirtualService", name, S.vs_proxied)
    time.sleep(ctx.settings.settle)
    return (t_vs - t0) if t_vs is not None else None


def cold_starts(ctx: Context, rec: S.Recorder) -> None:
    s, b = ctx.settings, ctx.bench
    overhead, whole, to_proxy, to_serve, pod_watch, patch_rtt = [], [], [], [], [], []
    # On the path: the activator hears of the ready pod from its wake call within a millisecond, so the
    # answer waits for the mesh to learn of the endpoint: Kubernetes' EndpointSlice controller, then
    # istiod (debounce, then a push to the activator's sidecar), then Envoy, the activator and the app.
    steps: dict[str, list[float]] = {
        "ready_to_endpointslice_event": [],
        "endpointslice_event_to_istiod_push": [],
        "istiod_push_to_answer": [],
    }
    # Beside it, for comparison: the ElastiService status (other activator replicas) and the workload's own.
    aside: dict[str, list[float]] = {"ready_to_es_status_event": [], "ready_to_deployment_event": []}
    failures = 0
    for i in range(s.cycles):
        sw = put_to_sleep(ctx, rec, "cold")
        if sw is not None:
            to_proxy.append(sw)
        # This process times the answer: a garbage collection of its own must not land inside a measured
        # wake (the events are recorded in another process).
        gc.collect()
        gc.disable()
        try:
            t_send = time.time()
            status, headers, body, t_done = S.sidecar_get(
                ctx.pg.client_url(80), f"http://{S.authority('cold')}{S.APP_PATH}"
            )
        finally:
            gc.enable()
        if status != 200 or headers.get("x-elasti-cold-start") != "true":
            failures += 1
            ctx.log(f"  cycle {i}: unexpected answer {status} {headers.get('x-elasti-cold-start')} {body[:100]!r}")
            continue
        _, ack, sent = S.pod_ready_after(ctx.kubelet_log, "cold", t_send)
        overhead.append(t_done - ack)
        whole.append(t_done - t_send)
        patch_rtt.append(ack - sent)
        S.until(lambda: b.serving("cold"), "cold Serving again")
        t_dep = rec.first(t_send, "Deployment", "cold", S.deployment_ready)
        t_vs = rec.first(t_send, "VirtualService", "cold", lambda o: not S.vs_proxied(o))
        if t_dep is not None and t_vs is not None:
            to_serve.append(t_vs - t_dep)
        t_pod = rec.first(t_send, "Pod", "cold-", pod_is_ready)
        if t_pod is not None:
            pod_watch.append(t_pod - ack)
        t_es = rec.first(t_send, "ElastiService", "cold", S.es_ready)
        t_eps = rec.first(t_send, "EndpointSlice", "cold-elasti-origin-", S.slice_ready)
        t_push = rec.first(t_eps, "EDSPush", "elasti-activator-", lambda _o: True) if t_eps is not None else None
        if t_eps is not None and t_push is not None and t_push <= t_done:
            steps["ready_to_endpointslice_event"].append(t_eps - ack)
            steps["endpointslice_event_to_istiod_push"].append(t_push - t_eps)
            steps["istiod_push_to_answer"].append(t_done - t_push)
        if t_es is not None:
            aside["ready_to_es_status_event"].append(t_es - ack)
        if t_dep is not None:
            aside["ready_to_deployment_event"].append(t_dep - ack)
        since_ready = ", ".join(
            f"{what} +{ms(t - ack)}"
            for what, t in (
                ("status event", t_es),
                ("EndpointSlice event", t_eps),
                ("istiod push", t_push),
                ("serve routes event", t_vs),
            )
            if t
        )
        ctx.log(
            f"  cycle {i + 1}/{s.cycles}: Ready→answer {ms(t_done - ack)} ({since_ready}), cold start "
            f"{ms(t_done - t_send)}, to proxy {ms(to_proxy[-1]) if to_proxy else '-'}, "
            f"to serve {ms(to_serve[-1]) if to_serve else '-'}"
        )
    ctx.put("cold_cycles", len(overhead))
    ctx.put("cold_failures", failures)
    if overhead:
        ctx.put("cold_overhead_p50_ms", pct(overhead, 0.5) * 1000)
        ctx.put("cold_overhead_p99_ms", pct(overhead, 0.99) * 1000)
        ctx.put("cold_start_p50_ms", pct(whole, 0.5) * 1000)
        ctx.put("cold_start_p99_ms", pct(whole, 0.99) * 1000)
        ctx.put("ready_patch_rtt_p50_ms", pct(patch_rtt, 0.5) * 1000)
        ctx.row(
            f"1. cold-start overhead, pod Ready → held answer complete ({len(overhead)} wakes)",
            f"p50 {ms(pct(overhead, 0.5))}, p99 {ms(pct(overhead, 0.99))}",
            "p99 <= 20 ms",
        )
        ctx.row(
            "1. whole cold start, request → answer (startup delay 1 s)",
            f"p50 {ms(pct(whole, 0.5))}, p99 {ms(pct(whole, 0.99))}",
        )
    if pod_watch:
        ctx.put("pod_ready_watch_delay_p50_ms", pct(pod_watch, 0.5) * 1000)
    for parts, label, sep in (
        (
            steps,
            "1. where it goes (p50): Ready → origin EndpointSlice event → istiod EDS push to the activator's "
            "sidecar → answer",
            " + ",
        ),
        (aside, "1. for comparison (p50): Ready → ElastiService status event; Ready → Deployment ready event", "; "),
    ):
        if all(parts.values()):
            for k, v in parts.items():
                ctx.put(f"cold_{k}_p50_ms", pct(v, 0.5) * 1000)
            ctx.row(label, sep.join(ms(pct(v, 0.5)) for v in parts.values()))
    for label, vals, key in (
        ("replicas=0 → VirtualService proxy", to_proxy, "switch_to_proxy"),
        ("target ready → VirtualService serve", to_serve, "switch_to_serve"),
    ):
        if vals:
            ctx.put(f"{key}_p50_ms", pct(vals, 0.5) * 1000)
            ctx.put(f"{key}_p99_ms", pct(vals, 0.99) * 1000)
            ctx.row(
                f"2. switch {label} (watch timestamps, {len(vals)})",
                f"p50 {ms(pct(vals, 0.5))}, p99 {ms(pct(vals, 0.99))}",
                "p99 <= 100 ms",
            )
    controller_histogram(ctx)
    not_ready = activator_counter(ctx, "elasti_activator_mesh_not_ready_total", "cold")
    if overhead and not_ready is not None:
        ctx.put("cold_mesh_not_ready_per_wake", not_ready / len(overhead))
        ctx.row(
            "1. forwards the mesh answered 'no healthy upstream' (sent again), per wake",
            f"{not_ready / len(overhead):.2f}",
        )


def scrape(base_url: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of a ``/metrics`` exposition: (name, labels, value)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(base_url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def activator_counter(ctx: Context, metric: str, name: str) -> float | None:
    """One counter of the activator for ``bench/<name>``."""
    assert ctx.pg.activator is not None
    want = {"namespace": S.NS, "name": name}
    return next((v for n, labels, v in scrape(ctx.pg.activator.admin_url) if n == metric and labels == want), None)


def controller_histogram(ctx: Context) -> None:
    """The controller's own ``elasti_controller_switch_seconds`` for ``bench/cold``: mean and the p99 bucket."""
    assert ctx.pg.controller is not None
    samples = scrape(ctx.pg.controller.metrics_url)
    hist = "elasti_controller_switch_seconds"
    for mode in ("proxy", "serve"):
        mine = [
            (n, labels, v) for n, labels, v in samples if labels.get("name") == "cold" and labels.get("mode") == mode
        ]
        buckets = sorted((float(labels["le"]), v) for n, labels, v in mine if n == hist + "_bucket")
        total = sum(v for n, _, v in mine if n == hist + "_sum")
        count = sum(v for n, _, v in mine if n == hist + "_count")
        if count:
            p99_le = next((le for le, c in buckets if c >= 0.99 * count), float("inf"))
            ctx.put(f"controller_switch_{mode}_mean_ms", total / count * 1000)
            ctx.put(f"controller_switch_{mode}_p99_bucket_ms", p99_le * 1000)
            ctx.row(
                f"2. controller's histogram, switch to {mode} ({int(count)})",
                f"mean {ms(total / count)}, p99 <= {ms(p99_le)} (bucket)",
            )


# ---- figure 3: bursts ------------------------------------------------------------------------------
def burst(ctx: Context, rec: S.Recorder, n: int) -> None:
    pg = ctx.pg
    assert pg.activator is not None and pg.activator.pid is not None
    pid = pg.activator.pid
    put_to_sleep(ctx, rec, "burst")
    peak_reset = T.reset_peak_rss(pid)
    rss_before = T.status_kib(pid, "VmRSS")
    cmd = T.loadgen_cmd(
        "0-1",
        "burst",
        "--port",
        str(pg.ports.activator),
        "--n",
        str(n),
        "--target",
        S.APP_PATH,
        "--host-header",
        S.authority("burst"),
        "--header",
        f"elasti-service: {S.NS}/burst",
        "--header",
        f"elasti-token: {_token(pg, 'burst')}",
        "--timeout",
        "150",
    )
    t_start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=T._root())
    peak = {"held": 0, "rss": rss_before, "fds": 0}
    stop = threading.Event()

    def sample() -> None:
        url = f"{pg.activator.admin_url}/v1/pending/{S.NS}/burst"  # type: ignore[union-attr]
        while not stop.is_set():
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    peak["held"] = max(peak["held"], int(json.loads(resp.read())["pending"]))
                peak["rss"] = max(peak["rss"], T.status_kib(pid, "VmRSS"))
                peak["fds"] = max(peak["fds"], T.open_fds(pid))
            except (OSError, ValueError, KeyError):
                pass
            stop.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate(timeout=300)
    stop.set()
    sampler.join(5)
    if proc.returncode != 0:
        raise T.BenchError(f"burst generator failed: {err[-800:]}")
    res = json.loads(out.strip().splitlines()[-1])
    _, ack, _ = S.pod_ready_after(ctx.kubelet_log, "burst", t_start)
    ok = int(res["statuses"].get("200", 0))
    hwm = T.status_kib(pid, "VmHWM") if peak_reset else 0
    rss_mib = max(hwm, peak["rss"]) / 1024
    drain = (res["last_done"] - ack) if res.get("last_done") else float("nan")
    ctx.put(f"burst_{n}_success", ok)
    ctx.put(f"burst_{n}_failed", n - ok)
    ctx.put(f"burst_{n}_held_peak", peak["held"])
    ctx.put(f"burst_{n}_cold_answers", int(res.get("cold", 0)))
    ctx.put(f"burst_{n}_drain_after_ready_s", drain)
    ctx.put(f"burst_{n}_activator_peak_rss_mib", rss_mib)
    ctx.put(f"burst_{n}_activator_peak_fds", peak["fds"])
    ctx.row(
        f"3. burst of {n} held on one ElastiService",
        f"{ok}/{n} answered 200 (held at once: {peak['held']}), drain after Ready {drain:.2f} s, "
        f"activator peak RSS {rss_mib:.0f} MiB",
        "all answered, RSS <= 300 MB" if n >= 10000 else "all answered",
    )
    if res.get("errors") or ok != n:
        ctx.notes.append(f"burst {n}: statuses {res['statuses']}, errors {res['errors']}")
    S.until(lambda: ctx.bench.serving("burst"), "burst Serving again")


def _token(pg: Any, name: str) -> str:
    """The route token of bench/<name> under the playground's route key (what its routes carry)."""
    return str(routekey.KeyFile(str(pg.route_key)).token(S.NS, name))


# ---- figure 4: activator throughput for late traffic -----------------------------------------------
def second_activator(
    ctx: Context, log_name: str, upstream: int, port: int, admin_port: int, *flags: str
) -> ActivatorProc:
    """An activator process beside the playground's, for bench/web (ready: every request is forwarded at
    once), sending its upstream requests to ``127.0.0.1:upstream`` as to its sidecar; ``flags``: more of
    its flags."""
    pg = ctx.pg
    assert pg.info is not None and pg.controller is not None
    return ActivatorProc(
        pg.info.activator_kubeconfig,
        pg.logs_dir / log_name,
        *flags,
        "--namespace",
        S.NS,
        "--route-key-file",
        str(pg.route_key),
        controller_url=pg.controller.base_url,
        upstream_proxy=f"http://127.0.0.1:{upstream}",
        port=port,
        admin_port=admin_port,
        log_level="warning",
    )


def throughput(ctx: Context, baseline: Path | None = None) -> None:
    """``baseline``: also an activator run from the code in that folder (another commit's worktree), in the
    same rounds against the same backend."""
    s, pg = ctx.settings, ctx.pg
    assert pg.info is not None and pg.controller is not None
    ports_ = free_ports(8, avoid=tuple(vars(pg.ports).values()))
    p_backend, p_proxy, p_act, p_admin, p_base, p_base_admin, p_trl, p_trl_admin = ports_
    backend = T.Nginx(ctx.workdir / "nginx-backend", T.BACKEND.format(port=p_backend), CLIENT_CPU)
    nginx = T.Nginx(ctx.workdir / "nginx-proxy", T.PROXY.format(port=p_proxy, upstream=p_backend), PROXY_CPU)

    # A second activator process, pinned, whose upstream "sidecar" is the backend nginx: it answers the
    # activator's absolute-URI requests for the origin of bench/web itself, like the direct target.
    act = second_activator(ctx, "activator-throughput.log", p_backend, p_act, p_admin)
    # The same with --http1-trailers: aiohttp's Python parser reads every HTTP/1.1 request.
    trl = second_activator(ctx, "activator-throughput-trailers.log", p_backend, p_trl, p_trl_admin, "--http1-trailers")
    base: ActivatorProc | None = None
    if baseline is not None:
        base = second_activator(ctx, "activator-throughput-baseline.log", p_backend, p_base, p_base_admin)
        # Its code first on the path; no working directory ahead of it (`python -m` would put one there).
        base.env = {"PYTHONPATH": str(baseline.resolve()), "PYTHONSAFEPATH": "1"}
    try:
        backend.start(p_backend)
        nginx.start(p_proxy)
        for proc in (act, trl, base):
            if proc is not None:
                proc.start()
                proc.wait_ready()
                assert proc.pid is not None
                T.pin(proc.pid, PROXY_CPU)
        # The route token is checked on every request, as in a real install.
        signed = {"elasti-service": f"{S.NS}/web", "elasti-token": _token(pg, "web")}
        lua_act = T.wrk_script(ctx.workdir / "activator.lua", headers=signed)
        S.until(lambda: _status(f"{act.url}/", signed) == 200, "activator forwards web")
        targets = {
            "direct": (f"http://127.0.0.1:{p_backend}/", None, None),
            "nginx": (f"http://127.0.0.1:{p_proxy}/", None, nginx.proc.pid if nginx.proc else None),
            "activator": (f"http://127.0.0.1:{p_act}/", lua_act, act.pid),
            "trailers": (f"http://127.0.0.1:{p_trl}/", lua_act, trl.pid),
        }
        S.until(lambda: _status(f"{trl.url}/", signed) == 200, "activator with --http1-trailers forwards web")
        if base is not None:
            S.until(lambda: _status(f"{base.url}/", signed) == 200, "baseline activator forwards web")
            targets["baseline"] = (f"http://127.0.0.1:{p_base}/", lua_act, base.pid)
        runs: dict[str, list[tuple[T.WrkResult, float]]] = {k: [] for k in targets}
        for _ in range(s.rounds):
            for name, (url, lua, pid) in targets.items():
                cpu0 = T.cpu_seconds(pid) if pid else 0.0
                r = T.wrk(url, seconds=s.wrk_seconds, connections=s.wrk_connections, cpus=CLIENT_CPU, lua=lua)
                cpu = (T.cpu_seconds(pid) - cpu0) if pid else 0.0
                runs[name].append((r, cpu))
                ctx.log(
                    f"  wrk {name}: {r.rps:.0f} req/s, p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms"
                    + (f", {cpu / r.requests * 1e6:.0f} µs CPU/request" if pid and r.requests else "")
                )
        # The activator against the baseline's, round by round (each pair ran back to back).
        paired: dict[str, list[float]] = {"rps": [], "cpu": []}
        for (a, ca), (b, cb) in zip(runs["activator"], runs.get("baseline", []), strict=False):
            paired["rps"].append(a.rps / b.rps)
            if a.requests and b.requests and cb:
                paired["cpu"].append((ca / a.requests) / (cb / b.requests))
        # --http1-trailers against the default, round by round.
        trailer_cpu = [
            (ct / t.requests) / (ca / a.requests)
            for (a, ca), (t, ct) in zip(runs["activator"], runs["trailers"], strict=True)
            if a.requests and t.requests and ca
        ]
        med: dict[str, T.WrkResult] = {}
        for name, rs in runs.items():
            rs.sort(key=lambda x: x[0].rps)
            r, cpu = rs[len(rs) // 2]
            med[name] = r
            ctx.put(f"throughput_{name}_rps", r.rps)
            ctx.put(f"throughput_{name}_p50_ms", r.p50_ms)
            ctx.put(f"throughput_{name}_p99_ms", r.p99_ms)
            ctx.put(f"throughput_{name}_errors", r.errors + r.non_2xx)
            if targets[name][2] and r.requests:
                us = cpu / r.requests * 1e6
                ctx.put(f"throughput_{name}_cpu_us_per_request", us)
                ctx.put(f"throughput_{name}_rps_per_cpu_second", 1e6 / us if us else 0.0)
        ctx.put("throughput_activator_over_nginx", med["activator"].rps / med["nginx"].rps)
        ctx.put("throughput_activator_over_direct", med["activator"].rps / med["direct"].rps)
        labels = {"baseline": f"activator from {baseline}", "trailers": "activator with --http1-trailers"}
        text = ""
        if paired["rps"]:
            ctx.put("throughput_activator_over_baseline", median(paired["rps"]))
            text = f"req/s {median(paired['rps']):.3f} (rounds: {', '.join(f'{x:.3f}' for x in paired['rps'])})"
            if paired["cpu"]:
                ctx.put("throughput_activator_over_baseline_cpu", median(paired["cpu"]))
                text += (
                    f"; CPU per request {median(paired['cpu']):.3f} "
                    f"(rounds: {', '.join(f'{x:.3f}' for x in paired['cpu'])})"
                )
        for name in targets:
            r = med[name]
            extra = ""
            if f"throughput_{name}_cpu_us_per_request" in ctx.results:
                extra = f", {ctx.results[f'throughput_{name}_cpu_us_per_request']:.0f} µs CPU/request"
            ctx.row(
                f"4. closed loop ({s.wrk_connections} keep-alive conns, wrk): {labels.get(name, name)}",
                f"{r.rps:,.0f} req/s, p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms{extra}",
                ">= 3,000 req/s (stretch 10,000)" if name == "activator" else "",
            )
        ctx.row(
            "4. ratios (same run)",
            f"activator/nginx {ctx.results['throughput_activator_over_nginx']:.3f}, "
            f"activator/direct {ctx.results['throughput_activator_over_direct']:.3f}",
            "stretch: activator/nginx ~0.35",
        )
        if trailer_cpu:
            ctx.put("throughput_trailers_over_activator_cpu", median(trailer_cpu))
            ctx.row(
                "4. CPU per request, --http1-trailers / default, same rounds (median of the rounds' ratios)",
                f"{median(trailer_cpu):.3f} (rounds: {', '.join(f'{x:.3f}' for x in trailer_cpu)})",
            )
        if paired["rps"]:
            ctx.row(f"4. activator / activator from {baseline}, same rounds (median of the rounds' ratios)", text)
        # Open loop at a fixed rate: the same generator for every target, in turn, `rounds` times; the
        # median run by p99 is reported (one stall of the shared machine should not decide a p99 alone).
        rate = int(s.rate)
        fixed: dict[str, list[dict[str, Any]]] = {name: [] for name in targets if name != "trailers"}
        ports = {"direct": p_backend, "nginx": p_proxy, "activator": p_act, "baseline": p_base}
        for _ in range(s.rounds):
            for name in fixed:
                port = ports[name]
                hdr = f"elasti-service: {S.NS}/web" if name in ("activator", "baseline") else None
                args = ["rate", "--port", str(port), "--rate", str(s.rate), "--duration", str(s.rate_seconds)]
                args += ["--conns", "50", "--timeout", "30"]
                if hdr:
                    args += ["--header", hdr, "--header", f"elasti-token: {_token(pg, 'web')}"]
                res = T.run_loadgen(CLIENT_CPU, *args, timeout=s.rate_seconds + 90)
                fixed[name].append(res)
                ctx.log(f"  {rate} req/s {name}: p50 {float(res['p50_ms']):.2f} ms, p99 {float(res['p99_ms']):.2f} ms")
        for name, runs_ in fixed.items():
            runs_.sort(key=lambda r: float(r["p99_ms"]))
            res = runs_[len(runs_) // 2]
            ok = sum(int(r["statuses"].get("200", 0)) for r in runs_)
            total = sum(int(r["requests"]) for r in runs_)
            ctx.put(f"fixed_{rate}_{name}_p50_ms", float(res["p50_ms"]))
            ctx.put(f"fixed_{rate}_{name}_p99_ms", float(res["p99_ms"]))
            ctx.put(f"fixed_{rate}_{name}_p99_worst_ms", float(runs_[-1]["p99_ms"]))
            ctx.put(f"fixed_{rate}_{name}_ok", ok)
            ctx.put(f"fixed_{rate}_{name}_failed", total - ok)
            ctx.row(
                f"4. open loop at {rate} req/s ({len(runs_)} x {s.rate_seconds:g} s, Python generator): "
                f"{labels.get(name, name)}",
                f"p50 {float(res['p50_ms']):.2f} ms, p99 {float(res['p99_ms']):.2f} ms (median run; worst "
                f"{float(runs_[-1]['p99_ms']):.2f} ms), {ok}/{total} ok",
                "p99 <= 20 ms" if name == "activator" else "",
            )
    finally:
        act.stop(10)
        trl.stop(10)
        if base is not None:
            base.stop(10)
        nginx.stop()
        backend.stop()


def _status(url: str, headers: dict[str, str]) -> int:
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


# ---- figure 5: warm path ---------------------------------------------------------------------------
def warm_path(ctx: Context) -> None:
    s, pg = ctx.settings, ctx.pg
    S.until(lambda: ctx.bench.serving("web"), "web Serving")
    scripts = {
        name: T.wrk_script(ctx.workdir / f"warm-{name}.lua", headers={"Host": S.gateway_host(name)}, target=S.APP_PATH)
        for name in ("web", "plain")
    }
    for name in ("web", "plain"):
        S.until(
            lambda n=name: S.gateway_status(pg.gateway_url, S.gateway_host(n)) == 200,
            f"{name} through the gateway",
        )
    runs: dict[str, list[T.WrkResult]] = {"web": [], "plain": []}
    # The Envoy gateway on CPU 0, the apps (kubelet stand-in) with wrk on CPU 1, for the time of the runs:
    # both paths then see the same share of the machine, run after run, in turn.
    kubelet = pg.cluster.procs.get("kubelet")
    gateway = pg.cluster.procs.get("ingress-gateway")
    mesh_pid = gateway.pid if gateway else None
    cpu_us: dict[str, list[float]] = {"web": [], "plain": []}
    pinned = [(p, cpu) for p, cpu in ((mesh_pid, PROXY_CPU), (kubelet.pid if kubelet else None, CLIENT_CPU)) if p]
    for pid, cpu in pinned:
        T.pin(pid, cpu)
    try:
        for _ in range(max(1, s.warm_rounds)):
            for name in ("plain", "web"):
                cpu0 = T.cpu_seconds(mesh_pid) if mesh_pid else 0.0
                r = T.wrk(
                    pg.gateway_url + "/", seconds=s.warm_seconds, connections=16, cpus=CLIENT_CPU, lua=scripts[name]
                )
                runs[name].append(r)
                if mesh_pid and r.requests:
                    cpu_us[name].append((T.cpu_seconds(mesh_pid) - cpu0) / r.requests * 1e6)
                ctx.log(f"  warm {name}: {r.rps:.0f} req/s, p99 {r.p99_ms:.2f} ms, errors {r.errors + r.non_2xx}")
    finally:
        for pid, _ in pinned:
            T.pin(pid, "0-1")
    med = {k: sorted(v, key=lambda r: r.rps)[len(v) // 2] for k, v in runs.items()}
    for name, r in med.items():
        ctx.put(f"warm_{name}_rps", r.rps)
        ctx.put(f"warm_{name}_p99_ms", r.p99_ms)
        ctx.put(f"warm_{name}_errors", r.errors + r.non_2xx)
    ratio = med["web"].rps / med["plain"].rps
    ctx.put("warm_with_over_without_elastiservice", ratio)
    extra = ""
    if cpu_us["web"] and cpu_us["plain"]:
        # The gateway's CPU per request does not depend on what else the machine is doing.
        cw, cp = median(cpu_us["web"]), median(cpu_us["plain"])
        ctx.put("warm_web_mesh_cpu_us_per_request", cw)
        ctx.put("warm_plain_mesh_cpu_us_per_request", cp)
        ctx.put("warm_mesh_cpu_with_over_without_elastiservice", cw / cp)
        extra = f"; gateway CPU per request {cw:.0f} / {cp:.0f} µs, ratio {cw / cp:.3f}"
    ctx.row(
        f"5. warm path through the Envoy ingress gateway (serve mode), with / without an ElastiService "
        f"({len(runs['web'])} runs each)",
        f"{med['web'].rps:,.0f} / {med['plain'].rps:,.0f} req/s, ratio {ratio:.3f}{extra}",
        "~1.0",
    )


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
