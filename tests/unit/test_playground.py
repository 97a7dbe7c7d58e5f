"""The playground's pure parts: narration, route descriptions, page checks, elasti-system manifests."""

from __future__ import annotations

import io
from typing import Any

import pytest

from elasti_istio.playground import bookinfo, system
from elasti_istio.playground.narrate import Narrator, StepFailed
from elasti_istio.playground.procs import ACTIVATOR_HOST, free_ports


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_without_a_terminal_prints_each_change_once() -> None:
    out = io.StringIO()
    n = Narrator(out)
    seen = iter([(False, "a"), (False, "a"), (False, "b"), (False, "b"), (True, "")])

    def probe() -> tuple[bool, str]:
        return next(seen)

    n.wait(probe, 10, "thing", interval=0.001)
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    assert [line.split()[-1] for line in lines] == ["a", "b"]
    assert "\r" not in out.getvalue()


def test_progress_on_a_terminal_rewrites_one_line_and_clears_it() -> None:
    out = Tty()
    n = Narrator(out)
    seen = iter([(False, "one"), (False, "two"), (True, "")])
    n.wait(lambda: next(seen), 10, "thing", interval=0.001)
    text = out.getvalue()
    assert text.count("\r") >= 3 and "one" in text and "two" in text
    assert "\n" not in text, "progress never scrolls"


def test_a_step_that_times_out_fails_with_its_reason_and_shows_in_the_timeline() -> None:
    out = io.StringIO()
    n = Narrator(out)
    with n.step("first"):
        pass
    with pytest.raises(StepFailed) as info, n.step("second"):
        n.wait(lambda: (False, "still 0/6 ready"), 0.05, "Bookinfo", interval=0.01)
    assert info.value.title == "second"
    assert "timed out" in info.value.reason and "still 0/6 ready" in info.value.reason
    with pytest.raises(StepFailed) as info, n.step("third"):
        raise RuntimeError("mesh exited with code 1")
    assert info.value.reason == "mesh exited with code 1"
    n.timeline()
    results = [line.split()[-1] for line in out.getvalue().splitlines() if line.strip()[:1].isdigit()]
    assert results == ["ok", "FAILED", "FAILED"]


def test_routes_are_described_per_destination() -> None:
    spec = {
        "http": [
            {
                "route": [
                    {"destination": {"host": "details", "subset": "v1"}, "weight": 0},
                    {
                        "destination": {"host": ACTIVATOR_HOST, "port": {"number": 8012}},
                        "headers": {"request": {"set": {"elasti-service": "bookinfo/details"}}},
                        "weight": 100,
                    },
                ]
            }
        ]
    }
    lines = bookinfo.describe_routes(spec)
    assert "details subset v1" in lines[0] and lines[0].endswith("weight 0")
    assert f"{ACTIVATOR_HOST}:8012" in lines[1] and "weight 100  sets elasti-service: bookinfo/details" in lines[1]
    assert bookinfo.proxied(spec)
    serve = {"http": [{"route": [{"destination": {"host": "details", "subset": "v1"}}]}]}
    assert bookinfo.describe_routes(serve)[0].endswith("weight 100") and not bookinfo.proxied(serve)


@pytest.mark.parametrize(
    ("status", "headers", "body", "problem"),
    [
        (200, {}, "<h4>Book Details</h4> reviews", None),
        (503, {}, "no healthy upstream", "status 503"),
        (200, {"x-bookinfo-degraded": "details"}, "Book Details", "without details"),
        (
            200,
            {"x-bookinfo-degraded": "reviews", "x-bookinfo-degraded-why": "reviews: 503 no healthy upstream"},
            "Book Details",
            "without reviews (reviews: 503 no healthy upstream)",
        ),
        (200, {}, "Sorry, product details are currently unavailable for this book.", "no book details"),
    ],
)
def test_page_problems(status: int, headers: dict[str, str], body: str, problem: str | None) -> None:
    found = bookinfo.page_problem(status, headers, body)
    assert found == problem if problem is None else problem in (found or "")


