"""Blobs through the mirror: streaming fills, verification, coalescing, ranges."""

import asyncio
import hashlib
import logging
from pathlib import Path

import aiohttp
import pytest

from mirror.content.embedded import EmbeddedStore
from mirror.content.graph_embedded import EmbeddedGraph
from tests.support.fakehub import FakeHub
from tests.support.mirror import RunningMirror, settings_for
from tests.support.oci import Blob, make_image, make_layer, make_random_layer
from tests.support.waiting import eventually


def cdn_gets(hub: FakeHub) -> int:
    return hub.count("GET", "cdn")


def stored_files(mirror: RunningMirror) -> list[Path]:
    root = mirror.settings.data_dir / "blobs"
    return sorted(p for p in root.rglob("*") if p.is_file())


def publish(hub: FakeHub, layer: Blob, repo: str = "library/app") -> None:
    hub.add_image(repo, "latest", make_image([layer]))


async def test_cold_then_warm_blob_bytes_and_headers(
    fake_hub: FakeHub, mirror: RunningMirror
) -> None:
    layer = make_random_layer(3 * 1024 * 1024, seed=1)
    publish(fake_hub, layer)

    for expected_cdn_gets in (1, 1):
        status, headers, body = await mirror.get(
            f"/v2/app/blobs/{layer.digest}", headers={"Accept-Encoding": "gzip"}
        )
        assert status == 200
        assert body == layer.data
        assert headers["Docker-Content-Digest"] == layer.digest
        assert headers["Content-Length"] == str(layer.size)
        assert "Content-Encoding" not in headers
        assert cdn_gets(fake_hub) == expected_cdn_gets

    assert fake_hub.cdn_authorization_rejections == 0
    assert all(r.header("Authorization") is None for r in fake_hub.requests(server="cdn"))


async def test_the_blob_on_disk_is_the_verified_blob(
    fake_hub: FakeHub, mirror: RunningMirror
) -> None:
    layer = make_layer({"etc/os-release": b"ID=test\n"})
    publish(fake_hub, layer)
    await mirror.get(f"/v2/app/blobs/{layer.digest}")

    [stored] = stored_files(mirror)
    assert stored.name == layer.digest.removeprefix("sha256:")
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == stored.name


async def test_first_bytes_arrive_before_upstream_finishes(
    fake_hub: FakeHub, mirror: RunningMirror
) -> None:
    layer = make_random_layer(2 * 1024 * 1024, seed=2)
    publish(fake_hub, layer)
    fake_hub.blob_delay_per_chunk = 0.05  # 64 KiB chunks: about 1.6 s in all
    assert mirror.session is not None

    async with mirror.session.get(f"{mirror.url}/v2/app/blobs/{layer.digest}") as response:
        first = await response.content.readexactly(64 * 1024)
        [cdn] = fake_hub.requests("GET", "cdn")
        assert cdn.status is None  # upstream still sending
        rest = await response.read()

    assert first + rest == layer.data


async def test_concurrent_cold_pulls_share_one_upstream_get(
    fake_hub: FakeHub, mirror: RunningMirror
) -> None:
    layer = make_random_layer(4 * 1024 * 1024, seed=3)
    publish(fake_hub, layer)
    fake_hub.blob_delay_per_chunk = 0.002

    results = await asyncio.gather(*(mirror.get(f"/v2/app/blobs/{layer.digest}") for _ in range(8)))

    assert all(status == 200 and body == layer.data for status, _, body in results)
    assert cdn_gets(fake_hub) == 1


async def test_a_client_disconnecting_does_not_stop_the_fill(
    fake_hub: FakeHub, mirror: RunningMirror
) -> None:
    layer = make_random_layer(2 * 1024 * 1024, seed=4)
    publish(fake_hub, layer)
    fake_hub.blob_delay_per_chunk = 0.01
    assert mirror.session is not None

    async with mirror.session.get(f"{mirror.url}/v2/app/blobs/{layer.digest}") as response:
        await response.content.readexactly(100 * 1024)
        response.close()  # the client goes away mid-blob

    status, _, body = await mirror.get(f"/v2/app/blobs/{layer.digest}")
    assert (status, body) == (200, layer.data)
    assert cdn_gets(fake_hub) == 1
    [cdn] = fake_hub.requests("GET", "cdn")
    assert cdn.bytes_sent == layer.size


async def test_a_client_hanging_up_mid_blob_logs_no_error(
    fake_hub: FakeHub, mirror: RunningMirror, caplog: pytest.LogCaptureFixture
) -> None:
    # Larger than the socket buffers, so the mirror is still sending when the client leaves.
    layer = make_random_layer(32 * 1024 * 1024, seed=14)
    publish(fake_hub, layer)
    assert mirror.session is not None

    for _cold_then_cached in range(2):
        url = f"{mirror.url}/v2/app/blobs/{layer.digest}"
        async with mirror.session.get(url) as response:
            await response.content.readexactly(100 * 1024)
            response.close()
        status, _, body = await mirror.get(f"/v2/app/blobs/{layer.digest}")
        assert (status, body) == (200, layer.data)

    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    assert cdn_gets(fake_hub) == 1


