"""Two HTTP/2 server stacks answering the same unary gRPC call themselves, for figure 6c: the activator's own
HTTP/2 protocol (``activator.h2server``, on the ``h2`` state machine, what carries gRPC through the
activator) and Hypercorn (an HTTP/2-capable ASGI server on the same ``h2``, the alternative that would
also have replaced aiohttp's HTTP/1.1 path). Each reads the request message and answers it back with
``grpc-status: 0`` in trailers; nothing is forwarded, so the figure is the server stack alone.

``python -m benchmarks.h2_servers --server activator|hypercorn --port P``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from typing import Any

RESPONSE_HEADERS = [(b":status", b"200"), (b"content-type", b"application/grpc")]
TRAILERS = [(b"grpc-status", b"0")]


async def _read_all(stream: Any) -> bytes:
    parts = []
    while (chunk := await stream.read()) is not None:
        parts.append(chunk)
    return b"".join(parts)


async def serve_activator(port: int) -> None:
    from activator.h2server import H2Request, H2Server

    async def handler(req: H2Request) -> None:
        message = await _read_all(req.stream)
        await req.respond(RESPONSE_HEADERS)
        await req.stream.send_data(message)
        await req.stream.send_headers(TRAILERS, end=True)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: H2Server(handler, 1000, 3600, lambda _c: None), "127.0.0.1", port)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    parts = []
    while True:
        event = await receive()
        parts.append(event.get("body", b""))
        if not event.get("more_body"):
            break
    headers = [(k, v) for k, v in RESPONSE_HEADERS if not k.startswith(b":")]
    await send({"type": "http.response.start", "status": 200, "headers": headers, "trailers": True})
    await send({"type": "http.response.body", "body": b"".join(parts)})
    await send({"type": "http.response.trailers", "headers": TRAILERS})


async def serve_hypercorn(port: int) -> None:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    cfg = Config()
    cfg.bind = [f"127.0.0.1:{port}"]
    cfg.accesslog = None
    cfg.errorlog = "-"
    cfg.loglevel = "WARNING"
    cfg.keep_alive_max_requests = 1 << 30  # its default (1000) ends each connection after 1000 calls
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await serve(asgi_app, cfg, shutdown_trigger=stop.wait)  # type: ignore[arg-type]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", choices=("activator", "hypercorn"), required=True)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    with contextlib.suppress(ImportError):
        import uvloop  # the activator's loop, as it ships; both stacks run on it

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(serve_activator(args.port) if args.server == "activator" else serve_hypercorn(args.port))


if __name__ == "__main__":
    main()
