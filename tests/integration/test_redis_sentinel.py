"""Replicas on a Redis that survives losing its master: a master, a replica and three
sentinels (real redis-server processes), the mirror given ``redis+sentinel://``."""

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
import redis

from mirror.content.redis_client import connect
from tests.support.binaries import require_binary
from tests.support.fakehub import FakeHub
from tests.support.oci import OCI_MANIFEST, make_image, make_layer, make_random_layer
from tests.support.process import MirrorProcess, run_mirror
from tests.support.redis_sentinel import SentinelGroup

ACCEPT = {"Accept": OCI_MANIFEST}
DEADLINE = 30.0  # for a failover and the replicas' recovery: they take seconds


@pytest.fixture
def sentinels() -> Iterator[SentinelGroup]:
    with SentinelGroup(require_binary("redis-server")) as group:
        yield group


@pytest_asyncio.fixture
async def replicas(
    fake_hub: FakeHub, sentinels: SentinelGroup, tmp_path: Path
) -> AsyncIterator[tuple[MirrorProcess, MirrorProcess]]:
    shared = tmp_path / "shared"
    pair = tuple(
        MirrorProcess(shared, fake_hub.url, "--redis-url", sentinels.url(), name=name)
        for name in ("a", "b")
    )
    try:
        for process in pair:
            await asyncio.to_thread(process.start)
        yield pair[0], pair[1]
    finally:
        for process in pair:
            await asyncio.to_thread(process.stop)


