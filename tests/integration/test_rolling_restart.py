"""A rolling restart loses nothing: two replicas sharing Redis and a data dir behind a real
nginx, clients pulling in a loop, each replica stopped (SIGTERM) and started in turn."""

from __future__ import annotations

import asyncio
import hashlib
import signal
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from tests.support.binaries import require_binary
from tests.support.fakehub import FakeHub
from tests.support.nginx import LoadBalancer
from tests.support.oci import OCI_MANIFEST, Image, make_image, make_layer, make_random_layer
from tests.support.process import MirrorProcess
from tests.support.realregistry import free_port
from tests.support.redis_server import RedisServer

CLIENTS = 4
# Bounds for the test to give up, far above what each step takes: not timed assertions.
EXIT_WAIT = 60.0
PROGRESS_WAIT = 120.0


@dataclass
class Pulls:
    """What the clients saw: pulls done whole, and every failure with what it was."""

    done: int = 0
    failures: list[str] = field(default_factory=list)
    progress: asyncio.Event = field(default_factory=asyncio.Event)

    def count(self) -> None:
        self.done += 1
        self.progress.set()
        self.progress = asyncio.Event()

    async def at_least(self, target: int) -> None:
        async with asyncio.timeout(PROGRESS_WAIT):
            while self.done < target and not self.failures:
                await self.progress.wait()


def images() -> dict[str, Image]:
    return {
        "library/small": make_image([make_layer(b"small" * 1000)]),
        "library/medium": make_image(
            [make_random_layer(2 * 1024 * 1024, seed=51), make_layer(b"top layer")]
        ),
        # Large enough to be in flight when a replica is told to stop.
        "library/large": make_image([make_random_layer(24 * 1024 * 1024, seed=52)]),
    }


async def pull(session: aiohttp.ClientSession, base: str, name: str, image: Image) -> None:
    """One pull by the registry API, every byte checked; raises AssertionError on any fault."""
    async with session.get(f"{base}/v2/") as response:
        assert response.status == 200, f"/v2/: {response.status}"
    manifest_url = f"{base}/v2/{name}/manifests/1.0"
    async with session.get(manifest_url, headers={"Accept": OCI_MANIFEST}) as response:
        body = await response.read()
        assert response.status == 200, f"{manifest_url}: {response.status} {body[:200]!r}"
        assert body == image.manifest, f"{manifest_url}: wrong manifest"
    for blob in image.blobs:
        url = f"{base}/v2/{name}/blobs/{blob.digest}"
        hasher = hashlib.sha256()
        async with session.get(url) as response:
            assert response.status == 200, f"{url}: {response.status}"
            async for chunk in response.content.iter_chunked(256 * 1024):
                hasher.update(chunk)
        assert f"sha256:{hasher.hexdigest()}" == blob.digest, f"{url}: wrong bytes"


async def client(base: str, catalog: dict[str, Image], pulls: Pulls, stop: asyncio.Event) -> None:
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            for name, image in catalog.items():
                try:
                    await pull(session, base, name, image)
                except (AssertionError, aiohttp.ClientError, OSError) as exc:
                    pulls.failures.append(f"{type(exc).__name__}: {exc}")
                    return
            pulls.count()


async def restart(replica: MirrorProcess, pulls: Pulls) -> None:
    """SIGTERM, wait for exit 0, check that pulls go on without it, start it again."""
    replica.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(replica.wait, EXIT_WAIT) == 0
    await pulls.at_least(pulls.done + CLIENTS)  # the other replica serves everyone
    await asyncio.to_thread(replica.start)
    await pulls.at_least(pulls.done + CLIENTS)


async def test_restarting_each_replica_in_turn_fails_no_pull_and_asks_upstream_nothing(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    nginx_binary = require_binary("nginx")
    catalog = images()
    for name, image in catalog.items():
        fake_hub.add_image(name, "1.0", image)
    with RedisServer(require_binary("redis-server")) as redis:
        # nginx (no active health checks) leaves a replica that refused a connection out for
        # fail_timeout (1s): the delay must outlast it, or the replica that was restarted
        # just before is still left out when the other one closes its port.
        replicas = [
            MirrorProcess(
                tmp_path / "shared",
                fake_hub.url,
                *("--redis-url", redis.url(), "--shutdown-delay", "2s"),
                name=name,
                port=free_port(),
            )
            for name in ("a", "b")
        ]
        balancer = LoadBalancer(nginx_binary, tmp_path / "nginx", [r.fixed_port for r in replicas])
        try:
            for replica in replicas:
                await asyncio.to_thread(replica.start)
            await asyncio.to_thread(balancer.start)
            await rolling_restart(balancer.url, replicas, catalog, fake_hub)
        finally:
            balancer.stop()
            for replica in replicas:
                await asyncio.to_thread(replica.stop)
    for replica in replicas:
        drained = [line for line in replica.log().splitlines() if '"shutdown_drained"' in line]
        assert drained
        assert all('"cut": 0' in line for line in drained), drained


async def rolling_restart(
    base: str, replicas: list[MirrorProcess], catalog: dict[str, Image], fake_hub: FakeHub
) -> None:
    async with aiohttp.ClientSession() as session:
        for name, image in catalog.items():  # cached through the balancer, once
            await pull(session, base, name, image)
    fake_hub.clear_log()
    pulls, stop = Pulls(), asyncio.Event()
    clients = [asyncio.create_task(client(base, catalog, pulls, stop)) for _ in range(CLIENTS)]
    try:
        await pulls.at_least(CLIENTS)
        for replica in replicas:
            await restart(replica, pulls)
    finally:
        stop.set()
        await asyncio.gather(*clients)
    assert pulls.failures == []
    assert pulls.done >= 5 * CLIENTS
    # Everything was cached before the restarts: the upstream saw no manifest or blob request.
    assert fake_hub.count(path_contains="/manifests/") == 0
    assert fake_hub.count(path_contains="/blobs/") == 0
    assert fake_hub.count(server="cdn") == 0
