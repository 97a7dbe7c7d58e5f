"""The image holds what production needs and nothing else: the build context .dockerignore lets
through has no local cluster, kubelet stand-in, demo, benchmarks or tests, the dependencies the
Dockerfile installs have no gRPC library, and with exactly those two (nothing of the checkout, no
other installed package) every production module imports and the production commands run, while
``cluster``, ``kubelet`` and ``demo`` fail in one line saying they are not in the image.

No container engine is needed: the context is assembled the way Docker reads .dockerignore and the
dependencies are the installed distributions that ``pip install ".[extras]"`` would bring in."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from setuptools import find_namespace_packages

from elasti_istio import cli

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
NOT_PRODUCTION = (*cli.LOCAL_PACKAGES, "benchmarks", "tests")
RUNS = (
    ["--help"],
    ["controller", "--help"],
    ["activator", "--help"],
    ["status", "--help"],
    ["wake", "--help"],
    ["cluster", "up"],
    ["cluster", "--help"],
    ["kubelet"],
    ["demo", "--keep"],
)


# ---- the build context ----------------------------------------------------------------------------


def _pattern(text: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go's filepath.Match plus ``**``) as a regular expression."""
    out, i = "", 0
    while i < len(text):
        if text.startswith("**", i):
            out, i = out + ".*", i + 2
        elif text[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif text[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(text[i]), i + 1
    return re.compile(out)


def dockerignore() -> list[tuple[bool, str, re.Pattern[str]]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        text = line.lstrip("!").strip("/")
        rules.append((keep, text, _pattern(text)))
    return rules


def ignored(rel: str, rules: list[tuple[bool, str, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for keep, _, pattern in rules:
        if any(pattern.fullmatch(p) for p in prefixes):
            result = not keep
    return result


def build_context(dest: Path) -> list[str]:
    """Copies into ``dest`` the files ``docker build .`` sends; returns their paths."""
    rules = dockerignore()
    let_through = [text for keep, text, _ in rules if keep]
    assert "*" in [text for keep, text, _ in rules if not keep], "an allow-list"
    sent: list[str] = []
    for folder, dirs, files in os.walk(ROOT):
        here = Path(folder).relative_to(ROOT).as_posix()
        here = "" if here == "." else here + "/"
        # An ignored folder is not entered unless a later exception may let something below it through.
        dirs[:] = [
            d for d in dirs if not ignored(here + d, rules) or any(t.startswith(here + d + "/") for t in let_through)
        ]
        for name in files:
            rel = here + name
            if not ignored(rel, rules):
                sent.append(rel)
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, dest / rel)
    return sorted(sent)


# ---- the dependencies the Dockerfile installs -------------------------------------------------------


def dockerfile_extras() -> list[str]:
    """The extras of the ``pip install ".[...]"`` that makes the image's environment."""
    text = (ROOT / "Dockerfile").read_text()
    found = re.findall(r"pip install [^\n]*?[\"']?\.\[([\w,-]*)\][\"']?", text)
    assert len(found) == 1, found
    return [e.strip() for e in found[0].split(",") if e.strip()]


def _installed() -> dict[str, importlib.metadata.Distribution]:
    return {canonicalize_name(d.metadata["Name"]): d for d in importlib.metadata.distributions()}


def closure(requirements: list[str]) -> dict[str, importlib.metadata.Distribution]:
    """The installed distributions ``requirements`` bring in, transitively, markers evaluated here."""
    installed = _installed()
    found: dict[str, importlib.metadata.Distribution] = {}
    extras_of: dict[str, set[str]] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        extras = set(req.extras) | {""}
        if name in found and extras <= extras_of[name]:
            continue
        assert name in installed, f"{req} is required but not installed here"
        dist = found[name] = installed[name]
        extras_of[name] = extras_of.get(name, set()) | extras
        for sub in map(Requirement, dist.requires or []):
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras):
                todo.append(sub)
    return found


def image_requirements() -> list[str]:
    optional = PYPROJECT["project"]["optional-dependencies"]
    return list(PYPROJECT["project"]["dependencies"]) + [r for e in dockerfile_extras() for r in optional[e]]


def site_of(dists: dict[str, importlib.metadata.Distribution], dest: Path) -> None:
    """A site-packages holding exactly the files of ``dists`` (links to the installed ones)."""
    for dist in dists.values():
        assert dist.files is not None, f"{dist.metadata['Name']} has no RECORD"
        for f in dist.files:
            if f.parts[0] == "..":
                continue  # scripts
            target = dest / PurePosixPath(f)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(Path(str(dist.locate_file(f))))


def top_level(dist: importlib.metadata.Distribution) -> set[str]:
    names = {f.parts[0] for f in dist.files or [] if f.parts[0] != ".." and not f.parts[0].endswith(".dist-info")}
    return {n.split(".")[0] for n in names if n != "__pycache__"}


# ---- the production install, run in isolation -------------------------------------------------------

PROBE = r"""
import contextlib, importlib, io, json, pkgutil, sys
ctx, site = sys.argv[1], sys.argv[2]
sys.path[:0] = [ctx, site]
imported = []
for top in ("elasti_istio", "activator"):
    package = importlib.import_module(top)
    for info in pkgutil.walk_packages(package.__path__, top + "."):
        if not info.name.endswith(".__main__"):
            importlib.import_module(info.name)
            imported.append(info.name)
from elasti_istio.cli import main
runs = {}
for argv in json.loads(sys.argv[3]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    runs[" ".join(argv)] = [code, out.getvalue(), err.getvalue()]
files = sorted({str(getattr(m, "__file__", None) or "") for m in list(sys.modules.values())})
print(json.dumps({"imported": imported, "runs": runs, "modules": sorted(sys.modules), "files": files}))
"""


@dataclass
class Image:
    context: Path
    sent: list[str]
    packages: list[str]
    dists: dict[str, importlib.metadata.Distribution]
    imported: list[str]
    runs: dict[str, tuple[int, str, str]]
    modules: list[str]
    files: list[str]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    base = tmp_path_factory.mktemp("image")
    ctx, site = base / "context", base / "site-packages"
    sent = build_context(ctx)
    find = PYPROJECT["tool"]["setuptools"]["packages"]["find"]
    packages = sorted(find_namespace_packages(where=str(ctx), include=find["include"], exclude=find.get("exclude", ())))
    dists = closure(image_requirements())
    site_of(dists, site)
    # -I: no environment, user site or script folder; -S: no site-packages of this venv (nor the
    # editable install's finder), so only the context and the image's dependencies can be imported.
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-B", "-c", PROBE, str(ctx), str(site), json.dumps(RUNS)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=base,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(out.stdout)
    return Image(ctx, sent, packages, dists, report["imported"], report["runs"], report["modules"], report["files"])


def test_the_context_has_no_local_cluster_benchmarks_or_tests(image: Image) -> None:
    assert "pyproject.toml" in image.sent and "README.md" in image.sent
    assert {"activator", "elasti_istio", "elasti_istio.controller", "elasti_istio.kube"} <= set(image.packages)
    assert not [p for p in image.packages if p.startswith(NOT_PRODUCTION)]
    assert not [f for f in image.sent if f.replace("/", ".").startswith(NOT_PRODUCTION)]
    assert not [f for f in image.sent if "__pycache__" in f or ".egg-info" in f]


def test_what_the_context_leaves_out_is_what_the_cli_expects_missing() -> None:
    """A package left out of the image that the CLI does not know to be optional would break it."""
    find = PYPROJECT["tool"]["setuptools"]["packages"]["find"]
    everything = find_namespace_packages(where=str(ROOT), include=find["include"])
    rules = dockerignore()
    left_out = {p for p in everything if ignored(p.replace(".", "/"), rules)}
    with_code = {p for p in left_out if list((ROOT / p.replace(".", "/")).glob("*.py"))}
    assert with_code and all(p.startswith(cli.LOCAL_PACKAGES) for p in with_code), with_code
    assert all(any(p == q or p.startswith(q + ".") for p in left_out) for q in cli.LOCAL_PACKAGES)


def test_the_image_installs_no_grpc_library(image: Image) -> None:
    optional = PYPROJECT["project"]["optional-dependencies"]
    assert "local" not in dockerfile_extras() and "test" not in dockerfile_extras()
    local = {canonicalize_name(Requirement(r).name) for r in optional["local"]}
    assert local and not local & set(image.dists)
    assert "h2" in image.dists, "the activator's HTTP/2"
    installed = _installed()
    modules = set().union(*(top_level(installed[d]) for d in local if d in installed))
    assert modules <= set(cli.LOCAL_DEPENDENCIES), "the CLI names the local extra's modules"


def test_no_production_module_imports_a_local_part(image: Image) -> None:
    """Also the imports inside functions, which importing every module does not run."""
    bad = []
    for path in image.context.rglob("*.py"):
        package = ".".join(path.relative_to(image.context).with_suffix("").parts[:-1])
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                prefix = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]) if node.level else ""
                names = [".".join(x for x in (prefix, node.module or "") if x)]
            for name in names:
                if name.startswith(NOT_PRODUCTION) or name.split(".")[0] in cli.LOCAL_DEPENDENCIES:
                    bad.append(f"{path.relative_to(image.context)}:{node.lineno} imports {name}")
    assert bad == []


def test_every_production_module_imports_with_only_the_image(image: Image) -> None:
    expected = {p for p in image.packages if p not in ("elasti_istio", "activator")}
    assert expected <= set(image.imported)
    assert {"activator.app", "elasti_istio.controller.operator", "elasti_istio.cli"} <= set(image.imported)
    assert not [m for m in image.modules if m.startswith(NOT_PRODUCTION) or m.split(".")[0] in cli.LOCAL_DEPENDENCIES]
    # Nothing came from the checkout or this environment's site-packages.
    assert not [f for f in image.files if f.startswith(str(ROOT) + "/")]


def test_production_commands_run(image: Image) -> None:
    assert PYPROJECT["project"]["scripts"]["elasti-istio"] == "elasti_istio.cli:main"
    for argv in ("--help", "controller --help", "activator --help", "status --help", "wake --help"):
        code, out, err = image.runs[argv]
        assert code == 0 and out.startswith("usage: elasti-istio") and err == "", (argv, err)
    assert "--leader-election" in image.runs["controller --help"][1]


@pytest.mark.parametrize("argv", ["cluster up", "cluster --help", "kubelet", "demo --keep"])
def test_local_commands_say_they_are_not_in_the_image(image: Image, argv: str) -> None:
    code, out, err = image.runs[argv]
    lines = err.strip().splitlines()
    assert code == 1 and out == "", (code, out)
    assert len(lines) == 1 and lines[0].startswith(f"error: `elasti-istio {argv.split()[0]}` is not in this image")
