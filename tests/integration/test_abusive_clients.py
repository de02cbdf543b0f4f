"""What one abusive client can cost everyone else: the cold-lookup budget, descriptors held
by downloads that never read, half-finished TLS handshakes, and pipelined requests (issue 21).
Each client here is a loopback address of its own (127.0.0.2, 127.0.0.3 ...): the mirror
tells clients apart by the address a connection comes from."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from tests.support.fakehub import FakeHub
from tests.support.mirror import RunningMirror, settings_for
from tests.support.oci import OCI_MANIFEST, Image, make_image, make_layer


async def fetch(url: str, *, source: str = "127.0.0.1") -> tuple[int, bytes]:
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=connector) as session:
        headers = {"Accept": OCI_MANIFEST}
        async with session.get(url, headers=headers) as answer:
            return answer.status, await answer.read()


async def pull(base: str, name: str, image: Image, source: str) -> list[int]:
    """A client's pull of an image: its manifest, then its blobs; the statuses it got."""
    statuses = [(await fetch(f"{base}/v2/{name}/manifests/latest", source=source))[0]]
    for blob in image.blobs:
        status, body = await fetch(f"{base}/v2/{name}/blobs/{blob.digest}", source=source)
        statuses.append(status)
        assert status != 200 or body == blob.data
    return statuses


@pytest.mark.parametrize("miss_limit", [0.0, 1 / 60], ids=["miss-limit-off", "miss-limit-on"])
async def test_one_address_flooding_cold_lookups_leaves_the_budget_to_the_others(
    fake_hub: FakeHub, tmp_path: Path, miss_limit: float
) -> None:
    images = {f"library/app{n}": make_image([make_layer(f"app{n}".encode())]) for n in range(3)}
    for name, image in images.items():
        fake_hub.add_image(name, "latest", image)
    settings = settings_for(
        fake_hub.url, tmp_path / "data", cold_lookup_rate=1.0, client_miss_limit=miss_limit
    )
    async with RunningMirror(settings) as mirror:
        flood = await asyncio.gather(
            *(fetch(f"{mirror.url}/v2/library/app0/manifests/made-up-{n}") for n in range(100))
        )
        flooded = [status for status, _ in flood]
        assert flooded.count(429) >= 90  # the flood itself is bounded
        assert set(flooded) <= {404, 429}

        pulls = await asyncio.gather(
            *(
                pull(mirror.url, name, image, f"127.0.0.{n + 2}")
                for n, (name, image) in enumerate(images.items())
            )
        )
    statuses = [status for statuses in pulls for status in statuses]
    assert statuses.count(429) == 0, pulls
    assert set(statuses) == {200}
