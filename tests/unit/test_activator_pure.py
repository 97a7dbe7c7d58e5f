"""The activator's pure parts: header routing, hold policy, ElastiService parsing, header rewriting."""

from __future__ import annotations

from types import SimpleNamespace

from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from activator.forward import mesh_not_ready, response_headers, upstream_headers
from activator.h2proxy import forward_headers
from activator.h2server import H2Request
from activator.queue import Admission, Change, HoldQueues
from activator.registry import Target, WakeFailure, target_from
from activator.routing import Rejection, route
from tests.activator_stubs import elastiservice


def test_route_by_header() -> None:
    assert route(["shop/details"]) == (("shop", "details"), None)
    assert route([" shop/details-v1.x "]) == (("shop", "details-v1.x"), None)
    # The Service port the route chose, written by the rewrite when the destination names one.
    assert route(["shop/details:9090"]) == (("shop", "details"), 9090)
    for values, err in [
        (["shop/details:0"], "malformed"),
        (["shop/details:65536"], "malformed"),
        (["shop/details:http"], "malformed"),
        (["shop/details:"], "malformed"),
        (["shop/details:80:81"], "malformed"),
        ([], "missing"),
        (["shop/a", "shop/b"], "duplicate"),
        (["shop/a, shop/b"], "duplicate"),
        (["details"], "malformed"),
        (["Shop/details"], "malformed"),
        (["shop/"], "malformed"),
        (["/details"], "malformed"),
        (["a/b/c"], "malformed"),
        (["x" * 64 + "/a"], "malformed"),
    ]:
        r = route(values)
        assert isinstance(r, Rejection) and err in r.error, (values, r)


def test_queue_limits() -> None:
    q = HoldQueues(max_held=3)
    a, b = ("ns", "a"), ("ns", "b")
    assert q.admit(a, 2) is Admission.ADMITTED
    assert q.admit(a, 2) is Admission.ADMITTED
    assert q.admit(a, 2) is Admission.QUEUE_FULL
    assert q.admit(b, 5) is Admission.ADMITTED
    assert q.admit(b, 5) is Admission.GLOBAL_FULL
    assert (q.pending(a), q.pending(b), q.total) == (2, 1, 3)
    q.leave(a)
    assert q.admit(b, 5) is Admission.ADMITTED
    assert q.total == 3


def test_one_wake_per_cycle_namespace_qualified() -> None:
    q = HoldQueues(100)
    one, other = ("ns1", "web"), ("ns2", "web")
    for key in (one, one, other):
        q.admit(key, 10)
    assert q.open_cycle(one, None) is True
    assert q.open_cycle(one, None) is False  # same cycle: no second notification
    assert q.open_cycle(other, None) is True  # same name, other namespace: its own cycle
    assert q.observe(one, ready=True, failure=None) is Change.READY
    assert q.open_cycle(one, None) is True  # after ready, the next held request starts a new cycle


def test_refusal_fails_only_its_own_cycle() -> None:
    q = HoldQueues(100)
    k = ("ns", "a")
    q.admit(k, 10)
    mark = q.failures(k)
    q.open_cycle(k, None)
    first = q.cycle_id(k)
    q.observe(k, ready=True, failure=None)  # that cycle ended: ready
    q.open_cycle(k, None)
    refusal = WakeFailure("ScaleRefused", "quota", "")
    assert q.fail_cycle(k, first, refusal) is False  # a late answer for an old cycle changes nothing
    assert q.failed_since(k, mark) is None
    assert q.fail_cycle(k, q.cycle_id(k), refusal) is True
    assert q.failed_since(k, mark) == refusal and not q.cycle_open(k)


def test_cycle_ends_when_nothing_is_held() -> None:
    q = HoldQueues(100)
    k = ("ns", "a")
    q.admit(k, 10)
    q.open_cycle(k, None)
    assert q.leave(k) is True
    assert q.cycle_open(k) is False


def test_wake_failure_fails_only_a_fresh_failure() -> None:
    q = HoldQueues(100)
    k = ("ns", "a")
    old = WakeFailure("Refused", "quota exceeded", "t1")
    q.admit(k, 10)
    mark = q.failures(k)
    q.open_cycle(k, old)  # the condition is left over from an earlier cycle
    assert q.observe(k, ready=False, failure=old) is Change.NONE
    assert q.failed_since(k, mark) is None
    q.observe(k, ready=False, failure=None)  # the controller started the new wake
    assert q.observe(k, ready=False, failure=old) is Change.FAILED  # the same failure again is fresh now
    assert q.failed_since(k, mark) == old
    q.admit(k, 10)  # a later request opens a new cycle with that failure as stale
    assert q.open_cycle(k, old) is True
    new = WakeFailure("Refused", "still no quota", "t2")
    assert q.observe(k, ready=False, failure=new) is Change.FAILED


