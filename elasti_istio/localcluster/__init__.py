"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager and
a kubelet stand-in, for tests and the playground."""
