"""Signatures, SBOMs and attestations across the air gap: seed, export, import, offline."""

from __future__ import annotations

import asyncio
import json
import subprocess
import tarfile
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

from tests.support.artifacts import (
    ATTESTATION_TYPE,
    COSIGN_SIG_TYPE,
    SBOM_TYPE,
    cosign_referrer,
    cosign_signature,
    make_referrer,
    new_key,
    public_pem,
    referrers_index,
    sig_tag,
)
from tests.support.fakehub import FakeHub
from tests.support.oci import (
    OCI_INDEX,
    OCI_MANIFEST,
    Image,
    make_image,
    make_layer,
    sha256_digest,
)
from tests.support.process import MirrorProcess, run_mirror

ACCEPT = f"{OCI_INDEX}, {OCI_MANIFEST}"


async def mirror(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = await asyncio.to_thread(run_mirror, *args, "--data-dir", str(data))
    assert done.returncode == 0, done.stdout + done.stderr
    return done


async def fetch(url: str) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers={"Accept": ACCEPT}) as response,
    ):
        return response.status, await response.read()


def bundle_members(bundle: Path) -> set[str]:
    with tarfile.open(bundle) as tar:
        return {"sha256:" + n.rsplit("/", 1)[1] for n in tar.getnames() if "blobs/sha256/" in n}


def signed_app(hub: FakeHub) -> tuple[Image, list[Image], Image, Any]:
    """app:1.0 with a referrer signature, an SBOM, an attestation and a .sig tag."""
    key = new_key()
    image = make_image([make_layer(b"the signed app " * 100)])
    hub.add_image("library/app", "1.0", image)
    referrers = [
        cosign_referrer(key, "docker.io/library/app", image),
        make_referrer(image, SBOM_TYPE, b'{"spdxVersion": "SPDX-2.3", "packages": []}'),
        make_referrer(image, ATTESTATION_TYPE, b'{"_type": "https://in-toto.io/Statement/v1"}'),
    ]
    for referrer in referrers:
        hub.add_image("library/app", None, referrer)
    signature = cosign_signature(key, "docker.io/library/app", image)
    hub.add_image("library/app", sig_tag(image), signature)
    return image, referrers, signature, key


async def test_referrers_cross_the_air_gap_byte_exact_and_are_served_offline(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    image, referrers, signature, key = signed_app(fake_hub)
    plain = make_image([make_layer(b"nobody signed this")])
    fake_hub.add_image("library/plain", "1.0", plain)
    upstream_answer = fake_hub.referrers_of(fake_hub.repo("library/app"), image.digest)
    assert len(upstream_answer) == 3
    connected, offline = tmp_path / "connected", tmp_path / "offline"

    seeded = await mirror(connected, "seed", "--upstream", fake_hub.url, "app:1.0", "plain:1.0")
    assert "4 referrers" in seeded.stdout  # three referrers and the .sig tag
    listed = json.loads((await mirror(connected, "ls", "--json")).stdout)
    counts = {f"{row['repository']}:{row['tag']}": row["referrers"] for row in listed}
    assert counts["library/app:1.0"] == 4
    assert counts["library/plain:1.0"] == 0

    bundle = tmp_path / "bundle.tar"
    await mirror(connected, "export", "--output", str(bundle), "app:1.0", "plain:1.0")
    carried = bundle_members(bundle)
    for artifact in [*referrers, signature]:
        assert {artifact.digest, *(b.digest for b in artifact.blobs)} <= carried
    bare = tmp_path / "bare.tar"
    await mirror(connected, "export", "--output", str(bare), "--no-referrers")
    assert not {r.digest for r in [*referrers, signature]} & bundle_members(bare)
    assert {image.digest, plain.digest} <= bundle_members(bare)

    loaded = await mirror(offline, "import", str(bundle))
    assert "imported 4 of 4 images" in loaded.stdout  # two images, the referrers, the .sig tag
    fake_hub.clear_log()
    policy = tmp_path / "policy.yaml"
    (tmp_path / "cosign.pub").write_bytes(public_pem(key))
    policy.write_text(
        f"signatures: {{keys: [{tmp_path / 'cosign.pub'}], repositories: ['library/app']}}\n"
    )
    with MirrorProcess(offline, fake_hub.url, "--offline", "--config", str(policy)) as served:
        status, body = await fetch(f"{served.url}/v2/app/referrers/{image.digest}")
        assert status == 200
        assert json.loads(body)["manifests"] == upstream_answer
        status, body = await fetch(
            f"{served.url}/v2/app/referrers/{image.digest}?artifactType={quote(COSIGN_SIG_TYPE)}"
        )
        assert [m["digest"] for m in json.loads(body)["manifests"]] == [referrers[0].digest]
        for artifact in [*referrers, signature]:
            status, body = await fetch(f"{served.url}/v2/app/manifests/{artifact.digest}")
            assert (status, body) == (200, artifact.manifest)
            for blob in artifact.blobs:
                status, body = await fetch(f"{served.url}/v2/app/blobs/{blob.digest}")
                assert (status, body) == (200, blob.data)
        status, body = await fetch(f"{served.url}/v2/app/manifests/{sig_tag(image)}")
        assert (status, body) == (200, signature.manifest)
        # The policy reads the imported signatures: the signed image is served offline.
        status, body = await fetch(f"{served.url}/v2/app/manifests/1.0")
        assert (status, body) == (200, image.manifest)
        status, body = await fetch(f"{served.url}/v2/plain/referrers/{plain.digest}")
        assert (status, json.loads(body)["manifests"]) == (200, [])
    assert fake_hub.log == []


async def test_an_upstream_fallback_tag_crosses_the_gap_as_it_is(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    fake_hub.referrers_api = False  # the CNCF registry 2.8: only the fallback tag
    image = make_image([make_layer(b"signed on an old registry")])
    fake_hub.add_image("library/old", "1.0", image)
    sbom = make_referrer(image, SBOM_TYPE, b'{"spdxVersion": "SPDX-2.3"}')
    fake_hub.add_image("library/old", None, sbom)
    fallback = referrers_index([sbom])
    fallback_tag = image.digest.replace(":", "-")
    fake_hub.repo("library/old").manifests[sha256_digest(fallback)] = (fallback, OCI_INDEX)
    fake_hub.set_tag("library/old", fallback_tag, sha256_digest(fallback))
    connected, offline = tmp_path / "connected", tmp_path / "offline"

    seeded = await mirror(connected, "seed", "--upstream", fake_hub.url, "old:1.0")
    assert "1 referrers" in seeded.stdout
    bundle = tmp_path / "bundle.tar"
    await mirror(connected, "export", "--output", str(bundle), "old:1.0")
    await mirror(offline, "import", str(bundle))
    fake_hub.clear_log()
    with MirrorProcess(offline, fake_hub.url, "--offline") as served:
        status, body = await fetch(f"{served.url}/v2/old/manifests/{fallback_tag}")
        assert (status, body) == (200, fallback)
        status, body = await fetch(f"{served.url}/v2/old/referrers/{image.digest}")
        assert json.loads(body)["manifests"] == json.loads(fallback)["manifests"]
        status, body = await fetch(f"{served.url}/v2/old/manifests/{sbom.digest}")
        assert (status, body) == (200, sbom.manifest)
    assert fake_hub.log == []
