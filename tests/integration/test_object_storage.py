"""Blobs in S3-compatible object storage: `mirror serve` on a real SeaweedFS bucket, in front
of the fake Docker Hub (with its request log)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiobotocore.session import get_session
from aiohttp import web
from botocore.config import Config

from mirror.config import load
from mirror.engine import open_engine
from mirror.services import maintenance
from tests.support.binaries import require_binary
from tests.support.fakehub import FakeHub, LoggedRequest
from tests.support.mirror import metric_value
from tests.support.oci import OCI_MANIFEST, make_image, make_layer, make_random_layer
from tests.support.process import (
    MirrorProcess,
    dir_blobs_verified,
    dir_manifest_digest,
    skopeo_copy,
)
from tests.support.redis_server import RedisServer
from tests.support.s3_proxy import CompletionHoldingProxy, S3Proxy
from tests.support.seaweedfs import ACCESS_KEY, READER_KEY, SECRET_KEY, SeaweedFS
from tests.support.waiting import eventually

ACCEPT = {"Accept": OCI_MANIFEST}
BUCKET = "mirror-blobs"


@pytest.fixture(scope="module")
def seaweedfs() -> Iterator[SeaweedFS]:
    with SeaweedFS() as server:
        yield server


@pytest.fixture
def bucket(seaweedfs: SeaweedFS, request: pytest.FixtureRequest) -> str:
    """A bucket of the test's own (the mirror creates it at start)."""
    return f"t-{abs(hash(request.node.name)) % 10**12}"


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer(require_binary("redis-server")) as server:
        yield server


def s3_client(seaweedfs: SeaweedFS) -> object:
    return get_session().create_client(
        "s3",
        endpoint_url=seaweedfs.endpoint,
        region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(s3={"addressing_style": "path"}),
    )


async def objects(seaweedfs: SeaweedFS, bucket: str) -> dict[str, bytes]:
    """Every object in the bucket: key -> bytes (one the mirror deletes between the
    listing and its GET, an eviction going on, is left out)."""
    found: dict[str, bytes] = {}
    async with s3_client(seaweedfs) as client:  # type: ignore[attr-defined]
        listed = await client.list_objects_v2(Bucket=bucket)
        for item in listed.get("Contents", ()):
            try:
                answer = await client.get_object(Bucket=bucket, Key=item["Key"])
            except client.exceptions.NoSuchKey:
                continue
            found[item["Key"]] = await answer["Body"].read()
    return found


def blob_files(data_dir: Path) -> list[Path]:
    return [p for p in data_dir.rglob("*") if p.is_file() and len(p.name) >= 64]


@pytest_asyncio.fixture
async def served(
    fake_hub: FakeHub, seaweedfs: SeaweedFS, bucket: str, tmp_path: Path
) -> AsyncIterator[MirrorProcess]:
    process = MirrorProcess(tmp_path / "data", fake_hub.url, env=seaweedfs.env(bucket))
    await asyncio.to_thread(process.start)
    yield process
    await asyncio.to_thread(process.stop)


async def get(session: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, bytes]:
    async with session.get(url, headers={**ACCEPT, **headers}) as response:
        return response.status, await response.read()


async def landed(process: MirrorProcess, count: int = 1) -> None:
    """Until ``count`` blobs pulled through ``process`` are complete in the bucket (and
    recorded, their spools gone): a client has a blob once its bytes are verified, and the
    object lands after. For tests that look at the bucket or the data dir from outside."""
    await process.wait_for_event("blob_stored", count=count)


async def test_a_pull_lands_the_blobs_in_the_bucket_and_none_in_the_data_dir(
    fake_hub: FakeHub, seaweedfs: SeaweedFS, bucket: str, served: MirrorProcess
) -> None:
    big = make_random_layer(20 * 1024 * 1024, seed=5)  # three parts of a multipart upload
    small = make_layer(b"config-ish" * 100)
    image = make_image([big, small])
    fake_hub.add_image("library/app", "1.0", image)
    async with aiohttp.ClientSession() as session:
        status, body = await get(session, f"{served.url}/v2/app/manifests/1.0")
        assert (status, body) == (200, image.manifest)
        for layer in (big, small):
            status, body = await get(session, f"{served.url}/v2/app/blobs/{layer.digest}")
            assert status == 200
            assert hashlib.sha256(body).hexdigest() == layer.digest.removeprefix("sha256:")
        await landed(served, count=2)
        stored = await objects(seaweedfs, bucket)
        for layer in (big, small):
            assert stored[f"blobs/sha256/{layer.digest.removeprefix('sha256:')}"] == layer.data
        assert blob_files(served.data_dir) == []

        fake_hub.clear_log()
        status, body = await get(
            session, f"{served.url}/v2/app/blobs/{big.digest}", Range="bytes=100-199"
        )
        assert (status, body) == (206, big.data[100:200])
        assert fake_hub.count("GET", "cdn") == 0  # from the bucket
        async with session.get(f"{served.url}/metrics") as response:
            page = await response.text()
        for op in ("upload_part", "complete_multipart_upload", "put_object", "get_object"):
            assert (
                metric_value(page, "mirror_storage_requests_total", op=op, result="ok") or 0
            ) >= 1, op
        assert metric_value(page, "mirror_storage_request_duration_seconds_count", op="get_object")


