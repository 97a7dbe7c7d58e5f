"""The VirtualService rewrite fuzzed with specs generated from Istio's own CRD schema.

The generator walks the ``openAPIV3Schema`` of the VirtualService CRD the local cluster installs (field
names, types, ranges, formats, required fields, the "at most one of" ``oneOf`` groups, maps and lists) and
only chooses values where the schema leaves Istio's meaning open: destination hosts in every form that
does or does not resolve to the target's Service, subsets, weights, durations.

Against the real API server each generated spec is created as a VirtualService, put in proxy mode and
back in serve mode with the same JSON Patch the controller sends (``spec.http`` and the restore
annotation, with the resourceVersion; ``Reconciler.switch_vs``), and read back each time: the server
must accept every patch, store exactly what was sent (it prunes unknown fields silently, so a dropped
field would only show on reading back) and serve mode must give back the original exactly as the server
stored it; Istio's validating webhook (the local istiod's) sees every write, and must refuse none of the
rewrite's. Offline, many more specs go through the same rewrite and a structural check of the output
against the schema. The run prints its figures: specs tried, crashes (an exception from the rewrite: 0),
rewrites refused by the API server or Istio (0) and the memory of the process that ran the rewrite.

``ELASTI_FUZZ_SCALE`` multiplies the number of generated specs (``make fuzz`` runs ten times as many).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import itertools
import os
import resource
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from elasti_istio.controller import vspatch
from elasti_istio.duration import parse_go
from elasti_istio.kube import Kube, load_connection
from elasti_istio.kube.client import JSON_PATCH, KubeError
from elasti_istio.localcluster import binaries
from elasti_istio.localcluster.cluster import ClusterInfo
from elasti_istio.resources import VIRTUALSERVICES
from elasti_istio.vsrewrite import (
    HEADER,
    RESTORE_ANNOTATION,
    ActivatorRef,
    Target,
    read_restore,
    route_total,
    to_proxy,
    to_serve,
    write_restore,
)

# Every test here needs the Istio CRDs of the local cluster's istiod build.
pytestmark = pytest.mark.cluster

ACT = ActivatorRef("elasti-activator.elasti-system.svc.cluster.local", 8012)
SERVICE = "details"
INT32 = (-(2**31), 2**31 - 1)
SCALE = float(os.environ.get("ELASTI_FUZZ_SCALE", "1"))
TOKEN = "0f" * 32  # a route token as the controller writes it (elasti_istio.routekey)


def peak_rss_kib() -> int:
    """The peak resident memory of this process, which ran every rewrite."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


@functools.cache
def vs_spec_schema(version: str = VIRTUALSERVICES.version) -> dict[str, Any]:
    """From the Istio CRDs the local cluster installs (those of the istiod build it runs)."""
    crds = binaries.find(install=False).istio_crds
    for doc in yaml.safe_load_all(crds.read_text()):
        if doc and doc.get("kind") == "CustomResourceDefinition" and doc["spec"]["names"]["kind"] == "VirtualService":
            v = next(v for v in doc["spec"]["versions"] if v["name"] == version)
            return v["schema"]["openAPIV3Schema"]["properties"]["spec"]
    raise LookupError("no VirtualService CRD")


# --- the generator ----------------------------------------------------------------------------------


def _exclusive_groups(node: dict[str, Any]) -> list[tuple[frozenset[str], bool]]:
    """``oneOf`` of single ``required`` keys: (keys, at least one). With a ``not anyOf`` branch: at most one."""
    alts = node.get("oneOf")
    if not alts:
        return []
    keys = frozenset(k for alt in alts for k in alt.get("required", ()))
    return [(keys, not any("not" in alt for alt in alts))]


def _is_duration(node: dict[str, Any]) -> bool:
    return any("duration(" in r.get("rule", "") for r in node.get("x-kubernetes-validations", ()))


