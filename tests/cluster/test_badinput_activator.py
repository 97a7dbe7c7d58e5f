"""A fuzz run against the real ``elasti-istio activator`` process: random headers, elasti-service values and
request lines, forged route tokens, bodies over the size limit, bodies that drip. Each case gets its 4xx (or,
when it is in fact a valid request, the workload's answer through the mesh); a forged token never reaches a
workload or a queue; after each batch a well-formed request for a known ElastiService is still forwarded and
answered, and the process's resident memory stays bounded. The run prints its figures: cases tried by kind,
crashes (the process gone, or a traceback in its log: 0) and memory before, at peak and at the end.

``ELASTI_FUZZ_SCALE`` multiplies the number of generated cases (``make fuzz`` runs ten times as many).

The activator runs as in production: its own process with the activator identity's RBAC (get/list/watch
on ElastiServices only), reading ElastiServices from the API server and forwarding through a real Envoy
sidecar (the mesh client's, fed by istiod) to a simulated pod.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elasti_istio import routekey
from elasti_istio.localcluster.cluster import ClusterInfo
from tests import harness
from tests.conftest import K8s, MeshInfo
from tests.helpers import wait_for
from tests.rbac import bind_activator_role
from tests.unit.test_activator_badinput import (
    Reply,
    check_request_line_reply,
    exchange,
    header_oracle,
    header_sets,
    request_head,
    request_lines,
    service_headers,
    service_oracle,
)

MAX_LINE, MAX_FIELD, MAX_HEADERS = 4096, 2048, 32
MAX_BODY, BODY_TIMEOUT, RETRY_LIMIT = 256 * 1024, 1.5, 64 * 1024
BATCH = 40  # cases between two health and memory checks
RSS_SLACK_KIB = 96 * 1024  # generous: allocator noise, not a leak, must fit
SCALE = float(os.environ.get("ELASTI_FUZZ_SCALE", "1"))
TOKEN = routekey.TOKEN_HEADER.encode()


def workload(name: str) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {
                        "containers": [{"name": "app", "image": "example/web", "ports": [{"containerPort": 8080}]}]
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name},
            "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
        },
    ]


def elastiservice(name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{harness.GROUP}/{harness.VERSION}",
        "kind": "ElastiService",
        "metadata": {"name": name},
        "spec": {
            "service": "web",
            "scaleTargetRef": {"kind": "Deployment", "name": "web"},
            "activator": {"holdTimeout": "30s", "retryInterval": "100ms", "queueLimit": 100},
        },
    }


def set_status(k8s: K8s, ns: str, name: str, ready: int) -> None:
    k8s.custom.patch_namespaced_custom_object_status(  # type: ignore[attr-defined]
        harness.GROUP,
        harness.VERSION,
        ns,
        "elastiservices",
        name,
        {"status": {"readyReplicas": ready, "origin": {"service": "web", "port": 80}}},
    )


class Running:
    def __init__(self, proc: harness.Proc, port: int, admin: int, ns: str, key: bytes) -> None:
        self.proc, self.port, self.admin, self.ns, self.key = proc, port, admin, ns, key
        assert proc.proc is not None
        self.pid = proc.proc.pid

    def token(self, ns: str, name: str) -> bytes:
        return routekey.token(self.key, ns, name).encode()

    def head(
        self, method: str, target: str, headers: list[tuple[bytes, bytes]] | None = None, name: str = "web"
    ) -> bytes:
        """A request for ElastiService ``name`` as its rewritten route sends it: header and valid token."""
        signed = [(TOKEN, self.token(self.ns, name)), *(headers or [])]
        return request_head(method, target, signed, service=f"{self.ns}/{name}")

    def crashes(self) -> int:
        """The process gone, or an exception that escaped a handler (logged with its traceback)."""
        return (not self.proc.alive()) + self.proc.logs().count("Traceback (most recent call last)")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def well_formed(self) -> None:
        assert self.proc.alive(), self.proc.logs()[-3000:]
        reply = exchange(self.port, self.head("GET", "/fuzz/still-serving?x=1"))
        assert reply.status == 200, reply
        doc = reply.json()
        assert doc["path"] == "/fuzz/still-serving" and doc["query"] == "x=1"

    def pending(self, name: str) -> int:
        status, body = harness.http_json("GET", f"http://127.0.0.1:{self.admin}/v1/pending/{self.ns}/{name}")
        assert status == 200, body
        return int(body["pending"])


@pytest.fixture
def activator(cluster: ClusterInfo, k8s: K8s, namespace: str, mesh: MeshInfo, tmp_path: Path) -> Iterator[Running]:
    bind_activator_role(k8s, namespace)
    harness.apply(k8s, namespace, workload("web"))
    for name in ("web", "cold"):
        harness.create(k8s, namespace, elastiservice(name))
    set_status(k8s, namespace, "web", 1)
    set_status(k8s, namespace, "cold", 0)
    port, admin = harness.free_port(), harness.free_port()
    key = secrets.token_hex(32)
    (tmp_path / "route-key").write_text(key + "\n")
    proc = harness.Proc(
        [
            "activator",
            "--listen",
            f"127.0.0.1:{port}",
            "--admin-listen",
            f"127.0.0.1:{admin}",
            "--kubeconfig",
            str(cluster.activator_kubeconfig),
            "--namespace",
            namespace,
            "--controller-url",
            "http://127.0.0.1:9",  # no controller: nothing here needs a wake to succeed
            "--sidecar-address",
            mesh.client,
            "--max-line-size",
            str(MAX_LINE),
            "--max-field-size",
            str(MAX_FIELD),
            "--max-headers",
            str(MAX_HEADERS),
            "--max-body-size",
            str(MAX_BODY),
            "--request-body-timeout",
            str(BODY_TIMEOUT),
            "--retry-body-limit",
            str(RETRY_LIMIT),
            "--route-key-file",
            str(tmp_path / "route-key"),
        ],
        tmp_path / "activator.log",
    ).start()
    run = Running(proc, port, admin, namespace, key.encode())
    try:
        wait_for(
            lambda: harness.http_json("GET", f"http://127.0.0.1:{admin}/readyz", timeout=2)[0] == 200,
            60,
            "activator /readyz",
        )
        wait_for(lambda: run.well_formed() or True, 60, "a request forwarded to the workload")
        yield run
    finally:
        proc.stop()


def _chunked(size: int, piece: int = 64 * 1024) -> bytes:
    """``size`` bytes of body in chunked framing."""
    full, rest = divmod(size, piece)
    out = (b"%x\r\n%s\r\n" % (piece, b"c" * piece)) * full
    if rest:
        out += b"%x\r\n%s\r\n" % (rest, b"c" * rest)
    return out + b"0\r\n\r\n"


def _oversized(run: Running, kind: str, size: int) -> Reply:
    if kind == "content-length":
        return exchange(run.port, run.head("POST", "/fuzz", [(b"Content-Length", str(size).encode())]))
    head = run.head("POST", "/fuzz", [(b"Transfer-Encoding", b"chunked")])
    return exchange(run.port, head, _chunked(size))


FORGERIES = ("missing", "junk", "other name", "other namespace", "other key", "upper case", "truncated", "longer")
forged_tokens = st.tuples(
    st.sampled_from(FORGERIES),
    st.sampled_from(["web", "cold"]),  # ready (would be forwarded) or at zero (would be held and wake it)
    st.binary(min_size=0, max_size=100).map(lambda b: bytes(c for c in b if 0x21 <= c <= 0x7E)),
)

cases = st.one_of(
    st.tuples(st.just("headers"), header_sets()),
    st.tuples(st.just("token"), forged_tokens),
    st.tuples(st.just("service"), service_headers),
    st.tuples(st.just("line"), request_lines),
    st.tuples(
        st.just("oversized"),
        st.tuples(st.sampled_from(["content-length", "chunked"]), st.integers(MAX_BODY + 1, 4 * MAX_BODY)),
    ),
)


def forged(run: Running, how: str, name: str, junk: bytes) -> list[tuple[bytes, bytes]]:
    """Token headers that are not the token of ``name`` under the route key."""
    good = run.token(run.ns, name)
    token = {
        "missing": None,
        "junk": junk,
        "other name": run.token(run.ns, "cold" if name == "web" else "web"),
        "other namespace": run.token(f"{run.ns}-x", name),
        "other key": routekey.token(secrets.token_hex(32).encode(), run.ns, name).encode(),
        "upper case": good.upper(),
        "truncated": good[:-1],
        "longer": good + b"0",
    }[how]
    if token == good:  # junk that happens to be the token, a token of digits only: not a forgery
        token = good[:-1]
    return [] if token is None else [(TOKEN, token)]


def check_case(run: Running, kind: str, data: Any) -> None:
    if kind == "headers":
        reply = exchange(run.port, run.head("GET", "/fuzz", data))
        expected = header_oracle(
            [*data, (b"Connection", b"close")], [b"Host", b"elasti-service", TOKEN], MAX_FIELD, MAX_HEADERS
        )
        assert reply.status in expected, (data, reply, expected)
        if reply.status == 200:
            got = {k.lower(): v for k, v in reply.json()["headers"].items()}
            names = [n.decode().lower() for n, _ in data]
            if TOKEN.decode() not in names:  # the token is the activator's, never the workload's
                assert TOKEN.decode() not in got, got
            for name, value in data:  # a header sent once reaches the workload unchanged
                if names.count(name.decode().lower()) == 1:
                    assert got.get(name.decode().lower()) == value.strip(b" \t").decode(), (name, value, got)
        else:
            assert reply.is_own_error(), reply
    elif kind == "token":
        how, name, junk = data
        head = request_head("GET", "/fuzz", forged(run, how, name, junk), service=f"{run.ns}/{name}")
        reply = exchange(run.port, head)
        assert reply.status == 403 and reply.is_own_error(), (data, reply)
        assert run.pending("cold") == 0, "a forged token reached a queue"
    elif kind == "service":
        # Signed as a route would sign the value, so that what is tried is the parsing of the value.
        raw = [(n.encode(), v.encode()) for n, v in data]
        ns, _, name = data[0][1].strip(" \t").partition("/") if data else ("", "", "")
        signed = [(TOKEN, run.token(ns, name))] if name else []
        reply = exchange(run.port, request_head("GET", "/fuzz", [*signed, *raw], service=None))
        expected = service_oracle([v for _, v in data], {f"{run.ns}/web"})
        assert reply.status == expected, (data, reply)
        if expected != 200:
            assert reply.is_own_error(), reply
    elif kind == "line":
        line = data
        reply = exchange(
            run.port, line + b"\r\nHost: x\r\nConnection: close\r\n\r\n", head_request=line.startswith(b"HEAD ")
        )
        check_request_line_reply(line, reply)
    else:
        how, size = data
        reply = _oversized(run, how, size)
        assert reply.status == 413 and reply.is_own_error(), (data, reply)


def start_drippers(run: Running, n: int) -> tuple[list[threading.Thread], list[Reply]]:
    """``n`` clients dripping their bodies to the ready ElastiService and one to the held one; a well-formed
    request is served as usual meanwhile."""
    web = run.head("POST", "/fuzz", [(b"Content-Length", b"100000")])
    cold = run.head("POST", "/fuzz", [(b"Transfer-Encoding", b"chunked")], name="cold")
    results: list[Reply] = []

    def drip(head: bytes, piece: bytes) -> None:
        results.append(exchange(run.port, head, piece, drip=(piece, 0.2, 150)))

    threads = [threading.Thread(target=drip, args=(web, b"d")) for _ in range(n)]
    threads.append(threading.Thread(target=drip, args=(cold, b"1\r\nd\r\n")))
    for t in threads:
        t.start()
    run.well_formed()
    return threads, results


def test_fuzz_against_the_running_activator(activator: Running, k8s: K8s, record_property: Any) -> None:
    run = activator
    for _ in range(30):  # warm: connections pooled, code paths loaded
        run.well_formed()
    for kind, data in (("oversized", ("chunked", 2 * MAX_BODY)), ("line", b"\x16\x03\x01"), ("headers", [])):
        check_case(run, kind, data)
    baseline = run.rss_kib()
    peak = baseline
    tried = {"headers": 0, "token": 0, "service": 0, "line": 0, "oversized": 0, "drip": 0}

    @settings(max_examples=int(240 * SCALE), deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(cases)
    def one(case: tuple[str, Any]) -> None:
        nonlocal peak
        kind, data = case
        tried[kind] += 1
        check_case(run, kind, data)
        if sum(tried.values()) % BATCH == 0:
            run.well_formed()
            peak = max(peak, run.rss_kib())

    one()

    # Drippers: late traffic and a held request released while its client is still dripping.
    threads, results = start_drippers(run, 16)
    count = len(threads)
    wait_for(lambda: run.pending("cold") == 1, 30, "the held dripper")
    set_status(k8s, run.ns, "cold", 1)
    for t in threads:
        t.join(60)
    assert sorted(r.status for r in results) == [408] * count, results
    assert all(r.is_own_error() for r in results)
    assert run.pending("cold") == 0
    tried["drip"] += count

    run.well_formed()
    end = run.rss_kib()
    peak = max(peak, end)
    crashes = run.crashes()
    total = sum(tried.values())
    summary = ", ".join(f"{k} {v}" for k, v in tried.items())
    print(
        f"\nactivator fuzz: {total} cases tried ({summary}); crashes {crashes}; "
        f"VmRSS {baseline} KiB before, peak {peak} KiB, {end} KiB at the end"
    )
    record_property("cases", total)
    record_property("crashes", crashes)
    record_property("rss_kib", {"baseline": baseline, "peak": peak, "end": end})
    assert crashes == 0, run.proc.logs()[-5000:]
    assert peak - baseline < RSS_SLACK_KIB, (baseline, peak)
