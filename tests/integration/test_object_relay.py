"""Blobs streamed from object storage to clients: `mirror serve` on a real SeaweedFS bucket
relays an object's body socket to socket (splice(2)) where both connections are plain TCP,
and through Python where one is TLS. What a client sees either way: the object's bytes, the
range it asked for, and a cut transfer, never a short or padded one, when the bucket fails
mid-body."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from tests.integration.test_abusive_clients import (
    fetch_blob_as_clients_do,
    first_bytes,
    stalled_get,
)
from tests.integration.test_object_storage import s3_client
from tests.integration.test_tls import Certificates
from tests.support.fakehub import FakeHub
from tests.support.oci import Blob, make_image, make_random_layer
from tests.support.process import MirrorProcess
from tests.support.seaweedfs import SeaweedFS
from tests.support.waiting import eventually

MIB = 1024 * 1024
# Ranges of a 24 MiB blob: inside the first MiB, across the 1 MiB reads of the other path,
# one byte, the last bytes, an open end.
RANGES = ("bytes=10-19", f"bytes={MIB - 5}-{3 * MIB + 4}", "bytes=7-7", "bytes=-100",
          f"bytes={20 * MIB}-")  # fmt: skip


@pytest.fixture(scope="module")
def seaweedfs() -> Iterator[SeaweedFS]:
    with SeaweedFS() as server:
        yield server


class FaultyLink:
    """A TCP proxy in front of the S3 server that passes bytes through untouched until it
    is armed: then the next GET of a blob object has its answer cut (or held) after
    ``after`` bytes."""

    def __init__(self, target: str) -> None:
        host, _, port = target.removeprefix("http://").partition(":")
        self.target = (host, int(port))
        self.after: int | None = None
        self.hold = False
        self.struck = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.url = ""

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connected, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def arm(self, after: int, *, hold: bool = False) -> None:
        self.after, self.hold = after, hold

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        victim = asyncio.Event()
        up = asyncio.create_task(self._requests(reader, upstream_writer, victim))
        try:
            await self._answers(upstream_reader, writer, victim)
        finally:
            up.cancel()
            for side in (writer, upstream_writer):
                side.transport.abort()
            self._tasks.discard(task)

    async def _requests(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, victim: asyncio.Event
    ) -> None:
        while data := await reader.read(65536):
            if self.after is not None and data.startswith(b"GET ") and b"/blobs/" in data:
                victim.set()
            writer.write(data)
            await writer.drain()

    async def _answers(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, victim: asyncio.Event
    ) -> None:
        passed = 0
        while data := await reader.read(65536):
            if victim.is_set() and self.after is not None:
                if passed + len(data) > self.after:
                    writer.write(data[: self.after - passed])
                    await writer.drain()
                    self.after = None
                    self.struck += 1
                    if self.hold:
                        await asyncio.Event().wait()  # until the proxy closes
                    return
                passed += len(data)
            writer.write(data)
            await writer.drain()


@pytest_asyncio.fixture
async def link(seaweedfs: SeaweedFS) -> AsyncIterator[FaultyLink]:
    proxy = FaultyLink(seaweedfs.endpoint)
    await proxy.start()
    yield proxy
    await proxy.close()


def _bucket(request: pytest.FixtureRequest) -> str:
    return f"r-{abs(hash(request.node.name)) % 10**12}"


async def _landed(
    seaweedfs: SeaweedFS, process: MirrorProcess, session: aiohttp.ClientSession, blob: Blob
) -> None:
    """Pull the blob once (the fill stores it in the bucket), and wait until its object
    is in the bucket."""
    url = f"{process.url}/v2/app/blobs/{blob.digest}"
    async with session.get(url) as response:
        assert hashlib.sha256(await response.read()).hexdigest() == blob.digest.split(":")[1]
    bucket = process.env["MIRROR_STORAGE_S3_BUCKET"]
    key = f"blobs/sha256/{blob.digest.split(':')[1]}"
    async with s3_client(seaweedfs) as client:  # type: ignore[attr-defined]
        for _ in range(500):
            listed = await client.list_objects_v2(Bucket=bucket, Prefix=key)
            if listed.get("KeyCount"):
                return
            await asyncio.sleep(0.02)
    raise AssertionError(f"{key} never landed in {bucket}")


@contextlib.asynccontextmanager
async def running(process: MirrorProcess) -> AsyncIterator[MirrorProcess]:
    """The mirror started and stopped off the loop: the loop runs the test's proxy."""
    await asyncio.to_thread(process.start)
    try:
        yield process
    finally:
        await asyncio.to_thread(process.stop)


