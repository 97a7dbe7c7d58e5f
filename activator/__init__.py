"""The elasti activator: holds requests for a workload at zero replicas until it is ready, then forwards them.

It only receives traffic while a VirtualService is in proxy mode; the ``elasti-service`` header the
mesh sets picks the ElastiService whose hold settings, readiness and origin address apply.
"""
