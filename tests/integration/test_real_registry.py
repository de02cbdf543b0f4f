"""Debian's docker-registry as the upstream, skopeo pulling through the mirror."""

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from tests.support.binaries import require_binary
from tests.support.oci import DOCKER_MANIFEST, Image, Index, make_image, make_index, make_layer
from tests.support.process import (
    MirrorProcess,
    dir_blobs_verified,
    dir_manifest_digest,
    skopeo_copy,
)
from tests.support.realregistry import RealRegistry


@pytest_asyncio.fixture
async def served(real_registry: RealRegistry, tmp_path: Path) -> AsyncIterator[MirrorProcess]:
    process = MirrorProcess(tmp_path / "data", real_registry.url)
    await asyncio.to_thread(process.start)
    yield process
    await asyncio.to_thread(process.stop)


def _two_platforms() -> Index:
    return make_index(
        [
            make_image([make_layer(f"{arch} layer".encode())], arch=arch)
            for arch in ("amd64", "arm64")
        ]
    )


# repository -> (what is pushed, pushed as Docker schema2 / manifest list?)
IMAGES: dict[str, tuple[Image | Index, bool]] = {
    "library/oci-single": (make_image([make_layer({"a": b"1"}), make_layer({"b": b"2"})]), False),
    "library/oci-index": (_two_platforms(), False),
    "library/docker-single": (make_image([make_layer({"c": b"3"})]), True),
    "library/docker-list": (_two_platforms(), True),
    "org/team/app": (make_image([make_layer({"d": b"4"})]), False),
}


@pytest.mark.parametrize("repository", list(IMAGES))
async def test_skopeo_copy_all_through_the_mirror_keeps_upstream_digests(
    real_registry: RealRegistry, served: MirrorProcess, tmp_path: Path, repository: str
) -> None:
    content, docker_types = IMAGES[repository]
    pushed = await asyncio.to_thread(
        real_registry.push_image, content, repository, "v1", v2s2=docker_types
    )

    pulled_name = repository.removeprefix("library/")
    await skopeo_copy(f"{served.host}/{pulled_name}:v1", tmp_path / "pulled")

    assert dir_manifest_digest(tmp_path / "pulled") == pushed
    assert dir_blobs_verified(tmp_path / "pulled") >= 2


async def _narrow_answer(url: str, repository: str) -> tuple[int, str]:
    """(status, first error code or "") for a client accepting only Docker schema 2."""
    headers = {"Accept": DOCKER_MANIFEST}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}/v2/{repository}/manifests/v1", headers=headers) as response,
    ):
        body = await response.read()
        code = json.loads(body)["errors"][0]["code"] if response.status >= 400 else ""
        return response.status, code


async def test_a_narrow_accept_gets_the_registrys_answer_from_the_cache(tmp_path: Path) -> None:
    # An upstream of its own, stopped half-way: the session's registry serves other tests.
    require_binary("docker-registry")
    require_binary("skopeo")
    with RealRegistry() as registry, MirrorProcess(tmp_path / "data", registry.url) as mirror:
        upstream: dict[str, tuple[int, str]] = {}
        for repository in ("library/oci-single", "library/oci-index"):
            content, _ = IMAGES[repository]
            await asyncio.to_thread(registry.push_image, content, repository, "v1")
            upstream[repository] = await _narrow_answer(registry.url, repository)
            await _narrow_answer(mirror.url, repository.removeprefix("library/"))  # now cached

        registry.stop()
        for repository, answer in upstream.items():
            assert answer == (404, "MANIFEST_UNKNOWN")
            assert await _narrow_answer(mirror.url, repository.removeprefix("library/")) == answer
