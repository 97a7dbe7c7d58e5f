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
