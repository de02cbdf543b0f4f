"""What every MetadataStore promises, run against each implementation (see conftest.py).

The last part holds what only the Redis store promises: its key schema, and failing fast
with StoreUnavailable when Redis is gone.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator

import fakeredis
import fakeredis.aioredis
import pytest
import pytest_asyncio
from redis.asyncio import Redis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection
from redis.crc import key_slot

from mirror.content.protocols import MetadataStore, referrers_key
from mirror.content.redis_store import RedisStore, StoreUnavailable
from mirror.domain.manifests import Manifest, TagRecord
from tests.contract.conftest import Backend
from tests.support.binaries import require_binary
from tests.support.redis_server import RedisServer

HUB = "docker.io"
INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER = "application/vnd.docker.distribution.manifest.v2+json"


def manifest(body: bytes, media_type: str = INDEX) -> Manifest:
    return Manifest(body, media_type, "sha256:" + hashlib.sha256(body).hexdigest())


def record(m: Manifest, checked_at: float = 1_718_000_000.5) -> TagRecord:
    return TagRecord(m.digest, m.media_type, checked_at)


# --- manifests ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"schemaVersion":2,"manifests":[]}\n', id="json"),
        pytest.param(b'{ "a" :\t1 ,\r\n"b": "\xc3\xa9" }  ', id="json-odd-whitespace"),
        pytest.param(bytes(range(256)) * 3, id="every-byte"),
        pytest.param(b"\x00\x00\xff\xfe", id="nul-and-invalid-utf8"),
        pytest.param(b"", id="empty"),
        pytest.param(os.urandom(1 << 20), id="1MiB-random"),
    ],
)
async def test_manifest_round_trip_is_byte_exact(store: MetadataStore, body: bytes) -> None:
    m = manifest(body, "application/vnd.example+octet-stream; charset=binary")
    await store.put_manifest(HUB, "library/alpine", m)
    got = await store.get_manifest(HUB, "library/alpine", m.digest)
    assert got == m
    assert got is not None
    assert type(got.body) is bytes


async def test_putting_a_manifest_again_keeps_it(store: MetadataStore) -> None:
    m = manifest(b'{"same":"bytes"}')
    await store.put_manifest(HUB, "library/alpine", m)
    await store.put_manifest(HUB, "library/alpine", m)
    assert await store.get_manifest(HUB, "library/alpine", m.digest) == m


# --- absent keys -------------------------------------------------------------------------


async def test_absent_keys_are_none_or_false(store: MetadataStore) -> None:
    assert await store.get_manifest(HUB, "library/alpine", "sha256:" + "0" * 64) is None
    assert await store.get_tag(HUB, "library/alpine", "latest") is None
    assert await store.get_missing(HUB, "library/alpine", "latest") is False


async def test_kinds_do_not_mix(store: MetadataStore) -> None:
    """A tag, a negative entry and a manifest of the same name are three different things."""
    m = manifest(b"{}")
    await store.put_tag(HUB, "library/alpine", m.digest, record(m))
    assert await store.get_manifest(HUB, "library/alpine", m.digest) is None
    assert await store.get_missing(HUB, "library/alpine", m.digest) is False
    await store.put_missing(HUB, "library/alpine", "gone", 60)
    assert await store.get_tag(HUB, "library/alpine", "gone") is None


# --- registries and repositories do not mix ----------------------------------------------


async def test_registries_do_not_mix(store: MetadataStore) -> None:
    hub, other = manifest(b'{"from":"hub"}'), manifest(b'{"from":"ghcr"}')
    await store.put_manifest(HUB, "library/alpine", hub)
    await store.put_tag(HUB, "library/alpine", "3.20", record(hub))
    await store.put_missing(HUB, "library/alpine", "nope", 60)
    await store.put_tag("ghcr.io", "library/alpine", "3.20", record(other))

    assert await store.get_manifest("ghcr.io", "library/alpine", hub.digest) is None
    assert await store.get_tag("ghcr.io", "library/alpine", "3.20") == record(other)
    assert await store.get_tag(HUB, "library/alpine", "3.20") == record(hub)
    assert await store.get_missing("ghcr.io", "library/alpine", "nope") is False


async def test_repositories_do_not_mix(store: MetadataStore) -> None:
    m = manifest(b'{"repo":"alpine"}')
    await store.put_manifest(HUB, "library/alpine", m)
    await store.put_tag(HUB, "library/alpine", "latest", record(m))
    await store.put_missing(HUB, "library/alpine", "nope", 60)

    assert await store.get_manifest(HUB, "library/debian", m.digest) is None
    assert await store.get_tag(HUB, "library/debian", "latest") is None
    assert await store.get_missing(HUB, "library/debian", "nope") is False


# Pairs of names that a store joining its key parts with ':', '/' or '|' (or mishandling
# '%', '{', '}' or a prefix) would send to the same key.
COLLIDING = [
    [("a:b", "c"), ("a", "b:c")],
    [("a/b", "c"), ("a", "b/c")],
    [("a|b", "c"), ("a", "b|c")],
    [("a.b", "c"), ("a", "b.c"), ("a", "bc"), ("ab", "c")],
    [("a}:{b", "c"), ("a", "b}:{c"), ("a}", "c")],
    [("a%3Ab", "c"), ("a:b", "c"), ("a%253Ab", "c")],
    [("reg", "repo:tag:latest"), ("reg", "repo")],
    [("reg:v1", "x"), ("reg", "v1:x"), ("reg", "v1/x")],
]


@pytest.mark.parametrize("names", COLLIDING, ids=lambda names: " vs ".join(map(str, names)))
async def test_names_that_join_alike_stay_apart(
    store: MetadataStore, names: list[tuple[str, str]]
) -> None:
    stored = {}
    for registry, repository in names:
        m = manifest(repr((registry, repository)).encode())
        stored[registry, repository] = m
        await store.put_manifest(registry, repository, m)
        await store.put_tag(registry, repository, "latest", record(m))
    await store.put_missing(*names[0], "latest:x", 60)

    for (registry, repository), m in stored.items():
        assert await store.get_tag(registry, repository, "latest") == record(m)
        assert await store.get_manifest(registry, repository, m.digest) == m
        for other in stored.values():
            if other is not m:
                assert await store.get_manifest(registry, repository, other.digest) is None
    for registry, repository in names[1:]:
        assert await store.get_missing(registry, repository, "latest:x") is False


async def test_tags_that_join_alike_stay_apart(store: MetadataStore) -> None:
    one, two = manifest(b"1"), manifest(b"2")
    await store.put_tag(HUB, "a", "b:c", record(one))
    await store.put_tag(HUB, "a:b", "c", record(two))
    assert await store.get_tag(HUB, "a", "b:c") == record(one)
    assert await store.get_tag(HUB, "a:b", "c") == record(two)
    assert await store.get_tag(HUB, "a", "b") is None


# --- tags --------------------------------------------------------------------------------


async def test_tag_record_round_trips_exactly(store: MetadataStore) -> None:
    m = manifest(b"{}", DOCKER)
    checked_at = 1_718_000_000.123_456_7
    await store.put_tag(HUB, "library/alpine", "3.20", record(m, checked_at))
    got = await store.get_tag(HUB, "library/alpine", "3.20")
    assert got == TagRecord(m.digest, DOCKER, checked_at)
    assert got is not None
    assert got.checked_at == checked_at


async def test_tag_overwrite_replaces_every_field(store: MetadataStore) -> None:
    old, new = manifest(b'{"v":1}', DOCKER), manifest(b'{"v":2}', INDEX)
    await store.put_tag(HUB, "library/alpine", "latest", record(old, 1000.0))
    await store.put_tag(HUB, "library/alpine", "latest", record(new, 2000.25))
    assert await store.get_tag(HUB, "library/alpine", "latest") == record(new, 2000.25)


# --- negative cache ----------------------------------------------------------------------


async def test_negative_entry_expires(store: MetadataStore, backend: Backend) -> None:
    await store.put_missing(HUB, "library/alpine", "nope", 0.2)
    assert await store.get_missing(HUB, "library/alpine", "nope") is True
    await backend.pass_time(0.35)
    assert await store.get_missing(HUB, "library/alpine", "nope") is False


async def test_later_negative_entry_replaces_the_earlier(
    store: MetadataStore, backend: Backend
) -> None:
    await store.put_missing(HUB, "library/alpine", "short", 0.2)
    await store.put_missing(HUB, "library/alpine", "short", 60)
    await store.put_missing(HUB, "library/alpine", "zero", 60)
    await store.put_missing(HUB, "library/alpine", "zero", 0)
    await backend.pass_time(0.35)
    assert await store.get_missing(HUB, "library/alpine", "short") is True
    assert await store.get_missing(HUB, "library/alpine", "zero") is False


# --- persistence and concurrency ---------------------------------------------------------


async def test_data_survives_closing_and_reopening(backend: Backend) -> None:
    m = manifest(bytes(range(256)))
    first = await backend.open()
    try:
        await first.put_manifest(HUB, "library/alpine", m)
        await first.put_tag(HUB, "library/alpine", "latest", record(m))
        await first.put_missing(HUB, "library/alpine", "nope", 60)
    finally:
        await first.close()

    second = await backend.open()
    try:
        assert await second.get_manifest(HUB, "library/alpine", m.digest) == m
        assert await second.get_tag(HUB, "library/alpine", "latest") == record(m)
        assert await second.get_missing(HUB, "library/alpine", "nope") is True
    finally:
        await second.close()


async def test_concurrent_puts_and_gets(store: MetadataStore) -> None:
    async def worker(n: int) -> None:
        repository = f"team/app-{n % 8}"
        m = manifest(f'{{"n":{n}}}'.encode() + bytes([n % 256]) * n)
        await store.put_manifest(HUB, repository, m)
        await store.put_tag(HUB, repository, f"v{n}", record(m, float(n)))
        await store.put_missing(HUB, repository, f"gone{n}", 60)
        assert await store.get_manifest(HUB, repository, m.digest) == m
        assert await store.get_tag(HUB, repository, f"v{n}") == record(m, float(n))
        assert await store.get_missing(HUB, repository, f"gone{n}") is True

    await asyncio.gather(*(worker(n) for n in range(64)))

    shared = manifest(b'{"shared":true}')
    await asyncio.gather(
        *(store.put_manifest(HUB, "library/alpine", shared) for _ in range(16)),
        *(store.put_tag(HUB, "library/alpine", "latest", record(shared)) for _ in range(16)),
    )
    gets = await asyncio.gather(
        *(store.get_manifest(HUB, "library/alpine", shared.digest) for _ in range(32))
    )
    assert gets == [shared] * 32


# --- the Redis store beyond the contract -------------------------------------------------


@pytest_asyncio.fixture
async def fake_client() -> AsyncIterator[Redis]:
    client = fakeredis.aioredis.FakeRedis(server=fakeredis.FakeServer())
    try:
        yield client
    finally:
        await client.aclose()


async def test_redis_key_schema(fake_client: Redis) -> None:
    store = RedisStore(fake_client)
    m = manifest(b"{}")
    await store.put_manifest(HUB, "library/alpine", m)
    await store.put_tag(HUB, "library/alpine", "latest", record(m))
    await store.put_missing(HUB, "library/alpine", "nope", 60)
    await store.put_tag(HUB, "library/debian", "latest", record(m))

    keys = sorted(k.decode() if isinstance(k, bytes) else k for k in await fake_client.keys())
    alpine = "mirror:v1:{docker.io:library%2Falpine}"
    assert keys == [
        f"{alpine}:manifest:sha256%3A{m.digest.removeprefix('sha256:')}",
        f"{alpine}:missing:nope",
        f"{alpine}:tag:latest",
        "mirror:v1:{docker.io:library%2Fdebian}:tag:latest",
    ]
    # One cluster slot for everything of a repository.
    assert len({key_slot(key.encode()) for key in keys[:3]}) == 1
    # Manifests and tags stay; negative entries expire.
    assert await fake_client.pttl(keys[0]) == -1
    assert await fake_client.pttl(keys[2]) == -1
    assert 0 < await fake_client.pttl(keys[1]) <= 60_000


async def test_redis_store_refuses_a_decoding_client() -> None:
    client = fakeredis.aioredis.FakeRedis(decode_responses=True)
    try:
        with pytest.raises(ValueError, match="decode_responses"):
            RedisStore(client)
    finally:
        await client.aclose()


async def test_open_accepts_redis_rediss_and_unix_urls() -> None:
    for url, connection_class in [
        ("redis://:secret@redis.internal:6380/3", None),
        ("rediss://user:secret@redis.internal:6380/3", SSLConnection),
        ("unix:///run/redis/redis.sock?db=3&password=secret", UnixDomainSocketConnection),
    ]:
        store = await RedisStore.open(url, timeout=1.5)  # unreachable: the schema check is skipped
        pool = store._redis.connection_pool
        kwargs = pool.connection_kwargs
        assert (kwargs["db"], kwargs["password"]) == (3, "secret"), url
        assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (1.5, 1.5)
        if connection_class is not None:
            assert pool.connection_class is connection_class
        await store.close()


async def test_unix_socket_and_db_from_the_url(redis_server: RedisServer) -> None:
    await _flush_all(redis_server)
    m = manifest(b"{}")
    over_unix = await RedisStore.open(redis_server.unix_url(db=5))
    db0 = await RedisStore.open(redis_server.url(db=0))
    db5 = await RedisStore.open(redis_server.url(db=5))
    try:
        await over_unix.put_manifest(HUB, "library/alpine", m)
        assert await db5.get_manifest(HUB, "library/alpine", m.digest) == m
        assert await db0.get_manifest(HUB, "library/alpine", m.digest) is None
    finally:
        for store in (over_unix, db0, db5):
            await store.close()


async def test_password_from_the_url() -> None:
    with RedisServer(require_binary("redis-server"), password="s3cr%t/:@ x") as server:
        good = await RedisStore.open(server.url())
        over_unix = await RedisStore.open(server.unix_url(db=2))
        bad = await RedisStore.open(f"redis://127.0.0.1:{server.port}/0")
        try:
            assert await good.ping() is True
            assert await over_unix.ping() is True
            await good.put_missing(HUB, "library/alpine", "nope", 60)
            assert await good.get_missing(HUB, "library/alpine", "nope") is True
            assert await bad.ping() is False
            with pytest.raises(StoreUnavailable):
                await bad.get_missing(HUB, "library/alpine", "nope")
        finally:
            for store in (good, over_unix, bad):
                await store.close()


async def _flush_all(server: RedisServer) -> None:
    client = Redis.from_url(server.url())
    try:
        await client.flushall()
    finally:
        await client.aclose()


async def _every_call_fails_fast(store: RedisStore, within: float) -> None:
    m = manifest(b"{}")
    calls = [
        store.get_manifest(HUB, "library/alpine", m.digest),
        store.put_manifest(HUB, "library/alpine", m),
        store.get_tag(HUB, "library/alpine", "latest"),
        store.put_tag(HUB, "library/alpine", "latest", record(m)),
        store.get_missing(HUB, "library/alpine", "nope"),
        store.put_missing(HUB, "library/alpine", "nope", 60),
    ]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(call, timeout=10)
        assert time.monotonic() - started < within
    started = time.monotonic()
    assert await store.ping() is False
    assert time.monotonic() - started < within


async def test_stopped_redis_fails_fast_with_store_unavailable() -> None:
    with RedisServer(require_binary("redis-server")) as server:
        store = await RedisStore.open(server.url(), timeout=2.0)
        try:
            await store.put_missing(HUB, "library/alpine", "nope", 60)  # a pooled connection
            server.stop()
            await _every_call_fails_fast(store, within=3.0)
        finally:
            await store.close()


async def test_nothing_listening_fails_fast_with_store_unavailable() -> None:
    with RedisServer(require_binary("redis-server")) as server:
        server.stop()
        store = await RedisStore.open(server.url(), timeout=2.0)
        try:
            await _every_call_fails_fast(store, within=3.0)
        finally:
            await store.close()


async def test_silent_redis_times_out_with_store_unavailable() -> None:
    """A peer that accepts connections and never answers (a hung Redis, a black hole)."""
    held: list[asyncio.StreamWriter] = []

    async def never_answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = await RedisStore.open(f"redis://127.0.0.1:{port}/0", timeout=0.5)
    try:
        await _every_call_fails_fast(store, within=1.5)
    finally:
        await store.close()
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_redis_store_resumes_when_redis_comes_back() -> None:
    with RedisServer(require_binary("redis-server")) as server:
        store = await RedisStore.open(server.url(), timeout=2.0)
        try:
            await store.put_missing(HUB, "library/alpine", "nope", 60)
            server.stop()
            with pytest.raises(StoreUnavailable):
                await store.get_missing(HUB, "library/alpine", "nope")
            server.start()  # same port, empty: nothing was saved
            assert await store.ping() is True
            assert await store.get_missing(HUB, "library/alpine", "nope") is False
            await store.put_missing(HUB, "library/alpine", "nope", 60)
            assert await store.get_missing(HUB, "library/alpine", "nope") is True
        finally:
            await store.close()


async def test_every_tag_is_listed_with_its_record(store: MetadataStore) -> None:
    first, second = manifest(b'{"a":1}'), manifest(b'{"b":2}')
    await store.put_tag(HUB, "library/alpine", "3.20", record(first))
    await store.put_tag(HUB, "library/alpine", "latest", record(second, 1_718_000_001.25))
    await store.put_tag("ghcr.io", "acme/odd:name", "v1.0_rc", record(first))
    await store.put_missing(HUB, "library/alpine", "gone", 60)
    listed = [(t.registry, t.repository, t.tag, t.record) for t in await store.list_tags()]
    assert sorted(listed, key=str) == sorted(
        [
            (HUB, "library/alpine", "3.20", record(first)),
            (HUB, "library/alpine", "latest", record(second, 1_718_000_001.25)),
            ("ghcr.io", "acme/odd:name", "v1.0_rc", record(first)),
        ],
        key=str,
    )


async def test_tags_of_one_repository_are_listed_alone(store: MetadataStore) -> None:
    first = manifest(b'{"a":1}')
    await store.put_tag(HUB, "library/alpine", "3.20", record(first))
    await store.put_tag(HUB, "library/alpine", "edge", record(first))
    await store.put_tag(HUB, "library/alpine2", "x", record(first))
    await store.put_tag("ghcr.io", "library/alpine", "y", record(first))
    await store.put_tag(HUB, "a*b", "z", record(first))  # a glob character in a name
    listed = await store.list_tags(HUB, "library/alpine")
    assert [(t.registry, t.repository, t.tag) for t in listed] == [
        (HUB, "library/alpine", "3.20"),
        (HUB, "library/alpine", "edge"),
    ]
    assert [t.tag for t in await store.list_tags(HUB, "a*b")] == ["z"]
    assert await store.list_tags(HUB, "nothing/here") == []


async def test_kept_referrers_answers_are_read_back_but_never_listed_as_tags(
    store: MetadataStore,
) -> None:
    first, answer = manifest(b'{"a":1}'), manifest(b'{"manifests":[]}')
    subject = "sha256:" + "c" * 64
    await store.put_tag(HUB, "library/alpine", "3.20", record(first))
    await store.put_tag(HUB, "library/alpine", referrers_key(subject), record(answer))
    assert await store.get_tag(HUB, "library/alpine", referrers_key(subject)) == record(answer)
    assert [t.tag for t in await store.list_tags()] == ["3.20"]
    assert [t.tag for t in await store.list_tags(HUB, "library/alpine")] == ["3.20"]


async def test_pins_are_added_listed_and_removed(store: MetadataStore) -> None:
    assert await store.pins() == []
    await store.add_pins(["docker.io/library/alpine:3.20", "ghcr.io/acme/tool@sha256:" + "a" * 64])
    await store.add_pins(["docker.io/library/alpine:3.20"])  # again: still one pin
    assert await store.pins() == [
        "docker.io/library/alpine:3.20",
        "ghcr.io/acme/tool@sha256:" + "a" * 64,
    ]
    assert await store.remove_pins(["docker.io/library/alpine:3.20", "not/pinned"]) == 1
    assert await store.pins() == ["ghcr.io/acme/tool@sha256:" + "a" * 64]
    await store.add_pins([])
    assert await store.remove_pins([]) == 0
