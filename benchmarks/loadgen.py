"""The benchmarks' own HTTP/1.1 load generator, run as a separate process (``python -m benchmarks.loadgen``).

Two modes, both on raw asyncio sockets so that the client costs little next to what it measures:

- ``burst``: N requests at once, each on its own connection, all sent before any is answered (they
  are held); reports the status of every one and when the last answer was complete.
- ``rate``: an open-loop generator — request *i* is due at ``start + i / rate`` whatever happened to
  the ones before, and its latency is counted from when it was due, so a stall shows in the
  percentiles instead of slowing the generator down (no coordinated omission). wrk2 does this; it is
  not packaged by Debian.

Prints one JSON object on stdout at the end (``burst`` also prints ``{"sent": N}`` once every request
is on the wire).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import sys
import time
from collections import Counter

HEADER_END = b"\r\n\r\n"


class HttpError(Exception):
    """The response could not be read."""


def build_request(target: str, host: str, headers: list[str], keep_alive: bool) -> bytes:
    lines = [f"GET {target} HTTP/1.1", f"Host: {host}"]
    lines += headers
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], int]:
    """(status, lower-cased headers, body length) of one response, its body read to the end."""
    head = await reader.readuntil(HEADER_END)
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise HttpError(f"bad status line {lines[0][:80]!r}")
    status = int(parts[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    length = 0
    if "content-length" in headers:
        length = int(headers["content-length"])
        await reader.readexactly(length)
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            length += size
            if size == 0:
                break
    elif status >= 200 and status not in (204, 304):
        body = await reader.read()  # until the server closes
        length = len(body)
    return status, headers, length


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


# ---- burst -----------------------------------------------------------------------------------------
async def burst(args: argparse.Namespace) -> dict[str, object]:
    req = build_request(args.target, args.host_header or f"{args.host}:{args.port}", args.header, keep_alive=False)
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    cold = 0
    done_times: list[float] = []
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    # Connect in batches: a burst of SYNs beyond the listen backlog would be retried by the kernel a
    # second later, and that second would show up as drain time.
    for start in range(0, args.n, args.connect_batch):
        batch = [
            asyncio.open_connection(args.host, args.port) for _ in range(start, min(args.n, start + args.connect_batch))
        ]
        for res in await asyncio.gather(*batch, return_exceptions=True):
            if isinstance(res, BaseException):
                errors[f"connect: {type(res).__name__}"] += 1
            else:
                conns.append(res)
    for _, writer in conns:
        writer.write(req)
    await asyncio.gather(*(w.drain() for _, w in conns), return_exceptions=True)
    print(json.dumps({"sent": len(conns)}), flush=True)

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal cold
        try:
            status, headers, _ = await asyncio.wait_for(read_response(reader), args.timeout)
            statuses[str(status)] += 1
            if headers.get("x-elasti-cold-start") == "true":
                cold += 1
            done_times.append(time.time())
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, HttpError, TimeoutError) as exc:
            errors[type(exc).__name__] += 1
        finally:
            writer.close()

    await asyncio.gather(*(one(r, w) for r, w in conns))
    return {
        "mode": "burst",
        "n": args.n,
        "statuses": dict(statuses),
        "errors": dict(errors),
        "cold": cold,
        "first_done": min(done_times) if done_times else None,
        "last_done": max(done_times) if done_times else None,
    }


# ---- open loop -------------------------------------------------------------------------------------
async def rate(args: argparse.Namespace) -> dict[str, object]:
    req = build_request(args.target, args.host_header or f"{args.host}:{args.port}", args.header, keep_alive=True)
    idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for _ in range(args.conns):
        idle.put_nowait(await asyncio.open_connection(args.host, args.port))
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    total = int(args.rate * args.duration)
    tasks: set[asyncio.Task[None]] = set()

    async def one(due: float) -> None:
        conn = await idle.get()
        reader, writer = conn
        try:
            writer.write(req)
            status, _, _ = await asyncio.wait_for(read_response(reader), args.timeout)
            latencies.append(time.perf_counter() - due)
            statuses[str(status)] += 1
            idle.put_nowait(conn)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, HttpError, TimeoutError) as exc:
            errors[type(exc).__name__] += 1
            writer.close()
            with contextlib.suppress(OSError):
                idle.put_nowait(await asyncio.open_connection(args.host, args.port))

    # perf_counter, not loop.time(): uvloop's clock has millisecond resolution.
    start = time.perf_counter() + 0.05
    late = 0
    for i in range(total):
        due = start + i / args.rate
        wait = due - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        elif wait < -0.001:
            late += 1  # the generator itself fell behind: counted, and the latency still runs from `due`
        t = asyncio.create_task(one(due))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=args.timeout + 5)
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "mode": "rate",
        "rate": args.rate,
        "requests": total,
        "completed": len(latencies),
        "achieved_rate": len(latencies) / elapsed if elapsed > 0 else 0.0,
        "statuses": dict(statuses),
        "errors": dict(errors),
        "generator_late": late,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "max_ms": (latencies[-1] * 1000) if latencies else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loadgen", description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("burst", "rate"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--target", default="/", help="request target: a path, or an absolute URI for a forward proxy")
    p.add_argument("--host-header", help="Host header (default: HOST:PORT)")
    p.add_argument("--header", action="append", default=[], help="extra 'Name: value' header (repeatable)")
    p.add_argument("--n", type=int, default=100, help="burst: requests held at once")
    p.add_argument("--connect-batch", type=int, default=500, help="burst: connections opened at a time")
    p.add_argument("--rate", type=float, default=1000.0, help="rate: requests per second")
    p.add_argument("--duration", type=float, default=10.0, help="rate: seconds")
    p.add_argument("--conns", type=int, default=64, help="rate: keep-alive connections")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds one response may take")
    args = p.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop  # type: ignore[import-not-found]

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    result = runner(burst(args) if args.mode == "burst" else rate(args))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
