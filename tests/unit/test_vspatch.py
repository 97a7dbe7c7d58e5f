from elasti_istio.controller import vspatch
from elasti_istio.vsrewrite import RESTORE_ANNOTATION

PATH = "/metadata/annotations/elasti.truefoundry.com~1original-routes"


def vs(annotations: dict | None = None) -> dict:
    meta = {"name": "d", "resourceVersion": "7"}
    if annotations is not None:
        meta["annotations"] = annotations
    return {"metadata": meta, "spec": {"hosts": ["d"], "http": [{"route": [{"destination": {"host": "d"}}]}]}}


def test_nothing_to_do() -> None:
    v = vs()
    assert vspatch.build(v, v["spec"], None) is None


def test_replace_routes_keeps_nulls_and_tests_the_version() -> None:
    new = {"http": [{"retries": {"retryRemoteLocalities": None}, "route": []}]}
    ops = vspatch.build(vs({}), new, '{"a":1}')
    assert ops == [
        {"op": "test", "path": "/metadata/resourceVersion", "value": "7"},
        {"op": "replace", "path": "/spec/http", "value": new["http"]},
        {"op": "add", "path": PATH, "value": '{"a":1}'},
    ]


def test_annotation_added_to_absent_map_and_removed() -> None:
    v = vs(None)
    assert vspatch.build(v, v["spec"], "x")[1:] == [  # type: ignore[index]
        {"op": "add", "path": "/metadata/annotations", "value": {RESTORE_ANNOTATION: "x"}}
    ]
    v = vs({RESTORE_ANNOTATION: "x", "other": "kept"})
    assert vspatch.build(v, v["spec"], None)[1:] == [{"op": "remove", "path": PATH}]  # type: ignore[index]


def managed(manager: str, fields: dict, operation: str = "Update") -> dict:
    return {"manager": manager, "operation": operation, "apiVersion": "networking.istio.io/v1", "fieldsV1": fields}


def test_serve_mode_gives_the_routes_back_to_their_owner() -> None:
    """spec.http is an atomic list: after the controller's writes it owns all of it, and a GitOps tool's
    server-side apply of a route change would conflict. In serve mode the controller drops that claim."""
    v = vs({})
    git = managed("argocd", {"f:spec": {"f:hosts": {}}}, "Apply")
    ours = managed(
        vspatch.MANAGER,
        {"f:metadata": {"f:annotations": {f"f:{RESTORE_ANNOTATION}": {}, "f:other": {}}}, "f:spec": {"f:http": {}}},
    )
    v["metadata"]["managedFields"] = [git, ours]
    ops = vspatch.release_http(v)
    assert ops == [
        {"op": "test", "path": "/metadata/resourceVersion", "value": "7"},
        {
            "op": "replace",
            "path": "/metadata/managedFields",
            "value": [git, {**ours, "fieldsV1": {"f:metadata": {"f:annotations": {"f:other": {}}}}}],
        },
    ]
    # owning nothing else: the entry goes; owning nothing at all: nothing to do
    v["metadata"]["managedFields"] = [git, managed(vspatch.MANAGER, {"f:spec": {"f:http": {}}})]
    assert vspatch.release_http(v)[1]["value"] == [git]  # type: ignore[index]
    v["metadata"]["managedFields"] = [managed(vspatch.MANAGER, {"f:spec": {"f:http": {}}})]
    assert vspatch.release_http(v)[1]["value"] == [{}]  # type: ignore[index]
    v["metadata"]["managedFields"] = [git]
    assert vspatch.release_http(v) is None
    # still in proxy mode for some ElastiService: the routes are not the user's yet
    proxied = vs({RESTORE_ANNOTATION: "{}"})
    proxied["metadata"]["managedFields"] = [ours]
    assert vspatch.release_http(proxied) is None
