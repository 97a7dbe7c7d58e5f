"""The server side of HTTP/2 cleartext on the proxy port: one task per stream, cancelled when the client
resets it (a cancelled gRPC call leaves the queue at once), GOAWAY and a bounded wait on shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import h2.errors
import h2.events
from hyperframe.frame import GoAwayFrame
from multidict import CIMultiDict

from activator.h2conn import H2Connection, Headers, Stream, StreamGone

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class H2Request:
    """One request stream: its pseudo-headers, its other headers (raw and for lookups), and the stream."""

    __slots__ = ("authority", "headers", "method", "path", "raw", "remote", "scheme", "started", "stream")

    def __init__(self, stream: Stream, remote: str) -> None:
        self.stream = stream
        self.remote = remote
        self.method = self.path = self.authority = self.scheme = ""
        self.raw: Headers = []
        self.headers: CIMultiDict[str] = CIMultiDict()
        for name, value in stream.headers:
            if name.startswith(b":"):
                text = value.decode("latin-1")
                if name == b":method":
                    self.method = text
                elif name == b":path":
                    self.path = text
                elif name == b":authority":
                    self.authority = text
                elif name == b":scheme":
                    self.scheme = text
                continue
            self.raw.append((name, value))
            self.headers.add(name.decode("latin-1"), value.decode("latin-1"))
        if not self.authority and "host" in self.headers:
            self.authority = self.headers["host"]
        self.started = False  # response headers sent

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.raw:
            if k == name:
                return v
        return None

    @property
    def content_length(self) -> int | None:
        value = self.header(b"content-length")
        return int(value) if value is not None and value.isdigit() else None

    async def respond(self, headers: Headers, end: bool = False) -> None:
        self.started = True
        await self.stream.send_headers(headers, end)


Handler = Callable[[H2Request], Awaitable[None]]


class H2Server(H2Connection):
    """One HTTP/2 connection of the proxy listener."""

    client_side = False

    def __init__(
        self, handler: Handler, max_streams: int, idle_timeout: float, on_lost: Callable[[H2Server], None]
    ) -> None:
        super().__init__()
        self.handler = handler
        self._max_streams = max_streams
        self.idle_timeout = idle_timeout
        self.on_lost = on_lost
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.accepting = True
        self.remote = ""
        self._idle: asyncio.TimerHandle | None = None

    def max_streams(self) -> int:
        return self._max_streams

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) else ""
        self._arm_idle()

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        if self._idle is not None:
            self._idle.cancel()
        for task in list(self.tasks.values()):
            task.cancel()
        self.on_lost(self)

    def on_event(self, event: h2.events.Event) -> None:
        if not isinstance(event, h2.events.RequestReceived):
            return
        sid = event.stream_id
        if not self.accepting:
            self.h2.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        stream = Stream(self, sid)
        stream.headers = list(event.headers)
        self.streams[sid] = stream
        if event.stream_ended is not None:
            stream._end()
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self.tasks[sid] = self.loop.create_task(self._run(stream))

    def on_reset(self, stream_id: int) -> None:
        task = self.tasks.get(stream_id)
        if task is not None:
            task.cancel()

    async def _run(self, stream: Stream) -> None:
        request = H2Request(stream, self.remote)
        try:
            await self.handler(request)
        except (asyncio.CancelledError, StreamGone):
            pass
        except Exception:
            log.exception("an HTTP/2 request from %s failed", self.remote)
            self.reset(stream.id, h2.errors.ErrorCodes.INTERNAL_ERROR)
        finally:
            self.tasks.pop(stream.id, None)
            if stream.id in self.streams:
                if stream.ended or stream.gone is not None or stream.sent_end:
                    # Answered before the request ended (a call the origin finished first): what the client
                    # still sends is acknowledged and dropped. No RST_STREAM(NO_ERROR), which RFC 9113 8.1
                    # allows: gRPC's C core takes it for an error when the trailers came just before it.
                    self.forget(stream.id)
                else:  # the answer was never completed
                    self.reset(stream.id, h2.errors.ErrorCodes.CANCEL)
            self._arm_idle()

    def _arm_idle(self) -> None:
        if self.tasks or self.idle_timeout <= 0 or self.transport is None:
            return
        if self._idle is not None:
            self._idle.cancel()
        self._idle = self.loop.call_later(self.idle_timeout, self._idle_close)

    def _idle_close(self) -> None:
        self._idle = None
        if not self.tasks:
            self._goaway()
            self.close()

    def _goaway(self) -> None:
        """GOAWAY naming the last stream taken, written beside ``h2``: its own would end the connection
        for the streams still being answered."""
        self.accepting = False
        if self.transport is None:
            return
        self.flush_now()  # what h2 has queued goes first
        frame = GoAwayFrame(0)
        frame.last_stream_id = self.h2.highest_inbound_stream_id
        frame.error_code = h2.errors.ErrorCodes.NO_ERROR
        self.transport.write(frame.serialize())

    async def shutdown(self, timeout: float) -> None:
        """No new streams; the ones in progress get ``timeout`` seconds, then the connection closes."""
        self._goaway()
        tasks = list(self.tasks.values())
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        for task in tasks:
            task.cancel()
        self.close()
