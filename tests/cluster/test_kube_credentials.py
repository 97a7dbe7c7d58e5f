"""Credentials that change while the controller runs, against the real API server (static tokens): a
kubeconfig's ``tokenFile`` is re-read, an ``exec`` plugin is run again when its token expires or is
refused. Who the server took a request for is asked of the server itself (SelfSubjectReview)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from elasti_istio.kube import Kube, KubeError, load_connection
from elasti_istio.kube import config as kubeconfig
from elasti_istio.localcluster.cluster import ClusterInfo
from elasti_istio.localcluster.identities import IDENTITIES

PLUGIN = """\
import datetime, json, os, pathlib, sys
here = pathlib.Path(sys.argv[0]).parent
lifetime = float(os.environ.get("TOKEN_LIFETIME", "0"))
status = {"token": (here / "token").read_text().strip()}
if lifetime:
    until = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=lifetime)
    status["expirationTimestamp"] = until.strftime("%Y-%m-%dT%H:%M:%SZ")
print(json.dumps({"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential", "status": status}))
"""


def token_of(kc: Path) -> str:
    return str(yaml.safe_load(kc.read_text())["users"][0]["user"]["token"])


def kubeconfig_with(cluster: ClusterInfo, folder: Path, user: dict[str, Any]) -> Path:
    doc = yaml.safe_load(cluster.admin_kubeconfig.read_text())
    doc["users"][0]["user"] = user
    path = folder / "kubeconfig"
    path.write_text(yaml.safe_dump(doc))
    return path


async def whoami(kube: Kube) -> str:
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
    review = await kube.request("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews", body=body)
    return str(review["status"]["userInfo"]["username"])


CONTROLLER, ACTIVATOR = IDENTITIES["controller"][0], IDENTITIES["activator"][0]


@pytest.fixture
def tokens(cluster: ClusterInfo) -> dict[str, str]:
    return {"controller": token_of(cluster.controller_kubeconfig), "activator": token_of(cluster.activator_kubeconfig)}


def test_a_token_file_that_changes_is_followed(cluster: ClusterInfo, tokens: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "token").write_text(tokens["controller"] + "\n")
    conn = load_connection(str(kubeconfig_with(cluster, tmp_path, {"tokenFile": "token"})))  # relative to the file

    async def run() -> None:
        async with Kube(conn) as kube:
            assert await whoami(kube) == CONTROLLER
            (tmp_path / "token").write_text(tokens["activator"] + "\n")  # rotated under a running client
            assert await whoami(kube) == ACTIVATOR

    asyncio.run(run())


def exec_user(folder: Path, lifetime: float) -> dict[str, Any]:
    script = folder / "plugin.py"
    script.write_text(PLUGIN)
    return {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": sys.executable,
            "args": [str(script)],
            "env": [{"name": "TOKEN_LIFETIME", "value": str(lifetime)}],
            "interactiveMode": "Never",
        }
    }


def test_an_exec_plugin_is_run_again_when_its_token_expires(
    cluster: ClusterInfo, tokens: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "token").write_text(tokens["controller"])
    lifetime = kubeconfig.EXPIRY_MARGIN + 3
    conn = load_connection(str(kubeconfig_with(cluster, tmp_path, exec_user(tmp_path, lifetime))))
    plugin = conn.exec_plugin
    assert plugin is not None

    async def run() -> None:
        async with Kube(conn) as kube:
            assert await whoami(kube) == CONTROLLER
            assert await whoami(kube) == CONTROLLER
            assert plugin.runs == 1, "a token that has not expired is used again"
            (tmp_path / "token").write_text(tokens["activator"])
            deadline = asyncio.get_running_loop().time() + 60
            while await whoami(kube) != ACTIVATOR:  # the plugin's next run, once its token expires
                assert asyncio.get_running_loop().time() < deadline, "the plugin was not run again"
                await asyncio.sleep(0.2)
            assert plugin.runs == 2

    asyncio.run(run())


def test_an_exec_plugins_token_refused_by_the_server_is_replaced(
    cluster: ClusterInfo, tokens: dict[str, str], tmp_path: Path
) -> None:
    """No expirationTimestamp: the token is used until the API server answers 401, then the plugin runs
    again and the request is sent once more with the new token."""
    (tmp_path / "token").write_text("revoked")
    conn = load_connection(str(kubeconfig_with(cluster, tmp_path, exec_user(tmp_path, 0))))
    plugin = conn.exec_plugin
    assert plugin is not None

    async def run() -> None:
        async with Kube(conn) as kube:
            with pytest.raises(KubeError) as err:
                await whoami(kube)
            assert err.value.status == 401 and plugin.runs == 2, "refused, run again, refused again: an error"
            (tmp_path / "token").write_text(tokens["controller"])
            assert await whoami(kube) == CONTROLLER
            assert plugin.runs == 3

    asyncio.run(run())


def test_the_kubeconfig_user_of_the_context_in_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Several files in $KUBECONFIG merge as kubectl merges them: the first to name a thing wins."""
    first = {
        "current-context": "b",
        "contexts": [{"name": "a", "context": {"user": "ua"}}],
        "users": [{"name": "ub", "user": {"tokenFile": "first-token"}}],
    }
    second = {
        "current-context": "a",
        "contexts": [{"name": "b", "context": {"user": "ub"}}, {"name": "a", "context": {"user": "other"}}],
        "users": [{"name": "ub", "user": {"token": "shadowed"}}, {"name": "ua", "user": {"token": "t"}}],
    }
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "config").write_text(json.dumps(first))
    (tmp_path / "two").write_text(json.dumps(second))
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path / 'one' / 'config'}:{tmp_path / 'two'}")
    user, base = kubeconfig._kubeconfig_user(None, None)
    assert user == {"tokenFile": "first-token"} and base == str(tmp_path / "one")
    assert kubeconfig._kubeconfig_user(None, "a")[0] == {"token": "t"}
    assert kubeconfig._kubeconfig_user(None, "missing") == ({}, "")
