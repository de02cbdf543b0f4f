"""The store implementations the contract suite runs against, one parameter each.

A :class:`Backend` opens stores over one set of data: closing a store and opening another
from the same backend must find what the first one wrote (the same directory, the same
Redis server, the same fakeredis server object).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import fakeredis
import fakeredis.aioredis
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from mirror.content.cached import CachedStore
from mirror.content.embedded import EmbeddedStore
from mirror.content.protocols import MetadataStore
from mirror.content.redis_store import RedisStore
from tests.support.binaries import require_binary
from tests.support.mirror import FakeClock
from tests.support.redis_server import RedisServer


async def _real_time(seconds: float) -> None:
    # A Redis server expires keys by its own clock, which no test can move: time passes.
    await asyncio.sleep(seconds)


@dataclass(frozen=True)
class Backend:
    name: str
    open: Callable[[], Awaitable[MetadataStore]]
    # Lets ``seconds`` pass for the stores' expiry: the test clock moves where the store
    # reads one.
    pass_time: Callable[[float], Awaitable[None]] = _real_time


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the whole run; tests that stop a server start their own."""
    with RedisServer(require_binary("redis-server")) as server:
        yield server


async def _flush(url: str) -> None:
    client = Redis.from_url(url)
    try:
        await client.flushall()
    finally:
        await client.aclose()


def _embedded(tmp_path: Path) -> Backend:
    clock = FakeClock()

    async def open_store() -> MetadataStore:
        return await EmbeddedStore.open(tmp_path, clock=clock)

    async def pass_time(seconds: float) -> None:
        clock.advance(seconds)

    return Backend("embedded", open_store, pass_time)


def _fakeredis() -> Backend:
    server = fakeredis.FakeServer()

    async def open_store() -> MetadataStore:
        return RedisStore(fakeredis.aioredis.FakeRedis(server=server))

    return Backend("fakeredis", open_store)


async def _redis(request: pytest.FixtureRequest) -> Backend:
    server: RedisServer = request.getfixturevalue("redis_server")
    await _flush(server.url())

    async def open_store() -> MetadataStore:
        return await RedisStore.open(server.url())

    return Backend("redis", open_store)


def _cached(inner: Backend) -> Backend:
    async def open_store() -> MetadataStore:
        return CachedStore(await inner.open(), max_entries=64, tag_ttl=300.0)

    return Backend(f"cached-{inner.name}", open_store, inner.pass_time)


@pytest_asyncio.fixture(params=["embedded", "fakeredis", "redis", "cached-fakeredis"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    name: str = request.param
    if name == "embedded":
        return _embedded(tmp_path)
    if name == "fakeredis":
        return _fakeredis()
    if name == "redis":
        return await _redis(request)
    return _cached(_fakeredis())


@pytest_asyncio.fixture
async def store(backend: Backend) -> AsyncIterator[MetadataStore]:
    opened = await backend.open()
    try:
        yield opened
    finally:
        await opened.close()
