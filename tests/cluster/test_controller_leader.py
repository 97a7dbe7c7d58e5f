"""Leader election: only the Lease holder acts and serves wakes; a killed leader is replaced."""

from __future__ import annotations

import signal
from pathlib import Path

from tests.cluster.test_controller_lifecycle import activator_dests, bookinfo, phase, vs_spec
from tests.conftest import K8s
from tests.harness import ControllerProc, http_json, scale, wait_until


def readyz(p: ControllerProc) -> int:
    try:
        return http_json("GET", p.metrics_url + "/readyz", timeout=2)[0]
    except OSError:
        return 0


def test_only_the_leader_acts_and_a_killed_leader_is_replaced(
    k8s: K8s,
    namespace: str,
    cluster,  # type: ignore
    tmp_path: Path,
) -> None:
    bookinfo(k8s, namespace)
    flags = ("--leader-election", "--leader-election-namespace", namespace, "--lease-seconds", "4")
    procs = [
        ControllerProc(cluster.admin_kubeconfig, namespace, tmp_path / f"c{i}.log", *flags).start() for i in range(2)
    ]
    try:

        def one_leader() -> ControllerProc | None:
            codes = [readyz(p) for p in procs]
            return procs[codes.index(200)] if sorted(codes) == [200, 503] else None

        leader = wait_until(one_leader, 60, "exactly one ready replica")
        follower = procs[1 - procs.index(leader)]
        assert (leader_gauge(leader), leader_gauge(follower)) == (1.0, 0.0)
        code, body = follower.wake(namespace, "details")
        assert code == 503 and "not the leader" in body["error"]
        lease = k8s.custom.get_namespaced_custom_object(  # type: ignore[attr-defined]
            "coordination.k8s.io", "v1", namespace, "leases", "elasti-controller"
        )
        assert lease["spec"]["holderIdentity"].endswith(f"_{leader.proc.pid}")  # type: ignore[union-attr]

        scale(k8s, namespace, "details-v1", 0)
        wait_until(lambda: activator_dests(vs_spec(k8s, namespace, "details")), what="leader proxies")

        leader.kill(signal.SIGKILL)
        wait_until(lambda: readyz(follower) == 200, 30, "the follower takes over")
        assert follower.wake(namespace, "details")[0] == 202
        wait_until(lambda: phase(k8s, namespace, "details") == "Serving", what="new leader wakes and restores")
        assert k8s.apps.read_namespaced_deployment("details-v1", namespace).spec.replicas == 1  # type: ignore
    finally:
        for p in procs:
            p.stop()
            print(p.log_path.name, p.logs()[-2000:])


def leader_gauge(p: ControllerProc) -> float:
    line = next(x for x in p.metrics().splitlines() if x.startswith("elasti_controller_leader "))
    return float(line.split()[1])


def test_without_leader_election_the_replica_says_it_acts(start_controller) -> None:  # type: ignore[no-untyped-def]
    ctrl = start_controller()
    wait_until(lambda: leader_gauge(ctrl) == 1.0, 30, "elasti_controller_leader 1 without leader election")
