"""The elasti-istio controller: a kopf operator for ElastiServices."""