async def test_a_bad_upstream_blob_never_becomes_an_object(
    fake_hub: FakeHub, seaweedfs: SeaweedFS, bucket: str, served: MirrorProcess
) -> None:
    layer = make_random_layer(12 * 1024 * 1024, seed=9)
    image = make_image([layer])
    fake_hub.add_image("library/app", "1.0", image)
    fake_hub.corrupt_next_blob = True
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientPayloadError):
            await get(session, f"{served.url}/v2/app/blobs/{layer.digest}")
    assert await objects(seaweedfs, bucket) == {}
    async with s3_client(seaweedfs) as client:  # type: ignore[attr-defined]
        uploads = await client.list_multipart_uploads(Bucket=bucket)
    assert uploads.get("Uploads", []) == []  # aborted, not left behind


async def test_two_replicas_on_one_bucket_fetch_each_blob_once(
    fake_hub: FakeHub, seaweedfs: SeaweedFS, bucket: str, redis: RedisServer, tmp_path: Path
) -> None:
    layer = make_random_layer(10 * 1024 * 1024, seed=31)
    image = make_image([layer])
    fake_hub.add_image("library/app", "1.0", image)
    fake_hub.blob_delay_per_chunk = 0.003  # a slow upstream: the pulls overlap
    pair = [
        MirrorProcess(
            tmp_path / f"data-{name}",
            fake_hub.url,
            "--redis-url",
            redis.url(),
            env=seaweedfs.env(bucket),
            name=name,
        )
        for name in ("a", "b")
    ]
    for process in pair:
        await asyncio.to_thread(process.start)
    try:
        async with aiohttp.ClientSession() as session:
            urls = [f"{p.url}/v2/app/blobs/{layer.digest}" for p in pair * 3]
            results = await asyncio.gather(*(get(session, url) for url in urls))
            assert [status for status, _ in results] == [200] * 6
            assert all(body == layer.data for _, body in results)
            assert fake_hub.count("GET", "cdn") == 1

            fake_hub.clear_log()
            for process in pair:
                status, body = await get(session, f"{process.url}/v2/app/blobs/{layer.digest}")
                assert (status, body) == (200, layer.data)
            assert fake_hub.count("GET", "cdn") == 0
        await eventually(
            lambda: any('"blob_stored"' in process.log() for process in pair), "the landing"
        )
        for process in pair:
            assert blob_files(process.data_dir) == []
    finally:
        for process in pair:
            await asyncio.to_thread(process.stop)


def replicas(
    fake_hub: FakeHub, seaweedfs: SeaweedFS, bucket: str, redis: RedisServer, tmp_path: Path
) -> list[MirrorProcess]:
    """Two replicas on one bucket and one Redis, each with a data dir of its own."""
    return [
        MirrorProcess(
            tmp_path / f"data-{name}",
            fake_hub.url,
            "--redis-url",
            redis.url(),
            env=seaweedfs.env(bucket),
            name=name,
        )
        for name in ("a", "b")
    ]


async def upstream_sending(fake_hub: FakeHub) -> LoggedRequest:
    """The fake upstream's blob transfer, once it has begun sending bytes."""
    for _ in range(600):
        sending = [entry for entry in fake_hub.requests("GET", "cdn") if entry.bytes_sent]
        if sending:
            return sending[0]
        await asyncio.sleep(0.05)
    raise AssertionError("the upstream blob transfer never began")


async def read_until_cut(response: aiohttp.ClientResponse) -> tuple[bytes, bool]:
    """The body's bytes as far as they came, and whether the transfer was cut."""
    received = bytearray()
    try:
        async for chunk in response.content.iter_any():
            received += chunk
    except aiohttp.ClientPayloadError:
        return bytes(received), True
    return bytes(received), False


async def test_a_replica_following_another_answers_headers_before_the_blob_is_stored(
    fake_hub: FakeHub, seaweedfs: SeaweedFS, bucket: str, redis: RedisServer, tmp_path: Path
) -> None:
    """The replica that did not fill a blob has no disk to stream the filler's spool from; its
    clients still get their headers at once (containerd gives up after 30 s without them),
    not only once the whole blob is in the bucket."""
    layer = make_random_layer(12 * 1024 * 1024, seed=41)
    fake_hub.add_image("library/app", "1.0", make_image([layer]))
    fake_hub.blob_delay_per_chunk = 0.03  # about six seconds for the whole blob
    filler, follower = pair = replicas(fake_hub, seaweedfs, bucket, redis, tmp_path)
    for process in pair:
        await asyncio.to_thread(process.start)
    try:
        async with aiohttp.ClientSession() as session:
            filled = asyncio.create_task(
                get(session, f"{filler.url}/v2/app/blobs/{layer.digest}")
            )
            upstream = await upstream_sending(fake_hub)
            async with session.get(f"{follower.url}/v2/app/blobs/{layer.digest}") as response:
                assert upstream.status is None, "headers only after the upstream finished"
                assert upstream.bytes_sent < layer.size
                assert response.status == 200
                assert response.content_length == layer.size
                body = await response.read()
            assert hashlib.sha256(body).hexdigest() == layer.digest.removeprefix("sha256:")
            assert await filled == (200, layer.data)
        assert fake_hub.count("GET", "cdn") == 1
        await landed(filler)
        for process in pair:
            assert blob_files(process.data_dir) == []  # the follower's spool went too
    finally:
        for process in pair:
            await asyncio.to_thread(process.stop)


