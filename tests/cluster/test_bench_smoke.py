"""``make bench`` in miniature, so that the benchmarks keep working: every figure is produced and every
request of the run succeeded. Nothing here judges speed."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import tools

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
BURST = 50  # the --quick burst size
RATE = 200  # the --quick open-loop rate

FIGURES = [
    # 1. cold starts
    "cold_overhead_p50_ms",
    "cold_overhead_p99_ms",
    "cold_start_p50_ms",
    "cold_start_p99_ms",
    # 2. switches, from watch timestamps and from the controller's histogram
    "switch_to_proxy_p50_ms",
    "switch_to_proxy_p99_ms",
    "switch_to_serve_p50_ms",
    "switch_to_serve_p99_ms",
    "controller_switch_proxy_mean_ms",
    "controller_switch_serve_mean_ms",
    # 3. burst
    f"burst_{BURST}_success",
    f"burst_{BURST}_drain_after_ready_s",
    f"burst_{BURST}_activator_peak_rss_mib",
    # 4. throughput, closed and open loop, and the ratios
    *(f"throughput_{t}_{m}" for t in ("direct", "nginx", "activator") for m in ("rps", "p50_ms", "p99_ms")),
    *(f"throughput_{t}_cpu_us_per_request" for t in ("activator", "trailers")),
    "throughput_trailers_over_activator_cpu",
    "throughput_activator_over_nginx",
    "throughput_activator_over_direct",
    *(f"fixed_{RATE}_{t}_p99_ms" for t in ("direct", "nginx", "activator")),
    # 5. warm path
    "warm_web_rps",
    "warm_plain_rps",
    "warm_with_over_without_elastiservice",
    # 6. gRPC: warm unary calls on one core, and cold starts of a gRPC call beside HTTP's
    *(f"grpc_{t}_{m}" for t in ("direct", "envoy", "activator") for m in ("calls_per_s", "p50_ms", "p99_ms")),
    "grpc_activator_cpu_us_per_call",
    "grpc_envoy_cpu_us_per_call",
    "grpc_activator_over_envoy",
    *(f"grpc_single_{t}_p50_ms" for t in ("direct", "envoy", "activator")),
    *(f"{k}_cold_{m}" for k in ("grpc", "http") for m in ("overhead_p50_ms", "overhead_p90_ms", "warm_p50_ms")),
    # 6c. the HTTP/2 server stack alone: the activator's beside Hypercorn (in the test extra)
    *(f"h2_stack_{t}_{m}" for t in ("activator", "hypercorn") for m in ("calls_per_s", "cpu_us_per_call")),
    "h2_stack_hypercorn_over_activator_cpu",
]


def test_quick_benchmark_produces_every_figure(tmp_path: Path) -> None:
    if tools.missing_tools():
        subprocess.run(["bash", str(tools.INSTALL_SCRIPT)], check=False, timeout=600)
    if tools.missing_tools():
        pytest.skip(f"cannot install {tools.missing_tools()} (benchmarks/install-tools.sh needs root or sudo)")
    out = tmp_path / "results.json"
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out), "--state-dir", str(tmp_path / "state")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert run.returncode == 0, f"benchmark failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    results = json.loads(out.read_text())

    missing = [f for f in FIGURES if f not in results]
    assert not missing, f"figures not produced: {missing}\n{run.stdout[-3000:]}"
    bad = [f for f in FIGURES if not isinstance(results[f], int | float) or math.isnan(results[f])]
    assert not bad, f"figures that are not numbers: {[(f, results[f]) for f in bad]}"

    # Every request of the run succeeded.
    assert results["cold_cycles"] == 2 and results["cold_failures"] == 0
    assert results[f"burst_{BURST}_success"] == BURST and results[f"burst_{BURST}_failed"] == 0
    assert results[f"burst_{BURST}_held_peak"] == BURST  # all of them were held at once
    assert results[f"burst_{BURST}_cold_answers"] == BURST
    assert results["throughput_trailers_errors"] == 0
    for t in ("direct", "nginx", "activator"):
        assert results[f"throughput_{t}_errors"] == 0, t
        assert results[f"fixed_{RATE}_{t}_failed"] == 0, t
    assert results["warm_web_errors"] == 0 and results["warm_plain_errors"] == 0
    for t in ("direct", "envoy", "activator"):
        assert results[f"grpc_{t}_calls"] > 0 and results[f"grpc_{t}_failed"] == 0, t
        assert results[f"grpc_single_{t}_failed"] == 0, t
    assert results["h2_stack_calls"] > 0 and results["h2_stack_calls_without_answer_message"] == 0
    assert results["grpc_calls_without_answer_message"] == 0
    for k in ("grpc", "http"):
        assert results[f"{k}_cold_cycles"] == 2 and results[f"{k}_cold_failures"] == 0, k

    machine = results["machine"]
    for key in ("cpu_model", "cores", "kernel", "python", "aiohttp", "kopf", "pinning"):
        assert machine.get(key), key
    assert results["nofile_soft"] == results["nofile_hard"]
    assert "| figure" in run.stdout  # the table was printed
