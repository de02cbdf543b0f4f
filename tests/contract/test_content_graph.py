"""What every content graph promises, run against each store (see conftest.py)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import fakeredis
import fakeredis.aioredis
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from mirror.content.embedded import EmbeddedStore
from mirror.content.graph import BlobEntry, Usage
from mirror.content.protocols import MetadataStore
from mirror.content.redis_store import RedisStore
from mirror.content.schema import VERSION
from mirror.domain.manifests import Manifest, parse
from mirror.services.closure import blobs_needed
from tests.support.oci import make_image, make_index, make_layer
from tests.support.redis_server import RedisServer

HUB = "docker.io"


async def test_an_index_needs_the_blobs_of_its_children(store: MetadataStore) -> None:
    amd64 = make_image([make_layer(b"a"), make_layer(b"shared")], arch="amd64")
    arm64 = make_image([make_layer(b"b"), make_layer(b"shared")], arch="arm64")
    index = make_index([amd64, arm64])
    graph = store.graph
    await graph.add_manifest(HUB, "library/app", index.digest, parse(index.index, ""))
    top = Manifest(index.index, index.media_type, index.digest)
    await store.put_manifest(HUB, "library/app", top)
    for image in (amd64, arm64):
        await graph.add_manifest(HUB, "library/app", image.digest, parse(image.manifest, ""))
        manifest = Manifest(image.manifest, image.media_type, image.digest)
        await store.put_manifest(HUB, "library/app", manifest)
    needed = await blobs_needed(store, HUB, "library/app", index.digest)
    expected = {blob.digest: blob.size for image in (amd64, arm64) for blob in image.blobs}
    assert needed == expected
    assert await blobs_needed(store, HUB, "library/app", amd64.digest) == {
        blob.digest: blob.size for blob in amd64.blobs
    }
    shared = amd64.blobs[-1].digest
    await graph.add_manifest("ghcr.io", "acme/app", amd64.digest, parse(amd64.manifest, ""))
    assert await graph.holders(shared) == {(HUB, "library/app"), ("ghcr.io", "acme/app")}
    assert await graph.unreferenced([shared, "sha256:" + "0" * 64]) == {"sha256:" + "0" * 64}


async def test_blobs_come_out_least_recently_pulled_first(store: MetadataStore) -> None:
    graph = store.graph
    digests = [f"sha256:{n:064x}" for n in range(5)]
    for n, digest in enumerate(digests):
        await graph.blob_stored(digest, 100 * (n + 1), at=1000.0 + n)
    assert await graph.usage() == Usage(5, 1500)
    await graph.record_pulls({digests[0]: 2000.0, digests[1]: 500.0}, {})  # never backwards
    oldest = await graph.oldest_blobs(3)
    assert [entry.digest for entry in oldest] == [digests[1], digests[2], digests[3]]
    assert oldest[0] == BlobEntry(digests[1], 200, 1001.0)
    page = await graph.oldest_blobs(10, after=(oldest[-1].last_pulled, oldest[-1].digest))
    assert [entry.digest for entry in page] == [digests[4], digests[0]]
    await graph.blobs_removed([digests[1], digests[1]])
    assert await graph.usage() == Usage(4, 1300)
    assert digests[1] not in [entry.digest for entry in await graph.oldest_blobs(10)]
    await graph.blob_stored(digests[1], 200, at=3000.0)  # fetched again
    assert (await graph.oldest_blobs(10))[-1].digest == digests[1]
    assert await graph.usage() == Usage(5, 1500)


async def test_paging_goes_through_blobs_pulled_at_one_instant(store: MetadataStore) -> None:
    """``import`` stamps every blob with one time: paging must not stop inside the tie."""
    graph = store.graph
    tied = {f"sha256:{n:064x}": (10, 1000.0) for n in range(2000)}
    newer = "sha256:" + "f" * 64
    await graph.reconcile({**tied, newer: (10, 2000.0)})
    seen: list[str] = []
    after: tuple[float, str] | None = None
    while page := await graph.oldest_blobs(500, after):  # as eviction and verify page
        seen.extend(entry.digest for entry in page)
        after = (page[-1].last_pulled, page[-1].digest)
    assert len(seen) == 2001
    assert seen == [*sorted(tied), newer]


async def test_reconcile_aligns_records_with_the_disk(store: MetadataStore) -> None:
    graph = store.graph
    kept, gone, found = (f"sha256:{n:064x}" for n in range(3))
    await graph.blob_stored(kept, 10, at=1.0)
    await graph.blob_stored(gone, 20, at=2.0)
    await graph.reconcile({kept: (10, 1.0), found: (30, 5.0)})
    assert await graph.usage() == Usage(2, 40)
    assert {entry.digest for entry in await graph.oldest_blobs(10)} == {kept, found}


async def test_image_pulls_are_recorded_in_batches(store: MetadataStore) -> None:
    digest, other = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    await store.graph.record_pulls({}, {(HUB, "library/app", digest): 5.0})
    await store.graph.record_pulls({}, {(HUB, "library/app", digest): 3.0})  # never back
    await store.graph.record_pulls({}, {(HUB, "library/app", other): 7.5})
    assert await store.graph.last_pulls(HUB, "library/app") == {digest: 5.0, other: 7.5}
    assert await store.graph.last_pulls(HUB, "library/other") == {}


async def test_tag_pulls_are_counted_and_ranked(store: MetadataStore) -> None:
    graph = store.graph
    assert await graph.most_pulled(5) == []
    await graph.record_pulls({}, {}, {(HUB, "library/app", "1.0"): 3, ("ghcr.io", "a:b/c", "x"): 1})
    await graph.record_pulls({}, {}, {(HUB, "library/app", "1.0"): 2, (HUB, "library/db", "16"): 4})
    assert await graph.most_pulled(5) == [
        ((HUB, "library/app", "1.0"), 5),
        ((HUB, "library/db", "16"), 4),
        (("ghcr.io", "a:b/c", "x"), 1),
    ]
    assert await graph.most_pulled(1) == [((HUB, "library/app", "1.0"), 5)]


def test_an_old_data_dir_is_migrated_in_place(tmp_path: Path) -> None:
    image = make_image([make_layer(b"old")])
    with sqlite3.connect(tmp_path / "metadata.sqlite3") as db:
        db.executescript(
            "CREATE TABLE manifests (registry TEXT NOT NULL, repository TEXT NOT NULL,"
            " digest TEXT NOT NULL, media_type TEXT NOT NULL, body BLOB NOT NULL,"
            " PRIMARY KEY (registry, repository, digest));"
        )
        db.execute(
            "INSERT INTO manifests VALUES (?, ?, ?, ?, ?)",
            (HUB, "library/old", image.digest, json.loads(image.manifest)["mediaType"],
             image.manifest),
        )  # fmt: skip
    store = EmbeddedStore(tmp_path / "metadata.sqlite3")
    try:
        with sqlite3.connect(tmp_path / "metadata.sqlite3") as db:
            assert db.execute("PRAGMA user_version").fetchone() == (VERSION,)
            edges = db.execute("SELECT child, kind FROM edges").fetchall()
            plan = db.execute(
                "EXPLAIN QUERY PLAN SELECT digest, size, last_pulled FROM blobs WHERE present = 1"
                " AND (last_pulled, digest) > (?, ?) ORDER BY last_pulled, digest LIMIT ?",
                (0.0, "", 10),
            ).fetchall()
    finally:
        store._db.close()
    assert sorted(edges) == sorted((blob.digest, "blob") for blob in image.blobs)
    # Eviction's query walks the index: no scan of the table, no sort of its rows.
    details = " ".join(row[-1] for row in plan)
    assert "SEARCH blobs USING INDEX blobs_by_last_pull" in details
    assert "SCAN" not in details
    assert "TEMP B-TREE" not in details


@pytest_asyncio.fixture(params=["fakeredis", "redis"])
async def redis_client(request: pytest.FixtureRequest) -> AsyncIterator[Redis]:
    """One Redis that several stores share, as replicas do."""
    client: Redis
    if request.param == "fakeredis":
        client = fakeredis.aioredis.FakeRedis(server=fakeredis.FakeServer())
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        client = Redis.from_url(server.url())
        await client.flushall()
    try:
        yield client
    finally:
        await client.aclose()


async def test_storages_sharing_redis_keep_their_own_blob_records(redis_client: Redis) -> None:
    """Replicas with data dirs of their own: blob records are each storage's, what the
    manifests reference is everyone's."""
    first, second = (RedisStore(redis_client, scope=name).graph for name in ("a", "b"))
    image = make_image([make_layer(b"shared layer")])
    layer, other = image.blobs[-1].digest, "sha256:" + "e" * 64
    await first.blob_stored(layer, 100, at=1.0)
    await second.reconcile({other: (50, 2.0)})  # the second's disk has only its own blob
    assert await first.usage() == Usage(1, 100)
    assert [entry.digest for entry in await first.oldest_blobs(10)] == [layer]
    assert await second.usage() == Usage(1, 50)
    await first.add_manifest(HUB, "library/app", image.digest, parse(image.manifest, ""))
    assert await second.holders(layer) == {(HUB, "library/app")}
    assert await second.unreferenced([layer, other]) == {other}


