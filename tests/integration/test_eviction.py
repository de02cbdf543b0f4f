"""The disk budget: what eviction removes, in what order, and what it never breaks."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from unittest.mock import patch

import aiohttp
import pytest
from redis.asyncio import Redis

from mirror.config import Settings
from mirror.content.blobs import BlobStore
from mirror.content.graph import BlobEntry
from mirror.domain.pins import Pin
from mirror.services.eviction import LEASE, Pass
from tests.support.binaries import require_binary
from tests.support.fakehub import FakeHub
from tests.support.hung_redis import HungRedis
from tests.support.mirror import FakeClock, RunningMirror, settings_for
from tests.support.oci import OCI_MANIFEST, Image, make_image, make_random_layer
from tests.support.process import MirrorProcess
from tests.support.redis_server import RedisServer

MIB = 1024 * 1024
HOUR = 3600.0


def image_of(seed: int, size: int = MIB) -> Image:
    return make_image([make_random_layer(size, seed=seed)])


async def pull(mirror: RunningMirror, repository: str, image: Image) -> None:
    """What a client does: the manifest by tag, then every blob."""
    status, _, body = await mirror.get(f"/v2/{repository}/manifests/latest", accept=[OCI_MANIFEST])
    assert (status, body) == (200, image.manifest)
    for blob in image.blobs:
        status, _, body = await mirror.get(f"/v2/{repository}/blobs/{blob.digest}")
        assert (status, body) == (200, blob.data)


def on_disk(mirror: RunningMirror, image: Image) -> bool:
    layer = image.blobs[-1].digest.removeprefix("sha256:")
    return (mirror.settings.data_dir / "blobs" / "sha256" / layer[:2] / layer).exists()


async def evict(mirror: RunningMirror) -> None:
    """One pass of the evictor, after any pass the mirror started by itself."""
    await pass_that_ran(mirror)


async def pass_that_ran(mirror: RunningMirror) -> Pass:
    for _ in range(500):
        if (result := await mirror.engine.evictor.run_once()).ran:
            return result
        await asyncio.sleep(0.01)
    raise AssertionError("the evictor's lease was never free")


@contextlib.asynccontextmanager
async def no_pass_running(mirror: RunningMirror) -> AsyncIterator[None]:
    """Holds the evictor's lease: what is on disk and what is recorded stay still."""
    for _ in range(500):
        lease = await mirror.engine.coordinator.acquire(LEASE)
        if lease is not None:
            try:
                yield
            finally:
                await lease.release()
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the evictor's lease was never free")


async def test_least_recently_pulled_goes_first_and_a_pull_refreshes(
    fake_hub: FakeHub, tmp_path: Path, clock: FakeClock
) -> None:
    images = {name: image_of(seed) for seed, name in enumerate(("a", "b", "c"))}
    for name, image in images.items():
        fake_hub.add_image(f"library/{name}", "latest", image)
    settings = settings_for(fake_hub.url, tmp_path / "data", max_cache_size=int(2.5 * MIB))
    async with RunningMirror(settings, clock=clock, eviction_interval=3600) as mirror:
        for name in ("a", "b", "a", "c"):  # a again before c: b is the least recently pulled
            await pull(mirror, name, images[name])
            clock.advance(60)
        await evict(mirror)  # c landing over the budget started one already
        assert [on_disk(mirror, images[n]) for n in "abc"] == [True, False, True]
        usage = await mirror.engine.store.graph.usage()
        assert usage.bytes <= 2.5 * MIB
        cdn_before = fake_hub.count("GET", "cdn")
        await pull(mirror, "a", images["a"])
        await pull(mirror, "c", images["c"])
        assert fake_hub.count("GET", "cdn") == cdn_before  # still cached
        await pull(mirror, "b", images["b"])
        assert fake_hub.count("GET", "cdn") == cdn_before + 1  # only its missing layer


