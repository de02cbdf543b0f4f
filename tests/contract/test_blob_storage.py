"""What every blob storage promises the content layer, run against the local filesystem and a
real S3 bucket (SeaweedFS). Their calls block: the content layer makes them off the loop, and
so do these tests."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from mirror.content.blobs import BlobStore
from mirror.content.s3 import open_s3
from mirror.content.storage import BlobStorage
from mirror.domain.reference import Digest
from mirror.storage_settings import S3Settings
from tests.support.seaweedfs import ACCESS_KEY, SECRET_KEY, SeaweedFS


@pytest.fixture(scope="module")
def seaweedfs() -> Iterator[SeaweedFS]:
    with SeaweedFS() as server:
        yield server


@pytest_asyncio.fixture(params=["filesystem", "s3"])
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStorage]:
    if request.param == "filesystem":
        yield BlobStore(tmp_path / "blobs")
        return
    server: SeaweedFS = request.getfixturevalue("seaweedfs")
    settings = S3Settings(
        bucket=f"contract-{abs(hash(request.node.name)) % 10**12}",
        endpoint=server.endpoint,
        region="us-east-1",
        access_key_id=ACCESS_KEY,
        secret_access_key=SECRET_KEY,
    )
    async with open_s3(settings, tmp_path / "spool", connect_timeout=5, read_timeout=5) as s3:
        yield s3


def digest_of(data: bytes) -> Digest:
    return Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())


def land(storage: BlobStorage, data: bytes) -> Digest:
    digest = digest_of(data)
    writer = storage.new_partial(digest)
    writer.write(data)
    assert writer.commit()
    return digest


def read_all(storage: BlobStorage, digest: Digest) -> bytes:
    with storage.open(digest) as file:
        return file.read()


async def test_a_committed_blob_is_present_whole_and_listed(storage: BlobStorage) -> None:
    data = os.urandom(300_000)
    digest = await asyncio.to_thread(land, storage, data)
    assert storage.size(digest) == len(data)
    assert await asyncio.to_thread(storage.locate, digest) == len(data)
    assert await asyncio.to_thread(read_all, storage, digest) == data
    listed = await asyncio.to_thread(storage.on_disk)
    assert listed[str(digest)][0] == len(data)


async def test_a_blob_being_written_is_readable_and_not_yet_present(storage: BlobStorage) -> None:
    data = b"arriving " * 1000
    digest = digest_of(data)
    writer = await asyncio.to_thread(storage.new_partial, digest)
    await asyncio.to_thread(writer.write, data[:100])
    reader = writer.open_reader()
    try:
        assert os.pread(reader, 1000, 0) == data[:100]
        assert storage.size(digest) is None
        assert await asyncio.to_thread(storage.locate, digest) is None
        await asyncio.to_thread(writer.write, data[100:])
        assert await asyncio.to_thread(writer.commit)
        assert os.pread(reader, len(data) + 1, 0) == data  # readers finish after the commit
    finally:
        os.close(reader)


async def test_a_discarded_blob_leaves_nothing(storage: BlobStorage) -> None:
    data = b"never whole" * 1000
    digest = digest_of(data)
    writer = await asyncio.to_thread(storage.new_partial, digest)
    await asyncio.to_thread(writer.write, data)
    await asyncio.to_thread(writer.discard)
    assert await asyncio.to_thread(storage.locate, digest) is None
    assert await asyncio.to_thread(storage.on_disk) == {}
    assert await asyncio.to_thread(storage.sweep) == 0


async def test_the_inspected_copy_is_removed_once(storage: BlobStorage) -> None:
    digest = await asyncio.to_thread(land, storage, b"layer" * 100)
    inspected = await asyncio.to_thread(storage.stat, digest)
    assert inspected is not None
    assert inspected.size == 500
    assert await asyncio.to_thread(storage.remove, digest, inspected)
    assert await asyncio.to_thread(storage.stat, digest) is None
    assert storage.size(digest) is None
    assert not await asyncio.to_thread(storage.remove, digest, inspected)
    with pytest.raises(FileNotFoundError):
        await asyncio.to_thread(storage.open, digest)


async def test_a_range_is_read_as_asked(storage: BlobStorage) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    digest = await asyncio.to_thread(land, storage, data)
    got = b"".join([chunk async for chunk in storage.chunks(digest, 1000, 2_500_000)])
    assert got == data[1000:2_500_000]
    tail = b"".join([chunk async for chunk in storage.chunks(digest, len(data) - 5, len(data))])
    assert tail == data[-5:]
    with pytest.raises(FileNotFoundError):
        await anext(storage.chunks(digest_of(b"absent"), 0, 1))
