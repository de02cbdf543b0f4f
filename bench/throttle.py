"""A TCP relay that gives the upstream a realistic uplink: one link of N MiB/s, shared.

Loopback moves gigabytes a second, faster than any site's link to Docker Hub, so a cold pull
straight off loopback measures the mirror's disk and hashing rather than what users feel.
This relay sits in front of the upstream registry and lets its answers through at ``--rate``
MiB/s in total, however many connections share it (as one uplink is shared); requests go
through unthrottled.

    python -m bench.throttle --listen 127.0.0.1:PORT --target 127.0.0.1:PORT --rate 100
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

CHUNK = 64 * 1024
# The link may run this far ahead of its schedule: smooths over timer granularity.
SLACK = 0.005


class Link:
    """A shared schedule: each chunk books the link for len/rate seconds after the last one."""

    def __init__(self, bytes_per_second: float) -> None:
        self._rate = bytes_per_second
        self._free_at = 0.0

    async def send(self, size: int) -> None:
        now = time.monotonic()
        self._free_at = max(now, self._free_at) + size / self._rate
        delay = self._free_at - now - SLACK
        if delay > 0:
            await asyncio.sleep(delay)


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link | None
) -> None:
    try:
        while chunk := await reader.read(CHUNK):
            if link is not None:
                await link.send(len(chunk))
            writer.write(chunk)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        with contextlib.suppress(ConnectionError, RuntimeError):
            writer.close()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _handler(target: tuple[str, int], link: Link) -> Handler:
    async def relay(client_reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        try:
            server_reader, server = await asyncio.open_connection(*target)
        except OSError:
            client.close()
            return
        await asyncio.gather(_pipe(client_reader, server, None), _pipe(server_reader, client, link))

    return relay


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def _serve(listen: tuple[str, int], target: tuple[str, int], rate_mib: float) -> None:
    link = Link(rate_mib * 1024 * 1024)
    server = await asyncio.start_server(_handler(target, link), *listen)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listen", type=_address, required=True)
    parser.add_argument("--target", type=_address, required=True)
    parser.add_argument("--rate", type=float, required=True, help="MiB/s, shared")
    arguments = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(arguments.listen, arguments.target, arguments.rate))


if __name__ == "__main__":
    main()
