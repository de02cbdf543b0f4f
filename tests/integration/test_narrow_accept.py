"""Clients that accept only a Docker schema 2 manifest, pulling multi-platform tags."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from tests.support.fakehub import FakeHub
from tests.support.mirror import FakeClock, RunningMirror
from tests.support.oci import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Image,
    Index,
    make_image,
    make_index,
    make_layer,
)

NARROW = [DOCKER_MANIFEST]  # an old client: no lists, no OCI
EVERYTHING = [DOCKER_LIST, DOCKER_MANIFEST, OCI_MANIFEST]


def manifest_gets(hub: FakeHub) -> int:
    requests = hub.requests("GET", "registry", "/manifests/")
    return sum(1 for request in requests if request.status != 401)


async def test_narrow_pulls_obey_the_freshness_window_and_stale_serving(
    fake_hub: FakeHub, mirror: RunningMirror, clock: FakeClock
) -> None:
    amd64 = make_image([make_layer(b"amd64")], arch="amd64", docker=True)
    arm64 = make_image([make_layer(b"arm64")], arch="arm64", docker=True)
    index = make_index([amd64, arm64], docker=True)
    fake_hub.add_index("library/app", "1.0", index)
    status, _, body = await mirror.get("/v2/app/manifests/1.0", accept=EVERYTHING)
    assert (status, body) == (200, index.index)  # the index is cached now
    fake_hub.clear_log()

    for _ in range(5):
        status, headers, body = await mirror.get("/v2/app/manifests/1.0", accept=NARROW)
        assert (status, body) == (200, amd64.manifest)
        assert headers["Content-Type"] == DOCKER_MANIFEST
    assert manifest_gets(fake_hub) <= 1

    # By digest: never upstream once cached, whatever the Accept.
    gets = manifest_gets(fake_hub)
    for digest, wanted in ((index.digest, index.index), (amd64.digest, amd64.manifest)):
        status, _, body = await mirror.get(f"/v2/app/manifests/{digest}", accept=NARROW)
        assert (status, body) == (200, wanted)
    assert manifest_gets(fake_hub) == gets

    # Upstream down past the window: served stale like any other pull.
    fake_hub.down = True
    clock.advance(3600)
    status, _, body = await mirror.get("/v2/app/manifests/1.0", accept=NARROW)
    assert (status, body) == (200, amd64.manifest)



def _oci_index() -> Index:
    arches = ("amd64", "arm64")
    return make_index([make_image([make_layer(arch.encode())], arch=arch) for arch in arches])


def _oci_image() -> Image:
    return make_image([make_layer(b"oci single")])


@pytest.mark.parametrize("content", [_oci_index, _oci_image], ids=["oci-index", "oci-image"])
async def test_narrow_pulls_of_an_oci_tag_are_answered_from_the_cache(
    fake_hub: FakeHub, mirror: RunningMirror, clock: FakeClock, content: Callable[[], Image | Index]
) -> None:
    # The distribution registry and Docker Hub answer a client that cannot read an OCI
    # index or manifest with a 404: what the mirror holds tells it so without asking again.
    held = content()
    if isinstance(held, Index):
        fake_hub.add_index("library/oci", "1.0", held)
    else:
        fake_hub.add_image("library/oci", "1.0", held)
    status, _, body = await mirror.get("/v2/oci/manifests/1.0", accept=[OCI_INDEX, OCI_MANIFEST])
    assert status == 200
    fake_hub.clear_log()

    answers = [await mirror.get("/v2/oci/manifests/1.0", accept=NARROW) for _ in range(5)]
    assert {status for status, _, _ in answers} == {404}
    assert {body for _, _, body in answers} == {answers[0][2]}
    assert json.loads(answers[0][2])["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert manifest_gets(fake_hub) <= 1

    # Upstream down past the window: the same answer, not a 503.
    fake_hub.down = True
    clock.advance(3600)
    status, _, body = await mirror.get("/v2/oci/manifests/1.0", accept=NARROW)
    assert (status, body) == (404, answers[0][2])
    # By digest the held bytes are served whatever the Accept, as before.
    status, _, body = await mirror.get(f"/v2/oci/manifests/{held.digest}", accept=NARROW)
    assert status == 200
