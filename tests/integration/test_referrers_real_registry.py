"""Referrers and the signature policy in front of a real CNCF registry (2.8), which stores
manifests with a ``subject`` but has no referrers API: only the fallback tag tells."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

import aiohttp

from tests.support.artifacts import (
    SBOM_TYPE,
    cosign_signature,
    make_referrer,
    new_key,
    public_pem,
    referrers_index,
    sig_tag,
)
from tests.support.oci import OCI_INDEX, OCI_MANIFEST, Image, make_image, make_layer
from tests.support.process import MirrorProcess
from tests.support.realregistry import RealRegistry

ACCEPT = f"{OCI_INDEX}, {OCI_MANIFEST}"


def _put(url: str, body: bytes, content_type: str, method: str = "PUT") -> str:
    request = urllib.request.Request(url, data=body, method=method)
    request.add_header("Content-Type", content_type)
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status in (201, 202), response.status
        return str(response.headers.get("Location", ""))


def push_raw(registry: RealRegistry, repo: str, image: Image, reference: str) -> None:
    """Blobs (an upload each, in one PUT) and the manifest as they are, byte for byte."""
    for blob in image.blobs:
        location = _put(f"{registry.url}/v2/{repo}/blobs/uploads/", b"", "", method="POST")
        separator = "&" if "?" in location else "?"
        _put(f"{location}{separator}digest={blob.digest}", blob.data, "application/octet-stream")
    _put(f"{registry.url}/v2/{repo}/manifests/{reference}", image.manifest, image.media_type)


async def fetch(url: str) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers={"Accept": ACCEPT}) as response,
    ):
        return response.status, await response.read()


async def test_a_real_registry_without_the_api_answers_through_its_fallback_tag(
    real_registry: RealRegistry, tmp_path: Path
) -> None:
    key = new_key()
    repo = "library/realsigned"
    image = make_image([make_layer(b"on a real registry")])
    unsigned = make_image([make_layer(b"on a real registry, unsigned")])
    await asyncio.to_thread(push_raw, real_registry, repo, image, "1.0")
    await asyncio.to_thread(push_raw, real_registry, repo, unsigned, "2.0")
    sbom = make_referrer(image, SBOM_TYPE, b'{"spdxVersion": "SPDX-2.3"}')
    await asyncio.to_thread(push_raw, real_registry, repo, sbom, sbom.digest)
    fallback = referrers_index([sbom])
    _put(
        f"{real_registry.url}/v2/{repo}/manifests/{image.digest.replace(':', '-')}",
        fallback,
        OCI_INDEX,
    )
    signature = cosign_signature(key, f"docker.io/{repo}", image)
    await asyncio.to_thread(push_raw, real_registry, repo, signature, sig_tag(image))
    (tmp_path / "cosign.pub").write_bytes(public_pem(key))
    config = tmp_path / "mirror.yaml"
    config.write_text(
        f"signatures: {{keys: [{tmp_path / 'cosign.pub'}], repositories: ['{repo}']}}\n"
    )

    with MirrorProcess(tmp_path / "data", real_registry.url, "--config", str(config)) as mirror:
        status, body = await fetch(f"{mirror.url}/v2/{repo}/referrers/{image.digest}")
        assert status == 200
        assert json.loads(body)["manifests"] == json.loads(fallback)["manifests"]
        status, body = await fetch(f"{mirror.url}/v2/{repo}/referrers/{unsigned.digest}")
        assert (status, json.loads(body)["manifests"]) == (200, [])
        status, body = await fetch(f"{mirror.url}/v2/{repo}/manifests/{sbom.digest}")
        assert (status, body) == (200, sbom.manifest)

        status, body = await fetch(f"{mirror.url}/v2/{repo}/manifests/1.0")
        assert (status, body) == (200, image.manifest)
        status, body = await fetch(f"{mirror.url}/v2/{repo}/manifests/2.0")
        error = json.loads(body)["errors"][0]
        assert (status, error["code"]) == (403, "DENIED")
        assert "no cosign signature found" in error["message"]
