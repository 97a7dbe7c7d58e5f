"""The mesh stand-in: an ingress gateway and an outbound (sidecar) proxy that route like Istio's Envoys.

Tests and the playground use it where a real cluster has Istio: it follows the live VirtualServices,
DestinationRules, Gateways, Services and EndpointSlices, and answers its own errors the way Envoy does.
"""
