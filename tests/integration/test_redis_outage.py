"""With Redis unreachable the mirror keeps serving: nothing waits on Redis behind a lock."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio
from redis.asyncio import Redis

from mirror.content.protocols import StoreUnavailable
from mirror.domain.reference import DOCKER_HUB
from mirror.engine import Engine
from mirror.upstream.client import UpstreamClient
from tests.support.binaries import require_binary
from tests.support.fakehub import FakeHub
from tests.support.hung_redis import HungRedis
from tests.support.mirror import RunningMirror, settings_for
from tests.support.oci import OCI_MANIFEST, Image, make_image, make_layer, make_random_layer
from tests.support.redis_server import RedisServer


@pytest_asyncio.fixture
async def silent_port() -> AsyncIterator[int]:
    """A TCP port that accepts connections and never answers: a Redis that hangs."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    for writer in held:
        writer.close()
    server.close()


@pytest_asyncio.fixture
async def hung_redis() -> AsyncIterator[tuple[HungRedis, int]]:
    redis = HungRedis()
    server = await asyncio.start_server(redis.serve, "127.0.0.1", 0)
    yield redis, server.sockets[0].getsockname()[1]
    redis.close()
    server.close()


@pytest_asyncio.fixture
async def redis_that_hangs() -> AsyncIterator[tuple[HungRedis, int, RedisServer]]:
    """A real redis-server behind a :class:`HungRedis`, which the test makes hang."""
    with RedisServer(require_binary("redis-server")) as real:
        redis = HungRedis(behind=real.port)
        server = await asyncio.start_server(redis.serve, "127.0.0.1", 0)
        yield redis, server.sockets[0].getsockname()[1], real
        redis.close()
        server.close()


async def no_lease_held(real: RedisServer) -> None:
    """Wait until every fill has released its lease (its last step, after its record)."""
    client = Redis.from_url(real.url())
    try:
        deadline = time.monotonic() + 30
        while await client.keys("mirror:v1:{lease:*"):
            assert time.monotonic() < deadline, "a lease is never released"
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()


async def test_manifest_misses_do_not_wait_on_a_redis_known_to_hang(
    fake_hub: FakeHub, tmp_path: Path, hung_redis: tuple[HungRedis, int]
) -> None:
    redis, port = hung_redis
    images = [make_image([make_layer(f"image {n}".encode())]) for n in range(4)]
    for number, image in enumerate(images):
        fake_hub.add_image(f"library/app{number}", "latest", image)
    settings = settings_for(fake_hub.url, tmp_path / "data", redis_url=f"redis://127.0.0.1:{port}")
    async with RunningMirror(settings) as mirror:
        # The start found Redis hanging and paid one timeout (the schema check): the outage
        # is known from then on, to the store, the content graph and the leases alike.
        status, _, body = await mirror.get("/v2/app0/manifests/latest", accept=[OCI_MANIFEST])
        assert (status, body) == (200, images[0].manifest)
        assert redis.asked() == ["EVAL"]  # the schema check: the one command waited out
        asked = len(redis.asked())
        for number, image in enumerate(images[1:], start=1):
            status, _, body = await mirror.get(
                f"/v2/app{number}/manifests/latest", accept=[OCI_MANIFEST]
            )
            assert (status, body) == (200, image.manifest)
        # Every later miss is answered without sending Redis anything (only probes ping it).
        assert redis.asked()[asked:] == []


async def test_cold_blobs_start_promptly_while_redis_hangs(
    fake_hub: FakeHub, tmp_path: Path, silent_port: int
) -> None:
    first, *layers = [make_random_layer(64 * 1024, seed=seed) for seed in range(7)]
    fake_hub.add_image("library/app", "latest", make_image([first, *layers]))
    settings = settings_for(
        fake_hub.url, tmp_path / "data", redis_url=f"redis://127.0.0.1:{silent_port}"
    )
    async with RunningMirror(settings) as mirror:
        # The first cold blob finds Redis hanging: it pays one timeout (2 s), unavoidably.
        status, _, body = await mirror.get(f"/v2/app/blobs/{first.digest}")
        assert (status, body) == (200, first.data)
        await asyncio.sleep(2.5)  # past the moment Redis is worth asking again
        started = time.monotonic()
        answers = await asyncio.gather(
            *(mirror.get(f"/v2/app/blobs/{layer.digest}") for layer in layers)
        )
        elapsed = time.monotonic() - started
    assert [status for status, _, _ in answers] == [200] * 6
    assert [body for _, _, body in answers] == [layer.data for layer in layers]
    # Nobody waits on Redis again: the outage is known, the local locks serve meanwhile.
    assert elapsed < 1.0, elapsed


