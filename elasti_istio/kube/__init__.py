"""A small asyncio Kubernetes client on aiohttp, shared by the controller, activator and simulators.

The official ``kubernetes`` package is used only to read kubeconfig files; every call on an event
loop goes through :class:`~elasti_istio.kube.client.Kube`, so nothing blocks the loop.
"""

from elasti_istio.kube.client import Gone, Kube, KubeError, Resource
from elasti_istio.kube.config import KubeConnection, load_connection

__all__ = ["Gone", "Kube", "KubeConnection", "KubeError", "Resource", "load_connection"]
