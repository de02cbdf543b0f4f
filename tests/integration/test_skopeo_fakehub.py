"""skopeo pulls through a real ``mirror serve`` in front of a Docker Hub look-alike.

The upstream has Docker Hub's token flow and CDN redirects; the CDN refuses any request
that carries a registry token.
"""

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.support.binaries import require_binary
from tests.support.fakehub import FakeHub
from tests.support.oci import make_image, make_index, make_layer, make_random_layer
from tests.support.process import (
    MirrorProcess,
    dir_blobs_verified,
    dir_manifest_digest,
    skopeo_copy,
)


@pytest_asyncio.fixture
async def served(fake_hub: FakeHub, tmp_path: Path) -> AsyncIterator[MirrorProcess]:
    require_binary("skopeo")
    process = MirrorProcess(tmp_path / "data", fake_hub.url)
    await asyncio.to_thread(process.start)
    yield process
    await asyncio.to_thread(process.stop)


async def test_skopeo_pulls_images_then_pulls_again_from_cache_alone(
    fake_hub: FakeHub, served: MirrorProcess, tmp_path: Path
) -> None:
    single = make_image([make_layer({"bin/hello": b"hi"}), make_layer(b"second layer")])
    index = make_index(
        [
            make_image([make_layer(b"amd")], arch="amd64"),
            make_image([make_layer(b"arm")], arch="arm64", variant="v8"),
        ]
    )
    big = make_image([make_random_layer(200 * 1024 * 1024, seed=42)])
    fake_hub.add_image("library/single", "1.0", single)
    fake_hub.add_index("library/multi", "1.0", index)
    fake_hub.add_image("someorg/big", "1.0", big)
    expected = {"single": single.digest, "multi": index.digest, "someorg/big": big.digest}

    for round_ in ("cold", "warm"):
        fake_hub.clear_log()
        for name, digest in expected.items():
            destination = tmp_path / round_ / name.replace("/", "_")
            await skopeo_copy(f"{served.host}/{name}:1.0", destination)
            assert dir_manifest_digest(destination) == digest
            assert dir_blobs_verified(destination) >= 2
        if round_ == "warm":
            assert fake_hub.count(server="registry", path_contains="/manifests/") == 0
            assert fake_hub.count(server="registry", path_contains="/blobs/") == 0
            assert fake_hub.count(server="cdn") == 0

    assert fake_hub.cdn_authorization_rejections == 0
    assert all(r.header("Authorization") is None for r in fake_hub.requests(server="cdn"))
    outcomes = {line["cache"] for line in served.access_log() if line["status"] == 200}
    assert {"hit", "miss"} <= outcomes


async def test_unknown_tag_is_404_with_the_json_body(
    fake_hub: FakeHub, served: MirrorProcess, tmp_path: Path
) -> None:
    fake_hub.add_image("library/single", "1.0", make_image([make_layer(b"x")]))

    def fetch() -> tuple[int, bytes]:
        request = urllib.request.Request(f"{served.url}/v2/single/manifests/nope")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    status, body = await asyncio.to_thread(fetch)
    assert status == 404
    assert json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"

    with pytest.raises(RuntimeError, match="manifest unknown"):
        await skopeo_copy(f"{served.host}/single:nope", tmp_path / "nope")


async def test_with_upstream_down_or_out_of_quota_cached_images_still_pull(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    require_binary("skopeo")
    single = make_image([make_layer({"bin/app": b"v1"})])
    index = make_index(
        [
            make_image([make_layer(b"amd")], arch="amd64"),
            make_image([make_layer(b"arm")], arch="arm64"),
        ]
    )
    fake_hub.add_image("library/single", "1.0", single)
    fake_hub.add_index("library/multi", "1.0", index)
    fake_hub.add_image("library/uncached", "1.0", make_image([make_layer(b"never pulled")]))
    expected = {"single": single.digest, "multi": index.digest}
    process = MirrorProcess(tmp_path / "data", fake_hub.url, "--tag-ttl", "0")
    await asyncio.to_thread(process.start)
    try:
        for name in expected:
            await skopeo_copy(f"{process.host}/{name}:1.0", tmp_path / "warm" / name)

        fake_hub.status_override = 429  # everything answers 429
        fake_hub.retry_after = "1"  # skopeo honours Retry-After: keep its retries short
        for name, digest in expected.items():
            destination = tmp_path / "limited" / name
            await skopeo_copy(f"{process.host}/{name}:1.0", destination)
            assert dir_manifest_digest(destination) == digest
        with pytest.raises(RuntimeError, match=r"(?i)toomanyrequests|429"):
            await skopeo_copy(f"{process.host}/uncached:1.0", tmp_path / "uncached")

        await fake_hub.close()  # the upstream is gone: connections refused
        for name, digest in expected.items():
            destination = tmp_path / "down" / name
            await skopeo_copy(f"{process.host}/{name}:1.0", destination)
            assert dir_manifest_digest(destination) == digest
    finally:
        await asyncio.to_thread(process.stop)
    stale = [line for line in process.access_log() if line["cache"] == "stale"]
    assert len(stale) >= 4
