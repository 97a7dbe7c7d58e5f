"""Keys, static tokens and kubeconfigs of the local cluster.

The token file defines an admin (``system:masters``) and one identity per component. The component
identities carry the user names of the ServiceAccounts the shipped manifests create
(``system:serviceaccount:elasti-system:elasti-controller``...), so RoleBindings written for those
ServiceAccounts apply to them unchanged. They have no permission until something binds a role.
"""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

import yaml

SYSTEM_NAMESPACE = "elasti-system"

# name -> (user, groups)
IDENTITIES: dict[str, tuple[str, list[str]]] = {
    "admin": ("elasti-admin", ["system:masters"]),
    "controller": (
        f"system:serviceaccount:{SYSTEM_NAMESPACE}:elasti-controller",
        ["system:serviceaccounts", f"system:serviceaccounts:{SYSTEM_NAMESPACE}", "system:authenticated"],
    ),
    "activator": (
        f"system:serviceaccount:{SYSTEM_NAMESPACE}:elasti-activator",
        ["system:serviceaccounts", f"system:serviceaccounts:{SYSTEM_NAMESPACE}", "system:authenticated"],
    ),
}


def make_service_account_key(pki: Path) -> tuple[Path, Path]:
    pki.mkdir(parents=True, exist_ok=True)
    key, pub = pki / "sa.key", pki / "sa.pub"
    if not key.exists():
        subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
        subprocess.run(
            ["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(pub)], check=True, capture_output=True
        )
    return key, pub


def write_tokens(path: Path) -> dict[str, str]:
    """Writes the static token file and returns identity name -> token."""
    tokens = {name: secrets.token_hex(16) for name in IDENTITIES}
    lines = []
    for name, (user, groups) in IDENTITIES.items():
        lines.append(f'{tokens[name]},{user},{user},"{",".join(groups)}"')
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return tokens


def write_kubeconfig(path: Path, server: str, ca_file: Path | None, user: str, token: str) -> None:
    cluster: dict[str, object] = {"server": server}
    if ca_file is not None:
        cluster["certificate-authority"] = str(ca_file)
    else:
        cluster["insecure-skip-tls-verify"] = True
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "elasti-local", "cluster": cluster}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "elasti-local", "context": {"cluster": "elasti-local", "user": user}}],
        "current-context": "elasti-local",
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    path.chmod(0o600)
