"""``elasti-istio demo`` as a user runs it: its own cluster in its own state dir, beside the session's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from elasti_istio.localcluster.cluster import ClusterInfo, pod_network

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

STEPS = (
    "[1] start the local cluster",
    "[2] install elasti-system",
    "[3] start the activator and the controller",
    "[4] deploy Bookinfo in namespace bookinfo",
    "[5] scale details-v1 to 0, as KEDA would",
    "weight 100  sets elasti-service: bookinfo/details",
    "[6] GET /productpage through the ingress gateway",
    "held by the activator",
    "the controller scaled details-v1 to 1",
    "the page is complete",
    "[7] routes restored",
    "Timeline",
    "All steps passed.",
)


def own_state_dir(base: Path, cluster: ClusterInfo) -> Path:
    """A state dir whose pod network (range, namespace) differs from the session cluster's."""
    taken = pod_network(cluster.state_dir)
    return next(
        d
        for i in range(50)
        if (net := pod_network(d := base / f"demo-{i}")).octet != taken.octet and net.ident != taken.ident
    )


def processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd:
                found.append(f"{pid}: {cmd[:200]}")
    return found


def test_demo_runs_the_story_and_leaves_nothing_running(cluster: ClusterInfo, tmp_path: Path) -> None:
    state = own_state_dir(tmp_path, cluster)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELASTI_")}
    proc = subprocess.run(
        [sys.executable, "-m", "elasti_istio", "demo", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    out = proc.stdout
    print(out, proc.stderr[-3000:])
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{out[-4000:]}\n{proc.stderr[-2000:]}"
    positions = [out.find(step) for step in STEPS]
    missing = [s for s, p in zip(STEPS, positions, strict=True) if p < 0]
    assert not missing, f"not narrated: {missing}"
    assert positions == sorted(positions), "steps out of order"
    assert not processes_mentioning(str(state)), "processes left behind"
    assert not pod_network(state).exists(), "the demo's network namespace was left behind"
    assert (state / "logs" / "controller.log").exists() and (state / "logs" / "activator.log").exists()
