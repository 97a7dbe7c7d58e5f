"""The route token: proof that a request reached the activator through a VirtualService the controller
rewrote, not from a pod that set ``elasti-service`` itself.

In proxy mode the controller puts, beside ``elasti-service: <namespace>/<name>``, the header
``elasti-token: <HMAC-SHA256 of "<namespace>/<name>" under the route key>`` on the activator
destination (``set``, so a client cannot supply either). The key lives in a Secret only the controller
and the activator read; a tenant can read the token of its own VirtualServices, which names only its
own ElastiService. The activator checks the token in constant time before anything else.

The key file holds one key per line: the first signs, every line is accepted. To rotate, put the new
key first and keep the old one on the next line until the controller has rewritten the
VirtualServices in proxy mode (it does so as soon as it sees the file change), then drop it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from pathlib import Path

from elasti_istio.resources import TOKEN_HEADER as TOKEN_HEADER

log = logging.getLogger(__name__)

CHECK_EVERY = 1.0  # seconds between looks at the key file


def token(key: bytes, namespace: str, name: str) -> str:
    return hmac.new(key, f"{namespace}/{name}".encode(), hashlib.sha256).hexdigest()


def parse_keys(text: str) -> tuple[bytes, ...]:
    """The keys of a key file: one per non-empty line, the signing key first."""
    return tuple(line.strip().encode() for line in text.splitlines() if line.strip())


def valid(keys: tuple[bytes, ...], namespace: str, name: str, presented: str | None) -> bool:
    """Whether ``presented`` is the token of namespace/name under one of the keys (constant time)."""
    if not presented or not keys:
        return False
    ok = False
    for key in keys:  # every key is tried, so the time does not say which one matched
        ok |= hmac.compare_digest(token(key, namespace, name).encode(), presented.strip().encode())
    return ok


class KeyFile:
    """The route keys in a file (a mounted Secret), looked at again at most every ``CHECK_EVERY`` seconds
    so that a rotation is picked up without a restart. An unreadable or empty file keeps the keys
    last read (and says so in the log); one never read gives no keys (every token is refused), or the
    keys given to :meth:`use_until_read`."""

    def __init__(self, path: str, clock: object = time.monotonic) -> None:
        self.path = path
        self._clock = clock
        self._checked = -CHECK_EVERY
        self._stamp: tuple[float, int, int] | None = None
        self.keys: tuple[bytes, ...] = ()
        self.generation = 0  # bumped whenever the keys change
        self.from_file = False  # whether the keys are the file's
        self._unreadable = False
        self.refresh()

    def refresh(self) -> bool:
        """Re-reads the file if it changed; True when the keys did."""
        now = self._clock()  # type: ignore[operator]
        if now - self._checked < CHECK_EVERY:
            return False
        self._checked = now
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime, st.st_size, st.st_ino)
            if stamp == self._stamp:
                return False
            keys = parse_keys(Path(self.path).read_text())
        except OSError as exc:
            if not self._unreadable:  # once per spell, not once a second
                log.warning("route key file %s unreadable: %s", self.path, exc)
            self._unreadable = True
            return False
        self._unreadable = False
        self._stamp = stamp
        if not keys:
            log.warning("route key file %s holds no key; keeping the keys read before", self.path)
            return False
        self.from_file = True
        if keys == self.keys:
            return False
        self.keys = keys
        self.generation += 1
        log.info("route keys read from %s (%d key(s))", self.path, len(keys))
        return True

    def use_until_read(self, text: str) -> bool:
        """Keys to use while the file has given none: a Secret just created through the API reaches its
        mount a minute or so later. Ignored once the file has been read; True when the keys changed."""
        keys = parse_keys(text)
        if self.from_file or not keys or keys == self.keys:
            return False
        self.keys = keys
        self.generation += 1
        log.info("route keys from the API until %s is there (%d key(s))", self.path, len(keys))
        return True

    def token(self, namespace: str, name: str) -> str | None:
        return token(self.keys[0], namespace, name) if self.keys else None

    def valid(self, namespace: str, name: str, presented: str | None) -> bool:
        self.refresh()
        return valid(self.keys, namespace, name, presented)
