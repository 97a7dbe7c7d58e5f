"""One ``error:`` line for the failures a person can fix (no kubeconfig, a bad one, an API server or
controller that cannot be reached, a refusal), instead of a traceback. Anything else is a bug and keeps
its traceback."""

from __future__ import annotations

import asyncio
import ssl

import aiohttp

from elasti_istio.kube import KubeError
from elasti_istio.kube.config import KubeconfigError


def explain(exc: BaseException) -> str | None:
    """What to tell the user about ``exc``, or None when it is not one of the known failures."""
    if isinstance(exc, KubeconfigError):
        return str(exc)
    if isinstance(exc, KubeError):
        if exc.status in (401, 403):
            return (
                f"the API server refused the request ({exc.status}): {exc.message}; check the kubeconfig's user "
                "and its RBAC"
            )
        return f"the API server answered {exc.status}: {exc.message}"
    if isinstance(exc, UnreachableError):
        return str(exc)
    if isinstance(exc, aiohttp.InvalidURL):
        return f"not a valid URL: {exc}"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | ssl.SSLError):
        return f"TLS failed: {exc}; check the kubeconfig's certificate-authority"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host}:{exc.port} ({exc.os_error.strerror or exc.os_error}); is it running?"
    if isinstance(exc, aiohttp.ClientError | asyncio.TimeoutError | TimeoutError | ConnectionError):
        return f"request failed: {exc or type(exc).__name__}"
    return None


class UnreachableError(Exception):
    """A server the command needs did not answer; the message names it and what to check."""