durations = st.builds(
    lambda n, unit: f"{n}{unit}",
    st.one_of(st.integers(1, 5000).map(str), st.decimals(1, 100, places=2).map(str)),
    st.sampled_from(["ms", "s", "m", "h"]),
) | st.sampled_from(["1ms", "0.5s", "1m30s", "2h", "100ms"])
# Never "": the local API server, built with a newer Go than 1.20 was, refuses empty strings in custom
# resources (kubernetes/kubernetes#99804); a real 1.20 server and later ones accept them.
texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)
dns = st.from_regex(r"[a-z]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)


class Generator:
    """Strategies for VirtualService specs in namespace ``ns``, where ``target`` is the ElastiService."""

    # How many of a list, and which optional fields show up more often than the others: those the rewrite reads.
    LIST_SIZE = {"http": (1, 3), "route": (1, 4), "tcp": (0, 2), "tls": (0, 2), "match": (0, 2)}
    LIKELY = {"destination", "weight", "subset", "headers", "request", "set"}
    ALWAYS = {(): "http", ("http", "[]"): "route"}  # the part the rewrite is about
    # Fields Istio's webhook refuses beside a route (or in a VirtualService that is not a delegate): left out
    # so that the cases tried are VirtualServices that can exist, not refusals of the original.
    NEVER = {("http", "[]"): {"redirect", "directResponse", "delegate"}}

    def __init__(self, ns: str, nulls: bool = False) -> None:
        self.ns = ns
        self.nulls = nulls
        svc = SERVICE
        self.target_hosts = [svc, f"{svc}.{ns}", f"{svc}.{ns}.svc", f"{svc}.{ns}.svc.cluster.local"]
        self.other_hosts = [
            f"{svc}.other",
            f"{svc}.{ns}.svc.other.domain",
            "ratings",
            f"ratings.{ns}.svc.cluster.local",
            "httpbin.org",
            "*.example.com",
            "*",
            ACT.host,
        ]

    def hosts(self) -> st.SearchStrategy[str]:
        target = st.sampled_from(self.target_hosts)
        return st.one_of(target, target, target, st.sampled_from(self.other_hosts), dns)

    def build(self, node: dict[str, Any], path: tuple[str, ...] = ()) -> st.SearchStrategy[Any]:
        s = self._build(node, path)
        if node.get("nullable") and self.nulls:
            s = st.one_of(st.none(), s)
        return s

    def _build(self, node: dict[str, Any], path: tuple[str, ...]) -> st.SearchStrategy[Any]:
        last = path[-1] if path else ""
        parent = path[-2] if len(path) > 1 else ""
        if last == "host" and parent in ("destination", "mirror"):
            return self.hosts()
        if last == "subset":
            return st.sampled_from(["v1", "v2", "v3"]) | texts
        if last == "weight":
            # int32 each, and so small that a route's total stays an int32 (proxy mode keeps the total). The
            # schema allows negative ones, Istio's webhook does not.
            return st.one_of(st.integers(0, 100), st.integers(0, 10**8))
        if last == "number" and parent == "port":
            return st.integers(1, 65535)
        if path in (("hosts", "[]"), ("tls", "[]", "match", "[]", "sniHosts", "[]")):
            return self.hosts()
        if "enum" in node:
            return st.sampled_from(node["enum"])
        kind = node.get("type")
        if kind == "object":
            if "properties" in node:
                return self._object(node, path)
            if "additionalProperties" in node:
                keys = st.one_of(texts, st.sampled_from([HEADER, "Elasti-Service", "x-user"]))
                return st.dictionaries(keys, self.build(node["additionalProperties"], (*path, "{}")), max_size=3)
            return st.just({})
        if kind == "array":
            lo, hi = self.LIST_SIZE.get(last, (0, 2))
            return st.lists(self.build(node["items"], (*path, "[]")), min_size=lo, max_size=hi)
        if kind == "string":
            if node.get("format") == "byte":
                return st.binary(min_size=1, max_size=16).map(lambda b: base64.b64encode(b).decode())
            if _is_duration(node):
                return durations
            return texts
        if kind == "integer":
            lo = node.get("minimum", INT32[0])
            hi = node.get("maximum", INT32[1])
            if node.get("format") == "int32":
                lo, hi = max(lo, INT32[0]), min(hi, INT32[1])
            return st.one_of(st.integers(max(lo, 0), min(hi, 1000)), st.integers(lo, hi))
        if kind == "number":
            # Within 2**53: the server writes an integral float64 as an integer, which Python then reads
            # back exactly only while every integer is a float64.
            return st.floats(min_value=-1e15, max_value=1e15, allow_nan=False)
        if kind == "boolean":
            return st.booleans()
        raise AssertionError(f"schema node without a generator at {path}: {node}")

    def _object(self, node: dict[str, Any], path: tuple[str, ...]) -> st.SearchStrategy[dict[str, Any]]:
        props: dict[str, Any] = node["properties"]
        required = set(node.get("required", ()))
        groups = _exclusive_groups(node)
        children = {k: self.build(v, (*path, k)) for k, v in props.items()}

        @st.composite
        def obj(draw: st.DrawFn) -> dict[str, Any]:
            chosen = set(required)
            if path in self.ALWAYS:
                chosen.add(self.ALWAYS[path])
            for k in props:
                if k in self.NEVER.get(path, ()):
                    continue
                if k not in chosen and draw(st.integers(0, 5)) >= (2 if k in self.LIKELY else 5):
                    chosen.add(k)
            for keys, at_least_one in groups:
                present = sorted(chosen & keys)
                if len(present) > 1:  # "at most one of": keep one
                    keep = draw(st.sampled_from(present))
                    chosen -= keys - {keep}
                if at_least_one and not chosen & keys:
                    chosen.add(draw(st.sampled_from(sorted(keys))))
            return {k: draw(children[k]) for k in props if k in chosen}

        return obj()

    def targets(self) -> st.SearchStrategy[Target]:
        return st.sampled_from(
            [
                Target(self.ns, SERVICE, SERVICE),
                Target(self.ns, SERVICE, SERVICE, token=TOKEN),
                Target(self.ns, f"{SERVICE}-v1", SERVICE, frozenset({"v1"}), whole_service=False, token=TOKEN),
                Target(self.ns, f"{SERVICE}-v12", SERVICE, frozenset({"v1", "v2"}), whole_service=False),
            ]
        )

    def specs(self) -> st.SearchStrategy[dict[str, Any]]:
        return self.build(vs_spec_schema())


# --- a structural check against the schema -------------------------------------------------------------


def violations(value: Any, node: dict[str, Any], path: str = "spec") -> list[str]:
    """What the API server would refuse (or prune) in ``value`` under ``node``: types, ranges (int32 too, which
    Istio needs but a 1.20 server does not check), formats, required fields, ``oneOf`` groups, unknown fields,
    and the durations of Istio's CEL rules."""
    if value is None:
        return [] if node.get("nullable") else [f"{path}: null"]
    kind = node.get("type")
    out: list[str] = []
    if "enum" in node and value not in node["enum"]:
        out.append(f"{path}: {value!r} not in enum")
    if kind == "object":
        if not isinstance(value, dict):
            return [f"{path}: not an object"]
        props = node.get("properties")
        for k in node.get("required", ()):
            if k not in value:
                out.append(f"{path}.{k}: required")
        for keys, at_least_one in _exclusive_groups(node):
            n = len(keys & value.keys())
            if n > 1 or (at_least_one and n == 0):
                out.append(f"{path}: {sorted(keys & value.keys())} break oneOf")
        for k, v in value.items():
            if props is not None:
                if k not in props:
                    out.append(f"{path}.{k}: unknown field, pruned")
                else:
                    out += violations(v, props[k], f"{path}.{k}")
            elif "additionalProperties" in node:
                out += violations(v, node["additionalProperties"], f"{path}[{k!r}]")
    elif kind == "array":
        if not isinstance(value, list):
            return [f"{path}: not a list"]
        for i, v in enumerate(value):
            out += violations(v, node["items"], f"{path}[{i}]")
    elif kind == "string":
        if not isinstance(value, str):
            return [f"{path}: not a string"]
        if node.get("format") == "byte":
            try:
                base64.b64decode(value, validate=True)
            except binascii.Error:
                out.append(f"{path}: not base64")
        if _is_duration(node):  # Istio's CEL rule (not enforced by a 1.20 server, but by current ones)
            try:
                if parse_go(value) < 0.001:
                    out.append(f"{path}: {value!r} under 1ms")
            except ValueError:
                out.append(f"{path}: {value!r} not a duration")
    elif kind == "integer":
        if not isinstance(value, int) or isinstance(value, bool):
            return [f"{path}: not an integer"]
        lo, hi = node.get("minimum"), node.get("maximum")
        if node.get("format") == "int32":
            lo, hi = INT32
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            out.append(f"{path}: {value} out of range")
    elif kind == "number":
        if not isinstance(value, int | float) or isinstance(value, bool):
            out.append(f"{path}: not a number")
    elif kind == "boolean" and not isinstance(value, bool):
        out.append(f"{path}: not a boolean")
    return out


# --- offline ---------------------------------------------------------------------------------------------

OFFLINE = Generator("shop")


def check_rewrite(spec: dict[str, Any], ns: str, target: Target) -> tuple[dict[str, Any], Any]:
    """Proxy then serve, offline: schema-valid output, totals kept, exact restore."""
    proxied, entries = to_proxy(spec, ns, target, ACT)
    assert violations(proxied, vs_spec_schema()) == [], violations(proxied, vs_spec_schema())
    for before, after in zip(spec.get("http") or [], proxied.get("http") or [], strict=True):
        if isinstance(before.get("route"), list) and before["route"]:
            assert route_total(after["route"]) == route_total(before["route"])
    served = to_serve(proxied, ns, target, ACT, entries)
    assert served == spec
    return proxied, entries


def test_generated_specs_are_valid_under_the_schema(record_property: Any) -> None:
    tried = 0

    @settings(max_examples=int(600 * SCALE), deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(OFFLINE.specs(), OFFLINE.targets())
    def one(spec: dict[str, Any], target: Target) -> None:
        nonlocal tried
        tried += 1
        assert violations(spec, vs_spec_schema()) == []
        check_rewrite(spec, "shop", target)  # an exception here fails the test with the shrunk spec

    one()
    record_property("cases", tried)
    print(f"\nVirtualService rewrite offline: {tried} generated specs tried, crashes 0, peak RSS {peak_rss_kib()} KiB")


# --- against the API server --------------------------------------------------------------------------


class ApiServer:
    """The API server through the controller's own client, on a private event loop."""

    def __init__(self, cluster: ClusterInfo, ns: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.kube = Kube(load_connection(str(cluster.admin_kubeconfig)), user_agent="vsrewrite-fuzz")
        self.ns = ns
        self.names = (f"vs-{i}" for i in itertools.count())

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def create(self, spec: dict[str, Any]) -> dict[str, Any]:
        body = {
            "apiVersion": f"{VIRTUALSERVICES.group}/{VIRTUALSERVICES.version}",
            "kind": "VirtualService",
            "metadata": {"name": next(self.names)},
            "spec": spec,
        }
        return self.run(self.kube.create(VIRTUALSERVICES, body, self.ns))  # type: ignore[no-any-return]

    def get(self, name: str) -> dict[str, Any]:
        return self.run(self.kube.get(VIRTUALSERVICES, name, self.ns))  # type: ignore[no-any-return]

    def switch(self, name: str, target: Target, mode: str) -> tuple[dict[str, Any], str | None]:
        """What ``Reconciler.switch_vs`` does: serve mode from the stored restore data, then proxy mode if
        asked, sent as the controller's JSON Patch (``vspatch.build``: resourceVersion test, ``spec.http``,
        the restore annotation)."""
        vs = self.get(name)
        meta = vs["metadata"]
        ann = dict(meta.get("annotations") or {})
        spec = vs.get("spec") or {}
        try:
            base = to_serve(spec, self.ns, target, ACT, read_restore(ann).get(target.key))
            new, entries = to_proxy(base, self.ns, target, ACT) if mode == "proxy" else (base, None)
            value = write_restore(ann, target.key, entries or None)
        except Exception as exc:
            raise RewriteCrashed(f"{mode}: {exc!r}") from exc
        ops = vspatch.build(vs, new, value)
        if ops is None:
            return new, value
        try:
            self.run(self.kube.patch(VIRTUALSERVICES, name, ops, self.ns, content_type=JSON_PATCH))
        except KubeError as exc:
            raise RewriteRefused(f"{mode}: {exc.status} {exc.message}") from exc
        return new, value

    def close(self) -> None:
        # Generated VirtualServices (hosts like "*" included) must not outlive the test while the
        # namespace is being deleted: the session's istiod sees every namespace.
        self.run(self.kube.request("DELETE", VIRTUALSERVICES.path(self.ns)))
        self.run(self.kube.close())
        self.loop.close()


@pytest.fixture
def server(cluster: ClusterInfo, namespace: str) -> Iterator[ApiServer]:
    c = ApiServer(cluster, namespace)
    try:
        yield c
    finally:
        c.close()


class RefusedByIstio(Exception):
    """Istio's validating webhook refused the generated original: no VirtualService like it can exist."""


class RewriteCrashed(Exception):
    """The rewrite raised on a VirtualService the server and Istio accepted."""


class RewriteRefused(Exception):
    """The API server or Istio's webhook refused what the rewrite wrote."""


def round_trip(server: ApiServer, spec: dict[str, Any], target: Target) -> bool:
    """Create, proxy, serve, each read back; True when proxy mode changed anything.

    The originals go through Istio's own admission rules like any write; one they refuse is not a case
    (:class:`RefusedByIstio`). The rewrite's writes must pass them.
    """
    try:
        created = server.create(spec)
    except KubeError as exc:
        if "admission webhook" in exc.message and "denied the request" in exc.message:
            raise RefusedByIstio(exc.message) from exc
        raise
    name = created["metadata"]["name"]
    stored = created.get("spec")
    assert stored == spec, "the generator made a spec the server changes"
    proxied, value = server.switch(name, target, "proxy")
    back = server.get(name)
    assert back["spec"] == proxied, "the server dropped or changed part of the proxy-mode spec"
    assert (back["metadata"].get("annotations") or {}).get(RESTORE_ANNOTATION) == value
    served, value = server.switch(name, target, "serve")
    assert value is None and served == stored
    back = server.get(name)
    assert back["spec"] == stored, "serve mode did not give back the original as stored"
    assert RESTORE_ANNOTATION not in (back["metadata"].get("annotations") or {})
    return proxied != stored


def test_rewrite_against_the_api_server(server: ApiServer, record_property: Any) -> None:
    gen = Generator(server.ns)
    tried = changed = refused = 0
    crashes: list[str] = []
    refused_rewrites: list[str] = []

    @settings(
        max_examples=int(150 * SCALE),
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(gen.specs(), gen.targets())
    def one(spec: dict[str, Any], target: Target) -> None:
        nonlocal tried, changed, refused
        try:
            rewritten = round_trip(server, spec, target)
        except RefusedByIstio:
            refused += 1
            assume(False)
        except RewriteCrashed as exc:
            crashes.append(f"{exc} on {spec}")
            rewritten = False
        except RewriteRefused as exc:
            refused_rewrites.append(f"{exc} on {spec}")
            rewritten = False
        tried += 1
        changed += rewritten

    one()
    record_property("cases", tried)
    record_property("crashes", len(crashes))
    record_property("rewrites_refused", len(refused_rewrites))
    print(
        f"\nVirtualService rewrite against the API server and Istio's webhook: {tried} specs tried, {changed} of "
        f"them rewritten; crashes {len(crashes)}; rewrites refused by the API server or Istio "
        f"{len(refused_rewrites)}; {refused} generated originals refused by Istio (not counted); "
        f"peak RSS {peak_rss_kib()} KiB"
    )
    assert crashes == [], crashes[:3]
    assert refused_rewrites == [], refused_rewrites[:3]
    assert tried >= 50 * SCALE, f"only {tried} generated specs passed Istio's validation"
    assert changed >= tried // 10  # the generator does reach the target's destinations


def test_null_valued_nullable_fields_survive_the_round_trip(server: ApiServer) -> None:
    spec = {
        "hosts": [SERVICE],
        "http": [
            {
                "retries": {"attempts": 2, "retryRemoteLocalities": None},
                "route": [{"destination": {"host": SERVICE}}],
            }
        ],
    }
    round_trip(server, spec, Target(server.ns, SERVICE, SERVICE))  # the server itself keeps the null on create
