"""With Redis unreachable the mirror keeps serving: nothing waits on Redis behind a lock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from tests.support.fakehub import FakeHub
from tests.support.mirror import RunningMirror, settings_for
from tests.support.oci import make_image, make_random_layer


@pytest_asyncio.fixture
async def silent_port() -> AsyncIterator[int]:
    """A TCP port that accepts connections and never answers: a Redis that hangs."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    for writer in held:
        writer.close()
    server.close()


async def test_cold_blobs_start_promptly_while_redis_hangs(
    fake_hub: FakeHub, tmp_path: Path, silent_port: int
) -> None:
    first, *layers = [make_random_layer(64 * 1024, seed=seed) for seed in range(7)]
    fake_hub.add_image("library/app", "latest", make_image([first, *layers]))
    settings = settings_for(
        fake_hub.url, tmp_path / "data", redis_url=f"redis://127.0.0.1:{silent_port}"
    )
    async with RunningMirror(settings) as mirror:
        # The first cold blob finds Redis hanging: it pays one timeout (2 s), unavoidably.
        status, _, body = await mirror.get(f"/v2/app/blobs/{first.digest}")
        assert (status, body) == (200, first.data)
        await asyncio.sleep(2.5)  # past the moment Redis is worth asking again
        started = time.monotonic()
        answers = await asyncio.gather(
            *(mirror.get(f"/v2/app/blobs/{layer.digest}") for layer in layers)
        )
        elapsed = time.monotonic() - started
    assert [status for status, _, _ in answers] == [200] * 6
    assert [body for _, _, body in answers] == [layer.data for layer in layers]
    # Nobody waits on Redis again: the outage is known, the local locks serve meanwhile.
    assert elapsed < 1.0, elapsed
