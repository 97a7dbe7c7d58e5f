"""The client side of HTTP/2 cleartext to origins (through the sidecar, a forward proxy, or direct):
prior knowledge, as Envoy speaks to an HTTP/2 upstream, and many streams per pooled connection."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import h2.events
import h2.exceptions

from activator.h2conn import H2Connection, Headers, Stream, StreamGone

log = logging.getLogger(__name__)


class H2Client(H2Connection):
    client_side = True

    def on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None and not stream.response.done():
                stream.response.set_result(list(event.headers))
                if event.stream_ended is not None:
                    stream._end()

    def can_take(self) -> bool:
        return (
            self.transport is not None
            and not self.goaway
            and self.h2.open_outbound_streams < self.h2.remote_settings.max_concurrent_streams
        )

    def open_stream(self, headers: Headers, end: bool) -> Stream:
        """A new stream with its request headers sent (no await between choosing its id and sending)."""
        sid = self.h2.get_next_available_stream_id()
        stream = Stream(self, sid)
        self.streams[sid] = stream
        self.h2.send_headers(sid, headers, end_stream=end)
        self.flush()
        return stream


class H2Pool:
    """Connections by (host, port); a new one when the others are full, closing, or gone."""

    def __init__(self, connect_timeout: float = 10.0) -> None:
        self.connect_timeout = connect_timeout
        self._conns: dict[tuple[str, int], list[H2Client]] = {}
        self._locks: dict[tuple[str, int], asyncio.Lock] = {}

    async def open(self, host: str, port: int, headers: Headers, end: bool) -> Stream:
        """Sends the request headers on a new stream. Raises OSError/TimeoutError when no connection."""
        key = (host, port)
        for _ in range(3):
            conn = self._free(key) or await self._connect(key)
            try:
                return conn.open_stream(headers, end)
            except (h2.exceptions.TooManyStreamsError, h2.exceptions.ProtocolError):
                conn.goaway = True  # full or closing: take no more streams on it
        raise OSError(f"no HTTP/2 connection to {host}:{port} would take a new stream")

    def _free(self, key: tuple[str, int]) -> H2Client | None:
        conns = self._conns.get(key)
        if not conns:
            return None
        conns[:] = [c for c in conns if c.transport is not None]
        for conn in conns:
            if conn.can_take():
                return conn
        return None

    async def _connect(self, key: tuple[str, int]) -> H2Client:
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            conn = self._free(key)
            if conn is not None:
                return conn
            loop = asyncio.get_running_loop()
            _, proto = await asyncio.wait_for(loop.create_connection(H2Client, *key), self.connect_timeout)
            self._conns.setdefault(key, []).append(proto)
            return proto

    async def close(self) -> None:
        for conns in self._conns.values():
            for conn in conns:
                conn.close()
        for conns in self._conns.values():
            for conn in conns:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(conn.closed), 1.0)
        self._conns.clear()


__all__ = ["H2Client", "H2Pool", "Stream", "StreamGone"]