def _serve(
    fake_hub: FakeHub,
    seaweedfs: SeaweedFS,
    bucket: str,
    tmp_path: Path,
    *options: str,
    endpoint: str | None = None,
    env: dict[str, str] | None = None,
    ca_file: Path | None = None,
) -> tuple[MirrorProcess, Blob]:
    blob = make_random_layer(24 * MIB, seed=230)
    fake_hub.add_image("library/app", "1.0", make_image([blob]))
    settings = {**seaweedfs.env(bucket), **(env or {})}
    if endpoint is not None:
        settings["MIRROR_STORAGE_S3_ENDPOINT"] = endpoint
    return MirrorProcess(
        tmp_path / "data", fake_hub.url, *options, env=settings, ca_file=ca_file
    ), blob


async def _from_the_bucket(
    seaweedfs: SeaweedFS,
    process: MirrorProcess,
    fake_hub: FakeHub,
    blob: Blob,
    ssl_context: ssl.SSLContext | None,
) -> None:
    """Whole and in ranges, the bytes of the object, with no upstream request."""
    connector = aiohttp.TCPConnector(ssl=ssl_context) if ssl_context else None
    async with aiohttp.ClientSession(connector=connector) as session:
        await _landed(seaweedfs, process, session, blob)
        fake_hub.clear_log()
        url = f"{process.url}/v2/app/blobs/{blob.digest}"
        for _ in range(2):  # the bucket's connection, taken over once, is not reused
            async with session.get(url) as response:
                assert response.status == 200
                assert await response.read() == blob.data
        for byte_range in RANGES:
            start_text, _, stop_text = byte_range.removeprefix("bytes=").partition("-")
            if not start_text:
                expected = blob.data[-int(stop_text) :]
            else:
                expected = blob.data[int(start_text) : int(stop_text) + 1 if stop_text else None]
            async with session.get(url, headers={"Range": byte_range}) as response:
                assert (response.status, await response.read()) == (206, expected), byte_range
        assert fake_hub.count("GET", "cdn") == 0


