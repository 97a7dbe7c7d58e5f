"""Which DestinationRules a route's subsets come from, by Istio's lookup rules: pure functions.

Istio looks for the DestinationRule of a host in the client's namespace first, then in the Service's
namespace, then in the root configuration namespace, and only among rules exported to the client's
namespace (``exportTo``). Rules for the same host in the namespace that wins are merged. The
VirtualService's namespace stands for the client's: it is where its routes are written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

HostMatches = Callable[[str, str], bool]  # (DestinationRule host, its namespace) -> is it the Service?


def exported_to(rule: dict[str, Any], namespace: str) -> bool:
    """Whether a DestinationRule is visible in ``namespace``: no ``exportTo`` (or ``*``) means everywhere,
    ``.`` its own namespace, ``~`` nowhere, else the namespaces listed."""
    own = (rule.get("metadata") or {}).get("namespace", "")
    export = (rule.get("spec") or {}).get("exportTo")
    if not export:
        return True
    return any(e == "*" or e == namespace or (e == "." and own == namespace) for e in export if isinstance(e, str))


def rules_for(
    client_namespace: str,
    service_namespace: str,
    root_namespace: str,
    rules_by_namespace: Mapping[str, list[dict[str, Any]]],
    host_matches: HostMatches,
) -> list[dict[str, Any]]:
    """The DestinationRules that apply to the Service for a client in ``client_namespace``: those of the
    first namespace (client's, Service's, root) that has one for the host and exports it there."""
    for ns in dict.fromkeys((client_namespace, service_namespace, root_namespace)):
        found = [
            r
            for r in rules_by_namespace.get(ns) or []
            if host_matches(str((r.get("spec") or {}).get("host", "")), ns) and exported_to(r, client_namespace)
        ]
        if found:
            return found
    return []