async def test_pinned_images_stay_whatever_their_age(
    fake_hub: FakeHub, tmp_path: Path, clock: FakeClock
) -> None:
    images = {name: image_of(seed) for seed, name in enumerate(("a", "b", "c"))}
    for name, image in images.items():
        fake_hub.add_image(f"library/{name}", "latest", image)
    settings = settings_for(
        fake_hub.url,
        tmp_path / "data",
        max_cache_size=int(1.5 * MIB),
        pins=(Pin.parse("library/a"),),
    )
    async with RunningMirror(settings, clock=clock, eviction_interval=3600) as mirror:
        for name, image in images.items():
            await pull(mirror, name, image)
            clock.advance(60)
        await evict(mirror)
        assert [on_disk(mirror, images[n]) for n in "abc"] == [True, False, False]
        # Pins alone over the budget: nothing pinned goes, and the metric says so.
        settings_small = settings_for(
            fake_hub.url, tmp_path / "data", max_cache_size=MIB // 2, pins=settings.pins
        )
    async with RunningMirror(settings_small, clock=clock, eviction_interval=3600) as mirror:
        await evict(mirror)
        assert on_disk(mirror, images["a"])
        _, _, page = await mirror.get("/metrics")
        assert b"mirror_pins_over_budget 1.0" in page


async def test_unused_blobs_expire_even_under_budget(
    fake_hub: FakeHub, tmp_path: Path, clock: FakeClock
) -> None:
    old, new = image_of(1), image_of(2)
    fake_hub.add_image("library/old", "latest", old)
    fake_hub.add_image("library/new", "latest", new)
    settings = settings_for(fake_hub.url, tmp_path / "data", evict_unused_after=24 * HOUR)
    async with RunningMirror(settings, clock=clock, eviction_interval=3600) as mirror:
        await pull(mirror, "old", old)
        clock.advance(20 * HOUR)
        await pull(mirror, "new", new)
        clock.advance(5 * HOUR)
        await evict(mirror)
        assert not on_disk(mirror, old)
        assert on_disk(mirror, new)
        _, _, page = await mirror.get("/metrics")
        assert b'mirror_evictions_total{reason="unused"}' in page


async def test_a_client_reading_a_blob_that_is_evicted_gets_every_byte(
    fake_hub: FakeHub, tmp_path: Path, clock: FakeClock
) -> None:
    first, second = image_of(7, size=32 * MIB), image_of(8, size=32 * MIB)
    fake_hub.add_image("library/first", "latest", first)
    fake_hub.add_image("library/second", "latest", second)
    layer = first.blobs[-1]
    settings = settings_for(fake_hub.url, tmp_path / "data", max_cache_size=40 * MIB)
    async with RunningMirror(settings, clock=clock, eviction_interval=3600) as mirror:
        await pull(mirror, "first", first)
        clock.advance(60)
        async with aiohttp.ClientSession() as session, session.get(
            f"{mirror.url}/v2/first/blobs/{layer.digest}", read_bufsize=64 * 1024
        ) as response:
            start = await response.content.read(64 * 1024)  # a slow client, mid-transfer
            await pull(mirror, "second", second)  # over the budget: first must go
            await evict(mirror)
            assert not on_disk(mirror, first)
            rest = await response.content.read()
        data = start + rest
        assert len(data) == layer.size
        assert "sha256:" + hashlib.sha256(data).hexdigest() == layer.digest


