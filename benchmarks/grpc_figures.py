"""Figure 6, gRPC: (a) warm unary calls forwarded on one core, the activator beside a bare Envoy and the
origin itself; (b) the cold-start overhead of a unary gRPC call through the mesh, with an HTTP request's
from the same cycles beside it."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

from benchmarks import system as S
from benchmarks import tools as T
from benchmarks.figures import (
    CLIENT_CPU,
    PROXY_CPU,
    Context,
    _token,
    activator_counter,
    ms,
    pct,
    put_to_sleep,
    second_activator,
)
from elasti_istio.kubelet import grpcecho
from elasti_istio.localcluster.binaries import find as find_binaries
from elasti_istio.playground.procs import free_ports

GRPC_COLD = "grpccold"  # the gRPC workload woken in (b)
MESSAGE = "elasti-bench"  # the request message of every call
COLD_HEADER = "x-elasti-cold-start"


# ---- (a) warm unary calls on one core ----------------------------------------------------------------
def grpc_throughput(ctx: Context) -> None:
    """Unary calls through a second, pinned activator, through a bare Envoy on the same core, and straight to
    the origin, in turn for ``rounds`` rounds (closed loop), then one call at a time."""
    s, pg = ctx.settings, ctx.pg
    assert pg.info is not None and pg.controller is not None
    p_origin, p_envoy, p_envoy_admin, p_act, p_admin = free_ports(5, avoid=tuple(vars(pg.ports).values()))
    origin = T.GrpcOrigin(ctx.workdir / "grpc-origin", CLIENT_CPU, log=ctx.log)
    envoy_bin = find_binaries(install=False)["envoy"]
    envoy = T.Envoy(ctx.workdir / "envoy-grpc", envoy_bin, PROXY_CPU)
    # A second activator process, pinned, for bench/web (ready: every call is forwarded at once). Its
    # HTTP/2 connections for the origin go to the upstream proxy's address, the gRPC origin itself, with
    # `:authority` the origin Service's, as they would go to a forward proxy.
    act = second_activator(ctx, "activator-grpc.log", p_origin, p_act, p_admin)
    frame = T.grpc_frame(grpcecho.EchoRequest(message=MESSAGE).SerializeToString())
    data = ctx.workdir / "grpc-call.bin"
    data.write_bytes(frame)
    try:
        origin.start(p_origin)
        envoy.start(p_envoy, T.envoy_grpc_proxy(p_envoy, p_envoy_admin, p_origin))
        act.start()
        act.wait_ready()
        assert act.pid is not None and envoy.proc is not None
        T.pin(act.pid, PROXY_CPU)
        signed = {"elasti-service": f"{S.NS}/web", "elasti-token": _token(pg, "web")}
        targets: dict[str, tuple[int, dict[str, str], int | None]] = {
            "direct": (p_origin, {}, None),
            "envoy": (p_envoy, {}, envoy.proc.pid),
            "activator": (p_act, signed, act.pid),
        }
        # A sample call with grpcio on every path first: status OK and the message echoed.
        for name, (port, headers, _) in targets.items():
            S.until(
                lambda p=port, h=headers: _call_ok(f"127.0.0.1:{p}", tuple(h.items())),
                f"a gRPC call through {name} answered OK",
                timeout=60,
            )
        url = "http://127.0.0.1:{port}" + grpcecho.method_path("Unary")
        for port, headers, _ in targets.values():  # warm-up, not counted
            T.h2load(
                url.format(port=port),
                seconds=1,
                connections=s.grpc_connections,
                streams=s.grpc_streams,
                cpus=CLIENT_CPU,
                data=data,
                headers={**T.GRPC_HEADERS, **headers},
                log=ctx.workdir / "h2load-warmup.log",
            )
        runs: dict[str, list[tuple[T.H2loadResult, float]]] = {k: [] for k in targets}
        for _ in range(s.rounds):
            for name, (port, headers, pid) in targets.items():
                cpu0 = T.cpu_seconds(pid) if pid else 0.0
                r = T.h2load(
                    url.format(port=port),
                    seconds=s.wrk_seconds,
                    connections=s.grpc_connections,
                    streams=s.grpc_streams,
                    cpus=CLIENT_CPU,
                    data=data,
                    headers={**T.GRPC_HEADERS, **headers},
                    log=ctx.workdir / f"h2load-{name}.log",
                )
                cpu = (T.cpu_seconds(pid) - cpu0) if pid else 0.0
                runs[name].append((r, cpu))
                ctx.log(
                    f"  h2load {name}: {r.rps:.0f} calls/s, p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms"
                    + (f", {cpu / r.done * 1e6:.0f} µs CPU/call" if pid and r.done else "")
                )
        _report_throughput(ctx, runs, origin.label, len(frame))
        # One call at a time: what each hop adds to a call's latency when nothing queues.
        single: dict[str, T.H2loadResult] = {}
        for name, (port, headers, _) in targets.items():
            single[name] = r = T.h2load(
                url.format(port=port),
                seconds=s.wrk_seconds,
                connections=1,
                streams=1,
                cpus=CLIENT_CPU,
                data=data,
                headers={**T.GRPC_HEADERS, **headers},
                log=ctx.workdir / f"h2load-{name}-single.log",
            )
            ctx.log(f"  h2load {name}, one call at a time: p50 {r.p50_ms:.3f} ms, p99 {r.p99_ms:.3f} ms")
            ctx.put(f"grpc_single_{name}_p50_ms", r.p50_ms)
            ctx.put(f"grpc_single_{name}_p99_ms", r.p99_ms)
            ctx.put(f"grpc_single_{name}_failed", r.errors)
        ctx.row(
            "6. one unary gRPC call at a time (1 conn x 1 stream, h2load), p50 / p99: direct, Envoy, activator",
            "; ".join(f"{single[n].p50_ms:.2f} / {single[n].p99_ms:.2f} ms" for n in ("direct", "envoy", "activator")),
        )
    finally:
        act.stop(10)
        envoy.stop()
        origin.stop()


def _call_ok(address: str, metadata: tuple[tuple[str, str], ...]) -> bool:
    import grpc

    code, message, _, _ = S.grpc_unary(address, None, MESSAGE, metadata, timeout=5)
    return code == grpc.StatusCode.OK and message == MESSAGE


def _report_throughput(
    ctx: Context, runs: dict[str, list[tuple[T.H2loadResult, float]]], origin: str, frame_size: int
) -> None:
    s = ctx.settings
    med: dict[str, T.H2loadResult] = {}
    cpu_us: dict[str, float] = {}
    unanswered = 0
    for name, rs in runs.items():
        for r, _ in rs:
            # Every call answered 2xx with its one response message (a gRPC error, the proxies' own
            # included, is a headers-only answer with no message), none failed or reset.
            unanswered += r.unanswered(frame_size)
        rs.sort(key=lambda x: x[0].rps)
        r, cpu = rs[len(rs) // 2]
        med[name] = r
        ctx.put(f"grpc_{name}_calls_per_s", r.rps)
        ctx.put(f"grpc_{name}_p50_ms", r.p50_ms)
        ctx.put(f"grpc_{name}_p99_ms", r.p99_ms)
        ctx.put(f"grpc_{name}_calls", sum(x.done for x, _ in rs))
        ctx.put(f"grpc_{name}_failed", sum(x.errors for x, _ in rs))
        if name != "direct" and r.done:
            cpu_us[name] = cpu / r.done * 1e6
            ctx.put(f"grpc_{name}_cpu_us_per_call", cpu_us[name])
    ctx.put("grpc_calls_without_answer_message", unanswered)
    ctx.put("grpc_activator_over_envoy", med["activator"].rps / med["envoy"].rps)
    ctx.put("grpc_activator_over_direct", med["activator"].rps / med["direct"].rps)
    if "activator" in cpu_us and "envoy" in cpu_us and cpu_us["envoy"]:
        ctx.put("grpc_activator_over_envoy_cpu", cpu_us["activator"] / cpu_us["envoy"])
    conc = f"{s.grpc_connections} conns x {s.grpc_streams} streams"
    labels = {
        "direct": f"direct to the origin ({origin} server, CPU 1)",
        "envoy": "Envoy (static config, h2c in and out, router only)",
        "activator": "activator (h2c in and out)",
    }
    for name, r in med.items():
        extra = f", {cpu_us[name]:.0f} µs CPU/call" if name in cpu_us else ""
        ctx.row(
            f"6. unary gRPC calls, closed loop ({conc}, h2load): {labels[name]}",
            f"{r.rps:,.0f} calls/s, p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms{extra}",
        )
    total = sum(ctx.results[f"grpc_{n}_calls"] for n in runs)
    cpu_ratio = ctx.results.get("grpc_activator_over_envoy_cpu")
    ctx.row(
        "6. gRPC ratios (same run)",
        f"activator/Envoy {ctx.results['grpc_activator_over_envoy']:.3f} by calls/s"
        + (f", {cpu_ratio:.2f} by CPU per call" if cpu_ratio else "")
        + f"; activator/direct {ctx.results['grpc_activator_over_direct']:.3f}; "
        f"{total - unanswered:,}/{total:,} calls answered 200 with their message",
    )


# ---- (c) the HTTP/2 server stack alone -----------------------------------------------------------------
def h2_server_stacks(ctx: Context) -> None:
    """The activator's HTTP/2 protocol beside Hypercorn, each answering the same unary call itself on one
    core (nothing forwarded), in alternating rounds: what the choice of HTTP/2 server costs per call."""
    s = ctx.settings
    stacks = ["activator"]
    hypercorn = T._dist_version("hypercorn")
    if hypercorn != "not installed":
        stacks.append("hypercorn")
    frame = T.grpc_frame(grpcecho.EchoRequest(message=MESSAGE).SerializeToString())
    data = ctx.workdir / "grpc-call.bin"
    data.write_bytes(frame)
    url = "http://127.0.0.1:{port}" + grpcecho.method_path("Unary")
    (port,) = free_ports(1, avoid=tuple(vars(ctx.pg.ports).values()))
    runs: dict[str, list[tuple[float, float]]] = {n: [] for n in stacks}  # (calls/s, µs CPU per call)
    unanswered = total = 0
    for _ in range(s.rounds):
        for name in stacks:
            server = T.H2ServerProc(ctx.workdir / "h2-servers", name, PROXY_CPU).start(port)
            try:
                assert server.proc is not None
                kw = dict(connections=s.grpc_connections, streams=s.grpc_streams, cpus=CLIENT_CPU, data=data)
                T.h2load(url.format(port=port), seconds=1, headers=T.GRPC_HEADERS, log=ctx.workdir / "h2s.log", **kw)
                cpu0 = T.cpu_seconds(server.proc.pid)
                r = T.h2load(
                    url.format(port=port),
                    seconds=s.wrk_seconds,
                    headers=T.GRPC_HEADERS,
                    log=ctx.workdir / f"h2load-stack-{name}.log",
                    **kw,  # type: ignore[arg-type]
                )
                cpu = T.cpu_seconds(server.proc.pid) - cpu0
            finally:
                server.stop()
            total += r.done
            unanswered += r.unanswered(len(frame))
            runs[name].append((r.rps, cpu / r.done * 1e6 if r.done else float("nan")))
            ctx.log(f"  {name}: {r.rps:.0f} calls/s, {runs[name][-1][1]:.0f} µs CPU/call")
    med = {n: sorted(v)[len(v) // 2] for n, v in runs.items()}
    ctx.put("h2_stack_calls", total)
    ctx.put("h2_stack_calls_without_answer_message", unanswered)
    for name, (rps, cpu_us) in med.items():
        ctx.put(f"h2_stack_{name}_calls_per_s", rps)
        ctx.put(f"h2_stack_{name}_cpu_us_per_call", cpu_us)
        label = "the activator's HTTP/2 protocol (h2)" if name == "activator" else f"Hypercorn {hypercorn} (h2, ASGI)"
        ctx.row(
            f"6c. unary gRPC call answered by the server itself, one core: {label}",
            f"{rps:,.0f} calls/s, {cpu_us:.0f} µs CPU/call",
        )
    if "hypercorn" in med:
        ratio = med["hypercorn"][1] / med["activator"][1]
        ctx.put("h2_stack_hypercorn_over_activator_cpu", ratio)
        ctx.row(
            "6c. HTTP/2 server stacks (same run)",
            f"Hypercorn/activator {ratio:.2f} by CPU per call; "
            f"{total - unanswered:,}/{total:,} answered with their message",
        )
    else:
        ctx.row("6c. HTTP/2 server stacks", "Hypercorn not installed (pip install -e '.[bench]'): activator only")


# ---- (b) the cold start of a unary gRPC call ----------------------------------------------------------
def grpc_cold_starts(ctx: Context, rec: S.Recorder) -> None:
    """Wake cycles of the gRPC workload, each followed by one of bench/cold (HTTP), both through the mesh
    client's sidecar: the same measurement as figure 1 for both protocols, in turn."""
    s = ctx.settings
    assert ctx.pg.client is not None
    sidecar = ctx.pg.client

    def grpc_call() -> tuple[bool, bool, float, str]:
        import grpc

        code, message, md, done = S.grpc_unary(
            f"{sidecar}:{S.GRPC_PORT}", f"{S.authority(GRPC_COLD)}:{S.GRPC_PORT}", MESSAGE
        )
        ok = code == grpc.StatusCode.OK and message == MESSAGE
        return ok, md.get(COLD_HEADER) == "true", done, f"{code} {message[:100]!r}"

    def http_call() -> tuple[bool, bool, float, str]:
        status, headers, body, done = S.sidecar_get(ctx.pg.client_url(80), f"http://{S.authority('cold')}{S.APP_PATH}")
        return status == 200, headers.get(COLD_HEADER) == "true", done, f"{status} {body[:100]!r}"

    kinds: dict[str, tuple[str, Callable[[], tuple[bool, bool, float, str]]]] = {
        "grpc": (GRPC_COLD, grpc_call),
        "http": ("cold", http_call),
    }
    steps = ("ready_to_endpointslice", "endpointslice_to_push", "push_to_answer")
    got: dict[str, dict[str, list[float]]] = {k: {n: [] for n in ("overhead", "whole", "warm", *steps)} for k in kinds}
    failures = dict.fromkeys(kinds, 0)
    not_ready0 = {k: _mesh_not_ready(ctx, name) for k, (name, _) in kinds.items()}
    for i in range(s.cycles):
        line = []
        for kind, (name, call) in kinds.items():
            one = _wake(ctx, rec, name, call)
            if one is None:
                failures[kind] += 1
                line.append(f"{kind} failed")
                continue
            for k, v in one.items():
                got[kind][k].append(v)
            split = " + ".join(ms(one[k]) for k in steps if k in one)
            line.append(
                f"{kind} Ready→answer {ms(one['overhead'])} ({split}), cold start {ms(one['whole'])}, "
                f"warm {ms(one['warm']) if 'warm' in one else '-'}"
            )
        ctx.log(f"  cycle {i + 1}/{s.cycles}: " + ", ".join(line))
    for kind in kinds:
        g = got[kind]
        ctx.put(f"{kind}_cold_cycles", len(g["overhead"]))
        ctx.put(f"{kind}_cold_failures", failures[kind])
        if g["overhead"]:
            ctx.put(f"{kind}_cold_overhead_p50_ms", pct(g["overhead"], 0.5) * 1000)
            ctx.put(f"{kind}_cold_overhead_p90_ms", pct(g["overhead"], 0.9) * 1000)
            ctx.put(f"{kind}_cold_start_p50_ms", pct(g["whole"], 0.5) * 1000)
        for k in ("warm", *steps):
            if g[k]:
                ctx.put(f"{kind}_cold_{k}_p50_ms", pct(g[k], 0.5) * 1000)
        if g["overhead"]:
            retried = _mesh_not_ready(ctx, kinds[kind][0]) - not_ready0[kind]
            ctx.put(f"{kind}_cold_mesh_not_ready_per_wake", retried / len(g["overhead"]))
    for kind, label in (("grpc", "unary gRPC call"), ("http", "HTTP GET (bench/cold), same cycles")):
        g = got[kind]
        if not g["overhead"]:
            continue
        tail = ""
        if all(g[k] for k in steps):
            tail = "; where (p50): Ready → EndpointSlice event → istiod push → answer " + " + ".join(
                ms(pct(g[k], 0.5)) for k in steps
            )
        if g["warm"]:
            tail += f"; the same call when serving, fresh connection: p50 {ms(pct(g['warm'], 0.5))}"
        retries = ctx.results.get(f"{kind}_cold_mesh_not_ready_per_wake")
        if retries is not None:
            tail += f"; 'no healthy upstream' per wake {retries:.1f}"
        ctx.row(
            f"6. cold-start overhead through the mesh client's sidecar, pod Ready → answer: {label} "
            f"({len(g['overhead'])} wakes)",
            f"p50 {ms(pct(g['overhead'], 0.5))}, p90 {ms(pct(g['overhead'], 0.9))}; whole cold start p50 "
            f"{ms(pct(g['whole'], 0.5))}{tail}",
        )
    if any(failures.values()):
        ctx.notes.append(f"figure 6 cold starts: failed wakes {failures}")