async def fetch(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with session.get(url, headers=ACCEPT) as response:
        return response.status, await response.read()


def keys_on(port: int, pattern: str) -> list[bytes]:
    with redis.Redis(port=port, socket_timeout=2) as client:
        return list(client.scan_iter(match=pattern, count=1000))


async def wait_store_ok(session: aiohttp.ClientSession, *processes: MirrorProcess) -> None:
    """Until every replica's /readyz says its store answers again (its probe found the
    new master through the sentinels)."""
    deadline = time.monotonic() + DEADLINE
    for process in processes:
        while True:
            async with session.get(f"{process.url}/readyz") as response:
                if (await response.json())["checks"]["store"] == "ok":
                    break
            assert time.monotonic() < deadline, f"{process.url} did not find the new master"
            await asyncio.sleep(0.1)


async def test_pulls_through_sentinel_are_cached_in_the_master(
    fake_hub: FakeHub, sentinels: SentinelGroup, tmp_path: Path
) -> None:
    layer = make_layer(b"behind sentinel" * 1000)
    image = make_image([layer])
    fake_hub.add_image("library/app", "1.0", image)
    url = sentinels.url(3)
    process = MirrorProcess(tmp_path / "data", fake_hub.url, "--redis-url", url, "--workers", "2")
    await asyncio.to_thread(process.start)
    try:
        async with aiohttp.ClientSession() as session:
            assert await fetch(session, f"{process.url}/v2/app/manifests/1.0") == (
                200,
                image.manifest,
            )
            status, body = await fetch(session, f"{process.url}/v2/app/blobs/{layer.digest}")
            assert (status, body) == (200, layer.data)
    finally:
        await asyncio.to_thread(process.stop)
    master = sentinels.master_port()
    assert master == sentinels.master.port
    with redis.Redis(port=master, db=3, socket_timeout=2) as client:
        tags = list(client.scan_iter(match="mirror:v1:*:tag:1.0"))
        manifests = list(client.scan_iter(match="mirror:v1:*:manifest:*"))
    assert len(tags) == 1
    assert len(manifests) == 1
    # The offline subcommands reach the same Redis through the sentinels.
    listed = await asyncio.to_thread(
        run_mirror, "ls", "--json", "--data-dir", str(tmp_path / "data"), "--redis-url", url
    )
    assert listed.returncode == 0, listed.stderr
    assert [row["tag"] for row in json.loads(listed.stdout)] == ["1.0"]


async def test_cached_pulls_go_on_while_the_master_is_killed_and_sharing_resumes_after(
    fake_hub: FakeHub, sentinels: SentinelGroup, replicas: tuple[MirrorProcess, MirrorProcess]
) -> None:
    layer = make_layer(b"cached before the failover" * 1000)
    image = make_image([layer])
    fake_hub.add_image("library/app", "1.0", image)
    first, second = replicas
    old_master = sentinels.master.port
    async with aiohttp.ClientSession() as session:
        for process in (first, second):
            assert await fetch(session, f"{process.url}/v2/app/manifests/1.0") == (
                200,
                image.manifest,
            )
            status, body = await fetch(session, f"{process.url}/v2/app/blobs/{layer.digest}")
            assert (status, body) == (200, layer.data)

        # Clients pull in a loop, on both replicas, while the master is SIGKILLed and the
        # sentinels promote the replica.
        stop = asyncio.Event()
        pulls: list[tuple[float, float]] = []

        async def pull_loop(process: MirrorProcess) -> None:
            while not stop.is_set():
                started = time.monotonic()
                manifest = await fetch(session, f"{process.url}/v2/app/manifests/1.0")
                assert manifest == (200, image.manifest)
                blob = await fetch(session, f"{process.url}/v2/app/blobs/{layer.digest}")
                assert blob == (200, layer.data)
                pulls.append((started, time.monotonic()))
                await asyncio.sleep(0.02)

        loops = [asyncio.create_task(pull_loop(p)) for p in (first, second, first, second)]
        await asyncio.sleep(0.3)
        killed = time.monotonic()
        await asyncio.to_thread(sentinels.master.kill)
        new_master = await asyncio.to_thread(sentinels.wait_for_new_master, old_master)
        promoted = time.monotonic()
        await wait_store_ok(session, first, second)
        stop.set()
        await asyncio.gather(*loops)  # an assertion that failed in a loop is raised here
        assert new_master == sentinels.replica.port
        assert any(killed < start and end < promoted for start, end in pulls)

        # Afterwards: a new tag is fetched once, written to the new master, and the other
        # replica finds it there.
        fake_hub.add_image("library/app", "2.0", make_image([make_layer(b"after")]))
        fake_hub.clear_log()
        assert (await fetch(session, f"{first.url}/v2/app/manifests/2.0"))[0] == 200
        assert (await fetch(session, f"{second.url}/v2/app/manifests/2.0"))[0] == 200
        assert fake_hub.count("GET", "registry", "/manifests/2.0") == 1
        assert len(keys_on(new_master, "mirror:v1:*:tag:2.0")) == 1

        await assert_one_fill_across(session, fake_hub, (first, second), new_master)


async def assert_one_fill_across(
    session: aiohttp.ClientSession,
    fake_hub: FakeHub,
    processes: tuple[MirrorProcess, MirrorProcess],
    master: int,
) -> None:
    """Cold pulls of one blob on both replicas cost one upstream GET, and the fill's lease
    is taken on ``master``."""
    big = make_random_layer(8 * 1024 * 1024, seed=23)
    fake_hub.add_image("library/app", "3.0", make_image([big]))
    fake_hub.blob_delay_per_chunk = 0.005  # a slow upstream: 128 chunks
    fake_hub.clear_log()
    leases: set[bytes] = set()
    done = asyncio.Event()

    async def watch_leases() -> None:
        while not done.is_set():
            leases.update(await asyncio.to_thread(keys_on, master, "mirror:v1:{lease:*"))
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch_leases())
    urls = [f"{p.url}/v2/app/blobs/{big.digest}" for p in processes * 4]
    results = await asyncio.gather(*(fetch(session, url) for url in urls))
    done.set()
    await watcher
    assert results == [(200, big.data)] * 8
    assert fake_hub.count("GET", "cdn") == 1
    blob_lease = f"blob%3A{big.digest}".replace(":", "%3A").encode()
    assert any(key.endswith(blob_lease) for key in leases), leases