async def pull(mirror: RunningMirror, repository: str, image: Image) -> None:
    status, _, body = await mirror.get(f"/v2/{repository}/manifests/latest", accept=[OCI_MANIFEST])
    assert (status, body) == (200, image.manifest)
    for blob in image.blobs:
        status, _, body = await mirror.get(f"/v2/{repository}/blobs/{blob.digest}")
        assert (status, body) == (200, blob.data)


def shared_state(engine: Engine) -> UpstreamClient:
    upstream = engine.upstreams[DOCKER_HUB]
    assert isinstance(upstream, UpstreamClient)
    return upstream


async def ask_metadata(engine: Engine) -> None:
    await engine.store.get_tag(DOCKER_HUB, "library/nobody", "latest")
    with contextlib.suppress(StoreUnavailable):  # the graph has no stand-in: it says so
        await engine.store.graph.usage()


async def ask_leases(engine: Engine) -> None:
    lease = await engine.coordinator.acquire("some work")
    assert lease is not None  # from Redis, or from the local locks standing in
    await lease.release()


async def ask_upstream_state(engine: Engine) -> None:
    await shared_state(engine).ratelimit.sync()  # the site-wide quota and breaker state


USERS: dict[str, Callable[[Engine], Awaitable[None]]] = {
    "metadata": ask_metadata,
    "leases": ask_leases,
    "upstream state": ask_upstream_state,
}


def store_probes() -> list[str]:
    """The tasks probing Redis (an upstream's circuit breaker has a probe of its own)."""
    names = [getattr(task.get_coro(), "__qualname__", "") for task in asyncio.all_tasks()]
    return [
        name
        for name in names
        if name.endswith("_probe_until_back") and not name.startswith("CircuitBreaker")
    ]


async def back(engine: Engine) -> None:
    deadline = time.monotonic() + 30
    while engine.store.degraded:
        assert time.monotonic() < deadline, "the probe never found Redis back"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("first", list(USERS))
async def test_one_failure_keeps_every_user_off_redis_until_the_one_probe_hears_it(
    fake_hub: FakeHub,
    tmp_path: Path,
    redis_that_hangs: tuple[HungRedis, int, RedisServer],
    first: str,
) -> None:
    redis, port, real = redis_that_hangs
    before, during = (make_image([make_layer(f"{when} the outage".encode())]) for when in "ab")
    fake_hub.add_image("library/before", "latest", before)
    fake_hub.add_image("library/during", "latest", during)
    settings = settings_for(fake_hub.url, tmp_path / "data", redis_url=f"redis://127.0.0.1:{port}")
    async with RunningMirror(settings) as mirror:
        engine = mirror.engine
        await pull(mirror, "before", before)
        await engine.background.stop()  # from here on only what the test does asks Redis
        await no_lease_held(real)
        held = await engine.coordinator.acquire("a lease taken before the outage")
        assert held is not None

        redis.hang()
        asked = len(redis.asked())
        await USERS[first](engine)
        assert len(redis.asked()) == asked + 1  # the one command that waited out its timeout
        for user in USERS.values():
            await user(engine)
        await held.publish({"size": 1})
        await held.release()
        await pull(mirror, "during", during)
        assert redis.asked()[asked + 1 :] == []  # nobody asked Redis again...
        assert len(store_probes()) == 1  # ... but the one probe

        redis.recover()
        await back(engine)
        for user in USERS.values():
            await user(engine)
        # Every user asks Redis again: the store (HMGET), the leases (SET), the state (HGETALL).
        assert {"HMGET", "SET", "HGETALL"} <= set(redis.asked()[asked + 1 :])
        assert store_probes() == []


async def test_a_readiness_probe_that_finds_redis_hanging_tells_the_one_verdict(
    fake_hub: FakeHub, tmp_path: Path, redis_that_hangs: tuple[HungRedis, int, RedisServer]
) -> None:
    redis, port, real = redis_that_hangs
    before, during = (make_image([make_layer(f"{when} readiness".encode())]) for when in "ab")
    fake_hub.add_image("library/before", "latest", before)
    fake_hub.add_image("library/during", "latest", during)
    settings = settings_for(fake_hub.url, tmp_path / "data", redis_url=f"redis://127.0.0.1:{port}")
    async with RunningMirror(settings) as mirror:
        await pull(mirror, "before", before)
        await mirror.engine.background.stop()  # from here on only what the test does asks Redis
        await no_lease_held(real)

        redis.hang()
        status, _, body = await mirror.get("/readyz")
        assert (status, json.loads(body)["checks"]["store"]) == (200, "degraded")
        assert mirror.engine.store.degraded  # known down now, to the store and all on Redis
        # The probe's timeout was the one paid: the pull after it sends Redis nothing.
        asked = len(redis.asked())
        await pull(mirror, "during", during)
        assert redis.asked()[asked:] == []
