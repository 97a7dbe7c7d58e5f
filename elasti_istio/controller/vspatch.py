"""The write that puts a VirtualService in a new mode: a JSON Patch, pure.

A JSON merge patch cannot carry ``null`` (it means "delete"), so null-valued fields of the routes
would be lost on the way; a JSON Patch replaces ``spec.http`` exactly. Its first operation tests the
resourceVersion read, so a concurrent edit fails the patch and is re-read instead of overwritten.

``spec.http`` is an atomic list: whoever writes it last owns all of it (server-side apply's
``managedFields``). Back in serve mode the controller gives that ownership up, so that a GitOps
tool's ``kubectl apply --server-side`` of a route change does not conflict with it.
"""

from __future__ import annotations

import copy
from typing import Any

from elasti_istio.vsrewrite import RESTORE_ANNOTATION

_ANN_PATH = "/metadata/annotations/" + RESTORE_ANNOTATION.replace("~", "~0").replace("/", "~1")


def build(vs: dict[str, Any], new_spec: dict[str, Any], annotation: str | None) -> list[dict[str, Any]] | None:
    """The operations that turn ``vs`` into one with ``new_spec['http']`` and the restore annotation
    ``annotation`` (None: absent); None when nothing would change."""
    meta = vs.get("metadata") or {}
    spec = vs.get("spec") or {}
    annotations = meta.get("annotations")
    ops: list[dict[str, Any]] = []
    if new_spec.get("http") != spec.get("http"):
        ops.append({"op": "replace" if "http" in spec else "add", "path": "/spec/http", "value": new_spec.get("http")})
    current = (annotations or {}).get(RESTORE_ANNOTATION)
    if annotation != current:
        if annotation is None:
            ops.append({"op": "remove", "path": _ANN_PATH})
        elif annotations is None:
            ops.append({"op": "add", "path": "/metadata/annotations", "value": {RESTORE_ANNOTATION: annotation}})
        else:
            ops.append({"op": "add", "path": _ANN_PATH, "value": annotation})
    if not ops:
        return None
    return [{"op": "test", "path": "/metadata/resourceVersion", "value": meta.get("resourceVersion")}, *ops]


MANAGER = "elasti-controller"  # the controller's field manager (from its User-Agent)


def _prune(fields: dict[str, Any], path: tuple[str, ...]) -> bool:
    """Removes ``path`` from a FieldsV1 tree, and parents left empty; True when something was removed."""
    head, *rest = path
    if head not in fields:
        return False
    if rest:
        child = fields[head]
        if not isinstance(child, dict) or not _prune(child, tuple(rest)):
            return False
        if child:
            return True
    del fields[head]
    return True


def release_http(vs: dict[str, Any], manager: str = MANAGER) -> list[dict[str, Any]] | None:
    """The JSON Patch that drops ``manager``'s ownership of ``spec.http`` and of the restore annotation
    (an entry left owning nothing goes); None when it owns neither. For a VirtualService in serve mode
    for every ElastiService (no restore annotation): its routes are the user's again."""
    meta = vs.get("metadata") or {}
    if RESTORE_ANNOTATION in (meta.get("annotations") or {}):
        return None
    entries = meta.get("managedFields") or []
    out: list[dict[str, Any]] = []
    changed = False
    for entry in entries:
        if entry.get("manager") != manager or entry.get("operation") != "Update" or entry.get("subresource"):
            out.append(entry)
            continue
        fields = copy.deepcopy(entry.get("fieldsV1") or {})
        removed = _prune(fields, ("f:spec", "f:http"))
        removed |= _prune(fields, ("f:metadata", "f:annotations", f"f:{RESTORE_ANNOTATION}"))
        changed |= removed
        if fields:
            out.append({**entry, "fieldsV1": fields})
    if not changed:
        return None
    return [
        {"op": "test", "path": "/metadata/resourceVersion", "value": meta.get("resourceVersion")},
        # An empty list would leave managedFields as they are; one empty entry clears them.
        {"op": "replace", "path": "/metadata/managedFields", "value": out or [{}]},
    ]
