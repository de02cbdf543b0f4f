"""Several mirror processes acting as one cache: replicas sharing Redis, and --workers."""

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from tests.support.binaries import require_binary
from tests.support.fakehub import FakeHub
from tests.support.mirror import metric_value
from tests.support.oci import OCI_MANIFEST, make_image, make_layer, make_random_layer
from tests.support.process import MirrorProcess
from tests.support.redis_server import RedisServer

ACCEPT = {"Accept": OCI_MANIFEST}


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer(require_binary("redis-server")) as server:
        yield server


@pytest_asyncio.fixture
async def replicas(
    fake_hub: FakeHub, redis: RedisServer, tmp_path: Path
) -> AsyncIterator[tuple[MirrorProcess, MirrorProcess]]:
    shared = tmp_path / "shared"
    pair = tuple(
        MirrorProcess(shared, fake_hub.url, "--redis-url", redis.url(), name=name)
        for name in ("a", "b")
    )
    for process in pair:
        await asyncio.to_thread(process.start)
    yield pair[0], pair[1]
    for process in pair:
        await asyncio.to_thread(process.stop)


async def fetch(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with session.get(url, headers=ACCEPT) as response:
        return response.status, await response.read()


async def test_two_replicas_fetch_a_blob_once_and_share_tags(
    fake_hub: FakeHub, replicas: tuple[MirrorProcess, MirrorProcess]
) -> None:
    layer = make_random_layer(8 * 1024 * 1024, seed=31)
    image = make_image([layer])
    fake_hub.add_image("library/app", "1.0", image)
    fake_hub.blob_delay_per_chunk = 0.005  # a slow upstream: 128 chunks
    first, second = replicas

    async with aiohttp.ClientSession() as session:
        urls = [f"{p.url}/v2/app/blobs/{layer.digest}" for p in (first, second) * 4]
        results = await asyncio.gather(*(fetch(session, url) for url in urls))
        assert [status for status, _ in results] == [200] * 8
        assert all(body == layer.data for _, body in results)
        assert fake_hub.count("GET", "cdn") == 1

        status, body = await fetch(session, f"{first.url}/v2/app/manifests/1.0")
        assert (status, body) == (200, image.manifest)
        fake_hub.clear_log()
        status, body = await fetch(session, f"{second.url}/v2/app/manifests/1.0")
        assert (status, body) == (200, image.manifest)
        assert fake_hub.count(server="registry", path_contains="/manifests/") == 0


async def test_replicas_keep_serving_while_redis_is_down_and_share_again_after(
    fake_hub: FakeHub, replicas: tuple[MirrorProcess, MirrorProcess], redis: RedisServer
) -> None:
    layer = make_layer(b"cached before the outage" * 1000)
    image = make_image([layer])
    fake_hub.add_image("library/app", "1.0", image)
    first, second = replicas
    async with aiohttp.ClientSession() as session:
        await fetch(session, f"{first.url}/v2/app/manifests/1.0")
        await fetch(session, f"{first.url}/v2/app/blobs/{layer.digest}")

        await asyncio.to_thread(redis.stop)
        for process in (first, second, first, second):
            started = time.monotonic()
            status, body = await fetch(session, f"{process.url}/v2/app/blobs/{layer.digest}")
            assert (status, body) == (200, layer.data)
            status, body = await fetch(session, f"{process.url}/v2/app/manifests/1.0")
            assert (status, body) == (200, image.manifest)
            assert time.monotonic() - started < 5  # bounded by the store timeout, no hang
        async with session.get(f"{second.url}/readyz") as response:
            assert (await response.json())["checks"]["store"] == "degraded"

        await asyncio.to_thread(redis.start)
        fake_hub.add_image("library/app", "2.0", make_image([make_layer(b"after")]))
        await asyncio.sleep(2.5)  # past the store's retry interval
        assert (await fetch(session, f"{first.url}/v2/app/manifests/2.0"))[0] == 200
        fake_hub.clear_log()
        assert (await fetch(session, f"{second.url}/v2/app/manifests/2.0"))[0] == 200
        assert fake_hub.count(server="registry", path_contains="/manifests/") == 0
    warnings = [line for line in second.log().splitlines() if "store_unavailable" in line]
    assert len(warnings) == 1


async def test_workers_share_one_port_one_fill_and_one_metrics_page(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    layer = make_random_layer(4 * 1024 * 1024, seed=32)
    fake_hub.add_image("library/app", "1.0", make_image([layer]))
    fake_hub.blob_delay_per_chunk = 0.005
    process = MirrorProcess(tmp_path / "data", fake_hub.url, "--workers", "2")
    await asyncio.to_thread(process.start)
    try:
        connector = aiohttp.TCPConnector(force_close=True)  # new connections: both workers
        async with aiohttp.ClientSession(connector=connector) as session:
            url = f"{process.url}/v2/app/blobs/{layer.digest}"
            results = await asyncio.gather(*(fetch(session, url) for _ in range(8)))
            assert all(result == (200, layer.data) for result in results)
            assert fake_hub.count("GET", "cdn") == 1
            for _ in range(20):
                await fetch(session, f"{process.url}/v2/")
            async with session.get(f"{process.url}/metrics") as response:
                page = await response.text()
        served = metric_value(page, "mirror_requests_total", route="blob", status="200")
        assert served == 8  # summed over both workers
        workers = {line.get("worker") for line in process.access_log()}
        assert workers == {0, 1}
    finally:
        await asyncio.to_thread(process.stop)


def manifest_gets(hub: FakeHub) -> int:
    """Manifest GETs that reached the quota (a 401 asking for a token spends nothing)."""
    requests = hub.requests("GET", "registry", "/manifests/")
    return sum(1 for request in requests if request.status != 401)


async def pull_new_tags(urls: list[str], count: int) -> list[int]:
    """GETs of tags nobody pulled yet: the first alone, then the rest at once, each on a new
    connection (so every worker gets some)."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        first, _ = await fetch(session, f"{urls[0]}/v2/app/manifests/0.0")
        rest = await asyncio.gather(
            *(
                fetch(session, f"{urls[number % len(urls)]}/v2/app/manifests/{number}.0")
                for number in range(1, count)
            )
        )
        return [first, *(status for status, _ in rest)]


async def test_after_a_429_no_worker_sends_a_manifest_get(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    for number in range(24):
        fake_hub.add_image("library/app", f"{number}.0", make_image([make_layer(b"x")]))
    fake_hub.ratelimit_remaining = 0
    fake_hub.retry_after = "120"
    process = MirrorProcess(tmp_path / "data", fake_hub.url, "--workers", "2")
    await asyncio.to_thread(process.start)
    try:
        statuses = await pull_new_tags([process.url], 24)
    finally:
        await asyncio.to_thread(process.stop)
    assert statuses == [429] * 24
    assert manifest_gets(fake_hub) == 1  # the one that learnt of the limit


async def test_after_a_429_no_process_on_the_host_sends_a_manifest_get(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    """Two processes on one data dir (what --workers runs, each request placed by hand)."""
    for number in range(6):
        fake_hub.add_image("library/app", f"{number}.0", make_image([make_layer(b"x")]))
    fake_hub.ratelimit_remaining = 0
    fake_hub.retry_after = "120"
    pair = [MirrorProcess(tmp_path / "data", fake_hub.url, name=name) for name in ("a", "b")]
    for process in pair:
        await asyncio.to_thread(process.start)
    try:
        statuses = await pull_new_tags([process.url for process in pair], 6)
    finally:
        for process in pair:
            await asyncio.to_thread(process.stop)
    assert statuses == [429] * 6
    assert manifest_gets(fake_hub) == 1


async def test_after_a_429_no_replica_sends_a_manifest_get(
    fake_hub: FakeHub, redis: RedisServer, tmp_path: Path
) -> None:
    for number in range(6):
        fake_hub.add_image("library/app", f"{number}.0", make_image([make_layer(b"x")]))
    fake_hub.ratelimit_remaining = 0
    fake_hub.retry_after = "120"
    # Replicas on different hosts: nothing shared but Redis.
    pair = [
        MirrorProcess(tmp_path / name, fake_hub.url, "--redis-url", redis.url(), name=name)
        for name in ("a", "b")
    ]
    for process in pair:
        await asyncio.to_thread(process.start)
    try:
        statuses = await pull_new_tags([process.url for process in pair], 6)
    finally:
        for process in pair:
            await asyncio.to_thread(process.stop)
    assert statuses == [429] * 6
    assert manifest_gets(fake_hub) == 1
