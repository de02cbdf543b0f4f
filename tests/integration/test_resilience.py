"""Docker Hub's bad days: down, out of quota, slow, lying. Cached content keeps pulling."""

import asyncio
import json
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from tests.support.fakehub import FakeHub
from tests.support.mirror import FakeClock, RunningMirror, metric_value, settings_for
from tests.support.oci import OCI_MANIFEST, Image, make_image, make_layer, make_random_layer

ACCEPT = [OCI_MANIFEST]


@pytest_asyncio.fixture
async def expired(
    fake_hub: FakeHub, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[RunningMirror]:
    """A mirror whose tags are always past their window, as with --tag-ttl 0."""
    settings = settings_for(fake_hub.url, tmp_path / "data", tag_ttl=0.0, negative_ttl=0.3)
    async with RunningMirror(settings, clock=clock, probe_interval=0.1) as mirror:
        yield mirror


async def cache_image(hub: FakeHub, mirror: RunningMirror, tag: str = "1.0") -> Image:
    image = make_image([make_layer(f"layer of {tag}".encode())])
    hub.add_image("library/app", tag, image)
    status, _, _ = await mirror.get(f"/v2/app/manifests/{tag}", accept=ACCEPT)
    assert status == 200
    await mirror.get(f"/v2/app/blobs/{image.layers[0].digest}")
    return image


async def metrics_page(mirror: RunningMirror) -> str:
    status, _, body = await mirror.get("/metrics")
    assert status == 200
    return body.decode()


def manifest_gets(hub: FakeHub) -> int:
    return hub.count("GET", "registry", "/manifests/")


@pytest.mark.parametrize("fault", ["503", "429", "refused"])
async def test_stale_tags_are_served_when_revalidation_fails(
    fake_hub: FakeHub, expired: RunningMirror, fault: str
) -> None:
    image = await cache_image(fake_hub, expired)
    if fault == "503":
        fake_hub.down = True
    elif fault == "429":
        fake_hub.status_override = 429
    else:
        await fake_hub.close()  # connections refused

    for _ in range(3):
        status, headers, body = await expired.get("/v2/app/manifests/1.0", accept=ACCEPT)
        assert (status, body) == (200, image.manifest)
        assert headers["Docker-Content-Digest"] == image.digest
        status, _, body = await expired.get(f"/v2/app/blobs/{image.layers[0].digest}")
        assert (status, body) == (200, image.layers[0].data)

    page = await metrics_page(expired)
    assert (metric_value(page, "mirror_requests_total", route="manifest", cache="stale") or 0) >= 3


async def test_max_stale_bounds_how_old_a_stale_answer_may_be(
    fake_hub: FakeHub, tmp_path: Path, clock: FakeClock
) -> None:
    settings = settings_for(fake_hub.url, tmp_path, tag_ttl=60.0, max_stale=100.0)
    async with RunningMirror(settings, clock=clock) as mirror:
        await cache_image(fake_hub, mirror)
        fake_hub.down = True
        clock.advance(60 + 50)
        assert (await mirror.get("/v2/app/manifests/1.0", accept=ACCEPT))[0] == 200
        clock.advance(60)
        status, _, body = await mirror.get("/v2/app/manifests/1.0", accept=ACCEPT)
        assert status == 503
        assert json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"


async def test_after_a_429_no_manifest_get_is_sent_until_retry_after(
    fake_hub: FakeHub, expired: RunningMirror
) -> None:
    image = await cache_image(fake_hub, expired)
    fake_hub.ratelimit_remaining = 0
    fake_hub.retry_after = "120"
    fake_hub.add_image("library/other", "1.0", make_image([make_layer(b"other")]))

    status, headers, body = await expired.get("/v2/other/manifests/1.0", accept=ACCEPT)
    assert status == 429
    assert json.loads(body)["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert 100 <= int(headers["Retry-After"]) <= 120
    gets_after_429 = manifest_gets(fake_hub)

    for name in ("other", "third", "fourth"):
        status, headers, _ = await expired.get(f"/v2/{name}/manifests/1.0", accept=ACCEPT)
        assert status == 429
        assert int(headers["Retry-After"]) > 0
    assert manifest_gets(fake_hub) == gets_after_429  # nothing more spent

    # What was pulled before still pulls (its revalidating HEAD is free).
    status, _, body = await expired.get("/v2/app/manifests/1.0", accept=ACCEPT)
    assert (status, body) == (200, image.manifest)
    page = await metrics_page(expired)
    assert metric_value(page, "mirror_upstream_ratelimit_remaining", upstream="docker.io") == 0


async def test_a_quota_reserve_keeps_the_last_pulls_for_later(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    settings = settings_for(fake_hub.url, tmp_path, ratelimit_reserve=10)
    async with RunningMirror(settings) as mirror:
        fake_hub.ratelimit_remaining = 11
        await cache_image(fake_hub, mirror, "1.0")  # spends one: 10 left
        await cache_image(fake_hub, mirror, "2.0")  # spends one: 9 left, below the reserve
        gets = manifest_gets(fake_hub)
        fake_hub.add_image("library/app", "3.0", make_image([make_layer(b"three")]))

        status, headers, _ = await mirror.get("/v2/app/manifests/3.0", accept=ACCEPT)

        assert status == 429
        assert "Retry-After" in headers
        assert manifest_gets(fake_hub) == gets
        assert fake_hub.ratelimit_remaining == 9


async def test_the_circuit_opens_on_a_failing_upstream_and_closes_when_it_returns(
    fake_hub: FakeHub, expired: RunningMirror
) -> None:
    image = await cache_image(fake_hub, expired)
    fake_hub.down = True
    for _ in range(6):
        assert (await expired.get("/v2/app/manifests/1.0", accept=ACCEPT))[0] == 200
    _, _, body = await expired.get("/readyz")
    assert json.loads(body)["upstreams"]["docker.io"]["reachable"] is False
    page = await metrics_page(expired)
    assert metric_value(page, "mirror_upstream_circuit_open", upstream="docker.io") == 1

    fake_hub.clear_log()
    for _ in range(5):  # answered without asking the upstream
        status, _, body = await expired.get("/v2/app/manifests/1.0", accept=ACCEPT)
        assert (status, body) == (200, image.manifest)
    assert fake_hub.count(server="registry", path_contains="/manifests/") == 0

    fake_hub.down = False
    for _ in range(50):  # the background probe notices within a few intervals
        await asyncio.sleep(0.1)
        _, _, body = await expired.get("/readyz")
        if json.loads(body)["upstreams"]["docker.io"]["reachable"]:
            break
    else:
        pytest.fail("the circuit never closed")
    await expired.get("/v2/app/manifests/1.0", accept=ACCEPT)
    assert fake_hub.count("HEAD", "registry", "/manifests/") >= 1


async def test_a_missing_tag_is_remembered_briefly(
    fake_hub: FakeHub, expired: RunningMirror, clock: FakeClock
) -> None:
    fake_hub.add_image("library/app", "1.0", make_image([make_layer(b"x")]))
    for _ in range(5):
        status, _, body = await expired.get("/v2/app/manifests/nope", accept=ACCEPT)
        assert status == 404
        assert json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert manifest_gets(fake_hub) <= 2  # the first 401 challenge, then one real 404

    clock.advance(0.4)  # negative_ttl is 0.3 s here
    fake_hub.add_image("library/app", "nope", make_image([make_layer(b"now it exists")]))
    assert (await expired.get("/v2/app/manifests/nope", accept=ACCEPT))[0] == 200


async def test_a_stalled_blob_is_not_stored_and_the_next_request_fetches_again(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    settings = settings_for(fake_hub.url, tmp_path / "data", read_timeout=1.0)
    layer = make_random_layer(1024 * 1024, seed=11)
    fake_hub.add_image("library/app", "1.0", make_image([layer]))
    fake_hub.stall_next_blob_at = 256 * 1024
    async with RunningMirror(settings) as mirror:
        assert mirror.session is not None
        async with mirror.session.get(f"{mirror.url}/v2/app/blobs/{layer.digest}") as response:
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
        assert not [p for p in (tmp_path / "data" / "blobs").rglob("*") if p.is_file()]

        status, _, body = await mirror.get(f"/v2/app/blobs/{layer.digest}")
        assert (status, body) == (200, layer.data)
        assert fake_hub.count("GET", "cdn") == 2


async def test_a_blob_deleted_by_hand_is_fetched_again(
    fake_hub: FakeHub, expired: RunningMirror
) -> None:
    image = await cache_image(fake_hub, expired)
    layer = image.layers[0]
    [stored] = [p for p in (expired.settings.data_dir / "blobs").rglob("*") if p.is_file()]
    stored.unlink()

    status, _, body = await expired.get(f"/v2/app/blobs/{layer.digest}")
    assert (status, body) == (200, layer.data)


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    if os.geteuid() != 0 and os.environ.get("CI") != "true":
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_a_full_disk_fails_the_fill_cleanly_and_recovers(
    fake_hub: FakeHub, small_disk: Path
) -> None:
    small = make_layer(b"fits" * 100)
    big = make_random_layer(4 * 1024 * 1024, seed=12)
    fake_hub.add_image("library/app", "small", make_image([small]))
    fake_hub.add_image("library/app", "big", make_image([big]))
    settings = settings_for(fake_hub.url, small_disk / "data")
    async with RunningMirror(settings) as mirror:
        assert (await mirror.get(f"/v2/app/blobs/{small.digest}"))[2] == small.data
        assert mirror.session is not None
        async with mirror.session.get(f"{mirror.url}/v2/app/blobs/{big.digest}") as response:
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
        partials = list((small_disk / "data").rglob("*.partial"))
        assert partials == []
        # Cached content is still served, and the mirror recovers when space returns.
        assert (await mirror.get(f"/v2/app/blobs/{small.digest}"))[2] == small.data
        remount = ["mount", "-o", "remount,size=16m", str(small_disk)]
        await asyncio.to_thread(subprocess.run, remount, check=True)
        status, _, body = await mirror.get(f"/v2/app/blobs/{big.digest}")
        assert (status, body) == (200, big.data)


async def test_metrics_show_upstream_requests_and_quota(
    fake_hub: FakeHub, mirror: RunningMirror
) -> None:
    await cache_image(fake_hub, mirror)
    await mirror.get("/v2/app/manifests/1.0", accept=ACCEPT)

    page = await metrics_page(mirror)

    assert (
        metric_value(page, "mirror_upstream_requests_total", kind="manifest_get", status="200") == 1
    )
    assert metric_value(page, "mirror_upstream_requests_total", kind="blob_get", status="200") == 1
    assert metric_value(page, "mirror_upstream_requests_total", kind="token", status="200") == 1
    assert metric_value(page, "mirror_upstream_ratelimit_remaining", upstream="docker.io") == 99
    assert metric_value(page, "mirror_requests_total", route="manifest", cache="hit") == 1
    assert metric_value(page, "mirror_blob_bytes_served_total", source="upstream") is not None
    assert metric_value(page, "mirror_blob_fills_in_flight") == 0
