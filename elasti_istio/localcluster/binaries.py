"""Finds etcd, kube-apiserver and kube-controller-manager, installing them once when missing."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

NAMES = ("etcd", "kube-apiserver", "kube-controller-manager")


class BinariesMissing(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("ELASTI_CACHE_DIR") or Path.home() / ".cache" / "elasti-istio")


def install_script() -> Path:
    return Path(str(resources.files("elasti_istio.localcluster") / "install-control-plane.sh"))


def _complete(folder: Path) -> bool:
    return all((folder / n).is_file() and os.access(folder / n, os.X_OK) for n in NAMES)


def find(install: bool = True) -> Path:
    """The folder holding the three programs.

    ``KUBEBUILDER_ASSETS`` wins when set (it must then be complete); otherwise the cache, filled by
    the install script on first use (its progress goes to stderr).
    """
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets:
        folder = Path(assets)
        if not _complete(folder):
            missing = [n for n in NAMES if not (folder / n).is_file()]
            raise BinariesMissing(f"KUBEBUILDER_ASSETS={assets} lacks {', '.join(missing)}")
        return folder
    folder = cache_dir() / "bin"
    if _complete(folder):
        return folder
    if not install:
        raise BinariesMissing(
            f"control-plane binaries not found in {folder}; run {install_script()} or set KUBEBUILDER_ASSETS"
        )
    print(f"control-plane binaries missing in {folder}: installing (first run only)", file=sys.stderr)
    proc = subprocess.run(["bash", str(install_script())], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0 or not _complete(folder):
        raise BinariesMissing(f"installing the control plane failed (exit {proc.returncode}); see the output above")
    return folder
