"""Upstream requests a client cannot make the mirror repeat: remembered misses, tag lists
inside the freshness window, and a bounded rate of lookups of names never seen."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from dataclasses import replace
from pathlib import Path

import aiohttp

from mirror.upstream.client import UpstreamClient
from tests.support.fakehub import FakeHub
from tests.support.mirror import RunningMirror, settings_for
from tests.support.oci import OCI_MANIFEST, make_image, make_layer
from tests.support.process import MirrorProcess

ACCEPT = [OCI_MANIFEST]
MISSING = "sha256:" + "c" * 64


def code(body: bytes) -> str:
    return str(json.loads(body)["errors"][0]["code"])


async def test_made_up_repositories_cost_nothing_upstream_the_second_time(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    settings = settings_for(fake_hub.url, tmp_path / "data", cold_lookup_rate=0.0)
    async with RunningMirror(settings) as mirror:
        for number in range(300):
            status, _, body = await mirror.get(f"/v2/made-up-{number}/manifests/latest")
            assert (status, code(body)) == (404, "NAME_UNKNOWN")
        first_round = len(fake_hub.log)
        fake_hub.clear_log()
        for number in range(300):
            status, _, _ = await mirror.get(f"/v2/made-up-{number}/manifests/latest")
            assert status == 404
            status, _, _ = await mirror.get(f"/v2/made-up-{number}/blobs/{MISSING}")
            assert status == 404
    # A token and a refused GET per name, no second try; the first 401 reads /v2/ once.
    assert first_round <= 2 * 300 + 2
    assert fake_hub.log == []


async def test_a_missing_blob_or_manifest_digest_is_asked_for_once(
    fake_hub: FakeHub, mirror: RunningMirror
) -> None:
    fake_hub.add_image("library/app", "1.0", make_image([make_layer(b"x")]))
    for _ in range(50):
        status, _, body = await mirror.get(f"/v2/app/blobs/{MISSING}")
        assert (status, code(body)) == (404, "BLOB_UNKNOWN")
        status, _, _ = await mirror.get(f"/v2/app/blobs/{MISSING}", method="HEAD")
        assert status == 404
        status, _, body = await mirror.get(f"/v2/app/manifests/{MISSING}", accept=ACCEPT)
        assert (status, code(body)) == (404, "MANIFEST_UNKNOWN")
    blob_asks = [r for r in fake_hub.log if f"/blobs/{MISSING}" in r.path and r.status != 401]
    manifest_asks = [
        r for r in fake_hub.log if f"/manifests/{MISSING}" in r.path and r.status != 401
    ]
    assert len(blob_asks) == 1
    assert len(manifest_asks) == 1


async def test_tag_lists_are_served_inside_the_freshness_window(
    fake_hub: FakeHub, mirror: RunningMirror
) -> None:
    fake_hub.add_image("library/app", "1.0", make_image([make_layer(b"x")]))
    bodies = [(await mirror.get("/v2/app/tags/list"))[2] for _ in range(20)]
    assert all(json.loads(body)["tags"] == ["1.0"] for body in bodies)
    assert fake_hub.count("GET", "registry", "/tags/list") <= 2  # one, after a 401 challenge
    assert mirror.clock is not None
    mirror.clock.advance(301)
    await mirror.get("/v2/app/tags/list")
    assert fake_hub.count("GET", "registry", "/tags/list") <= 3


async def test_expired_negative_answers_leave_the_embedded_store(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    fake_hub.add_image("library/app", "1.0", make_image([make_layer(b"x")]))
    settings = settings_for(fake_hub.url, tmp_path / "data", negative_ttl=0.0)
    async with RunningMirror(settings) as mirror:
        for number in range(20):
            status, _, _ = await mirror.get(f"/v2/app/manifests/nope-{number}", accept=ACCEPT)
            assert status == 404
    with sqlite3.connect(tmp_path / "data" / "metadata.sqlite3") as db:
        [(rows,)] = db.execute("SELECT count(*) FROM missing").fetchall()
    assert rows <= 1


async def test_lookups_of_names_never_seen_go_upstream_at_a_bounded_rate(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    for number in range(20):
        fake_hub.add_image("library/app", f"{number}.0", make_image([make_layer(b"x")]))
    settings = replace(settings_for(fake_hub.url, tmp_path / "data"), cold_lookup_rate=1.0)
    async with RunningMirror(settings) as mirror:
        answers = await asyncio.gather(
            *(mirror.get(f"/v2/app/manifests/{n}.0", accept=ACCEPT) for n in range(20))
        )
        statuses = [status for status, _, _ in answers]
        refused = [headers for status, headers, _ in answers if status == 429]
        assert statuses.count(200) == 5  # the burst: five seconds' worth at 1/s
        assert len(refused) == 15
        assert all(int(headers["Retry-After"]) >= 1 for headers in refused)
        gets = [r for r in fake_hub.requests("GET", "registry", "/manifests/") if r.status != 401]
        assert len(gets) == 5
        # What is cached is never limited.
        for _ in range(10):
            assert (await mirror.get("/v2/app/manifests/0.0", accept=ACCEPT))[0] == 200


async def test_missing_blobs_do_not_flood_the_log(fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.add_image("library/app", "1.0", make_image([make_layer(b"x")]))
    with MirrorProcess(tmp_path / "data", fake_hub.url) as mirror:
        async with aiohttp.ClientSession() as session:
            for number in range(30):
                url = f"{mirror.url}/v2/app/blobs/sha256:{number:064x}"
                async with session.get(url) as response:
                    assert response.status == 404
        log = mirror.log()
    assert log.count("blob_fill_failed") <= 2


async def test_manifests_in_memory_are_bounded_in_bytes(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    images = [
        make_image([make_layer(f"{n}-{layer}".encode()) for layer in range(150)])
        for n in range(10)
    ]  # manifests of about 25 KiB each
    for number, image in enumerate(images):
        fake_hub.add_image(f"library/big{number}", "latest", image)
    bound = 64 * 1024
    settings = settings_for(fake_hub.url, tmp_path / "data", manifest_cache_bytes=bound)
    async with RunningMirror(settings) as mirror:
        for round_ in range(2):
            for number, image in enumerate(images):
                status, _, body = await mirror.get(
                    f"/v2/big{number}/manifests/latest", accept=ACCEPT
                )
                assert (status, body) == (200, image.manifest), round_
                assert mirror.engine.store.manifest_bytes <= bound
        assert sum(len(image.manifest) for image in images) > 3 * bound


async def test_a_locked_embedded_store_degrades_like_a_redis_outage(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    image = make_image([make_layer(b"locked out")])
    fake_hub.add_image("library/app", "1.0", image)
    settings = settings_for(fake_hub.url, tmp_path / "data")
    async with RunningMirror(settings) as mirror:
        assert (await mirror.get("/v2/"))[0] == 200
        # Another process (a worker, say) holds the write lock for longer than we wait.
        blocker = sqlite3.connect(tmp_path / "data" / "metadata.sqlite3", timeout=0)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            status, _, body = await mirror.get("/v2/app/manifests/1.0", accept=ACCEPT)
            assert (status, body) == (200, image.manifest)  # fetched: never lost
            status, _, body = await mirror.get("/v2/app/manifests/1.0", accept=ACCEPT)
            assert (status, body) == (200, image.manifest)  # and served from memory
            status, _, body = await mirror.get("/readyz")
            assert json.loads(body)["checks"]["store"] == "degraded"
        finally:
            blocker.rollback()
            blocker.close()
        for _ in range(50):  # the background probe finds it usable again
            if json.loads((await mirror.get("/readyz"))[2])["checks"]["store"] == "ok":
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the store never came back")


async def test_tokens_for_made_up_names_are_bounded(fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.deny_unknown_repos = False  # tokens for anything; NAME_UNKNOWN for the unknown
    settings = settings_for(fake_hub.url, tmp_path / "data", cold_lookup_rate=0.0)
    async with RunningMirror(settings) as mirror:
        for number in range(1100):
            status, _, body = await mirror.get(f"/v2/nobody/x{number}/manifests/latest")
            assert (status, code(body)) == (404, "NAME_UNKNOWN")
        upstream = mirror.engine.upstreams["docker.io"]
        assert isinstance(upstream, UpstreamClient)
        assert upstream.cached_tokens <= 1024
        fake_hub.clear_log()
        status, _, _ = await mirror.get("/v2/nobody/x7/manifests/latest")
        assert status == 404
        assert fake_hub.log == []  # a repository the upstream does not know: remembered
