"""TCP forwarding for pods that stand for a process running outside the cluster (the activator in the playground).

A Pod annotated ``elasti.truefoundry.com/sim-forward`` gets, instead of an app, a listener on each
``podIP:containerPort`` that relays bytes both ways to the named address, so that Services,
EndpointSlices and the mesh see an ordinary pod while the real program runs as a local process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from elasti_istio.localcluster.podnet import NetnsSockets

log = logging.getLogger("elasti.kubelet")


def parse_forward(value: str, ports: list[int]) -> dict[int, tuple[str, int]]:
    """``host:port`` (every container port) or ``8080=host:port,9090=host:9091`` (per port) → targets."""
    out: dict[int, tuple[str, int]] = {}
    parts = [p.strip() for p in value.split(",") if p.strip()]
    for part in parts:
        src, eq, target = part.rpartition("=")
        host, sep, port = target.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise ValueError(f"expected host:port or containerPort=host:port, got {part!r}")
        addr = (host.strip("[]"), int(port))
        if eq:
            if not src.isdigit():
                raise ValueError(f"bad container port in {part!r}")
            out[int(src)] = addr
        else:
            for p in ports:
                out.setdefault(p, addr)
    return out


class TcpForwarder:
    def __init__(
        self, listen_ip: str, listen_port: int, target: tuple[str, int], sockets: NetnsSockets | None = None
    ) -> None:
        self.listen = (listen_ip, listen_port)
        self.sockets = sockets or NetnsSockets(None)
        self.target = target
        self.server: asyncio.Server | None = None
        self.active: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        sock = await asyncio.to_thread(self.sockets.listen, *self.listen)
        self.server = await asyncio.start_server(self._serve, sock=sock)

    def inflight(self) -> int:
        return len(self.active)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.active.add(task)  # type: ignore[arg-type]
        # The listening socket comes from the pod's network namespace without IPPROTO_TCP, so asyncio
        # does not set TCP_NODELAY on what it accepts: small writes (an HTTP/2 frame) would wait for
        # a delayed ACK, about 40 ms each.
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError as exc:
                log.warning("forward %s:%s → %s:%s failed: %s", *self.listen, *self.target, exc)
                return
            try:
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                up_writer.close()
                with contextlib.suppress(Exception):
                    await up_writer.wait_closed()
        except asyncio.CancelledError:
            # Cut by close(): the connection ends here, and asyncio's server would log a cancelled
            # handler as an error.
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self.active.discard(task)  # type: ignore[arg-type]

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()

    async def close(self) -> None:
        """Stops listening and cuts the connections still open."""
        self.stop_accepting()
        for t in list(self.active):
            t.cancel()
        await asyncio.gather(*self.active, return_exceptions=True)
        if self.server is not None:
            with contextlib.suppress(Exception):
                await self.server.wait_closed()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()
