"""The kubelet stand-in: plays one node of the local cluster (bind, pod addresses, apps, status)."""
