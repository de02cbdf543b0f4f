"""Manifests through the mirror: bytes, headers and the freshness window, by upstream counts."""

import asyncio
import hashlib
import json

from tests.support.fakehub import FakeHub
from tests.support.mirror import FakeClock, RunningMirror
from tests.support.oci import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    make_image,
    make_index,
    make_layer,
)

ALL_TYPES = [OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST]


def manifest_gets(hub: FakeHub) -> int:
    """Manifest GETs the upstream answered: what Docker Hub counts against the pull limit."""
    return sum(r.status == 200 for r in hub.requests("GET", "registry", "/manifests/"))


def manifest_heads(hub: FakeHub) -> int:
    return sum(r.status == 200 for r in hub.requests("HEAD", "registry", "/manifests/"))


async def test_tag_pull_is_byte_exact_with_registry_headers(
    fake_hub: FakeHub, mirror: RunningMirror
) -> None:
    image = make_image([make_layer({"hello.txt": b"hello"})])
    fake_hub.add_image("library/alpine", "3.20", image)

    status, headers, body = await mirror.get("/v2/alpine/manifests/3.20", accept=ALL_TYPES)

    assert status == 200
    assert body == image.manifest
    assert headers["Content-Type"] == OCI_MANIFEST
    assert headers["Content-Length"] == str(len(image.manifest))
    assert headers["Docker-Content-Digest"] == image.digest
    assert headers["ETag"] == f'"{image.digest}"'
    assert "sha256:" + hashlib.sha256(body).hexdigest() == image.digest


async def test_head_carries_the_get_headers_without_a_body(
    fake_hub: FakeHub, mirror: RunningMirror
) -> None:
    image = make_image([make_layer(b"x" * 100)])
    fake_hub.add_image("library/alpine", "latest", image)

    status, headers, body = await mirror.get(
        "/v2/library/alpine/manifests/latest", method="HEAD", accept=ALL_TYPES
    )

    assert (status, body) == (200, b"")
    assert headers["Content-Length"] == str(len(image.manifest))
    assert headers["Docker-Content-Digest"] == image.digest
    assert headers["Content-Type"] == OCI_MANIFEST


async def test_within_the_window_a_tag_makes_no_upstream_request(
    fake_hub: FakeHub, mirror: RunningMirror, clock: FakeClock
) -> None:
    fake_hub.add_image("library/alpine", "latest", make_image([make_layer(b"a")]))
    await mirror.get("/v2/alpine/manifests/latest", accept=ALL_TYPES)
    fake_hub.clear_log()

    clock.advance(299)
    for _ in range(5):
        status, _, _ = await mirror.get("/v2/alpine/manifests/latest", accept=ALL_TYPES)
        assert status == 200

    assert fake_hub.log == []


async def test_after_the_window_a_head_revalidates_and_no_get_follows(
    fake_hub: FakeHub, mirror: RunningMirror, clock: FakeClock
) -> None:
    image = make_image([make_layer(b"a")])
    fake_hub.add_image("library/alpine", "latest", image)
    await mirror.get("/v2/alpine/manifests/latest", accept=ALL_TYPES)
    fake_hub.clear_log()

    clock.advance(301)
    status, _, body = await mirror.get("/v2/alpine/manifests/latest", accept=ALL_TYPES)
    assert (status, body) == (200, image.manifest)
    assert (manifest_heads(fake_hub), manifest_gets(fake_hub)) == (1, 0)

    # The revalidation opened a new window.
    fake_hub.clear_log()
    await mirror.get("/v2/alpine/manifests/latest", accept=ALL_TYPES)
    assert fake_hub.count(server="registry") == 0


async def test_a_moved_tag_is_fetched_once_after_the_window(
    fake_hub: FakeHub, mirror: RunningMirror, clock: FakeClock
) -> None:
    old, new = make_image([make_layer(b"old")]), make_image([make_layer(b"new")])
    fake_hub.add_image("library/app", "v1", old)
    await mirror.get("/v2/app/manifests/v1", accept=ALL_TYPES)
    fake_hub.add_image("library/app", "v1", new)
    fake_hub.clear_log()

    _, _, body = await mirror.get("/v2/app/manifests/v1", accept=ALL_TYPES)
    assert body == old.manifest  # still inside the window

    clock.advance(301)
    _, headers, body = await mirror.get("/v2/app/manifests/v1", accept=ALL_TYPES)
    assert body == new.manifest
    assert headers["Docker-Content-Digest"] == new.digest
    assert (manifest_heads(fake_hub), manifest_gets(fake_hub)) == (1, 1)


async def test_a_digest_pull_never_goes_upstream_once_cached(
    fake_hub: FakeHub, mirror: RunningMirror, clock: FakeClock
) -> None:
    image = make_image([make_layer(b"d")])
    fake_hub.add_image("library/alpine", "latest", image)
    status, _, body = await mirror.get(f"/v2/alpine/manifests/{image.digest}", accept=ALL_TYPES)
    assert (status, body) == (200, image.manifest)
    assert manifest_gets(fake_hub) == 1
    fake_hub.clear_log()

    clock.advance(10 * 24 * 3600)
    for method in ("GET", "HEAD"):
        status, headers, _ = await mirror.get(
            f"/v2/alpine/manifests/{image.digest}", method=method, accept=ALL_TYPES
        )
        assert status == 200
        assert headers["Docker-Content-Digest"] == image.digest
    assert fake_hub.log == []


