"""API resources and well-known names used across the project."""

from __future__ import annotations

from elasti_istio.kube.client import Resource

# Written by the VirtualService rewrite (pure, so the names live there): the header naming an
# ElastiService's queue, the route token beside it (elasti_istio.routekey), the restore annotation.
from elasti_istio.vsrewrite import HEADER as HEADER
from elasti_istio.vsrewrite import RESTORE_ANNOTATION
from elasti_istio.vsrewrite import TOKEN_HEADER as TOKEN_HEADER

GROUP = "elasti.truefoundry.com"
VERSION = "v1alpha1"

ELASTISERVICES = Resource(GROUP, VERSION, "elastiservices", kind="ElastiService")
VIRTUALSERVICES = Resource("networking.istio.io", "v1beta1", "virtualservices", kind="VirtualService")
DESTINATIONRULES = Resource("networking.istio.io", "v1beta1", "destinationrules", kind="DestinationRule")
DEPLOYMENTS = Resource("apps", "v1", "deployments", kind="Deployment")
STATEFULSETS = Resource("apps", "v1", "statefulsets", kind="StatefulSet")
REPLICASETS = Resource("apps", "v1", "replicasets", kind="ReplicaSet")
ROLLOUTS = Resource("argoproj.io", "v1alpha1", "rollouts", kind="Rollout")
SCALEDOBJECTS = Resource("keda.sh", "v1alpha1", "scaledobjects", kind="ScaledObject")
SERVICES = Resource("", "v1", "services", kind="Service")
PODS = Resource("", "v1", "pods", kind="Pod")
EVENTS = Resource("", "v1", "events", kind="Event")
NODES = Resource("", "v1", "nodes", namespaced=False, kind="Node")
LEASES = Resource("coordination.k8s.io", "v1", "leases", kind="Lease")
NAMESPACES = Resource("", "v1", "namespaces", namespaced=False, kind="Namespace")
VALIDATING_WEBHOOKS = Resource(
    "admissionregistration.k8s.io",
    "v1",
    "validatingwebhookconfigurations",
    namespaced=False,
    kind="ValidatingWebhookConfiguration",
)
CRDS = Resource(
    "apiextensions.k8s.io", "v1", "customresourcedefinitions", namespaced=False, kind="CustomResourceDefinition"
)
ENDPOINTSLICES_V1 = Resource("discovery.k8s.io", "v1", "endpointslices", kind="EndpointSlice")

# Annotations and labels.
ANN_BIND = f"{GROUP}/elastiservice"
ANN_ORIGINAL_ROUTES = RESTORE_ANNOTATION
# On an ElastiService: a wake or a sleep asked for (any value; the controller acts, then removes it).
ANN_WAKE_REQUESTED = f"{GROUP}/wake-requested"
ANN_SLEEP_REQUESTED = f"{GROUP}/sleep-requested"
ANN_SIM_STARTUP = f"{GROUP}/sim-startup-seconds"
ANN_SIM_FORWARD = f"{GROUP}/sim-forward"
ANN_SIM_READINESS_URL = f"{GROUP}/sim-readiness-url"
