"""Sample workloads for the playground's users: the generic test app (any image that is not Bookinfo's
runs it) with its Service, a VirtualService and, optionally, an ElastiService."""

from __future__ import annotations

from typing import Any

GROUP, VERSION = "elasti.truefoundry.com", "v1alpha1"


def web_app(
    name: str = "web",
    *,
    kind: str = "Deployment",
    replicas: int = 1,
    ports: tuple[int, ...] = (8080,),
    hold_timeout: str = "30s",
    startup_seconds: float | None = None,
    elastiservice: bool = True,
    prestop_sleep: float | None = None,
    queue_limit: int = 1000,
    image: str = "e2e/httpbin",
) -> list[dict[str, Any]]:
    """A workload running the generic test app, its Service (port 80), a VirtualService and an ElastiService."""
    labels = {"app": name}
    container: dict[str, Any] = {"name": "app", "image": image, "ports": [{"containerPort": p} for p in ports]}
    if prestop_sleep is not None:
        container["lifecycle"] = {"preStop": {"exec": {"command": ["sleep", f"{prestop_sleep:g}"]}}}
    template: dict[str, Any] = {"metadata": {"labels": labels}, "spec": {"containers": [container]}}
    if startup_seconds is not None:
        template["metadata"]["annotations"] = {"elasti.truefoundry.com/sim-startup-seconds": str(startup_seconds)}
    spec: dict[str, Any] = {"replicas": replicas, "selector": {"matchLabels": labels}, "template": template}
    if kind == "StatefulSet":
        spec["serviceName"] = name
    docs: list[dict[str, Any]] = [
        {"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": name}, "spec": spec},
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name},
            "spec": {"selector": labels, "ports": [{"name": "http", "port": 80, "targetPort": ports[0]}]},
        },
        {
            "apiVersion": "networking.istio.io/v1beta1",
            "kind": "VirtualService",
            "metadata": {"name": name},
            "spec": {"hosts": [name], "http": [{"route": [{"destination": {"host": name}}]}]},
        },
    ]
    if elastiservice:
        docs.append(
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "ElastiService",
                "metadata": {"name": name},
                "spec": {
                    "service": name,
                    "scaleTargetRef": {"apiVersion": "apps/v1", "kind": kind, "name": name},
                    "virtualServices": [name],
                    "minTargetReplicas": 1,
                    "activator": {"holdTimeout": hold_timeout, "retryInterval": "100ms", "queueLimit": queue_limit},
                },
            }
        )
    return docs