async def test_two_platform_oci_index_and_its_children(
    fake_hub: FakeHub, mirror: RunningMirror
) -> None:
    amd64 = make_image([make_layer(b"amd64")], arch="amd64")
    arm64 = make_image([make_layer(b"arm64")], arch="arm64")
    index = make_index([amd64, arm64])
    fake_hub.add_index("library/multi", "latest", index)

    _, headers, body = await mirror.get("/v2/multi/manifests/latest", accept=ALL_TYPES)
    assert body == index.index
    assert headers["Content-Type"] == OCI_INDEX
    listed = {m["platform"]["architecture"]: m["digest"] for m in json.loads(body)["manifests"]}
    assert listed == {"amd64": amd64.digest, "arm64": arm64.digest}

    for child in (amd64, arm64):
        _, headers, body = await mirror.get(f"/v2/multi/manifests/{child.digest}", accept=ALL_TYPES)
        assert (body, headers["Docker-Content-Digest"]) == (child.manifest, child.digest)


async def test_docker_schema2_manifest_and_manifest_list(
    fake_hub: FakeHub, mirror: RunningMirror
) -> None:
    single = make_image([make_layer(b"s")], docker=True)
    listed = [make_image([make_layer(a.encode())], arch=a, docker=True) for a in ("amd64", "arm64")]
    manifest_list = make_index(listed, docker=True)
    fake_hub.add_image("org/single", "1.0", single)
    fake_hub.add_index("org/multi", "1.0", manifest_list)

    _, headers, body = await mirror.get("/v2/org/single/manifests/1.0", accept=ALL_TYPES)
    assert (body, headers["Content-Type"]) == (single.manifest, DOCKER_MANIFEST)
    _, headers, body = await mirror.get("/v2/org/multi/manifests/1.0", accept=ALL_TYPES)
    assert (body, headers["Content-Type"]) == (manifest_list.index, DOCKER_LIST)
    assert headers["Docker-Content-Digest"] == manifest_list.digest


async def test_accept_on_one_comma_joined_line_like_containerd(
    fake_hub: FakeHub, mirror: RunningMirror
) -> None:
    image = make_image([make_layer(b"c")])
    fake_hub.add_image("library/alpine", "latest", image)
    joined = ", ".join([*ALL_TYPES, "*/*"])

    status, headers, body = await mirror.get(
        "/v2/alpine/manifests/latest?ns=docker.io", method="HEAD", headers={"Accept": joined}
    )
    assert (status, headers["Docker-Content-Digest"], body) == (200, image.digest, b"")


async def test_a_client_that_cannot_take_the_index_gets_what_upstream_gives_it(
    fake_hub: FakeHub, mirror: RunningMirror
) -> None:
    amd64 = make_image([make_layer(b"amd64")], arch="amd64", docker=True)
    arm64 = make_image([make_layer(b"arm64")], arch="arm64", docker=True)
    fake_hub.add_index("library/multi", "latest", make_index([amd64, arm64], docker=True))
    await mirror.get("/v2/multi/manifests/latest", accept=ALL_TYPES)

    _, headers, body = await mirror.get("/v2/multi/manifests/latest", accept=[DOCKER_MANIFEST])

    assert headers["Content-Type"] == DOCKER_MANIFEST
    assert body == amd64.manifest  # the fake, like Docker Hub, picks linux/amd64


async def test_concurrent_cold_tag_pulls_make_one_upstream_get(
    fake_hub: FakeHub, mirror: RunningMirror
) -> None:
    image = make_image([make_layer(b"busy")])
    fake_hub.add_image("library/busy", "latest", image)

    results = await asyncio.gather(
        *(mirror.get("/v2/busy/manifests/latest", accept=ALL_TYPES) for _ in range(10))
    )

    assert {(status, body) for status, _, body in results} == {(200, image.manifest)}
    assert manifest_gets(fake_hub) == 1


async def test_tags_list_is_passed_through(fake_hub: FakeHub, mirror: RunningMirror) -> None:
    image = make_image([make_layer(b"t")])
    for tag in ("1.0", "1.1", "2.0"):
        fake_hub.add_image("library/app", tag, image)

    status, _, body = await mirror.get("/v2/app/tags/list")
    assert status == 200
    assert json.loads(body) == {"name": "library/app", "tags": ["1.0", "1.1", "2.0"]}

    status, headers, body = await mirror.get("/v2/app/tags/list?n=2")
    assert json.loads(body)["tags"] == ["1.0", "1.1"]
    assert "last=1.1" in headers["Link"]


async def test_unknown_tag_is_404_manifest_unknown(
    fake_hub: FakeHub, mirror: RunningMirror
) -> None:
    fake_hub.add_image("library/alpine", "latest", make_image([make_layer(b"u")]))

    status, headers, body = await mirror.get("/v2/alpine/manifests/nope", accept=ALL_TYPES)

    assert status == 404
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