async def test_a_stored_blob_reaches_the_client_whole_and_in_ranges(
    fake_hub: FakeHub, seaweedfs: SeaweedFS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    process, blob = _serve(fake_hub, seaweedfs, _bucket(request), tmp_path)
    async with running(process):
        await _from_the_bucket(seaweedfs, process, fake_hub, blob, None)


async def test_through_tls_a_stored_blob_reaches_the_client_whole_and_in_ranges(
    fake_hub: FakeHub, seaweedfs: SeaweedFS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    certificates = Certificates(tmp_path / "tls")
    process, blob = _serve(
        fake_hub,
        seaweedfs,
        _bucket(request),
        tmp_path,
        *certificates.options,
        ca_file=certificates.ca_file,
    )
    async with running(process):
        context = ssl.create_default_context(cafile=str(certificates.ca_file))
        await _from_the_bucket(seaweedfs, process, fake_hub, blob, context)


async def _cut_short(session: aiohttp.ClientSession, url: str) -> int:
    """The bytes a client got of a transfer that must fail; AssertionError if it did not."""
    received = [0]

    async def read_all() -> None:
        async with session.get(url) as response:
            assert response.status == 200
            async for chunk in response.content.iter_any():
                received[0] += len(chunk)

    with pytest.raises(aiohttp.ClientPayloadError):
        await read_all()
    return received[0]


async def test_the_bucket_cutting_a_body_cuts_the_clients_transfer(
    fake_hub: FakeHub,
    seaweedfs: SeaweedFS,
    link: FaultyLink,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    process, blob = _serve(fake_hub, seaweedfs, _bucket(request), tmp_path, endpoint=link.url)
    async with running(process), aiohttp.ClientSession() as session:
        await _landed(seaweedfs, process, session, blob)
        url = f"{process.url}/v2/app/blobs/{blob.digest}"
        link.arm(after=5 * MIB)
        received = await _cut_short(session, url)
        assert link.struck == 1
        assert received < len(blob.data)
        # The link is whole again: the next pull gets every byte (from the bucket once
        # the mirror's probe found it back, from upstream until then).
        async with session.get(url) as response:
            assert (response.status, await response.read()) == (200, blob.data)
    assert "blob_transfer_aborted" in process.log_path.read_text()


async def test_the_bucket_going_silent_mid_body_cuts_the_clients_transfer(
    fake_hub: FakeHub,
    seaweedfs: SeaweedFS,
    link: FaultyLink,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    process, blob = _serve(
        fake_hub,
        seaweedfs,
        _bucket(request),
        tmp_path,
        endpoint=link.url,
        env={"MIRROR_REQUEST_TIMEOUT": "2"},  # how long the bucket may send nothing
    )
    async with running(process):
        timeout = aiohttp.ClientTimeout(total=60)  # far beyond the mirror's own
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await _landed(seaweedfs, process, session, blob)
            link.arm(after=3 * MIB, hold=True)
            url = f"{process.url}/v2/app/blobs/{blob.digest}"
            assert await _cut_short(session, url) < len(blob.data)
            assert link.struck == 1


def _descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_clients_hanging_up_mid_body_leave_no_descriptors_behind(
    fake_hub: FakeHub, seaweedfs: SeaweedFS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    process, blob = _serve(fake_hub, seaweedfs, _bucket(request), tmp_path)
    async with running(process):
        url = f"{process.url}/v2/app/blobs/{blob.digest}"
        async with aiohttp.ClientSession() as session:
            await _landed(seaweedfs, process, session, blob)
            async with session.get(url) as response:  # the bucket's pool, warmed
                await response.read()
        before = _descriptors(process.pid)
        for _ in range(5):
            async with aiohttp.ClientSession() as session, session.get(url) as response:
                await response.content.readexactly(MIB)
                # the session closes with most of the body unread: the client hung up
        await eventually(
            lambda: _descriptors(process.pid) <= before, "the descriptors to be closed"
        )
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            assert await response.read() == blob.data


async def test_relays_that_never_read_are_counted_against_the_descriptor_limit(
    fake_hub: FakeHub, seaweedfs: SeaweedFS, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Each relay holds six descriptors (the client's socket and its copy, the bucket's
    connection and its copy, a pipe): the server must count them all, or a crowd of
    clients that never read runs it out of descriptors mid-answer."""
    process, blob = _serve(
        fake_hub,
        seaweedfs,
        _bucket(request),
        tmp_path,
        "--client-max-transfers",
        "1000",
    )
    process.prefix = ("prlimit", "--nofile=256:256", "--")
    path = f"/v2/app/blobs/{blob.digest}"
    async with running(process):
        async with aiohttp.ClientSession() as session:
            await _landed(seaweedfs, process, session, blob)
        crowd = [await stalled_get(process.port, path) for _ in range(120)]
        try:
            for _ in range(3):  # new pulls still get their bytes, after 503s at worst
                statuses, body = await fetch_blob_as_clients_do(process.url + path)
                assert statuses[-1] == 200, statuses
                assert body == blob.data
            answers = [first_bytes(sock) for sock in crowd]
        finally:
            for sock in crowd:
                sock.close()
        logged = [line.get("status") for line in process.access_log()]
        log = process.log()
    assert not [a for a in answers if a.startswith(b"HTTP/1.1 5") and b" 503" not in a]
    assert 500 not in logged
    assert "Traceback" not in log
    assert "object_storage_unavailable" not in log  # running short is not the bucket failing
