"""HTTP/1.1 messages with trailers, written and read off the wire by hand (aiohttp's client and server
drop trailers): a reader, the chunked framing, and an origin that records what reached it."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field

Fields = list[tuple[str, str]]


@dataclass
class Message:
    """One HTTP/1.1 message as read off the wire."""

    start: str
    headers: Fields
    body: bytes
    trailers: Fields = field(default_factory=list)

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


async def read_message(reader: asyncio.StreamReader, *, head_only: bool = False) -> Message:
    """Reads a message: its start line, header fields, and a Content-Length or chunked body with its
    trailer section (no body for a response to HEAD, 204 or 304)."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("utf-8", "surrogateescape")
    lines = head.split("\r\n")[:-2]
    headers = [(k, v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
    msg = Message(lines[0], headers, b"")
    if head_only:
        return msg
    if any(v.lower() == "chunked" for v in msg.header("Transfer-Encoding")):
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                break
            parts.append(await reader.readexactly(size))
            assert await reader.readexactly(2) == b"\r\n"
        msg.body = b"".join(parts)
        while (line := (await reader.readuntil(b"\r\n"))[:-2]) != b"":
            k, _, v = line.decode("utf-8", "surrogateescape").partition(":")
            msg.trailers.append((k, v.strip()))
    elif length := msg.header("Content-Length"):
        msg.body = await reader.readexactly(int(length[0]))
    return msg


def chunked(body: bytes, trailers: Fields, piece: int = 1000) -> bytes:
    out = b"".join(
        b"%x\r\n%b\r\n" % (len(body[i : i + piece]), body[i : i + piece]) for i in range(0, len(body), piece)
    )
    return out + b"0\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in trailers) + b"\r\n"


RESPONSE_TRAILERS: Fields = [("X-Digest", "sha256"), ("X-Count", "1")]


class Origin:
    """The workload: records each request (start line, headers, body, trailers) and answers chunked, with
    ``trailers`` after the body (``/plain``: a Content-Length answer)."""

    def __init__(self, trailers: Fields = RESPONSE_TRAILERS) -> None:
        self.trailers = trailers
        self.requests: list[Message] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                req = await read_message(reader)
                self.requests.append(req)
                digest = hashlib.sha256(req.body).hexdigest().encode()
                if req.start.split(" ")[1].endswith("/plain"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(digest), digest))
                else:
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Digest, X-Count\r\n\r\n"
                        + chunked(digest, self.trailers, piece=20)
                    )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()