async def test_a_demoted_master_sends_writes_to_the_new_one(
    fake_hub: FakeHub, sentinels: SentinelGroup, replicas: tuple[MirrorProcess, MirrorProcess]
) -> None:
    """A coordinated failover (SENTINEL FAILOVER) leaves the old master running, as a
    replica: connections the mirror holds to it answer writes with READONLY, and those
    writes must reach the new master, not be lost."""
    fake_hub.add_image("library/app", "1.0", make_image([make_layer(b"before")]))
    first, second = replicas
    old_master = sentinels.master.port
    async with aiohttp.ClientSession() as session:
        for process in (first, second):  # both hold connections to the master now
            assert (await fetch(session, f"{process.url}/v2/app/manifests/1.0"))[0] == 200

        with redis.Redis(port=sentinels.sentinel_ports[0], socket_timeout=2) as client:
            client.execute_command("SENTINEL", "FAILOVER", "mymaster")
        new_master = await asyncio.to_thread(sentinels.wait_for_new_master, old_master)
        await asyncio.to_thread(sentinels.wait_for_role, old_master, "slave")

        fake_hub.add_image("library/app", "2.0", make_image([make_layer(b"after")]))
        fake_hub.clear_log()
        for process in (first, second):
            assert (await fetch(session, f"{process.url}/v2/app/manifests/2.0"))[0] == 200
        assert fake_hub.count("GET", "registry", "/manifests/2.0") == 1
        assert len(keys_on(new_master, "mirror:v1:*:tag:2.0")) == 1
    for process in (first, second):
        assert "store_unavailable" not in process.log()


@pytest.mark.parametrize("back_as", ["master", "replica"])
async def test_a_dropped_connection_reconnects_to_the_master_the_sentinels_name(
    sentinels: SentinelGroup, back_as: str
) -> None:
    """redis-py retries a command once after a dropped connection; the reconnect must ask
    the sentinels, not go back to the old master's address, where the old master may be
    running again: restarted and not yet demoted, it takes writes the new master never
    sees; back as a replica, it answers READONLY."""
    client = connect(sentinels.url())
    try:
        await client.set(b"before", b"1")
        pool = client.connection_pool
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]  # untyped in redis-py
        try:
            old_master = sentinels.master.port
            await asyncio.to_thread(sentinels.master.kill)
            new_master = await asyncio.to_thread(sentinels.wait_for_new_master, old_master)
            if back_as == "replica":
                sentinels.master.extra = ("--replicaof", "127.0.0.1", str(new_master))
            await asyncio.to_thread(sentinels.master.start)
            await connection.disconnect()  # what the retry does after a dropped connection
            await connection.send_command("SET", "after", "2")
            assert await connection.read_response() == b"OK"
        finally:
            await client.connection_pool.release(connection)
    finally:
        await client.aclose()
    assert keys_on(new_master, "after") == [b"after"]


async def test_rediss_sentinel_follows_the_master_over_tls(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    with SentinelGroup(require_binary("redis-server"), tls=True) as group:
        fake_hub.add_image("library/app", "1.0", make_image([make_layer(b"before")]))
        process = MirrorProcess(
            tmp_path / "data",
            fake_hub.url,
            *("--redis-url", group.url(), "--redis-ca-file", str(group.ca_file)),
        )
        await asyncio.to_thread(process.start)
        try:
            async with aiohttp.ClientSession() as session:
                assert (await fetch(session, f"{process.url}/v2/app/manifests/1.0"))[0] == 200
                assert len(keys_on(group.master.port, "mirror:v1:*:tag:1.0")) == 1

                await asyncio.to_thread(group.master.kill)
                new_master = await asyncio.to_thread(group.wait_for_new_master, group.master.port)
                await wait_store_ok(session, process)
                fake_hub.add_image("library/app", "2.0", make_image([make_layer(b"after")]))
                assert (await fetch(session, f"{process.url}/v2/app/manifests/2.0"))[0] == 200
                assert len(keys_on(new_master, "mirror:v1:*:tag:2.0")) == 1
        finally:
            await asyncio.to_thread(process.stop)