async def test_blob_records_of_an_older_release_are_taken_over(redis_client: Redis) -> None:
    """Blob records written before they were scoped (keys without a storage) are taken
    over by the first reconciliation: the last pulls of the blobs on this disk are kept,
    the old keys removed."""
    kept, gone = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    for digest, size in ((kept, 100), (gone, 50)):
        await redis_client.hset(
            f"mirror:v1:{{graph}}:blob:sha256%3A{digest[7:]}",
            mapping={"size": size, "present": 1, "last_pulled": "5000.0"},
        )
        await redis_client.zadd("mirror:v1:{graph}:lru", {digest: 5000.0})
    await redis_client.hset("mirror:v1:{graph}:usage", mapping={"blobs": 2, "bytes": 150})
    graph = RedisStore(redis_client, scope="a").graph
    fresh = "sha256:" + "3" * 64
    await graph.reconcile({kept: (100, 10.0), fresh: (30, 20.0)})
    assert await graph.usage() == Usage(2, 130)
    assert await graph.oldest_blobs(10) == [
        BlobEntry(fresh, 30, 20.0),
        BlobEntry(kept, 100, 5000.0),  # its last pull, not the file's age
    ]
    assert await redis_client.keys("mirror:v1:{graph}:blob:*") == []
    assert not await redis_client.exists("mirror:v1:{graph}:lru", "mirror:v1:{graph}:usage")