async def test_a_blob_being_filled_is_not_evicted(
    fake_hub: FakeHub, tmp_path: Path, clock: FakeClock
) -> None:
    # Pinned images over the budget: the pass must free bytes and finds nothing it may
    # take, so it goes on to whatever else it is shown, the blob landing meanwhile too.
    kept = {name: image_of(seed, size=5 * MIB // 2) for seed, name in ((3, "a"), (4, "b"))}
    small = image_of(5, size=MIB)
    for name, image in {**kept, "small": small}.items():
        fake_hub.add_image(f"library/{name}", "latest", image)
    pins = (Pin.parse("library/a"), Pin.parse("library/b"))
    settings = settings_for(fake_hub.url, tmp_path / "data", max_cache_size=4 * MIB, pins=pins)
    async with RunningMirror(settings, clock=clock, eviction_interval=3600) as mirror:
        # Only the test's pass runs: any later pass may take the blob, pins being over.
        mirror.engine.evictor.poke = lambda: None  # type: ignore[method-assign]
        for name, image in kept.items():
            await pull(mirror, name, image)
            clock.advance(60)
        fake_hub.blob_delay_per_chunk = 0.002
        filling = asyncio.create_task(pull(mirror, "small", small))
        graph = mirror.engine.store.inner.graph
        listed = graph.oldest_blobs

        async def landing_during_the_pass(
            limit: int, after: tuple[float, str] | None = None
        ) -> list[BlobEntry]:
            page = await listed(limit, after)
            if not filling.done():  # the fill lands between two pages of the pass
                clock.advance(1)
                fake_hub.blob_delay_per_chunk = 0.0
                await filling
            return page

        with patch.object(graph, "oldest_blobs", landing_during_the_pass):
            result = await pass_that_ran(mirror)
        assert filling.done()
        assert result.short > 0  # the pass had bytes to free
        assert on_disk(mirror, small)
        cdn_before = fake_hub.count("GET", "cdn")
        await pull(mirror, "small", small)
        assert fake_hub.count("GET", "cdn") == cdn_before


async def test_a_blob_larger_than_the_budget_is_served_and_not_kept(
    fake_hub: FakeHub, tmp_path: Path, clock: FakeClock
) -> None:
    small, large = image_of(3, size=MIB), image_of(4, size=6 * MIB)
    fake_hub.add_image("library/small", "latest", small)
    fake_hub.add_image("library/large", "latest", large)
    settings = settings_for(fake_hub.url, tmp_path / "data", max_cache_size=4 * MIB)
    async with RunningMirror(settings, clock=clock, eviction_interval=3600) as mirror:
        await pull(mirror, "small", small)
        await pull(mirror, "large", large)  # served whole...
        assert not on_disk(mirror, large)  # ...and not kept
        await evict(mirror)
        assert on_disk(mirror, small)


async def test_a_blob_fetched_again_while_it_is_evicted_stays_counted(
    fake_hub: FakeHub, tmp_path: Path, clock: FakeClock
) -> None:
    images = {name: image_of(seed) for seed, name in enumerate(("a", "b", "c"), start=40)}
    for name, image in images.items():
        fake_hub.add_image(f"library/{name}", "latest", image)
    budget = int(2.5 * MIB)
    settings = settings_for(fake_hub.url, tmp_path / "data", max_cache_size=budget)
    layer = images["a"].blobs[-1]
    async with RunningMirror(settings, clock=clock, eviction_interval=3600) as mirror:
        for name in ("a", "b"):
            await pull(mirror, name, images[name])
            clock.advance(60)
        graph = mirror.engine.store.inner.graph
        record_removal = graph.blobs_removed
        raced = asyncio.Event()

        async def fetched_meanwhile(digests: Sequence[str]) -> None:
            if layer.digest in digests and not raced.is_set():
                # A client asks for the evicted layer after its file went, before the
                # removal is recorded: a fill lands it again.
                status, _, body = await mirror.get(f"/v2/a/blobs/{layer.digest}")
                assert (status, body) == (200, layer.data)
                raced.set()
            await record_removal(digests)

        with patch.object(graph, "blobs_removed", fetched_meanwhile):
            await pull(mirror, "c", images["c"])  # over the budget: a goes, and comes back
            await pass_that_ran(mirror)
        assert raced.is_set()
        await pass_that_ran(mirror)
        async with no_pass_running(mirror):
            disk = await asyncio.to_thread(mirror.engine.blobs.on_disk)
            usage = await mirror.engine.store.graph.usage()
        assert (usage.blobs, usage.bytes) == (len(disk), sum(size for size, _ in disk.values()))
        assert usage.bytes <= budget
        assert on_disk(mirror, images["a"])  # fetched last: kept


async def test_a_mirror_process_stays_within_its_budget(fake_hub: FakeHub, tmp_path: Path) -> None:
    """The issue's walk-through: serve with a budget, pull more than it holds, look."""
    images = [image_of(seed) for seed in range(10, 16)]  # six images of 1 MiB
    for number, image in enumerate(images):
        fake_hub.add_image(f"library/app{number}", "latest", image)
    data = tmp_path / "data"
    with MirrorProcess(data, fake_hub.url, "--max-cache-size", "3MiB") as mirror:
        async with aiohttp.ClientSession() as session:
            for number, image in enumerate(images):
                await pull_from(session, mirror.url, f"app{number}", image)
            await asyncio.sleep(0.5)  # the evictor runs in the background after each landing
            used = sum(size for size, _ in BlobStore(data / "blobs").on_disk().values())
            assert used <= 3 * MIB
            upstream_before = len(fake_hub.log)
            await pull_from(session, mirror.url, f"app{len(images) - 1}", images[-1])
            assert len(fake_hub.log) == upstream_before  # the latest image: all cached
        listing = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "mirror", "ls", "--data-dir", str(data), "--json"],
            capture_output=True,
            text=True,
            check=True,
        )
    rows = {row["repository"]: row for row in json.loads(listing.stdout)}
    assert len(rows) == len(images)  # manifests and tags stay when their blobs go
    latest = rows[f"library/app{len(images) - 1}"]
    assert latest["blobs_present"] == latest["blobs"]
    assert rows["library/app0"]["blobs_present"] < rows["library/app0"]["blobs"]