def _mesh_not_ready(ctx: Context, name: str) -> float:
    """The serving activator's count of forwards for bench/<name> the mesh answered itself (sent again)."""
    return activator_counter(ctx, "elasti_activator_mesh_not_ready_total", name) or 0.0


def _wake(
    ctx: Context, rec: S.Recorder, name: str, call: Callable[[], tuple[bool, bool, float, str]]
) -> dict[str, float] | None:
    """Puts ``name`` to sleep, sends one call that wakes it, and waits until it serves again: the overhead
    (pod Ready → answer complete), the whole cold start, where the overhead went (watch timestamps and
    istiod's pushes), and the same call once the workload serves (the mesh routes to it, not to the
    activator); None when the answer was not a held one that succeeded."""
    put_to_sleep(ctx, rec, name)
    gc.collect()
    gc.disable()  # no collection of this process inside a measured wake
    try:
        t_send = time.time()
        ok, cold, t_done, what = call()
    finally:
        gc.enable()
    try:
        if not (ok and cold):
            ctx.log(f"  {name}: unexpected answer {what} (cold-start header {cold})")
            return None
        _, ack, _ = S.pod_ready_after(ctx.kubelet_log, name, t_send)
        out = {"overhead": t_done - ack, "whole": t_done - t_send}
        t_eps = rec.first(t_send, "EndpointSlice", f"{name}-elasti-origin-", S.slice_ready)
        t_push = rec.first(t_eps, "EDSPush", "elasti-activator-", lambda _o: True) if t_eps is not None else None
        if t_eps is not None and t_push is not None and t_push <= t_done:
            out["ready_to_endpointslice"] = t_eps - ack
            out["endpointslice_to_push"] = t_push - t_eps
            out["push_to_answer"] = t_done - t_push
    finally:
        S.until(lambda: ctx.bench.serving(name), f"{name} Serving again")
    time.sleep(ctx.settings.settle)  # the serve routes reach the mesh client's sidecar
    gc.disable()
    try:
        t_send = time.time()
        ok, cold, t_done, what = call()
    finally:
        gc.enable()
    if ok and not cold:
        out["warm"] = t_done - t_send
    else:
        ctx.log(f"  {name}: unexpected warm answer {what} (cold-start header {cold})")
    return out