async def test_a_reconciled_graph_says_so(store: MetadataStore) -> None:
    """Eviction trusts the counts only after a reconcile: a graph that lost its records
    (a Redis restarted empty) must not claim to be aligned with the disk."""
    graph = store.graph
    left = "sha256:" + "6" * 64
    await graph.blob_stored(left, 5, at=1.0)
    # What it marks absent is said, so the caller can look again (a fill may have landed it).
    assert await graph.reconcile({"sha256:" + "4" * 64: (10, 1.0)}) == [left]
    await graph.blob_stored("sha256:" + "5" * 64, 20, at=2.0)
    usage = await graph.usage()
    assert (usage, usage.reconciled) == (Usage(2, 30), True)


async def test_a_redis_that_lost_its_keys_is_no_longer_reconciled(redis_client: Redis) -> None:
    graph = RedisStore(redis_client, scope="a").graph
    assert not (await graph.usage()).reconciled  # nothing aligned it yet
    await graph.reconcile({"sha256:" + "4" * 64: (10, 1.0)})
    assert (await graph.usage()).reconciled
    await redis_client.flushall()
    await graph.blob_stored("sha256:" + "5" * 64, 20, at=2.0)  # landed after the loss
    usage = await graph.usage()
    assert (usage, usage.reconciled) == (Usage(1, 20), False)
