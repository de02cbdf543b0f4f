"""The signature policy: in the repositories it covers, only cosign-signed images are served."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mirror.config import SignatureSettings
from mirror.domain.pins import Pin
from tests.support.artifacts import (
    PrivateKey,
    cosign_referrer,
    cosign_signature,
    new_key,
    public_pem,
    sig_tag,
)
from tests.support.fakehub import FakeHub
from tests.support.mirror import FakeClock, RunningMirror, settings_for
from tests.support.oci import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Image,
    Index,
    make_image,
    make_index,
    make_layer,
)

ACCEPT = [OCI_INDEX, OCI_MANIFEST]


def _policy(tmp_path: Path, *keys: PrivateKey) -> SignatureSettings:
    files = []
    for number, key in enumerate(keys):
        path = tmp_path / f"cosign-{number}.pub"
        path.write_bytes(public_pem(key))
        files.append(path)
    return SignatureSettings(tuple(files), (Pin.parse("library/signed*"),))


def _sign_with_tag(
    fake_hub: FakeHub, repo: str, key: PrivateKey, image: Image | Index
) -> Image:
    signature = cosign_signature(key, f"docker.io/{repo}", image)
    fake_hub.add_image(repo, sig_tag(image), signature)
    return signature


def _refusal(status: int, body: bytes) -> str:
    error = json.loads(body)["errors"][0]
    assert (status, error["code"]) == (403, "DENIED"), body
    return str(error["message"])


@pytest.mark.parametrize("kind", ["ecdsa", "rsa"])
async def test_the_policy_serves_signed_images_and_refuses_the_others(
    fake_hub: FakeHub, tmp_path: Path, clock: FakeClock, kind: str
) -> None:
    trusted, stranger = new_key(kind), new_key()
    signed = make_image([make_layer(b"signed")])
    unsigned = make_image([make_layer(b"unsigned")])
    forged = make_image([make_layer(b"signed by someone else")])
    for tag, image in (("signed", signed), ("unsigned", unsigned), ("forged", forged)):
        fake_hub.add_image("library/signed", tag, image)
    signature = _sign_with_tag(fake_hub, "library/signed", trusted, signed)
    _sign_with_tag(fake_hub, "library/signed", stranger, forged)
    fake_hub.add_image("library/other", "unsigned", unsigned)
    settings = settings_for(fake_hub.url, tmp_path / "data", signatures=_policy(tmp_path, trusted))

    async with RunningMirror(settings, clock=clock) as mirror:
        status, _, body = await mirror.get("/v2/signed/manifests/signed", accept=ACCEPT)
        assert (status, body) == (200, signed.manifest)
        status, _, body = await mirror.get(f"/v2/signed/manifests/{signed.digest}", method="HEAD")
        assert status == 200

        status, _, body = await mirror.get("/v2/signed/manifests/unsigned", accept=ACCEPT)
        assert "no cosign signature found" in _refusal(status, body)
        status, _, body = await mirror.get(f"/v2/signed/manifests/{unsigned.digest}")
        assert "no cosign signature found" in _refusal(status, body)
        status, _, body = await mirror.get("/v2/signed/manifests/forged", accept=ACCEPT)
        assert "trusted key" in _refusal(status, body)

        # Outside the policy's repositories nothing is checked.
        status, _, body = await mirror.get("/v2/other/manifests/unsigned", accept=ACCEPT)
        assert (status, body) == (200, unsigned.manifest)

        # What cosign verify reads through the mirror is served: the signature and its payload.
        status, _, body = await mirror.get(
            f"/v2/signed/manifests/{sig_tag(signed)}", accept=ACCEPT
        )
        assert (status, body) == (200, signature.manifest)
        payload = signature.layers[0]
        status, _, body = await mirror.get(f"/v2/signed/blobs/{payload.digest}")
        assert (status, body) == (200, payload.data)

        # The verdict is kept: pulling the signed image again asks the upstream nothing.
        fake_hub.clear_log()
        for _ in range(3):
            status, _, _ = await mirror.get(f"/v2/signed/manifests/{signed.digest}", accept=ACCEPT)
            assert status == 200
        assert fake_hub.log == []


async def test_an_oci_referrer_signature_passes_and_a_signed_index_passes_its_images(
    fake_hub: FakeHub, tmp_path: Path, clock: FakeClock
) -> None:
    key = new_key()
    image = make_image([make_layer(b"referrer-signed")])
    fake_hub.add_image("library/signed", "1.0", image)
    referrer = cosign_referrer(key, "docker.io/library/signed", image)
    fake_hub.add_image("library/signed", None, referrer)
    amd64 = make_image([make_layer(b"amd")], arch="amd64")
    arm64 = make_image([make_layer(b"arm")], arch="arm64")
    index = make_index([amd64, arm64])
    fake_hub.add_index("library/signed-multi", "2.0", index)
    _sign_with_tag(fake_hub, "library/signed-multi", key, index)
    settings = settings_for(fake_hub.url, tmp_path / "data", signatures=_policy(tmp_path, key))
    async with RunningMirror(settings, clock=clock) as mirror:
        status, _, body = await mirror.get("/v2/signed/manifests/1.0", accept=ACCEPT)
        assert (status, body) == (200, image.manifest)
        status, _, body = await mirror.get("/v2/signed-multi/manifests/2.0", accept=ACCEPT)
        assert (status, body) == (200, index.index)
        status, _, body = await mirror.get(
            f"/v2/signed-multi/manifests/{arm64.digest}", accept=ACCEPT
        )
        assert (status, body) == (200, arm64.manifest)


async def test_an_old_client_gets_the_image_of_a_signed_manifest_list(
    fake_hub: FakeHub, tmp_path: Path, clock: FakeClock
) -> None:
    key = new_key()
    amd64 = make_image([make_layer(b"docker amd")], arch="amd64", docker=True)
    arm64 = make_image([make_layer(b"docker arm")], arch="arm64", docker=True)
    listed = make_index([amd64, arm64], docker=True)
    fake_hub.add_index("library/signed", "list", listed)
    _sign_with_tag(fake_hub, "library/signed", key, listed)
    settings = settings_for(fake_hub.url, tmp_path / "data", signatures=_policy(tmp_path, key))
    async with RunningMirror(settings, clock=clock) as mirror:
        status, _, body = await mirror.get("/v2/signed/manifests/list", accept=[DOCKER_MANIFEST])
        assert (status, body) == (200, amd64.manifest)


async def test_a_signature_of_another_image_does_not_count(
    fake_hub: FakeHub, tmp_path: Path, clock: FakeClock
) -> None:
    key = new_key()
    image = make_image([make_layer(b"one")])
    other = make_image([make_layer(b"two")])
    fake_hub.add_image("library/signed", "1.0", image)
    fake_hub.add_image("library/signed", "2.0", other)
    # A valid signature of `other`, put where `image`'s signature would be.
    copied = cosign_signature(key, "docker.io/library/signed", other)
    fake_hub.add_image("library/signed", sig_tag(image), copied)
    settings = settings_for(fake_hub.url, tmp_path / "data", signatures=_policy(tmp_path, key))
    async with RunningMirror(settings, clock=clock) as mirror:
        status, _, body = await mirror.get("/v2/signed/manifests/1.0", accept=ACCEPT)
        assert "trusted key" in _refusal(status, body)


async def test_a_signature_whose_payload_is_gone_proves_nothing(
    fake_hub: FakeHub, tmp_path: Path, clock: FakeClock
) -> None:
    key = new_key()
    image = make_image([make_layer(b"payload lost")])
    fake_hub.add_image("library/signed", "1.0", image)
    signature = _sign_with_tag(fake_hub, "library/signed", key, image)
    del fake_hub.repo("library/signed").blobs[signature.layers[0].digest]
    settings = settings_for(fake_hub.url, tmp_path / "data", signatures=_policy(tmp_path, key))
    async with RunningMirror(settings, clock=clock) as mirror:
        status, _, body = await mirror.get("/v2/signed/manifests/1.0", accept=ACCEPT)
        assert "trusted key" in _refusal(status, body)


async def test_an_unsigned_verdict_is_asked_again_after_the_window(
    fake_hub: FakeHub, tmp_path: Path, clock: FakeClock
) -> None:
    key = new_key()
    image = make_image([make_layer(b"signed later")])
    fake_hub.add_image("library/signed", "1.0", image)
    # The negative cache (of the .sig tag's 404) keeps real time: out of the way here.
    settings = settings_for(
        fake_hub.url,
        tmp_path / "data",
        tag_ttl=60.0,
        negative_ttl=0.0,
        signatures=_policy(tmp_path, key),
    )
    async with RunningMirror(settings, clock=clock) as mirror:
        status, _, body = await mirror.get("/v2/signed/manifests/1.0", accept=ACCEPT)
        _refusal(status, body)
        _sign_with_tag(fake_hub, "library/signed", key, image)
        status, _, body = await mirror.get("/v2/signed/manifests/1.0", accept=ACCEPT)
        _refusal(status, body)  # the verdict holds inside the window
        clock.advance(61)
        status, _, body = await mirror.get("/v2/signed/manifests/1.0", accept=ACCEPT)
        assert (status, body) == (200, image.manifest)
