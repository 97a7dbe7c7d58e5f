"""The shipped kustomize overlays, rendered by ``kubectl kustomize`` as a user renders them.

Rendering works on a copy of ``deploy/`` and ``crds/``, so the work tree is never written, and files a
user may have next to the base (``wake-token``, ``route-key``) are never read.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = ("cluster-wide", "namespace-scoped")
SYSTEM_NS = "elasti-system"
RBAC_KINDS = ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl is not installed: the kustomize overlays cannot be rendered")
    return path


def copy_tree(dest: Path) -> Path:
    """``deploy/`` and ``crds/`` under ``dest``."""
    shutil.copytree(ROOT / "deploy", dest / "deploy", ignore=shutil.ignore_patterns("wake-token*", "route-key*"))
    shutil.copytree(ROOT / "crds", dest / "crds")
    return dest


def fresh_clone(dest: Path) -> Path:
    """What a clone has of ``deploy/`` and ``crds/``: the files git tracks (as they are in the work
    tree), nothing generated or ignored."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    out = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--", "deploy", "crds"], capture_output=True, timeout=60
    )
    if out.returncode != 0:
        pytest.skip(f"not a git work tree: {out.stderr.decode()[-300:]}")
    for name in filter(None, out.stdout.decode().split("\0")):
        src, dst = ROOT / name, dest / name
        if src.is_symlink() or src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst, follow_symlinks=False)
    return dest


def watch_namespaces(tree: Path, namespaces: list[str]) -> None:
    """Makes the namespace-scoped overlay of ``tree`` watch ``namespaces``, the way docs/deploy.md
    tells a user to: a ``--namespace`` line per namespace in flags.yaml, and per namespace a copy of
    ``rbac/bookinfo`` with its ``namespace:`` changed, listed in ``rbac/kustomization.yaml``."""
    overlay = tree / "deploy" / "kustomize" / "overlays" / "namespace-scoped"
    flags = [
        {"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": f"--namespace={ns}"}
        for ns in namespaces
    ]
    (overlay / "flags.yaml").write_text(yaml.safe_dump(flags))
    rbac = overlay / "rbac"
    template = (rbac / "bookinfo" / "kustomization.yaml").read_text()
    assert "namespace: bookinfo\n" in template
    shutil.rmtree(rbac / "bookinfo")
    for ns in namespaces:
        (rbac / ns).mkdir()
        (rbac / ns / "kustomization.yaml").write_text(template.replace("namespace: bookinfo\n", f"namespace: {ns}\n"))
    kustomization = yaml.safe_load((rbac / "kustomization.yaml").read_text())
    kustomization["resources"] = [r for r in kustomization["resources"] if r != "bookinfo"] + namespaces
    (rbac / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))


def render(tree: Path, overlay: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(tree / "deploy" / "kustomize" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, f"kubectl kustomize {overlay} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def run_kubectl(kubeconfig: Path, *args: str, docs: list[dict[str, Any]] | None = None) -> str:
    """``kubectl`` against the cluster of ``kubeconfig``, ``docs`` on its standard input."""
    out = subprocess.run(
        [kubectl(), "--kubeconfig", str(kubeconfig), *args],
        input=yaml.safe_dump_all(docs) if docs is not None else None,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, f"kubectl {' '.join(args)}:\n{out.stderr}"
    return out.stdout


@functools.cache
def _shipped(overlay: str) -> tuple[str, ...]:
    with tempfile.TemporaryDirectory() as tmp:
        return tuple(yaml.safe_dump(d) for d in render(copy_tree(Path(tmp)), overlay))


def shipped(overlay: str) -> list[dict[str, Any]]:
    """The overlay as shipped (a fresh copy of the objects each call)."""
    return [yaml.safe_load(d) for d in _shipped(overlay)]


def find(docs: list[dict[str, Any]], kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
    hits = [
        d
        for d in docs
        if d["kind"] == kind
        and d["metadata"]["name"] == name
        and (namespace is None or d["metadata"].get("namespace") == namespace)
    ]
    assert len(hits) == 1, f"{len(hits)} {kind} {namespace or '*'}/{name} in the rendered manifests"
    return hits[0]


def kinds(docs: list[dict[str, Any]], *names: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in names]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "one container per Deployment"
    return dict(containers[0])


def parse_args(args: list[str]) -> argparse.Namespace:
    """The container's args parsed by the real ``elasti-istio`` command line (argparse exits on a
    flag it does not know; that is turned into an assertion with its message). Flags must be spelled
    out: argparse would take an abbreviation that a later flag could make ambiguous."""
    from elasti_istio import cli, options

    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert args and args[0] in commands, f"{args[:1]} is not an elasti-istio command"
    known = set(commands[args[0]]._option_string_actions)
    for arg in args[1:]:
        if arg.startswith("--"):
            assert arg.partition("=")[0] in known, f"elasti-istio {args[0]} has no flag {arg.partition('=')[0]}"
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return options.resolve_repeatable(parser.parse_args(args))
    except SystemExit:
        raise AssertionError(f"elasti-istio refuses {args}:\n{err.getvalue()}") from None


def with_flags(args: list[str], **overrides: str) -> list[str]:
    """``args`` with ``--flag=value`` entries replaced (or added) by ``overrides`` (``wake_listen=`` ->
    ``--wake-listen=``): the manifests' flags, with the addresses of a local run."""
    out = list(args)
    for key, value in overrides.items():
        flag = "--" + key.replace("_", "-")
        out = [a for a in out if a != flag and not a.startswith(flag + "=")]
        out.append(f"{flag}={value}")
    return out
