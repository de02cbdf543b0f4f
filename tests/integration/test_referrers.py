"""The OCI 1.1 referrers API through the mirror: signatures, SBOMs and attestations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

from mirror.domain.pins import Pin
from mirror.domain.rules import AccessRules
from tests.support.artifacts import (
    ATTESTATION_TYPE,
    COSIGN_SIG_TYPE,
    SBOM_TYPE,
    cosign_referrer,
    make_referrer,
    new_key,
    referrers_index,
)
from tests.support.fakehub import FakeHub
from tests.support.mirror import FakeClock, RunningMirror, metric_value, settings_for
from tests.support.oci import (
    OCI_INDEX,
    OCI_MANIFEST,
    Image,
    make_image,
    make_layer,
    sha256_digest,
)

ACCEPT = [OCI_INDEX, OCI_MANIFEST]
REFERRERS_PATH = "/referrers/"


def _signed_image(fake_hub: FakeHub) -> tuple[Image, list[Image]]:
    image = make_image([make_layer(b"signed app")])
    fake_hub.add_image("library/app", "1.0", image)
    artifacts = [
        cosign_referrer(new_key(), "docker.io/library/app", image),
        make_referrer(image, SBOM_TYPE, b'{"spdxVersion": "SPDX-2.3"}'),
        make_referrer(image, ATTESTATION_TYPE, b'{"_type": "https://in-toto.io/Statement/v1"}'),
    ]
    for artifact in artifacts:
        fake_hub.add_image("library/app", None, artifact)
    return image, artifacts


def _asked(fake_hub: FakeHub) -> int:
    """Referrers requests the upstream answered (a token challenge is not an answer)."""
    return sum(r.status != 401 for r in fake_hub.requests("GET", "registry", REFERRERS_PATH))


def _index(body: bytes) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(body)
    assert document["schemaVersion"] == 2
    assert document["mediaType"] == OCI_INDEX
    return document


def _digests(body: bytes) -> list[str]:
    return sorted(entry["digest"] for entry in _index(body)["manifests"])


async def test_referrers_are_the_upstreams_and_pull_through_like_images(
    fake_hub: FakeHub, mirror: RunningMirror
) -> None:
    image, artifacts = _signed_image(fake_hub)
    status, headers, body = await mirror.get(f"/v2/app/referrers/{image.digest}")
    assert status == 200
    assert headers["Content-Type"] == OCI_INDEX
    assert "OCI-Filters-Applied" not in headers
    assert _digests(body) == sorted(a.digest for a in artifacts)
    types = {entry["artifactType"] for entry in _index(body)["manifests"]}
    assert types == {COSIGN_SIG_TYPE, SBOM_TYPE, ATTESTATION_TYPE}

    status, headers, body = await mirror.get(
        f"/v2/app/referrers/{image.digest}?artifactType={quote(SBOM_TYPE)}"
    )
    assert (status, headers["OCI-Filters-Applied"]) == (200, "artifactType")
    assert _digests(body) == [artifacts[1].digest]
    _, _, metrics = await mirror.get("/metrics")
    for cache in ("miss", "hit"):
        count = metric_value(
            metrics.decode(), "mirror_requests_total", route="referrers", cache=cache
        )
        assert count == 1
    # The filter is the mirror's own: the upstream was asked once, unfiltered.
    assert _asked(fake_hub) == 1
    assert all("artifactType" not in r.query for r in fake_hub.requests(path_contains="referrers"))

    for artifact in artifacts:
        status, headers, body = await mirror.get(
            f"/v2/app/manifests/{artifact.digest}", accept=ACCEPT
        )
        assert (status, body) == (200, artifact.manifest)
        for blob in artifact.blobs:
            status, _, body = await mirror.get(f"/v2/app/blobs/{blob.digest}")
            assert (status, body) == (200, blob.data)


async def test_referrers_are_kept_for_the_freshness_window(
    fake_hub: FakeHub, mirror: RunningMirror, clock: FakeClock
) -> None:
    image, artifacts = _signed_image(fake_hub)
    path = f"/v2/app/referrers/{image.digest}"
    for _ in range(3):
        status, _, body = await mirror.get(path)
        assert (status, len(_index(body)["manifests"])) == (200, 3)
    assert _asked(fake_hub) == 1

    # A new signature appears upstream; the mirror sees it once the window has passed.
    later = make_referrer(image, SBOM_TYPE, b'{"spdxVersion": "SPDX-2.3", "name": "v2"}')
    fake_hub.add_image("library/app", None, later)
    _, _, body = await mirror.get(path)
    assert len(_index(body)["manifests"]) == 3
    clock.advance(301)
    status, _, body = await mirror.get(path)
    assert status == 200
    assert _digests(body) == sorted([*(a.digest for a in artifacts), later.digest])
    assert _asked(fake_hub) == 2


async def test_referrers_are_served_stale_while_the_upstream_is_down(
    fake_hub: FakeHub, mirror: RunningMirror, clock: FakeClock
) -> None:
    image, artifacts = _signed_image(fake_hub)
    path = f"/v2/app/referrers/{image.digest}"
    _, _, first = await mirror.get(path)
    clock.advance(3600)
    fake_hub.down = True
    status, _, body = await mirror.get(path)
    assert (status, body) == (200, first)
    assert _digests(body) == sorted(a.digest for a in artifacts)
    # Nothing held for another digest: the failure is the client's to see, not an empty list.
    status, _, body = await mirror.get(f"/v2/app/referrers/{artifacts[0].digest}")
    assert (status, json.loads(body)["errors"][0]["code"]) == (503, "UNAVAILABLE")

    fake_hub.down = False
    fake_hub.status_override = 429
    status, _, body = await mirror.get(path)
    assert (status, body) == (200, first)
    # Until Retry-After has passed, nothing more is sent upstream: the answer stays stale,
    # and what is not held gets the 429 with its Retry-After.
    asked = _asked(fake_hub)
    for _ in range(3):
        status, _, body = await mirror.get(path)
        assert (status, body) == (200, first)
    status, headers, body = await mirror.get(f"/v2/app/referrers/{artifacts[1].digest}")
    assert (status, json.loads(body)["errors"][0]["code"]) == (429, "TOOMANYREQUESTS")
    assert int(headers["Retry-After"]) > 0
    assert _asked(fake_hub) == asked


async def test_referrers_from_the_fallback_tag_when_the_upstream_has_no_api(
    fake_hub: FakeHub, mirror: RunningMirror
) -> None:
    fake_hub.referrers_api = False
    image, artifacts = _signed_image(fake_hub)
    fallback = referrers_index(artifacts[:2])
    repo = fake_hub.repo("library/app")
    fallback_digest = sha256_digest(fallback)
    repo.manifests[fallback_digest] = (fallback, OCI_INDEX)
    repo.tags[image.digest.replace(":", "-")] = fallback_digest

    status, headers, body = await mirror.get(f"/v2/app/referrers/{image.digest}")
    assert (status, headers["Content-Type"]) == (200, OCI_INDEX)
    assert _index(body)["manifests"] == json.loads(fallback)["manifests"]
    status, _, body = await mirror.get(
        f"/v2/app/referrers/{image.digest}?artifactType={quote(COSIGN_SIG_TYPE)}"
    )
    assert _digests(body) == [artifacts[0].digest]

    # No fallback tag either: no referrers, an empty index (never a 404).
    other = make_image([make_layer(b"unsigned")])
    fake_hub.add_image("library/app", "2.0", other)
    status, _, body = await mirror.get(f"/v2/app/referrers/{other.digest}")
    assert (status, _index(body)["manifests"]) == (200, [])


async def test_no_referrers_is_an_empty_index_and_a_bad_digest_a_400(
    fake_hub: FakeHub, mirror: RunningMirror
) -> None:
    image = make_image([make_layer(b"nobody refers to me")])
    fake_hub.add_image("library/app", "1.0", image)
    status, headers, body = await mirror.get(f"/v2/app/referrers/{image.digest}")
    assert (status, headers["Content-Type"]) == (200, OCI_INDEX)
    assert _index(body)["manifests"] == []
    status, _, body = await mirror.get(
        f"/v2/app/referrers/{image.digest}?artifactType={quote(SBOM_TYPE)}"
    )
    assert (status, _index(body)["manifests"]) == (200, [])

    status, _, body = await mirror.get("/v2/app/referrers/sha256:1234")
    assert (status, json.loads(body)["errors"][0]["code"]) == (400, "DIGEST_INVALID")
    status, _, body = await mirror.get("/v2/app/referrers/latest")
    assert (status, json.loads(body)["errors"][0]["code"]) == (400, "DIGEST_INVALID")


async def test_referrers_follow_the_access_rules(
    fake_hub: FakeHub, tmp_path: Path, clock: FakeClock
) -> None:
    image, _ = _signed_image(fake_hub)
    rules = AccessRules(deny=(Pin.parse("library/app"),))
    settings = settings_for(fake_hub.url, tmp_path / "data", repositories=rules)
    async with RunningMirror(settings, clock=clock) as denying:
        status, _, body = await denying.get(f"/v2/app/referrers/{image.digest}")
        assert (status, json.loads(body)["errors"][0]["code"]) == (403, "DENIED")
    assert fake_hub.count(path_contains=REFERRERS_PATH) == 0
