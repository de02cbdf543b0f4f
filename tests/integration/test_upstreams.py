"""One mirror, several upstream registries, picked by containerd's ``?ns=``."""

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest_asyncio

from mirror.config import UpstreamSettings
from tests.support.fakehub import FakeHub
from tests.support.mirror import RunningMirror, settings_for
from tests.support.oci import OCI_MANIFEST, make_image, make_layer

ACCEPT = [OCI_MANIFEST]


@pytest_asyncio.fixture
async def second_hub() -> AsyncIterator[FakeHub]:
    async with FakeHub() as hub:
        yield hub


@pytest_asyncio.fixture
async def two_upstreams(
    fake_hub: FakeHub, second_hub: FakeHub, tmp_path: Path
) -> AsyncIterator[RunningMirror]:
    settings = settings_for(fake_hub.url, tmp_path / "data")
    upstreams = {**settings.upstreams, "ghcr.io": UpstreamSettings("ghcr.io", second_hub.url)}
    async with RunningMirror(replace(settings, upstreams=upstreams)) as mirror:
        yield mirror


async def test_ns_picks_the_upstream_and_metadata_never_mixes(
    fake_hub: FakeHub, second_hub: FakeHub, two_upstreams: RunningMirror
) -> None:
    from_hub = make_image([make_layer(b"docker hub nginx")])
    from_ghcr = make_image([make_layer(b"ghcr nginx")])
    fake_hub.add_image("library/nginx", "1.0", from_hub)
    second_hub.add_image("library/nginx", "1.0", from_ghcr)

    for _ in range(2):  # cold, then from the cache
        _, _, body = await two_upstreams.get(
            "/v2/library/nginx/manifests/1.0?ns=docker.io", accept=ACCEPT
        )
        assert body == from_hub.manifest
        _, _, body = await two_upstreams.get(
            "/v2/library/nginx/manifests/1.0?ns=ghcr.io", accept=ACCEPT
        )
        assert body == from_ghcr.manifest
        _, _, body = await two_upstreams.get("/v2/nginx/manifests/1.0", accept=ACCEPT)
        assert body == from_hub.manifest  # no ns means docker.io

    # A digest known to one upstream is not served for the other.
    status, _, _ = await two_upstreams.get(
        f"/v2/library/nginx/manifests/{from_hub.digest}?ns=ghcr.io", accept=ACCEPT
    )
    assert status == 404
    layer = from_ghcr.layers[0]
    status, _, body = await two_upstreams.get(f"/v2/library/nginx/blobs/{layer.digest}?ns=ghcr.io")
    assert (status, body) == (200, layer.data)
    assert second_hub.count("GET", "cdn") == 1
    assert fake_hub.count("GET", "cdn") == 0


async def test_an_unconfigured_ns_is_refused_and_nothing_goes_upstream(
    fake_hub: FakeHub, second_hub: FakeHub, two_upstreams: RunningMirror
) -> None:
    status, _, body = await two_upstreams.get(
        "/v2/library/nginx/manifests/1.0?ns=quay.io", accept=ACCEPT
    )
    assert status == 404
    assert b"not mirrored here" in body
    assert fake_hub.log == second_hub.log == []
