"""A real ``mirror serve`` killed with SIGKILL in the middle of a fill, then restarted."""

import asyncio
from pathlib import Path

import aiohttp

from tests.support.fakehub import FakeHub
from tests.support.oci import make_image, make_random_layer
from tests.support.process import MirrorProcess


async def test_sigkill_mid_fill_leaves_nothing_partial_behind(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    layer = make_random_layer(4 * 1024 * 1024, seed=21)
    fake_hub.add_image("library/app", "1.0", make_image([layer]))
    fake_hub.blob_delay_per_chunk = 0.02  # 64 chunks: over a second in all
    data_dir = tmp_path / "data"
    process = MirrorProcess(data_dir, fake_hub.url)
    await asyncio.to_thread(process.start)
    url = f"{process.url}/v2/app/blobs/{layer.digest}"

    async with aiohttp.ClientSession() as session:
        async with session.get(url) as response:
            await response.content.readexactly(128 * 1024)
            partials = list(data_dir.rglob("*.partial"))
            assert len(partials) == 1  # the fill is under way
            await asyncio.to_thread(process.kill)
            try:
                await response.read()
                delivered_whole = True
            except aiohttp.ClientPayloadError:
                delivered_whole = False
        assert not delivered_whole

        fake_hub.blob_delay_per_chunk = 0
        await asyncio.to_thread(process.start)
        url = f"{process.url}/v2/app/blobs/{layer.digest}"  # a new port
        try:
            assert list(data_dir.rglob("*.partial")) == []
            async with session.get(url) as response:
                assert response.status == 200
                assert await response.read() == layer.data
            async with session.get(url) as response:  # now from the cache
                assert await response.read() == layer.data
        finally:
            await asyncio.to_thread(process.stop)
    assert fake_hub.count("GET", "cdn") == 2