def test_weighted_destinations_are_those_of_the_namespace_that_get_traffic() -> None:
    def vs(*routes: list[dict[str, Any]]) -> dict[str, Any]:
        return {"spec": {"http": [{"route": r} for r in routes]}}

    def d(host: str, subset: str | None = None, weight: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"destination": {"host": host, **({"subset": subset} if subset else {})}}
        if weight is not None:
            out["weight"] = weight
        return out

    items = [
        vs([d("productpage")]),
        vs([d("reviews", "v1", 50), d("reviews", "v2", 50), d("reviews", "v3", 0)]),
        vs([d("details.bookinfo.svc.cluster.local", "v1")]),
        vs([d("other.elsewhere.svc.cluster.local")]),
    ]
    assert bookinfo.weighted_destinations(items, "bookinfo") == {
        ("productpage", ""),
        ("reviews", "v1"),
        ("reviews", "v2"),
        ("details", "v1"),
    }


def test_destinations_without_endpoints_are_those_without_a_healthy_host_in_envoy() -> None:
    sfx = ".bookinfo.svc.cluster.local"
    clusters = {
        f"outbound|9080||productpage{sfx}": 1,
        f"outbound|9080|v1|reviews{sfx}": 2,
        f"outbound|9080|v2|reviews{sfx}": 0,
        "outbound|9080|v1|details.other.svc.cluster.local": 1,
    }
    wanted = {("productpage", ""), ("reviews", "v1"), ("reviews", "v2"), ("details", "v1")}
    assert bookinfo.destinations_without_endpoints(wanted, "bookinfo", clusters) == [
        "details subset v1",
        "reviews subset v2",
    ]
    assert bookinfo.destinations_without_endpoints(set(), "bookinfo", clusters) == []


def test_activator_workload_forwards_both_ports_and_follows_readiness() -> None:
    dep, svc, rule = system.activator_workload(41000, 41001)
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["elasti.truefoundry.com/sim-forward"] == "8012=127.0.0.1:41000,9091=127.0.0.1:41001"
    assert ann["elasti.truefoundry.com/sim-readiness-url"] == "http://127.0.0.1:41001/readyz"
    assert (dep["metadata"]["namespace"], dep["metadata"]["name"]) == ("elasti-system", "elasti-activator")
    assert [p["port"] for p in svc["spec"]["ports"]] == [8012, 9091]
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    # The proxy port keeps the caller's protocol (h2c for gRPC), on gateways through the DestinationRule.
    assert svc["spec"]["ports"][0]["name"] == "proxy" and "appProtocol" not in svc["spec"]["ports"][0]
    assert rule["kind"] == "DestinationRule" and rule["metadata"]["namespace"] == "elasti-system"
    assert rule["spec"]["host"] == "elasti-activator.elasti-system.svc.cluster.local"


class FakeApi:
    def __init__(self) -> None:
        self.applied: list[dict[str, Any]] = []

    def apply(self, doc: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        self.applied.append(doc)
        return doc


def test_the_controller_grant_per_namespace_is_the_shipped_binding_as_a_role_binding() -> None:
    api = FakeApi()
    system.bind_controller(api, "team-a")  # type: ignore[arg-type]
    (doc,) = api.applied
    assert doc["kind"] == "RoleBinding" and doc["metadata"]["namespace"] == "team-a"
    assert doc["roleRef"]["kind"] == "ClusterRole" and doc["roleRef"]["name"] == "elasti-controller"
    assert doc["subjects"] == [{"kind": "ServiceAccount", "name": "elasti-controller", "namespace": "elasti-system"}]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in system.rbac_docs()}
    assert ("ClusterRoleBinding", "elasti-activator") in kinds and ("ClusterRole", "elasti-controller") in kinds


def test_free_ports_are_distinct_and_avoid_what_is_asked() -> None:
    ports = free_ports(6, avoid=(1,))
    assert len(set(ports)) == 6 and 1 not in ports
