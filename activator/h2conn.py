"""HTTP/2 over one asyncio connection, for both ends: the ``h2`` state machine driven by a transport.

Flow control is what bounds memory: data received on a stream is acknowledged to the peer only when
whoever reads the stream has taken it, so a client that streams into a held call is stopped by its
own window rather than filling the activator. Sending waits for the peer's window and for the
transport's write buffer to drain.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Iterable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

log = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]
STREAM_WINDOW = 1 << 20  # what one stream may have unread in the activator
CONNECTION_WINDOW = 16 << 20
MAX_FRAME = 1 << 16


class StreamGone(Exception):
    """The stream was reset or its connection closed: nothing more can be sent or received on it."""

    def __init__(self, code: int = h2.errors.ErrorCodes.CANCEL, detail: str = "") -> None:
        super().__init__(detail or f"stream reset ({h2.errors.ErrorCodes(code).name})")
        self.code = code


class Stream:
    """One HTTP/2 stream as seen by its reader: headers, then data chunks, then maybe trailers."""

    __slots__ = ("_chunks", "_conn", "_data", "_ended", "_gone", "headers", "id", "response", "sent_end", "trailers")

    def __init__(self, conn: H2Connection, stream_id: int) -> None:
        self._conn = conn
        self.id = stream_id
        self.headers: Headers = []
        self.trailers: Headers | None = None
        self.response: asyncio.Future[Headers] = conn.loop.create_future()  # the peer's (final) headers
        self._chunks: collections.deque[tuple[bytes, int]] = collections.deque()
        self._data = asyncio.Event()
        self._ended = False
        self._gone: StreamGone | None = None
        self.sent_end = False  # our side of the stream is complete

    @property
    def ended(self) -> bool:
        """The peer sent all it will send and it has all been read."""
        return self._ended and not self._chunks

    @property
    def gone(self) -> StreamGone | None:
        return self._gone

    async def read(self) -> bytes | None:
        """The next chunk of the peer's data, None at the end; acknowledges it so the peer may send more."""
        while not self._chunks:
            if self._ended:  # all it sent is here, whatever came after
                return None
            if self._gone is not None:
                raise self._gone
            self._data.clear()
            await self._data.wait()
        data, flow = self._chunks.popleft()
        self._conn.consumed(self.id, flow)
        return data

    def _feed(self, data: bytes, flow: int) -> None:
        self._chunks.append((data, flow))
        self._data.set()

    def _end(self) -> None:
        self._ended = True
        self._data.set()

    def _fail(self, gone: StreamGone) -> None:
        if self._gone is None:
            self._gone = gone
        self._data.set()
        if not self.response.done():
            self.response.set_exception(gone)
            self.response.exception()  # retrieved: nobody may be waiting for it

    async def send_headers(self, headers: Iterable[tuple[bytes, bytes]], end: bool = False) -> None:
        await self._conn.send_headers(self.id, headers, end)

    async def send_data(self, data: bytes, end: bool = False) -> None:
        await self._conn.send_data(self.id, data, end)

    def reset(self, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        self._conn.reset(self.id, code)


class H2Connection(asyncio.Protocol):
    """The shared half: events to streams, flow-controlled sending, resets and the end of the connection."""

    client_side = False

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=self.client_side,
                header_encoding=None,
                # What goes out was checked coming in (the other side's headers) or is the activator's own:
                # checking it again costs more per call than forwarding it does.
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        self.closed = self.loop.create_future()
        self.goaway = False  # the peer said it takes no new streams
        self._window = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._flush_due = False

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.h2.local_settings = h2.settings.Settings(
            client=self.client_side,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams(),
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        # h2 reads the frame size it accepts once, from its default settings: follow what is advertised.
        self.h2.max_inbound_frame_size = MAX_FRAME
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()

    def max_streams(self) -> int:
        return 1000

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.debug("HTTP/2 protocol error from the peer: %s", exc)
            self.flush()
            self.close()
            return
        for event in events:
            self.dispatch(event)
        self.flush()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        gone = StreamGone(h2.errors.ErrorCodes.CANCEL, "the connection closed")
        for stream in list(self.streams.values()):
            stream._fail(gone)
        self.streams.clear()
        self._window.set()
        self._writable.set()
        if not self.closed.done():
            self.closed.set_result(None)

    # -- events

    def dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                return
            stream._feed(event.data, event.flow_controlled_length)
            if event.stream_ended is not None:
                stream._end()
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.trailers = list(event.headers)
                if event.stream_ended is not None:
                    stream._end()
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._end()
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.pop(event.stream_id, None)
            if stream is not None:
                if event.error_code == h2.errors.ErrorCodes.NO_ERROR and stream._ended:
                    # The peer finished, then closed its end of our half (an origin that answered before
                    # the request was all sent): what it said stays readable; only sending stops.
                    stream._gone = StreamGone(event.error_code, "the peer closed the stream after its answer")
                else:
                    stream._fail(StreamGone(event.error_code))
                    self._release(stream)
            self._window.set()
            self.on_reset(event.stream_id)
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._window.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = True
            last = event.last_stream_id if event.last_stream_id is not None else 0
            for sid, stream in list(self.streams.items()):
                if sid > last:  # never processed by the peer: safe to send elsewhere
                    self.streams.pop(sid, None)
                    stream._fail(StreamGone(h2.errors.ErrorCodes.REFUSED_STREAM, "the peer closed the connection"))
            self.on_goaway()
        else:
            self.on_event(event)

    def on_event(self, event: h2.events.Event) -> None:
        """Events the two sides handle differently (requests, responses)."""

    def on_reset(self, stream_id: int) -> None:
        """The peer reset a stream."""

    def on_goaway(self) -> None:
        if not self.streams:
            self.close()

    # -- sending

    def flush(self) -> None:
        """Sends what h2 has queued at the end of this turn of the event loop, so the frames of one step (a
        response's headers, message and trailers; a request's headers and body) leave in one write."""
        if not self._flush_due:
            self._flush_due = True
            self.loop.call_soon(self.flush_now)

    def flush_now(self) -> None:
        self._flush_due = False
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def consumed(self, stream_id: int, flow: int) -> None:
        if flow and self.transport is not None:
            with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                self.h2.acknowledge_received_data(flow, stream_id)
                self.flush()

    async def send_headers(self, stream_id: int, headers: Iterable[tuple[bytes, bytes]], end: bool) -> None:
        await self._writable.wait()
        self._check(stream_id)
        try:
            self.h2.send_headers(stream_id, list(headers), end_stream=end)
        except h2.exceptions.StreamClosedError as exc:
            raise StreamGone() from exc
        self.flush()
        if end:
            self._sent_end(stream_id)

    async def send_data(self, stream_id: int, data: bytes, end: bool) -> None:
        view = memoryview(data)
        while view:
            await self._writable.wait()
            self._check(stream_id)
            try:
                window = min(self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size)
            except h2.exceptions.StreamClosedError as exc:
                raise StreamGone() from exc
            if window <= 0:
                self._window.clear()
                await self._window.wait()
                continue
            chunk, view = view[:window], view[window:]
            self.h2.send_data(stream_id, chunk.tobytes(), end_stream=end and not view)
            self.flush()
        if end and not data:
            self._check(stream_id)
            try:
                self.h2.end_stream(stream_id)
            except h2.exceptions.StreamClosedError as exc:
                raise StreamGone() from exc
            self.flush()
        if end:
            self._sent_end(stream_id)

    def _sent_end(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.sent_end = True

    def _check(self, stream_id: int) -> None:
        if self.transport is None:
            raise StreamGone(detail="the connection closed")
        stream = self.streams.get(stream_id)
        if stream is not None and stream.gone is not None:
            raise stream.gone

    def reset(self, stream_id: int, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            stream._fail(StreamGone(code))
            self._release(stream)
        if self.transport is None:
            return
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.h2.reset_stream(stream_id, code)
            self.flush()
        self.after_stream()

    def forget(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            self._release(stream)
        self.after_stream()

    def _release(self, stream: Stream) -> None:
        """Data the stream received and nobody will read gives its share of the connection's window
        back: otherwise every refused upload would shrink the window until the connection stalled."""
        unread = sum(flow for _, flow in stream._chunks)
        stream._chunks.clear()
        if unread and self.transport is not None:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.acknowledge_received_data(unread, stream.id)
                self.flush()

    def after_stream(self) -> None:
        if self.goaway and not self.streams:
            self.close()

    def close(self, code: int = h2.errors.ErrorCodes.NO_ERROR) -> None:
        if self.transport is None:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.close_connection(code)
        self.flush_now()
        self.transport.close()
