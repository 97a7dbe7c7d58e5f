"""Fixtures shared by the cluster tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ControllerProc


@pytest.fixture
def start_controller(cluster, namespace: str, tmp_path: Path) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    procs: list[ControllerProc] = []

    def start(*extra: str, activator_deployment: str | None = None, ns: str | None = namespace) -> ControllerProc:
        proc = ControllerProc(
            cluster.admin_kubeconfig,
            ns,
            tmp_path / f"controller-{len(procs)}.log",
            *extra,
            activator_deployment=activator_deployment,
        ).start()
        procs.append(proc)
        return proc.wait_ready()

    yield start
    for p in procs:
        p.stop()
        print(p.log_path.name, p.logs()[-3000:])