async def test_a_follower_whose_filler_fails_fetches_the_blob_itself_for_its_clients(
    fake_hub: FakeHub, seaweedfs: SeaweedFS, bucket: str, redis: RedisServer, tmp_path: Path
) -> None:
    """The filling replica's upstream fails mid-blob after the follower's client got its
    headers: the follower takes the fill over, and its client gets the whole blob."""
    layer = make_random_layer(12 * 1024 * 1024, seed=43)
    fake_hub.add_image("library/app", "1.0", make_image([layer]))
    fake_hub.blob_delay_per_chunk = 0.03
    fake_hub.truncate_next_blob_at = 6 * 1024 * 1024  # the filler's upstream fails mid-blob
    filler, follower = pair = replicas(fake_hub, seaweedfs, bucket, redis, tmp_path)
    for process in pair:
        await asyncio.to_thread(process.start)
    try:
        async with aiohttp.ClientSession() as session:
            url = f"{filler.url}/v2/app/blobs/{layer.digest}"
            filled = asyncio.create_task(session.get(url))
            upstream = await upstream_sending(fake_hub)
            followed = f"{follower.url}/v2/app/blobs/{layer.digest}"
            async with session.get(followed) as response:
                assert upstream.status is None  # headers before the filler's upstream failed
                assert response.status == 200
                received, cut = await read_until_cut(response)
            assert (received, cut) == (layer.data, False)
            async with await filled as response:
                received, cut = await read_until_cut(response)
            assert cut  # the filler's own client: its transfer failed
            assert layer.data.startswith(received)  # never a wrong byte
            assert fake_hub.count("GET", "cdn") == 2

            assert await get(session, url) == (200, layer.data)  # a retry: from the bucket
        assert fake_hub.count("GET", "cdn") == 2
        stored = await objects(seaweedfs, bucket)
        assert stored == {f"blobs/sha256/{layer.digest.removeprefix('sha256:')}": layer.data}
        for process in pair:
            assert blob_files(process.data_dir) == []
    finally:
        for process in pair:
            await asyncio.to_thread(process.stop)


