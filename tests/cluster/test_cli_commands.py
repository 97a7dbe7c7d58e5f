"""``elasti-istio status``, ``wake`` and ``sleep`` against a running controller and activator."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

from tests.cluster.test_controller_lifecycle import bookinfo, phase
from tests.conftest import K8s, MeshInfo
from tests.harness import Proc, events_for, free_port, http_json, scale, wait_until


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "elasti_istio", *args], capture_output=True, text=True, timeout=120)


def test_status_wake_and_sleep(
    k8s: K8s,
    namespace: str,
    cluster,
    start_controller: Any,
    mesh: MeshInfo,  # type: ignore
    tmp_path: Path,
) -> None:
    bookinfo(k8s, namespace)
    ctrl = start_controller()
    wake_base = ctrl.wake_url.rsplit("/v1/", 1)[0]
    listen, admin = free_port(), free_port()
    # The activator's controller is unreachable, so a request it holds stays held while we look.
    activator = Proc(
        [
            "activator",
            "--kubeconfig",
            str(cluster.admin_kubeconfig),
            "--namespace",
            namespace,
            "--listen",
            f"127.0.0.1:{listen}",
            "--admin-listen",
            f"127.0.0.1:{admin}",
            "--controller-url",
            f"http://127.0.0.1:{free_port()}",
            "--sidecar-address",
            mesh.client,
        ],
        tmp_path / "activator.log",
    ).start()
    held: dict[str, Any] = {}
    try:
        wait_until(
            lambda: http_json("GET", f"http://127.0.0.1:{admin}/readyz", timeout=2)[0] == 200, what="activator ready"
        )
        scale(k8s, namespace, "details-v1", 0)
        wait_until(lambda: phase(k8s, namespace, "details") == "ScaledToZero", what="ScaledToZero")

        def request() -> None:
            req = urllib.request.Request(
                f"http://127.0.0.1:{listen}/details/0", headers={"elasti-service": f"{namespace}/details"}
            )
            with urllib.request.urlopen(req, timeout=90) as resp:
                held["status"] = resp.status

        t = threading.Thread(target=request)
        t.start()
        base = ["--kubeconfig", str(cluster.admin_kubeconfig)]

        def rows() -> list[dict[str, Any]]:
            out = cli(
                "status", "-n", namespace, *base, "--activator-admin", f"http://127.0.0.1:{admin}", "--output", "json"
            )
            assert out.returncode == 0, out.stderr
            return json.loads(out.stdout)

        details = wait_until(
            lambda: next((r for r in rows() if r["name"] == "details" and r["held"] == 1), None),
            what="one held request shown",
        )
        assert details["phase"] == "ScaledToZero" and details["mode"] == "proxy"
        assert details["boundVirtualServices"] == [f"{namespace}/details"]
        table = cli("status", "-n", namespace, *base, "--activator-admin", f"http://127.0.0.1:{admin}")
        lines = table.stdout.splitlines()
        assert lines[0].split()[:5] == ["NAMESPACE", "NAME", "SERVICE", "PHASE", "MODE"]
        row = next(line.split() for line in lines if " details " in f" {line} ")
        assert row[3:5] == ["ScaledToZero", "proxy"] and row[-1] == "1"

        woken = cli("wake", f"{namespace}/details", "--controller-url", wake_base)
        assert woken.returncode == 0 and "wake accepted" in woken.stdout, woken.stderr
        wait_until(lambda: phase(k8s, namespace, "details") == "Serving", what="woken by the CLI")
        t.join(60)
        assert held.get("status") == 200  # the held request was served once the target was ready

        slept = cli("sleep", f"{namespace}/details", "--controller-url", wake_base, "--output", "json")
        assert slept.returncode == 0 and json.loads(slept.stdout)["status"] == 202
        wait_until(lambda: phase(k8s, namespace, "details") == "ScaledToZero", what="asleep by the CLI")

        # A wake asked by a person says so in its Event (the activator's say a request arrived).
        assert cli("wake", f"{namespace}/details", "--controller-url", wake_base).returncode == 0
        wait_until(
            lambda: any(
                e.reason == "Woken" and "asked to wake (elasti-istio wake)" in e.message
                for e in events_for(k8s, namespace, "details")
            ),
            what="the Woken Event of the CLI's wake",
        )

        missing = cli("wake", f"{namespace}/nope", "--controller-url", wake_base)
        assert missing.returncode == 1 and "not found" in missing.stderr
        bad = cli("wake", "no-slash", "--controller-url", wake_base)
        assert bad.returncode == 2 and "NAMESPACE/NAME" in bad.stderr
    finally:
        activator.stop()
        print(activator.logs()[-3000:])
