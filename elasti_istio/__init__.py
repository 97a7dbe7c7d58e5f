"""elasti-istio: scale-to-zero for HTTP services routed by Istio VirtualServices."""

__version__ = "0.1.0"
