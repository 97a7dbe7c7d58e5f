"""``elasti-istio cluster up|down|status``."""

from __future__ import annotations

import argparse
import sys

from elasti_istio import options
from elasti_istio.localcluster.binaries import BinariesMissing
from elasti_istio.localcluster.cluster import DEFAULT_STATE_DIR, ClusterError, LocalCluster


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "cluster",
        help="run a local Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager, kubelet stand-in)",
        description="A real Kubernetes control plane on loopback with the ElastiService, Istio, KEDA and Argo "
        "Rollouts CRDs installed. Pods are played by a kubelet stand-in that serves a test app on "
        "127.x.y.z addresses.",
    )
    csub = p.add_subparsers(dest="cluster_cmd", required=True, metavar="{up,down,status}")
    up = csub.add_parser("up", help="start the cluster in the background; prints the admin kubeconfig path last")
    down = csub.add_parser("down", help="stop every process of the cluster and remove its state dir")
    status = csub.add_parser("status", help="show which components run and the kubeconfig paths")
    for q in (up, down, status):
        options.add(q, "--state-dir", default=DEFAULT_STATE_DIR, help="where state, logs and kubeconfigs live")
    options.add(up, "--apiserver-port", type=int, default=0, help="kube-apiserver port on 127.0.0.1 (0: a free one)")
    options.add(up, "--startup-seconds", type=float, default=1.0, help="default delay before a Pod turns Ready")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        if args.cluster_cmd == "up":
            cluster = LocalCluster(
                args.state_dir, apiserver_port=args.apiserver_port, startup_seconds=args.startup_seconds
            )
            info = cluster.up()
            print(f"kubectl --kubeconfig {info.admin_kubeconfig} get nodes,crds", file=sys.stderr)
            print(info.admin_kubeconfig)
            return 0
        cluster = LocalCluster(args.state_dir)
        if args.cluster_cmd == "down":
            cluster.down()
            return 0
        state = cluster.read_state()
        if state is None:
            print(f"no cluster in {cluster.state_dir}")
            return 1
        alive = cluster.component_status(state)
        for name, ok in alive.items():
            print(f"{name:26} {'running' if ok else 'NOT RUNNING'}  pid {state['procs'].get(name, {}).get('pid')}")
        healthy = cluster.apiserver_healthy(state)
        print(f"{'api server':26} {state['server']} ({'ready' if healthy else 'not ready'})")
        info = cluster.info(state)
        print(f"{'pod addresses':26} {info.pod_cidr} on node {info.node_name}, network namespace {state['netns']}")
        print(f"{'ingress gateway':26} {info.gateway_url} (Envoy admin {info.gateway_admin})")
        print(f"{'istiod':26} {info.istiod}/debug/syncz")
        print(f"{'logs':26} {cluster.state_dir / 'logs'}")
        print(f"{'controller kubeconfig':26} {info.controller_kubeconfig}")
        print(f"{'activator kubeconfig':26} {info.activator_kubeconfig}")
        print(info.admin_kubeconfig)
        return 0 if all(alive.values()) and healthy else 1
    except (ClusterError, BinariesMissing) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
