"""The gRPC origin of figure 6 when Go is not at hand (``python -m benchmarks.grpc_origin --port N``): grpcio's
asyncio server answering every unary call, to any method, with the bytes of its request message and
status OK (an ``elasti.echo.v1.EchoRequest`` holding only a message reads as an ``EchoResponse`` with it).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import grpc


async def _echo(request: bytes, context: Any) -> bytes:
    return request


class _AnyMethod(grpc.GenericRpcHandler):
    def service(self, handler_call_details: Any) -> Any:
        return grpc.unary_unary_rpc_method_handler(_echo)  # no (de)serializers: the message's bytes


async def serve(port: int) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((_AnyMethod(),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.grpc_origin", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    asyncio.run(serve(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
