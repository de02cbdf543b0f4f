"""Images built by tests.support.oci survive a skopeo push into Debian's docker-registry."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from tests.support import oci
from tests.support.binaries import require_binary
from tests.support.realregistry import RealRegistry

ACCEPT_ALL = ", ".join(oci.ALL_MANIFEST_TYPES)


async def fetch(registry: RealRegistry, path: str) -> tuple[bytes, str, str]:
    """(body, Content-Type, Docker-Content-Digest) straight from the registry."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{registry.url}/v2/{path}", headers={"Accept": ACCEPT_ALL}) as response,
    ):
        assert response.status == 200, await response.text()
        return (
            await response.read(),
            response.headers["Content-Type"],
            response.headers.get("Docker-Content-Digest", ""),
        )


def two_platforms() -> oci.Index:
    shared = oci.make_layer({"etc/os-release": b"ID=test\n"})
    images = [
        oci.make_image([shared, oci.make_layer({f"bin/{arch}": arch.encode()})], arch=arch)
        for arch in ("amd64", "arm64")
    ]
    return oci.make_index(images)


async def test_single_arch_oci_image_round_trips(
    real_registry: RealRegistry, tmp_path: Path
) -> None:
    image = oci.make_image([oci.make_layer({"hello.txt": b"hi\n"}), oci.make_layer(5000)])
    oci.write_oci_layout(tmp_path, "v1", image)
    digest = real_registry.push(tmp_path, "v1", "library/single")
    assert digest == image.digest
    body, media_type, served = await fetch(real_registry, "library/single/manifests/v1")
    assert (body, media_type, served) == (image.manifest, oci.OCI_MANIFEST, image.digest)
    for blob in image.blobs:
        data, _, _ = await fetch(real_registry, f"library/single/blobs/{blob.digest}")
        assert data == blob.data


async def test_two_platform_index_round_trips(real_registry: RealRegistry, tmp_path: Path) -> None:
    index = two_platforms()
    oci.write_oci_layout(tmp_path, "multi", index)
    assert real_registry.push(tmp_path, "multi", "library/multi", all=True) == index.digest
    body, media_type, served = await fetch(real_registry, "library/multi/manifests/multi")
    assert (body, media_type, served) == (index.index, oci.OCI_INDEX, index.digest)
    for image in index.images:
        body, _, served = await fetch(real_registry, f"library/multi/manifests/{image.digest}")
        assert (body, served) == (image.manifest, image.digest)


async def test_v2s2_push_converts_to_docker_types(real_registry: RealRegistry) -> None:
    image = oci.make_image([oci.make_layer({"a": b"a"})], arch="arm64")
    digest = real_registry.push_image(image, "library/docker-single", "v1", v2s2=True)
    assert digest != image.digest
    body, media_type, served = await fetch(
        real_registry, f"library/docker-single/manifests/{digest}"
    )
    assert (media_type, served) == (oci.DOCKER_MANIFEST, digest)
    assert json.loads(body)["layers"][0]["digest"] == image.layers[0].digest

    index = two_platforms()
    digest = real_registry.push_image(index, "library/docker-multi", "v1", v2s2=True)
    body, media_type, _ = await fetch(real_registry, "library/docker-multi/manifests/v1")
    assert media_type == oci.DOCKER_LIST
    assert [m["platform"]["architecture"] for m in json.loads(body)["manifests"]] == [
        "amd64",
        "arm64",
    ]
    assert real_registry.get_manifest("library/docker-multi", "v1") == (body, media_type, digest)


def test_require_binary_skips_locally_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    assert require_binary("sh").endswith("/sh")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_binary("no-such-binary-for-tests")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        require_binary("no-such-binary-for-tests")
