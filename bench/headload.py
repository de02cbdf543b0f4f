"""A closed-loop HTTP/1.1 load generator for HEAD, where wrk cannot go.

wrk (4.1) parses every response as if it had a body, so a HEAD answered with a
``Content-Length`` never completes and wrk counts nothing. This sends one fixed request per
keep-alive connection, waits for the whole response (headers only for HEAD, headers and
``Content-Length`` bytes for GET), records the latency and sends the next: what wrk does, in
asyncio. It runs as its own processes (like ``wrk -t2``) so the benchmark's own threads do
not share its event loop; each prints its latencies as JSON and the caller merges them.

    python -m bench.headload URL --method HEAD --accept TYPES --connections 16 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)
FINISH_TIMEOUT = 10.0


@dataclass
class Tally:
    latencies_us: list[int] = field(default_factory=list)
    errors: int = 0  # status >= 400, or a connection lost mid-response


class _Connection(asyncio.Protocol):
    def __init__(self, request: bytes, *, head: bool, deadline: float, tally: Tally) -> None:
        self._request = request
        self._head = head
        self._deadline = deadline
        self._tally = tally
        self._buffer = b""
        self._started = 0.0
        self._transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._send()

    def _send(self) -> None:
        assert self._transport is not None
        if time.monotonic() >= self._deadline:
            self._transport.close()
            return
        self._started = time.perf_counter()
        self._transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        length = 0 if self._head else _body_length(self._buffer[:end])
        if len(self._buffer) < end + 4 + length:
            return
        status = int(self._buffer[9:12])
        self._buffer = self._buffer[end + 4 + length :]
        self._tally.latencies_us.append(int((time.perf_counter() - self._started) * 1e6))
        self._tally.errors += status >= 400
        self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._buffer:
            self._tally.errors += 1
        if not self.closed.done():
            self.closed.set_result(None)


def _body_length(headers: bytes) -> int:
    match = _CONTENT_LENGTH.search(headers)
    return int(match.group(1)) if match else 0


def _request(url: str, method: str, accept: str) -> bytes:
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}", f"Accept: {accept}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def run(url: str, *, method: str, accept: str, connections: int, seconds: float) -> Tally:
    parts = urlsplit(url)
    loop = asyncio.get_running_loop()
    request = _request(url, method, accept)
    tally = Tally()
    deadline = time.monotonic() + seconds
    protocols: list[_Connection] = []
    for _ in range(connections):
        _, protocol = await loop.create_connection(
            lambda: _Connection(request, head=method == "HEAD", deadline=deadline, tally=tally),
            parts.hostname or "127.0.0.1",
            parts.port or 80,
        )
        protocols.append(protocol)
    await asyncio.wait_for(asyncio.gather(*(p.closed for p in protocols)), seconds + FINISH_TIMEOUT)
    return tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.headload")
    parser.add_argument("url")
    parser.add_argument("--method", default="HEAD", choices=("HEAD", "GET"))
    parser.add_argument("--accept", default="*/*")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    arguments = parser.parse_args(argv)
    started = time.perf_counter()
    tally = asyncio.run(
        run(
            arguments.url,
            method=arguments.method,
            accept=arguments.accept,
            connections=arguments.connections,
            seconds=arguments.seconds,
        )
    )
    elapsed = time.perf_counter() - started
    result = {"elapsed": elapsed, "errors": tally.errors, "latencies_us": tally.latencies_us}
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