async def pull_from(session: aiohttp.ClientSession, url: str, name: str, image: Image) -> None:
    async with session.get(
        f"{url}/v2/{name}/manifests/latest", headers={"Accept": OCI_MANIFEST}
    ) as response:
        assert await response.read() == image.manifest
    for blob in image.blobs:
        async with session.get(f"{url}/v2/{name}/blobs/{blob.digest}") as response:
            assert await response.read() == blob.data


async def test_pull_times_survive_a_restart(
    fake_hub: FakeHub, tmp_path: Path, clock: FakeClock
) -> None:
    image = image_of(21)
    fake_hub.add_image("library/app", "latest", image)
    settings = settings_for(fake_hub.url, tmp_path / "data")
    async with RunningMirror(settings, clock=clock, eviction_interval=3600) as mirror:
        await pull(mirror, "app", image)
        clock.advance(600)
        await pull(mirror, "app", image)  # recorded in memory; written on the way down
        pulled_at = clock.now
        await mirror.restart()
        entries = await mirror.engine.store.graph.oldest_blobs(10)
    assert {entry.digest for entry in entries} == {blob.digest for blob in image.blobs}
    assert all(entry.last_pulled == pulled_at for entry in entries)


async def test_workers_and_replicas_on_one_data_dir_keep_one_budget(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    """Two replicas sharing Redis and a data dir, each with two workers: one evictor at a
    time (a lease), so the budget holds and nothing is evicted twice."""
    redis = RedisServer(require_binary("redis-server"))
    images = [image_of(seed) for seed in range(30, 38)]  # eight images of 1 MiB
    for number, image in enumerate(images):
        fake_hub.add_image(f"library/app{number}", "latest", image)
    data = tmp_path / "shared"
    with redis:
        options = ("--max-cache-size", "3MiB", "--workers", "2", "--redis-url", redis.url())
        pair = [MirrorProcess(data, fake_hub.url, *options, name=n) for n in ("a", "b")]
        for process in pair:
            await asyncio.to_thread(process.start)
        try:
            async with aiohttp.ClientSession() as session:
                for number, image in enumerate(images):
                    url = pair[number % 2].url
                    await pull_from(session, url, f"app{number}", image)
                await asyncio.sleep(1.0)
                used = sum(size for size, _ in BlobStore(data / "blobs").on_disk().values())
                last = len(images) - 1
                await pull_from(session, pair[0].url, f"app{last}", images[last])
        finally:
            for process in pair:
                await asyncio.to_thread(process.stop)
        logs = [process.log() for process in pair]
    assert used <= 3 * MIB
    evicted = [
        json.loads(line)["count"]
        for log in logs
        for line in log.splitlines()
        if '"blobs_evicted"' in line
    ]
    stored = sum(log.count('"blob_stored"') for log in logs)
    remaining = len(BlobStore(data / "blobs").on_disk())
    assert stored - sum(evicted) == remaining  # every removal counted once, by one evictor


async def test_replicas_with_data_dirs_of_their_own_sharing_redis_keep_their_own_budgets(
    fake_hub: FakeHub, tmp_path: Path, clock: FakeClock
) -> None:
    """One replica's first pass must not take the other's blobs for gone: each keeps the
    records of its own disk, and its budget."""
    images = [image_of(seed) for seed in range(50, 57)]  # seven images of 1 MiB
    for number, image in enumerate(images):
        fake_hub.add_image(f"library/app{number}", "latest", image)
    budget = int(3.5 * MIB)
    with RedisServer(require_binary("redis-server")) as redis:
        first, second = (
            RunningMirror(
                settings_for(
                    fake_hub.url, tmp_path / name, max_cache_size=budget, redis_url=redis.url()
                ),
                clock=clock,
                eviction_interval=3600,
            )
            for name in ("a", "b")
        )
        async with first, second:
            for number in (0, 1, 2):
                await pull(first, f"app{number}", images[number])
                clock.advance(60)
            await pull(second, "app3", images[3])
            await evict(second)  # its first pass aligns the records with its disk
            for number in (4, 5, 6):
                await pull(first, f"app{number}", images[number])
                clock.advance(60)
            for mirror in (first, second):
                await evict(mirror)
                async with no_pass_running(mirror):
                    disk = await asyncio.to_thread(mirror.engine.blobs.on_disk)
                    usage = await mirror.engine.store.graph.usage()
                assert usage.bytes == sum(size for size, _ in disk.values())
                assert usage.bytes <= budget


async def blob_bytes_on_disk(mirror: RunningMirror) -> int:
    async with no_pass_running(mirror):
        disk = await asyncio.to_thread(mirror.engine.blobs.on_disk)
    return sum(size for size, _ in disk.values())


async def test_a_redis_that_lost_the_graph_is_realigned_and_the_budget_holds(
    fake_hub: FakeHub, tmp_path: Path, clock: FakeClock
) -> None:
    """Redis flushed (or restarted empty between two requests) without the mirror seeing an
    outage: the blobs on disk before it must still count, and go first."""
    images = [image_of(seed) for seed in range(70, 77)]  # seven images of 1 MiB
    for number, image in enumerate(images):
        fake_hub.add_image(f"library/app{number}", "latest", image)
    budget = int(3.5 * MIB)
    with RedisServer(require_binary("redis-server")) as redis:
        settings = settings_for(
            fake_hub.url, tmp_path / "data", max_cache_size=budget, redis_url=redis.url()
        )
        async with RunningMirror(settings, clock=clock, eviction_interval=3600) as mirror:
            for number in (0, 1, 2):
                await pull(mirror, f"app{number}", images[number])
                clock.advance(60)
            await evict(mirror)
            client = Redis.from_url(redis.url())
            await client.flushall()
            await client.aclose()
            for number in (3, 4, 5, 6):
                await pull(mirror, f"app{number}", images[number])
                clock.advance(60)
            await evict(mirror)
            assert await blob_bytes_on_disk(mirror) <= budget
            for number in (5, 6):  # the newest stay, whole
                await pull(mirror, f"app{number}", images[number])
                assert on_disk(mirror, images[number])


async def test_blobs_that_landed_while_redis_was_down_are_evictable_after_it_is_back(
    fake_hub: FakeHub, tmp_path: Path, clock: FakeClock
) -> None:
    """Their records were not written during the outage; Redis lost nothing else."""
    images = [image_of(seed) for seed in range(80, 86)]  # six images of 1 MiB
    for number, image in enumerate(images):
        fake_hub.add_image(f"library/app{number}", "latest", image)
    budget = int(3.5 * MIB)
    with RedisServer(require_binary("redis-server")) as real:
        redis = HungRedis(behind=real.port)
        server = await asyncio.start_server(redis.serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        settings = settings_for(
            fake_hub.url,
            tmp_path / "data",
            max_cache_size=budget,
            redis_url=f"redis://127.0.0.1:{port}",
        )
        try:
            async with RunningMirror(settings, clock=clock, eviction_interval=3600) as mirror:
                for number in (0, 1):
                    await pull(mirror, f"app{number}", images[number])
                    clock.advance(60)
                await evict(mirror)
                redis.hang()
                for number in (2, 3, 4, 5):
                    await pull(mirror, f"app{number}", images[number])
                    clock.advance(60)
                assert mirror.engine.store.degraded  # the outage was noticed
                redis.recover()
                deadline = asyncio.get_running_loop().time() + 30
                while mirror.engine.store.degraded:
                    assert asyncio.get_running_loop().time() < deadline, "Redis never back"
                    await asyncio.sleep(0.05)
                await evict(mirror)
                assert await blob_bytes_on_disk(mirror) <= budget
                for number in (4, 5):  # the newest stay, whole
                    await pull(mirror, f"app{number}", images[number])
                    assert on_disk(mirror, images[number])
        finally:
            redis.close()
            server.close()


@pytest.mark.parametrize("store", ["embedded", "redis"])
async def test_a_blob_that_lands_while_the_graph_is_reconciled_stays_counted(
    fake_hub: FakeHub, tmp_path: Path, clock: FakeClock, store: str
) -> None:
    """Reconciling now happens while serving (after a Redis outage, or a Redis that lost
    its keys): a blob that lands between the walk of the disk and the graph's update must
    not be recorded absent, or it is on disk, counted nowhere, never evicted."""
    early, late = image_of(90), image_of(91)
    fake_hub.add_image("library/early", "latest", early)
    fake_hub.add_image("library/late", "latest", late)
    with contextlib.ExitStack() as stack:
        changes = {}
        if store == "redis":
            redis = stack.enter_context(RedisServer(require_binary("redis-server")))
            changes["redis_url"] = redis.url()
        settings = settings_for(fake_hub.url, tmp_path / "data", **changes)
        await reconcile_while_a_blob_lands(settings, clock, early, late)


async def reconcile_while_a_blob_lands(
    settings: Settings, clock: FakeClock, early: Image, late: Image
) -> None:
    async with RunningMirror(settings, clock=clock, eviction_interval=3600) as mirror:
        await pull(mirror, "early", early)
        await evict(mirror)
        content, graph = mirror.engine.content, mirror.engine.store.graph
        walk = content.on_disk

        async def a_landing_after_the_walk() -> dict[str, tuple[int, float]]:
            walked = await walk()
            await pull(mirror, "late", late)
            for _ in range(500):  # its fill records it once its client has every byte
                if (await graph.usage()).blobs == len(early.blobs) + len(late.blobs):
                    break
                await asyncio.sleep(0.01)
            return walked

        async with no_pass_running(mirror):
            content.on_disk = a_landing_after_the_walk  # type: ignore[method-assign]
            await content.reconcile()
            content.on_disk = walk  # type: ignore[method-assign]
            disk = await asyncio.to_thread(mirror.engine.blobs.on_disk)
            usage = await graph.usage()
        assert usage.bytes == sum(size for size, _ in disk.values())
        assert on_disk(mirror, late)