def mirror_command(
    data_dir: Path, env: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    """``python -m mirror ARGS --data-dir DIR`` with the storage's environment."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MIRROR_", "AWS_"))}
    return subprocess.run(
        [sys.executable, "-m", "mirror", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, **env},
        check=False,
    )


async def test_verify_finds_an_object_whose_bytes_were_replaced_and_repair_fixes_it(
    fake_hub: FakeHub, seaweedfs: SeaweedFS, bucket: str, served: MirrorProcess
) -> None:
    layer = make_random_layer(1024 * 1024, seed=12)
    image = make_image([layer])
    fake_hub.add_image("library/app", "1.0", image)
    key = f"blobs/sha256/{layer.digest.removeprefix('sha256:')}"
    async with aiohttp.ClientSession() as session:
        await get(session, f"{served.url}/v2/app/manifests/1.0")
        assert await get(session, f"{served.url}/v2/app/blobs/{layer.digest}") == (200, layer.data)
        await landed(served)  # then replaced: not while its upload still completes
        async with s3_client(seaweedfs) as client:  # type: ignore[attr-defined]
            await client.put_object(Bucket=bucket, Key=key, Body=b"x" * len(layer.data))
        env = seaweedfs.env(bucket)

        checked = await asyncio.to_thread(mirror_command, served.data_dir, env, "verify")
        assert checked.returncode == 1, checked.stderr
        assert f"corrupt {layer.digest}: needed by docker.io/library/app" in checked.stdout
        repaired = await asyncio.to_thread(
            mirror_command, served.data_dir, env, "verify", "--repair"
        )
        assert "1 taken out of service" in repaired.stdout, repaired.stderr
        assert key not in await objects(seaweedfs, bucket)

        fake_hub.clear_log()
        assert await get(session, f"{served.url}/v2/app/blobs/{layer.digest}") == (200, layer.data)
        assert fake_hub.count("GET", "cdn") == 1  # fetched again, whole
        again = await asyncio.to_thread(mirror_command, served.data_dir, env, "verify")
        assert again.returncode == 0, again.stdout


async def test_the_budget_holds_on_the_bucket(
    fake_hub: FakeHub, seaweedfs: SeaweedFS, bucket: str, tmp_path: Path
) -> None:
    layers = [make_random_layer(3 * 1024 * 1024, seed=40 + n) for n in range(4)]
    for n, layer in enumerate(layers):
        fake_hub.add_image(f"library/app{n}", "1.0", make_image([layer]))
    process = MirrorProcess(
        tmp_path / "data", fake_hub.url, "--max-cache-size", "7MiB", env=seaweedfs.env(bucket)
    )
    await asyncio.to_thread(process.start)
    try:
        async with aiohttp.ClientSession() as session:
            for n, layer in enumerate(layers):
                await get(session, f"{process.url}/v2/app{n}/manifests/1.0")
                url = f"{process.url}/v2/app{n}/blobs/{layer.digest}"
                assert await get(session, url) == (200, layer.data)
        for _ in range(200):  # each landing starts an eviction pass
            stored = await objects(seaweedfs, bucket)
            if sum(len(data) for data in stored.values()) <= 7 * 1024 * 1024:
                break
            await asyncio.sleep(0.1)
        assert sum(len(data) for data in stored.values()) <= 7 * 1024 * 1024
        newest = f"blobs/sha256/{layers[-1].digest.removeprefix('sha256:')}"
        assert stored[newest] == layers[-1].data  # least recently pulled go first
    finally:
        await asyncio.to_thread(process.stop)


async def test_with_the_storage_down_manifests_answer_and_blobs_come_from_upstream(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    cached = make_random_layer(2 * 1024 * 1024, seed=51)
    fresh = make_random_layer(2 * 1024 * 1024, seed=52)
    image = make_image([cached])
    fake_hub.add_image("library/app", "1.0", image)
    fake_hub.add_image("library/other", "1.0", make_image([fresh]))
    with SeaweedFS() as storage:
        process = MirrorProcess(tmp_path / "data", fake_hub.url, env=storage.env("outage"))
        await asyncio.to_thread(process.start)
        try:
            async with aiohttp.ClientSession() as session:
                manifest_url = f"{process.url}/v2/app/manifests/1.0"
                blob_url = f"{process.url}/v2/app/blobs/{cached.digest}"
                assert await get(session, manifest_url) == (200, image.manifest)
                assert await get(session, blob_url) == (200, cached.data)
                await landed(process)  # in the bucket before it goes

                await asyncio.to_thread(storage.stop)
                fake_hub.clear_log()
                assert await get(session, manifest_url) == (200, image.manifest)
                assert await get(session, blob_url) == (200, cached.data)
                assert fake_hub.count("GET", "cdn") == 1  # streamed from upstream, unstored
                async with session.get(f"{process.url}/metrics") as response:
                    page = await response.text()
                # The calls under way when the bucket went failed (this GET's, or a
                # background listing's at the same moment); from then on only the probe asks
                # the bucket: the second GET sends it nothing.
                assert await get(session, blob_url) == (200, cached.data)
                async with session.get(f"{process.url}/metrics") as response:
                    again = await response.text()
                assert _failed_storage_calls(page) >= 1
                assert _failed_storage_calls(again) == _failed_storage_calls(page)
                async with session.get(f"{process.url}/readyz") as response:
                    ready = await response.json()
                assert (response.status, ready["status"]) == (200, "degraded")
                assert ready["checks"]["storage"] == "degraded"
                async with session.get(f"{process.url}/status.json") as response:
                    shown = (await response.json())["disk"]["storage"]
                assert shown == {
                    "bucket": "outage",
                    "endpoint": storage.endpoint,
                    "state": "degraded",
                }

                await asyncio.to_thread(storage.start)
                for _ in range(100):  # the next probe finds it back
                    async with session.get(f"{process.url}/readyz") as response:
                        if (await response.json())["status"] == "ready":
                            break
                    await asyncio.sleep(0.1)
                url = f"{process.url}/v2/other/blobs/{fresh.digest}"
                await get(session, f"{process.url}/v2/other/manifests/1.0")
                assert await get(session, url) == (200, fresh.data)
                await landed(process, count=2)
                key = f"blobs/sha256/{fresh.digest.removeprefix('sha256:')}"
                assert (await objects(storage, "outage"))[key] == fresh.data
        finally:
            await asyncio.to_thread(process.stop)


async def test_redirect_mode_sends_clients_to_the_bucket_and_skopeo_follows(
    fake_hub: FakeHub, seaweedfs: SeaweedFS, bucket: str, tmp_path: Path
) -> None:
    require_binary("skopeo")
    layer = make_random_layer(1024 * 1024, seed=61)
    image = make_image([layer])
    fake_hub.add_image("library/app", "1.0", image)
    env = {**seaweedfs.env(bucket), "MIRROR_STORAGE_S3_REDIRECT": "true"}
    with MirrorProcess(tmp_path / "data", fake_hub.url, env=env) as process:
        await skopeo_copy(f"{process.host}/app:1.0", tmp_path / "first")
        await landed(process, count=2)  # the layer and the config: streamed until then
        async with aiohttp.ClientSession() as session:
            url = f"{process.url}/v2/app/blobs/{layer.digest}"
            async with session.get(url, allow_redirects=False) as response:
                assert response.status == 307
                assert response.headers["Location"].startswith(f"{seaweedfs.endpoint}/{bucket}/")
            async with session.get(url) as response:  # followed: the bucket answers
                assert (response.status, await response.read()) == (200, layer.data)
        fake_hub.clear_log()
        await skopeo_copy(f"{process.host}/app:1.0", tmp_path / "second")
        assert dir_manifest_digest(tmp_path / "second") == image.digest
        assert dir_blobs_verified(tmp_path / "second") == 2  # the layer and the config
        assert fake_hub.count("GET", "cdn") == 0


async def test_gc_aborts_multipart_uploads_abandoned_for_over_an_hour(
    fake_hub: FakeHub,
    seaweedfs: SeaweedFS,
    bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = seaweedfs.env(bucket)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # the standard variables
        monkeypatch.setenv(name, env.pop(name))
    settings = load({"data_dir": str(tmp_path / "data"), "upstream": fake_hub.url}, env=env)
    key = "blobs/sha256/" + "ab" * 32
    async with open_engine(settings) as engine, s3_client(seaweedfs) as client:  # type: ignore[attr-defined]
        await client.create_multipart_upload(Bucket=bucket, Key=key)
        young = await maintenance.gc(engine, dry_run=False)
        assert young.partials == 0  # a crash is not told from a slow upload so soon
        later = await maintenance.gc(engine, dry_run=False, now=time.time() + 2 * 3600)
        assert later.partials == 1
        uploads = await client.list_multipart_uploads(Bucket=bucket)
        assert uploads.get("Uploads", []) == []


def test_wrong_credentials_or_an_uncreatable_bucket_stop_the_start_in_one_line(
    fake_hub: FakeHub, seaweedfs: SeaweedFS, tmp_path: Path
) -> None:
    wrong = {**seaweedfs.env("mirror-start"), "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    refused = mirror_command(tmp_path / "a", wrong, "serve", "--upstream", fake_hub.url)
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert "refused the credentials for bucket 'mirror-start'" in lines[0]

    reader = {**seaweedfs.env("mirror-never"), "AWS_ACCESS_KEY_ID": READER_KEY}
    missing = mirror_command(tmp_path / "b", reader, "serve", "--upstream", fake_hub.url)
    assert missing.returncode == 1
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1, missing.stderr
    assert "bucket 'mirror-never' is missing and could not be created" in lines[0]


async def test_with_the_storage_hanging_a_pull_still_succeeds_from_upstream(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    cached = make_random_layer(2 * 1024 * 1024, seed=71)
    image = make_image([cached])
    fake_hub.add_image("library/app", "1.0", image)
    with SeaweedFS() as storage:
        process = MirrorProcess(
            tmp_path / "data",
            fake_hub.url,
            "--request-timeout",
            "1",  # how long a call to the bucket may go unanswered
            env=storage.env("hanging"),
        )
        await asyncio.to_thread(process.start)
        try:
            async with aiohttp.ClientSession() as session:
                manifest_url = f"{process.url}/v2/app/manifests/1.0"
                blob_url = f"{process.url}/v2/app/blobs/{cached.digest}"
                assert await get(session, manifest_url) == (200, image.manifest)
                assert await get(session, blob_url) == (200, cached.data)
                await landed(process)  # in the bucket before it hangs

                storage.pause()
                fake_hub.clear_log()
                async with session.head(blob_url) as response:  # from memory, not the bucket
                    assert response.status == 200
                    assert response.headers["Content-Length"] == str(len(cached.data))
                assert fake_hub.requests() == []
                assert await get(session, manifest_url) == (200, image.manifest)
                assert await get(session, blob_url) == (200, cached.data)
                assert fake_hub.count("GET", "cdn") == 1
                async with session.get(f"{process.url}/readyz") as response:
                    assert (await response.json())["checks"]["storage"] == "degraded"

                storage.resume()
                for _ in range(100):
                    async with session.get(f"{process.url}/readyz") as response:
                        if (await response.json())["status"] == "ready":
                            break
                    await asyncio.sleep(0.1)
                fake_hub.clear_log()
                assert await get(session, blob_url) == (200, cached.data)
                assert fake_hub.count("GET", "cdn") == 0  # from the bucket again
        finally:
            storage.resume()
            await asyncio.to_thread(process.stop)


async def test_seed_and_export_from_one_bucket_import_into_another(
    fake_hub: FakeHub, seaweedfs: SeaweedFS, bucket: str, tmp_path: Path
) -> None:
    big = make_random_layer(20 * 1024 * 1024, seed=81)  # more than a part
    image = make_image([big, make_layer(b"small layer" * 50)])
    fake_hub.add_image("library/app", "1.0", image)
    connected, offline = seaweedfs.env(bucket), seaweedfs.env(f"{bucket}-offline")
    upstream = ("--upstream", fake_hub.url)
    seeded = await asyncio.to_thread(
        mirror_command, tmp_path / "connected", connected, "seed", *upstream, "app:1.0"
    )
    assert seeded.returncode == 0, seeded.stderr
    bundle = tmp_path / "bundle.tar"
    exported = await asyncio.to_thread(
        mirror_command, tmp_path / "connected", connected, "export", "--output", str(bundle)
    )
    assert exported.returncode == 0, exported.stderr
    imported = await asyncio.to_thread(
        mirror_command, tmp_path / "offline", offline, "import", str(bundle)
    )
    assert imported.returncode == 0, imported.stderr
    stored = await objects(seaweedfs, f"{bucket}-offline")
    for layer in image.blobs:
        assert stored[f"blobs/sha256/{layer.digest.removeprefix('sha256:')}"] == layer.data
    assert blob_files(tmp_path / "offline") == []

    fake_hub.clear_log()
    with MirrorProcess(tmp_path / "offline", fake_hub.url, "--offline", env=offline) as served:
        destination = tmp_path / "pulled"
        await skopeo_copy(f"{served.host}/app:1.0", destination)
        assert dir_manifest_digest(destination) == image.digest
        assert dir_blobs_verified(destination) == 3
    assert fake_hub.requests() == []


async def test_the_hot_tier_keeps_blobs_in_the_data_dir_up_to_its_size(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    small = make_random_layer(2 * 1024 * 1024, seed=91)
    large = make_random_layer(5 * 1024 * 1024, seed=92)  # more than the whole tier
    image = make_image([small, large])
    fake_hub.add_image("library/app", "1.0", image)
    with SeaweedFS() as storage:
        env = {**storage.env("hot"), "MIRROR_STORAGE_S3_LOCAL_CACHE_SIZE": "4MiB"}
        filler = MirrorProcess(tmp_path / "filler", fake_hub.url, env=env, name="filler")
        other = MirrorProcess(tmp_path / "other", fake_hub.url, env=env, name="other")
        await asyncio.to_thread(filler.start)
        await asyncio.to_thread(other.start)
        try:
            async with aiohttp.ClientSession() as session:
                await get(session, f"{filler.url}/v2/app/manifests/1.0")
                for layer in (small, large):
                    url = f"{filler.url}/v2/app/blobs/{layer.digest}"
                    assert await get(session, url) == (200, layer.data)
                await landed(filler, count=2)  # the spool goes to the hot tier then
                hot = {path.name for path in blob_files(filler.data_dir / "hot")}
                assert hot == {small.digest.removeprefix("sha256:")}
                assert blob_files(filler.data_dir / "spool") == []

                # The other replica reads the bucket once, then keeps a copy of its own.
                await get(session, f"{other.url}/v2/app/manifests/1.0")
                url = f"{other.url}/v2/app/blobs/{small.digest}"
                assert await get(session, url) == (200, small.data)
                kept = other.data_dir / "hot" / "sha256" / small.digest[7:9] / small.digest[7:]
                for _ in range(200):  # copied in the background
                    if kept.exists():
                        break
                    await asyncio.sleep(0.05)
                assert kept.read_bytes() == small.data

                storage.pause()  # from the data dir now: the bucket is not asked
                fake_hub.clear_log()
                for process in (filler, other):
                    url = f"{process.url}/v2/app/blobs/{small.digest}"
                    assert await get(session, url, Range="bytes=10-19") == (206, small.data[10:20])
                    assert await get(session, url) == (200, small.data)
                assert fake_hub.requests() == []
        finally:
            storage.resume()
            for process in (filler, other):
                await asyncio.to_thread(process.stop)


class SlowingProxy(S3Proxy):
    """A proxy in front of the S3 server that answers the next ``slowdowns`` requests for
    blob objects with 503 SlowDown, as a busy S3 does, and forwards the rest untouched."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.slowdowns = 0
        self.refused = 0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self.slowdowns > 0 and "/blobs/" in request.path:
            self.slowdowns -= 1
            self.refused += 1
            await request.read()
            body = (
                b"<Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>"
            )
            return web.Response(status=503, body=body, content_type="application/xml")
        return await super()._handle(request)


async def test_slow_down_answers_are_retried_and_no_client_sees_them(
    fake_hub: FakeHub, seaweedfs: SeaweedFS, bucket: str, tmp_path: Path
) -> None:
    layer = make_random_layer(12 * 1024 * 1024, seed=101)  # two parts
    image = make_image([layer])
    fake_hub.add_image("library/app", "1.0", image)
    proxy = SlowingProxy(seaweedfs.endpoint)
    await proxy.start()
    env = {**seaweedfs.env(bucket), "MIRROR_STORAGE_S3_ENDPOINT": proxy.url}
    process = MirrorProcess(tmp_path / "data", fake_hub.url, env=env)
    try:
        await asyncio.to_thread(process.start)
        async with aiohttp.ClientSession() as session:
            await get(session, f"{process.url}/v2/app/manifests/1.0")
            proxy.slowdowns = 2  # the first part upload is refused twice
            url = f"{process.url}/v2/app/blobs/{layer.digest}"
            assert await get(session, url) == (200, layer.data)
            await landed(process)
            key = f"blobs/sha256/{layer.digest.removeprefix('sha256:')}"
            assert (await objects(seaweedfs, bucket))[key] == layer.data  # stored all the same

            proxy.slowdowns = 2  # and the reads from the bucket
            fake_hub.clear_log()
            assert await get(session, url) == (200, layer.data)
            assert fake_hub.count("GET", "cdn") == 0
            assert proxy.refused == 4
            async with session.get(f"{process.url}/readyz") as response:
                assert (await response.json())["status"] == "ready"
    finally:
        await asyncio.to_thread(process.stop)
        await proxy.close()


def _failed_storage_calls(page: str) -> float:
    """Calls to the bucket that failed, of every operation but the probe's (head_bucket),
    from a /metrics page: results other than ok and not_found."""
    total = 0.0
    for line in page.splitlines():
        if line.startswith("mirror_storage_requests_total{") and 'op="head_bucket"' not in line:
            series, _, value = line.rpartition(" ")
            if 'result="ok"' not in series and 'result="not_found"' not in series:
                total += float(value)
    return total


@pytest_asyncio.fixture
async def slow_bucket(seaweedfs: SeaweedFS) -> AsyncIterator[CompletionHoldingProxy]:
    """The bucket behind a proxy that holds back the completion of uploads when asked."""
    proxy = CompletionHoldingProxy(seaweedfs.endpoint)
    await proxy.start()
    yield proxy
    await proxy.close()


def behind(proxy: CompletionHoldingProxy, env: dict[str, str]) -> dict[str, str]:
    """A mirror's environment with its bucket behind ``proxy``; its calls to the bucket
    wait longer than the proxy holds one (the client's retry would find the upload gone)."""
    return {**env, "MIRROR_STORAGE_S3_ENDPOINT": proxy.url, "MIRROR_REQUEST_TIMEOUT": "60"}


def blob_key(digest: str) -> str:
    return f"blobs/sha256/{digest.removeprefix('sha256:')}"


async def no_fill_left(session: aiohttp.ClientSession, process: MirrorProcess) -> None:
    """Until ``process`` has no fill under way, landing ones included (its upload completed
    or was aborted, its spool gone)."""
    for _ in range(600):
        async with session.get(f"{process.url}/metrics") as response:
            page = await response.text()
        if metric_value(page, "mirror_blob_fills_in_flight") == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("a fill never ended")


async def test_a_cold_pull_ends_once_verified_and_the_blob_answers_from_the_spool_meanwhile(
    fake_hub: FakeHub,
    seaweedfs: SeaweedFS,
    bucket: str,
    slow_bucket: CompletionHoldingProxy,
    tmp_path: Path,
) -> None:
    """The client of a cold pull does not wait for the bucket to take the last parts: it has
    every byte once they matched the digest. Until the object is complete, the blob's next
    GETs, ranges and HEADs on that replica come from its verified spool (nothing asked of
    the upstream or the bucket), a redirect-mode GET too (there is nothing to presign yet);
    once it landed, they go to the bucket as for any stored blob."""
    layer = make_random_layer(20 * 1024 * 1024, seed=111)  # three parts
    fake_hub.add_image("library/app", "1.0", make_image([layer]))
    env = behind(slow_bucket, {**seaweedfs.env(bucket), "MIRROR_STORAGE_S3_REDIRECT": "true"})
    process = MirrorProcess(tmp_path / "data", fake_hub.url, env=env)
    await asyncio.to_thread(process.start)  # the proxy answers on this loop meanwhile
    try:
        async with aiohttp.ClientSession() as session:
            await get(session, f"{process.url}/v2/app/manifests/1.0")
            url = f"{process.url}/v2/app/blobs/{layer.digest}"
            slow_bucket.holding = True
            assert await get(session, url) == (200, layer.data)
            assert slow_bucket.completed == 0, "the client waited for the upload to complete"

            fake_hub.clear_log()
            reads = len(slow_bucket.reads(blob_key(layer.digest)))
            async with session.get(url, allow_redirects=False) as response:
                assert (response.status, await response.read()) == (200, layer.data)
            assert await get(session, url, Range="bytes=100-199") == (206, layer.data[100:200])
            async with session.head(url) as response:
                assert response.status == 200
                assert response.headers["Content-Length"] == str(layer.size)
            assert fake_hub.requests() == []
            assert len(slow_bucket.reads(blob_key(layer.digest))) == reads
            assert slow_bucket.completed == 0  # all of it while the upload was under way

            slow_bucket.release()
            await process.wait_for_event("blob_stored")
            async with session.get(url, allow_redirects=False) as response:
                assert response.status == 307
            assert (await objects(seaweedfs, bucket))[blob_key(layer.digest)] == layer.data
        assert blob_files(process.data_dir) == []  # the spool went once the object was in
    finally:
        await asyncio.to_thread(process.stop)


async def test_another_replica_waits_for_a_landing_blob_instead_of_fetching_it(
    fake_hub: FakeHub,
    seaweedfs: SeaweedFS,
    bucket: str,
    redis: RedisServer,
    slow_bucket: CompletionHoldingProxy,
    tmp_path: Path,
) -> None:
    """While one replica's blob is landing (its clients had it whole), a replica on the same
    bucket and Redis follows it, as it follows a fill: no second upstream fetch."""
    layer = make_random_layer(20 * 1024 * 1024, seed=113)
    fake_hub.add_image("library/app", "1.0", make_image([layer]))
    filler, other = replicas(fake_hub, seaweedfs, bucket, redis, tmp_path)
    for process in (filler, other):  # one endpoint: the bucket's identity scopes the leases
        process.env = behind(slow_bucket, process.env)
        await asyncio.to_thread(process.start)
    try:
        async with aiohttp.ClientSession() as session:
            slow_bucket.holding = True
            url = f"{filler.url}/v2/app/blobs/{layer.digest}"
            assert await get(session, url) == (200, layer.data)
            assert slow_bucket.completed == 0, "the client waited for the upload to complete"

            async with session.get(f"{other.url}/v2/app/blobs/{layer.digest}") as response:
                assert response.status == 200  # following: the size was published
                assert fake_hub.count("GET", "cdn") == 1
                assert slow_bucket.completed == 0
                slow_bucket.release()
                assert await response.read() == layer.data
        assert fake_hub.count("GET", "cdn") == 1
        for process in (filler, other):
            assert blob_files(process.data_dir) == []
    finally:
        for process in (filler, other):
            await asyncio.to_thread(process.stop)


async def test_a_blob_whose_upload_fails_after_its_client_finished_is_not_stored(
    fake_hub: FakeHub,
    seaweedfs: SeaweedFS,
    bucket: str,
    slow_bucket: CompletionHoldingProxy,
    tmp_path: Path,
) -> None:
    """The bucket fails the completion after the client had the blob whole: nothing is
    stored nor recorded, no upload is left behind, and the next pull fetches it again."""
    layer = make_random_layer(20 * 1024 * 1024, seed=117)
    fake_hub.add_image("library/app", "1.0", make_image([layer]))
    env = behind(slow_bucket, seaweedfs.env(bucket))
    process = MirrorProcess(tmp_path / "data", fake_hub.url, env=env)
    await asyncio.to_thread(process.start)
    try:
        async with aiohttp.ClientSession() as session:
            await get(session, f"{process.url}/v2/app/manifests/1.0")
            url = f"{process.url}/v2/app/blobs/{layer.digest}"
            slow_bucket.holding = True
            assert await get(session, url) == (200, layer.data)
            assert slow_bucket.completed == 0, "the client waited for the upload to complete"

            slow_bucket.release(fail=True)
            await process.wait_for_event("blob_not_stored")
            await no_fill_left(session, process)
            assert await objects(seaweedfs, bucket) == {}
            async with s3_client(seaweedfs) as client:  # type: ignore[attr-defined]
                uploads = await client.list_multipart_uploads(Bucket=bucket)
            assert uploads.get("Uploads", []) == []  # aborted
            async with session.get(f"{process.url}/status.json") as response:
                assert (await response.json())["disk"]["blobs"] == 0
            assert blob_files(process.data_dir) == []

            fake_hub.clear_log()
            assert await get(session, url) == (200, layer.data)
            assert fake_hub.count("GET", "cdn") == 1  # fetched again
    finally:
        await asyncio.to_thread(process.stop)


async def test_a_stop_waits_within_its_grace_for_a_blob_still_landing(
    fake_hub: FakeHub,
    seaweedfs: SeaweedFS,
    bucket: str,
    slow_bucket: CompletionHoldingProxy,
    tmp_path: Path,
) -> None:
    """SIGTERM while a blob its client had whole is still landing: the drain waits for it
    (within the grace), so it is stored and recorded before the process exits 0."""
    layer = make_random_layer(20 * 1024 * 1024, seed=119)
    fake_hub.add_image("library/app", "1.0", make_image([layer]))
    env = behind(slow_bucket, seaweedfs.env(bucket))
    process = MirrorProcess(tmp_path / "data", fake_hub.url, env=env)
    await asyncio.to_thread(process.start)
    try:
        async with aiohttp.ClientSession() as session:
            slow_bucket.holding = True
            assert await get(session, f"{process.url}/v2/app/blobs/{layer.digest}") == (
                200,
                layer.data,
            )
            assert slow_bucket.completed == 0, "the client waited for the upload to complete"
        process.send_signal(signal.SIGTERM)
        await process.wait_for_event("shutdown_draining")
        slow_bucket.release()
        assert await asyncio.to_thread(process.wait, 60) == 0
        drained = await process.wait_for_event("shutdown_drained")
        assert drained["landing"] == 0  # it had landed when the drain ended
        assert '"blob_stored"' in process.log()
        assert (await objects(seaweedfs, bucket))[blob_key(layer.digest)] == layer.data
        assert blob_files(process.data_dir) == []
    finally:
        await asyncio.to_thread(process.stop)


async def test_a_landing_the_stop_cuts_short_leaves_no_upload_and_no_object(
    fake_hub: FakeHub,
    seaweedfs: SeaweedFS,
    bucket: str,
    slow_bucket: CompletionHoldingProxy,
    tmp_path: Path,
) -> None:
    """The bucket takes longer than the grace (and the engine's wait for landings): the
    upload is aborted before the process exits, so no multipart upload is left for gc and
    the completion the bucket gets late finds nothing to complete."""
    layer = make_random_layer(20 * 1024 * 1024, seed=121)
    fake_hub.add_image("library/app", "1.0", make_image([layer]))
    env = behind(slow_bucket, seaweedfs.env(bucket))
    process = MirrorProcess(tmp_path / "data", fake_hub.url, "--shutdown-grace", "1s", env=env)
    await asyncio.to_thread(process.start)
    try:
        async with aiohttp.ClientSession() as session:
            slow_bucket.holding = True
            assert await get(session, f"{process.url}/v2/app/blobs/{layer.digest}") == (
                200,
                layer.data,
            )
            assert slow_bucket.completed == 0, "the client waited for the upload to complete"
        await eventually(lambda: slow_bucket.held, "the completion held")
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 60) == 0
        assert slow_bucket.completed == 0  # still held: the process did not wait for it
        async with s3_client(seaweedfs) as client:  # type: ignore[attr-defined]
            uploads = await client.list_multipart_uploads(Bucket=bucket)
        assert uploads.get("Uploads", []) == []
        slow_bucket.release()
        await eventually(lambda: slow_bucket.completed, "the held completion answered")
        assert await objects(seaweedfs, bucket) == {}
        assert blob_files(process.data_dir) == []
        assert '"blob_stored"' not in process.log()
    finally:
        await asyncio.to_thread(process.stop)
