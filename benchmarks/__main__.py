"""``python -m benchmarks [--quick]``: the whole system on this machine, measured; a table and results.json.

Pinning (two cores): for the activator throughput figure the proxy under test (the activator, or
nginx) runs on CPU 0 and the load generator (wrk, or the open-loop Python generator) with the backend
nginx on CPU 1; the warm path pins the Envoy ingress gateway to CPU 0 and wrk with the apps to CPU 1; the
gRPC figure pins the proxy under test (the activator, or a bare Envoy) to CPU 0 and h2load with the gRPC
origin to CPU 1 (see ``PINNING``, printed at the start and stored in results.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import figures as F
from benchmarks import grpc_figures as G
from benchmarks import system as S
from benchmarks import tools as T
from elasti_istio.playground.stack import Playground

PARTS = ("cold", "burst", "throughput", "warm", "grpc")
PINNING = (
    "figure 4: proxy under test (activator or nginx) on CPU 0; wrk / the open-loop generator and the backend nginx "
    "on CPU 1. Figure 5: the Envoy ingress gateway on CPU 0, wrk and the apps (kubelet stand-in) on CPU 1. "
    "Figure 6: the proxy under test (activator or Envoy) on CPU 0, h2load and the gRPC origin on CPU 1; its "
    "cold starts unpinned. Figures 1-3: nothing pinned. Otherwise the cluster (etcd, kube-apiserver, "
    "kube-controller-manager, istiod, kubelet stand-in, the Envoy sidecars) and the controller run unpinned."
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: few cycles, small bursts, 1 s load runs")
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"), help="results file")
    p.add_argument("--state-dir", type=Path, help="cluster state and logs (default: a temporary directory)")
    p.add_argument("--only", action="append", choices=PARTS, help="run only these (repeatable)")
    p.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="figure 4 also measures an activator run from the code in DIR (a git worktree of another commit), "
        "in the same rounds",
    )
    p.add_argument("--rounds", type=int, help="rounds of figures 4 and 6a, each target in turn (default 3; --quick: 1)")
    args = p.parse_args(argv)

    limits = T.raise_nofile()
    missing = T.missing_tools()
    if missing:
        print(f"missing tools: {', '.join(missing)}; run {T.INSTALL_SCRIPT} (or make bench)", file=sys.stderr)
        return 2
    settings = F.Settings.quick() if args.quick else F.Settings()
    if args.rounds:
        settings.rounds = args.rounds
    mach = T.machine()
    print(
        f"machine: {mach['cpu_model']}, {mach['cores']} cores, Linux {mach['kernel']}, Python {mach['python']}, "
        f"aiohttp {mach['aiohttp']}, kopf {mach['kopf']}, uvloop {mach['uvloop']}; load average at start "
        f"{mach['loadavg_at_start']:.2f}"
    )
    print(
        f"open files: soft limit {limits['nofile_soft_before']} raised to {limits['nofile_soft']} "
        f"(hard {limits['nofile_hard']}), for this process and everything it starts"
    )
    print(f"pinning: {PINNING}")

    tmp = tempfile.TemporaryDirectory(prefix="elasti-bench-")
    state = args.state_dir or Path(tmp.name) / "state"
    workdir = Path(tmp.name) / "work"
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    pg = Playground(state, startup_seconds=1.0, log=lambda m: print(f"  {m}", flush=True))
    ctx = F.Context(pg, settings, workdir, log=lambda m: print(m, flush=True))
    only = set(args.only or PARTS)
    rec: S.Recorder | None = None
    try:
        print("starting the system", flush=True)
        info = pg.start_cluster()
        pg.install_system()
        pg.start_mesh_client()
        pg.start_activator()
        pg.start_controller()
        assert pg.api is not None
        pg.api.ensure_namespace(S.NS)
        rec = S.Recorder(info.admin_kubeconfig, info.istiod).start()
        docs = S.workload("cold", elastiservice=True)
        docs += S.workload(
            "burst", elastiservice=True, startup=settings.burst_startup, queue_limit=max(settings.bursts)
        )
        docs += S.workload("web", elastiservice=True) + S.workload("plain", elastiservice=False)
        docs += [S.gateway()]
        waking = ["cold", "burst", "web"]
        if "grpc" in only:
            docs += S.grpc_workload(G.GRPC_COLD)
            waking.append(G.GRPC_COLD)
        pg.api.apply_all(docs, S.NS)
        for name in waking:
            S.until(lambda n=name: ctx.bench.serving(n), f"{name} Serving", timeout=120)
        print(f"system up in {time.monotonic() - t0:.1f}s", flush=True)

        if "cold" in only:
            print(f"figures 1-2: {settings.cycles} wake cycles of bench/cold", flush=True)
            F.cold_starts(ctx, rec)
        if "burst" in only:
            for n in settings.bursts:
                print(f"figure 3: burst of {n}", flush=True)
                F.burst(ctx, rec, n)
        if "throughput" in only:
            print("figure 4: activator throughput for late traffic", flush=True)
            F.throughput(ctx, baseline=args.baseline)
        if "warm" in only:
            print("figure 5: warm path", flush=True)
            F.warm_path(ctx)
        if "grpc" in only:
            print("figure 6: gRPC, warm unary calls on one core", flush=True)
            G.grpc_throughput(ctx)
            print("figure 6c: the HTTP/2 server stack alone, the activator's beside Hypercorn", flush=True)
            G.h2_server_stacks(ctx)
            print(
                f"figure 6: gRPC, {settings.cycles} wake cycles of bench/{G.GRPC_COLD}, each with one of bench/cold",
                flush=True,
            )
            G.grpc_cold_starts(ctx, rec)
    finally:
        if rec is not None:
            rec.stop()
        pg.stop()
        tmp.cleanup()

    results = dict(ctx.results)
    results.update({k: v for k, v in limits.items() if k in ("nofile_soft_before", "nofile_soft", "nofile_hard")})
    results["machine"] = {**mach, "pinning": PINNING, "mode": "quick" if args.quick else "full"}
    args.out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print()
    print(table(ctx.rows))
    for note in ctx.notes:
        print(f"note: {note}")
    print(f"\nwrote {args.out} ({len(ctx.results)} figures) in {time.monotonic() - t0:.0f}s")
    return 0


def table(rows: list[tuple[str, str, str]]) -> str:
    head = ("figure", "measured", "target")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    return "\n".join([line, sep, *body])


if __name__ == "__main__":
    sys.exit(main())
