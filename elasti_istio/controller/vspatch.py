"""The write that puts a VirtualService in a new mode: a JSON Patch, pure.

A JSON merge patch cannot carry ``null`` (it means "delete"), so null-valued fields of the routes
would be lost on the way; a JSON Patch replaces ``spec.http`` exactly. Its first operation tests the
resourceVersion read, so a concurrent edit fails the patch and is re-read instead of overwritten.
"""

from __future__ import annotations

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