async def test_a_corrupted_upstream_blob_is_never_stored_nor_delivered_whole(
    fake_hub: FakeHub, mirror: RunningMirror
) -> None:
    layer = make_random_layer(1024 * 1024, seed=5)
    publish(fake_hub, layer)
    fake_hub.corrupt_next_blob = True
    assert mirror.session is not None

    async with mirror.session.get(f"{mirror.url}/v2/app/blobs/{layer.digest}") as response:
        assert response.status == 200
        try:
            received = await response.read()
        except aiohttp.ClientPayloadError:
            received = None
    assert received is None  # the transfer failed visibly, it did not end cleanly
    assert stored_files(mirror) == []

    # The next request fetches again and gets the right bytes.
    status, _, body = await mirror.get(f"/v2/app/blobs/{layer.digest}")
    assert (status, body) == (200, layer.data)
    assert cdn_gets(fake_hub) == 2


async def test_a_truncated_upstream_blob_is_never_stored(
    fake_hub: FakeHub, mirror: RunningMirror
) -> None:
    layer = make_random_layer(1024 * 1024, seed=6)
    publish(fake_hub, layer)
    fake_hub.truncate_next_blob_at = 300 * 1024
    assert mirror.session is not None

    async with mirror.session.get(f"{mirror.url}/v2/app/blobs/{layer.digest}") as response:
        try:
            received = await response.read()
        except aiohttp.ClientPayloadError:
            received = None
    assert received is None
    assert stored_files(mirror) == []


async def test_range_on_cached_and_on_filling_blobs(
    fake_hub: FakeHub, mirror: RunningMirror
) -> None:
    layer = make_random_layer(1024 * 1024, seed=7)
    publish(fake_hub, layer)
    fake_hub.blob_delay_per_chunk = 0.01

    # Mid-fill: the first request starts the fill, the ranged one joins it.
    whole = asyncio.create_task(mirror.get(f"/v2/app/blobs/{layer.digest}"))
    await eventually(lambda: fake_hub.count("GET", "cdn"), "the fill to start")
    status, headers, body = await mirror.get(
        f"/v2/app/blobs/{layer.digest}", headers={"Range": "bytes=100-199"}
    )
    assert (status, body) == (206, layer.data[100:200])
    assert headers["Content-Range"] == f"bytes 100-199/{layer.size}"
    assert (await whole)[2] == layer.data
    assert cdn_gets(fake_hub) == 1

    # Cached.
    for header, expected in (
        ("bytes=100-199", layer.data[100:200]),
        ("bytes=1000-", layer.data[1000:]),
        ("bytes=-10", layer.data[-10:]),
    ):
        status, headers, body = await mirror.get(
            f"/v2/app/blobs/{layer.digest}", headers={"Range": header}
        )
        assert (status, body) == (206, expected)
    status, headers, body = await mirror.get(
        f"/v2/app/blobs/{layer.digest}", headers={"Range": f"bytes={layer.size}-"}
    )
    assert status == 416
    assert b"RANGE_INVALID" in body
    assert headers["Content-Range"] == f"bytes */{layer.size}"


async def test_head_blob_cached_and_uncached(fake_hub: FakeHub, mirror: RunningMirror) -> None:
    layer = make_layer(b"head" * 1000)
    publish(fake_hub, layer)

    status, headers, body = await mirror.get(f"/v2/app/blobs/{layer.digest}", method="HEAD")
    assert (status, body, headers["Content-Length"]) == (200, b"", str(layer.size))
    assert cdn_gets(fake_hub) == 0  # answered from upstream's HEAD, no download

    await mirror.get(f"/v2/app/blobs/{layer.digest}")
    status, headers, _ = await mirror.get(f"/v2/app/blobs/{layer.digest}", method="HEAD")
    assert (status, headers["Content-Length"]) == (200, str(layer.size))
    assert headers["Docker-Content-Digest"] == layer.digest


async def test_unknown_blob_is_404_blob_unknown(fake_hub: FakeHub, mirror: RunningMirror) -> None:
    publish(fake_hub, make_layer(b"present"))
    missing = "sha256:" + "0" * 64

    status, _, body = await mirror.get(f"/v2/app/blobs/{missing}")

    assert status == 404
    assert b'"BLOB_UNKNOWN"' in body
    assert stored_files(mirror) == []


class SlowBlobRecords(EmbeddedGraph):
    """A content graph slow to record a stored blob, as one busy with other writes is."""

    async def blob_stored(self, digest: str, size: int, at: float) -> None:
        await asyncio.sleep(0.5)
        await super().blob_stored(digest, size, at)


class SlowlyRecordingStore(EmbeddedStore):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.graph = SlowBlobRecords(self._db, self._run)


async def test_a_stop_right_after_a_fill_neither_fails_it_nor_forgets_it(
    fake_hub: FakeHub,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    layer = make_random_layer(256 * 1024, seed=15)
    publish(fake_hub, layer)
    data = tmp_path / "data"
    data.mkdir()
    store = await asyncio.to_thread(SlowlyRecordingStore, data / "metadata.sqlite3")
    async with RunningMirror(settings_for(fake_hub.url, data), store=store) as mirror:
        status, _, body = await mirror.get(f"/v2/app/blobs/{layer.digest}")
        assert (status, body) == (200, layer.data)
    # Stopped while the blob, stored and verified, was still being recorded.

    logged = capsys.readouterr().out + caplog.text
    assert "blob_stored" in logged
    assert "blob_fill_failed" not in logged
    reopened = await EmbeddedStore.open(data)
    try:
        assert [entry.digest for entry in await reopened.graph.oldest_blobs(10)] == [layer.digest]
    finally:
        await reopened.close()
