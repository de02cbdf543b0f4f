"""Blobs in S3-compatible object storage: `mirror serve` on a real SeaweedFS bucket, in front
of the fake Docker Hub (with its request log)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiobotocore.session import get_session
from botocore.config import Config

from tests.support.binaries import require_binary
from tests.support.fakehub import FakeHub
from tests.support.oci import OCI_MANIFEST, make_image, make_layer, make_random_layer
from tests.support.process import MirrorProcess
from tests.support.redis_server import RedisServer
from tests.support.seaweedfs import ACCESS_KEY, SECRET_KEY, SeaweedFS

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
    """Every object in the bucket: key -> bytes."""
    found: dict[str, bytes] = {}
    async with s3_client(seaweedfs) as client:  # type: ignore[attr-defined]
        listed = await client.list_objects_v2(Bucket=bucket)
        for item in listed.get("Contents", ()):
            answer = await client.get_object(Bucket=bucket, Key=item["Key"])
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
        for process in pair:
            assert blob_files(process.data_dir) == []
    finally:
        for process in pair:
            await asyncio.to_thread(process.stop)
