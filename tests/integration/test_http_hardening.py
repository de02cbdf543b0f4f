"""What clients see when an upstream or a client misbehaves at the HTTP level (issue 10)."""

from __future__ import annotations

import asyncio
import hashlib

from tests.support.fakehub import FakeHub
from tests.support.mirror import RunningMirror
from tests.support.oci import make_image, make_random_layer


async def test_a_blob_without_content_length_reaches_every_client_of_the_cold_fill(
    fake_hub: FakeHub, mirror: RunningMirror
) -> None:
    layer = make_random_layer(3 * 1024 * 1024 + 17, seed=101)
    fake_hub.add_image("library/app", "latest", make_image([layer]))
    fake_hub.cdn_chunked = True
    fake_hub.blob_delay_per_chunk = 0.002
    url = f"/v2/app/blobs/{layer.digest}"

    cold = await asyncio.wait_for(asyncio.gather(*(mirror.get(url) for _ in range(5))), 20)
    warm = await mirror.get(url)

    for status, headers, body in [*cold, warm]:
        assert status == 200
        assert len(body) == layer.size
        assert "sha256:" + hashlib.sha256(body).hexdigest() == layer.digest
        assert headers["Docker-Content-Digest"] == layer.digest
    assert fake_hub.count("GET", "cdn") == 1