def test_target_from_elastiservice() -> None:
    obj = elastiservice(
        "shop",
        "details",
        ready=True,
        origin=("details-elasti-origin", 9080),
        hold_timeout="1m30s",
        retry_interval="250ms",
        queue_limit=7,
        wake_failed=("Refused", "no quota", "t"),
    )
    t = target_from(obj, "example.org")
    assert t == Target(
        "shop",
        "details",
        90.0,
        0.25,
        7,
        True,
        "http://details-elasti-origin.shop.svc.example.org:9080",
        "details-elasti-origin.shop.svc.example.org:9080",
        WakeFailure("Refused", "no quota", "t"),
        service_hosts=frozenset({"details", "details.shop", "details.shop.svc", "details.shop.svc.example.org"}),
    )
    assert t.forwardable
    bare = target_from({"metadata": {"namespace": "shop", "name": "x"}, "spec": {}})
    assert (bare.hold_timeout, bare.retry_interval, bare.queue_limit, bare.ready, bare.base_url) == (
        60.0,
        0.1,
        1000,
        False,
        None,
    )
    no_origin = target_from(elastiservice("shop", "x", ready=True))
    assert no_origin.ready and not no_origin.forwardable  # held until status.origin appears


def test_header_rewrite() -> None:
    headers = CIMultiDict(
        [
            ("Host", "details:9080"),
            ("Connection", "keep-alive, X-Hop"),
            ("X-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Proxy-Authorization", "Basic x"),
            ("elasti-service", "shop/details"),
            ("X-Forwarded-For", "10.0.0.1"),
            ("Cookie", "a=1"),
            ("Cookie", "b=2"),
        ]
    )
    req = make_mocked_request("GET", "/p?q=1", headers=headers)
    t = Target(
        "shop", "details", authority="o.shop.svc.cluster.local:9080", base_url="http://o.shop.svc.cluster.local:9080"
    )
    out = upstream_headers(req, t)
    assert out["Host"] == "o.shop.svc.cluster.local:9080"
    assert out["X-Forwarded-Host"] == "details:9080"
    assert out["X-Forwarded-For"].startswith("10.0.0.1, ")
    assert out["X-Forwarded-Proto"] == "http"
    assert out.getall("Cookie") == ["a=1", "b=2"]
    for gone in ("Connection", "X-Hop", "Keep-Alive", "TE", "Proxy-Authorization", "elasti-service"):
        assert gone not in out
    resp = response_headers(CIMultiDict([("Transfer-Encoding", "chunked"), ("Set-Cookie", "a"), ("Set-Cookie", "b")]))
    assert resp.getall("Set-Cookie") == ["a", "b"] and "Transfer-Encoding" not in resp

    # The same request over HTTP/2 loses the same fields, except te: trailers (gRPC's); and keeps the rest.
    stream = SimpleNamespace(headers=[(b":method", b"GET"), (b":path", b"/p?q=1"), (b":authority", b"details:9080")])
    stream.headers += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    h2_out = forward_headers(H2Request(stream, "10.0.0.9"), t, None)  # type: ignore[arg-type]
    h2_names = {k.decode() for k, _ in h2_out if not k.startswith(b":")}
    assert h2_names == {k.lower() for k in out if k != "Host"} | {"te"}
    assert (b"te", b"trailers") in h2_out and (b":authority", b"o.shop.svc.cluster.local:9080") in h2_out


def test_mesh_reply_recognised() -> None:
    assert mesh_not_ready(503, b"no healthy upstream")
    assert mesh_not_ready(
        503, b"upstream connect error or disconnect/reset before headers. reset reason: connection failure"
    )
    # reached the workload (or may have): never resent
    assert not mesh_not_ready(
        503, b"upstream connect error or disconnect/reset before headers. reset reason: connection termination"
    )
    assert not mesh_not_ready(503, b"the app is overloaded")
    assert not mesh_not_ready(502, b"no healthy upstream")


def test_an_answer_that_came_from_an_upstream_is_never_taken_for_the_mesh() -> None:
    """Envoy's own replies carry no ``x-envoy-upstream-service-time``; an answer from an upstream does: a
    workload relaying its own "no healthy upstream" must be relayed, never sent again."""
    upstream = {"x-envoy-upstream-service-time": "3", "server": "envoy"}
    assert not mesh_not_ready(503, b"no healthy upstream", upstream)
    assert not mesh_not_ready(
        503, b"upstream connect error or disconnect/reset before headers. reset reason: connection failure", upstream
    )
    assert mesh_not_ready(503, b"no healthy upstream", {"server": "envoy", "content-type": "text/plain"})
