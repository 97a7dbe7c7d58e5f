"""Request bodies that can be sent again: kept in memory up to a bound, spooled to disk beyond it.

A forward the mesh answers "not ready" reached no workload, so the request is sent again later,
body and all. A held request's body is read whole before its first forward (in memory up to
``--retry-body-limit``, then in an unnamed temporary file under ``--spool-dir``), and every try
replays it: large and small held bodies are served alike. A request that finds its target ready on
arrival keeps a body over the memory bound streaming through, once, as before (a large upload reaches
a ready workload as it arrives). The bytes on disk of one activator are bounded by ``--spool-limit``;
a body that would pass it is refused with 503 and Retry-After.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator
from typing import IO

from aiohttp import web

_READ = 256 * 1024  # bytes read back from the spool file at a time


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class BodyError(Exception):
    """The request body cannot be taken: too large (413), too slow (408), malformed (400) or no room to
    keep it (503).

    Answered with ``status`` while nothing has been sent to the client yet; raised from the body's
    stream it also breaks off the upstream request, so that the workload never gets a truncated body.
    """

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail


class Spool:
    """Where bodies over the memory bound go, and how many bytes all of them may take together."""

    def __init__(self, directory: str | None = None, limit: int = 1 << 30) -> None:
        self.directory = directory or tempfile.gettempdir()
        self.limit = limit
        self.used = 0

    def reserve(self, n: int) -> bool:
        if self.limit and self.used + n > self.limit:
            return False
        self.used += n
        return True

    def release(self, n: int) -> None:
        self.used = max(0, self.used - n)


class RequestBody:
    """The request body, read only when first forwarded, and replayable for every further attempt.

    Reading it must finish within ``timeout`` seconds of its start and stay within ``max_size`` bytes
    (0: no limit for either); otherwise ``failure`` says why and every further read raises it.
    """

    __slots__ = (
        "_buf",
        "_complete",
        "_deadline",
        "_file",
        "_loaded",
        "_request",
        "_reserved",
        "_spooled",
        "failure",
        "limit",
        "max_size",
        "spool",
        "timeout",
    )

    def __init__(
        self,
        request: web.BaseRequest,
        limit: int,
        max_size: int = 0,
        timeout: float = 0.0,
        spool: Spool | None = None,
    ) -> None:
        self._request = request
        self.limit = limit
        self.max_size = max_size
        self.timeout = timeout
        self.spool = spool or Spool()
        self._loaded = False
        self._complete = False
        self._buf = bytearray()  # the first bytes of the body, up to ``limit``
        self._file: IO[bytes] | None = None  # the rest, once the body is larger
        self._spooled = 0  # bytes written to the file
        self._reserved = 0  # bytes taken from the spool's limit for it
        self.failure: BodyError | None = None
        self._deadline: float | None = None

    @property
    def retryable(self) -> bool:
        """Whether the body can be sent again: all of it was read and kept (in memory or on disk)."""
        return self.failure is None and self._complete

    async def load(self, whole: bool = False) -> None:
        """Reads the body before the first forward: all of it when ``whole`` (a held request: kept in
        memory up to the limit, on disk beyond it, so that every try sends it whole), else as much as
        fits in memory; a larger one is then streamed through as it is sent, once."""
        if self._loaded:
            return
        self._loaded = True
        req = self._request
        if not req.body_exists:
            self._complete = True
            return
        if self.timeout > 0:
            self._deadline = asyncio.get_running_loop().time() + self.timeout
        if req.version >= (1, 1) and req.headers.get("Expect", "").lower() == "100-continue":
            # Asked only now, so a held client does not send its body before it can go anywhere.
            await req.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if whole:
            while not self._complete:
                await self._take()
            return
        length = req.content_length
        if length is not None and length > self.limit:
            return
        while len(self._buf) <= self.limit:  # in memory if it ends within the limit
            chunk = await self._read()
            if not chunk:
                self._complete = True
                return
            self._buf += chunk

    async def _take(self) -> bytes:
        """Reads the next piece from the client and keeps it (b"" at the end of the body)."""
        chunk = await self._read()
        if not chunk:
            self._complete = True
            return chunk
        room = self.limit - len(self._buf) if self._file is None else 0
        if room > 0:
            self._buf += chunk[:room]
            chunk_rest = chunk[room:]
        else:
            chunk_rest = chunk
        if chunk_rest:
            await self._write(chunk_rest)
        return chunk

    async def _write(self, data: bytes) -> None:
        if not self.spool.reserve(len(data)):
            raise self._fail(
                503,
                "spool full",
                f"the activator keeps {self.spool.limit} bytes of request bodies on disk at most (--spool-limit); "
                "try again shortly",
            )
        self._reserved += len(data)
        if self._file is None:
            # Unbuffered: what was written is at once what a read-back (os.pread) sees.
            self._file = await asyncio.to_thread(tempfile.TemporaryFile, buffering=0, dir=self.spool.directory)
        await asyncio.to_thread(_write_all, self._file.fileno(), data)
        self._spooled += len(data)  # only now: a concurrent replay reads back what is on disk

    async def _read(self) -> bytes:
        """The next piece of the body from the client (b"" at its end), within the deadline and size limit."""
        if self.failure is not None:
            raise self.failure
        content = self._request.content
        try:
            if self._deadline is None:
                chunk = await content.readany()
            else:
                async with asyncio.timeout_at(self._deadline):
                    chunk = await content.readany()
        except TimeoutError:
            raise self._fail(
                408,
                "request body timeout",
                f"the request body was not complete within {self.timeout:g}s (--request-body-timeout)",
            ) from None
        except web.RequestPayloadError as exc:
            raise self._fail(400, "malformed request body", str(exc)[:300]) from None
        total = len(self._buf) + self._spooled + len(chunk)
        if self.max_size and total > self.max_size:
            detail = f"the request body is larger than {self.max_size} bytes (--max-body-size)"
            raise self._fail(413, "request body too large", detail)
        return chunk

    def _fail(self, status: int, error: str, detail: str) -> BodyError:
        self.failure = BodyError(status, error, detail)
        return self.failure

    def payload(self) -> bytes | AsyncIterator[bytes] | None:
        """What to send upstream on this try: the bytes when the body is complete and in memory; a replay
        of memory and disk when it is complete but larger; else what was read, then the rest as it
        arrives (sent once: a try after it cannot be made)."""
        if self.failure is not None:
            raise self.failure
        if self._complete and self._file is None:
            return bytes(self._buf) if self._request.body_exists else None
        return self._replay() if self._complete else self._stream()

    async def _replay(self) -> AsyncIterator[bytes]:
        """The whole kept body; reads nothing from the client, so tries never compete for it."""
        sent, total = 0, self._kept()
        while sent < total:
            piece = await self._kept_piece(sent)
            sent += len(piece)
            yield piece

    async def _stream(self) -> AsyncIterator[bytes]:
        """What was read, then the rest as it arrives: streamed through once, never kept whole."""
        if self._buf:
            yield bytes(self._buf)
        while chunk := await self._read():
            yield chunk

    def trailers(self) -> list[tuple[str, str]]:
        """The request's trailer fields, once its body was read to the end (kept only with
        ``--http1-trailers``; see :mod:`activator.trailers`)."""
        store = getattr(self._request.protocol, "trailers", None)
        return store.get(self._request.content) if store is not None else []

    def _kept(self) -> int:
        return len(self._buf) + self._spooled

    async def _kept_piece(self, offset: int) -> bytes:
        """Kept bytes from ``offset`` on: from memory, or read back from the spool file."""
        if offset < len(self._buf):
            return bytes(self._buf[offset:])
        assert self._file is not None
        start = offset - len(self._buf)
        piece = await asyncio.to_thread(os.pread, self._file.fileno(), min(_READ, self._spooled - start), start)
        if not piece:
            raise self._fail(500, "request body lost", "the spooled request body could not be read back")
        return piece

    def close(self) -> None:
        """Drops the spooled part (the temporary file has no name: closing it frees the disk)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self.spool.release(self._reserved)
        self._reserved = 0
        self._spooled = 0
