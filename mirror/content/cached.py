"""An in-process LRU in front of any metadata store, which also rides out its outages.

Hot manifests and tag records are answered from memory, so a tag pulled inside its
freshness window touches neither the disk nor Redis. Tag records are cached with the
time the upstream confirmed them and trusted only inside the freshness window: past it
the inner store is asked again, since another replica may have revalidated the tag.

When the inner store is unavailable (Redis down, SQLite locked or its disk full), reads
fall back to what is in memory and then count as misses (the resolver asks the upstream),
writes are kept in memory only, and no request asks the inner store again until the one
probe of :class:`~mirror.health.StoreHealth` hears it answer, so no request waits on its
timeouts. That verdict is shared with every other user of the same Redis (the leases, the
upstreams' shared state). The content graph follows it too: while the store is down its
calls raise :class:`StoreUnavailable` at once (their callers already treat the graph as
best effort), and a graph call that finds the store gone takes it down for everyone.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping, Sequence
from typing import TypeVar

from cachetools import LRUCache

from mirror.clock import SYSTEM, Clock
from mirror.content.graph import BlobEntry, ContentGraph, ImageKey, TagKey, Usage
from mirror.content.protocols import MetadataStore, StoreUnavailable
from mirror.domain.manifests import Manifest, References, TaggedRecord, TagRecord
from mirror.health import StoreHealth

T = TypeVar("T")


# What an entry costs besides its body: the key, the record, the LRU's bookkeeping.
ENTRY_OVERHEAD = 512


class ManifestLRU(LRUCache[tuple[str, str, str], Manifest]):
    """Manifests kept in memory, bounded both in count and in bytes (a manifest may be up
    to 4 MiB, so a count alone does not bound the memory)."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        super().__init__(max_bytes, getsizeof=lambda m: len(m.body) + ENTRY_OVERHEAD)
        self.max_entries = max_entries

    def __setitem__(self, key: tuple[str, str, str], value: Manifest) -> None:
        if len(value.body) + ENTRY_OVERHEAD > self.maxsize:
            return  # larger than the whole bound: served, not kept
        while key not in self and len(self) >= self.max_entries:
            self.popitem()
        super().__setitem__(key, value)


TAG_RECHECK = 5.0


class CachedStore:
    def __init__(
        self,
        inner: MetadataStore,
        *,
        max_entries: int,
        tag_ttl: float,
        max_bytes: int = 64 * 1024 * 1024,
        clock: Clock = SYSTEM,
        health: StoreHealth | None = None,
    ) -> None:
        """``health`` is the verdict shared with the other users of the inner store's
        Redis, which their owner (the engine) closes; by default, one of this store's own."""
        self.inner = inner
        self._own_health = health is None
        self.health = health or StoreHealth(inner.ping, clock=clock)
        self._clock = clock
        self._tag_ttl = tag_ttl
        self._manifests = ManifestLRU(max_entries, max_bytes)
        self._tags: LRUCache[tuple[str, str, str], TagRecord] = LRUCache(max_entries)
        # When each tag was last read from the inner store: a record past its window (which
        # nothing revalidates: offline, or an upstream that is down) is read again at most
        # every TAG_RECHECK seconds, rather than on every request.
        self._tags_read: LRUCache[tuple[str, str, str], float] = LRUCache(max_entries)
        self._graph = _GuardedGraph(self)

    @property
    def manifest_bytes(self) -> int:
        """Bytes of manifests held in memory (bounded by ``max_bytes``)."""
        return int(self._manifests.currsize)

    @property
    def degraded(self) -> bool:
        return not self.health.available

    async def get_manifest(self, registry: str, repository: str, digest: str) -> Manifest | None:
        key = (registry, repository, digest)
        manifest = self._manifests.get(key)
        if manifest is None:
            manifest = await self._read(self.inner.get_manifest(registry, repository, digest))
            if manifest is not None:
                self._manifests[key] = manifest
        return manifest

    async def put_manifest(self, registry: str, repository: str, manifest: Manifest) -> None:
        self._manifests[(registry, repository, manifest.digest)] = manifest
        await self._write(self.inner.put_manifest(registry, repository, manifest))

    async def get_tag(self, registry: str, repository: str, tag: str) -> TagRecord | None:
        key = (registry, repository, tag)
        cached = self._tags.get(key)
        now = self._clock.time()
        if cached is not None and (
            now - cached.checked_at < self._tag_ttl
            or now - self._tags_read.get(key, 0.0) < TAG_RECHECK
        ):
            return cached
        record = await self._read(self.inner.get_tag(registry, repository, tag))
        self._tags_read[key] = now
        if record is None:
            return cached  # what we knew, stale or not: the resolver decides
        if cached is None or record.checked_at >= cached.checked_at:
            self._tags[key] = record
            return record
        return cached

    async def put_tag(self, registry: str, repository: str, tag: str, record: TagRecord) -> None:
        self._tags[(registry, repository, tag)] = record
        await self._write(self.inner.put_tag(registry, repository, tag, record))

    async def get_missing(self, registry: str, repository: str, tag: str) -> bool:
        return bool(await self._read(self.inner.get_missing(registry, repository, tag)))

    async def put_missing(self, registry: str, repository: str, tag: str, ttl: float) -> None:
        await self._write(self.inner.put_missing(registry, repository, tag, ttl))

    @property
    def graph(self) -> ContentGraph:
        """The inner store's content graph, behind this store's outage mode."""
        return self._graph

    async def holders(self, blob: str) -> set[tuple[str, str]] | None:
        """The content graph's holders of a blob, for the request path: None while the
        store is down (nobody waits on it then)."""
        return await self._read(self.inner.graph.holders(blob))

    async def list_tags(
        self, registry: str | None = None, repository: str | None = None
    ) -> list[TaggedRecord]:
        return await self._guarded(self.inner.list_tags(registry, repository))

    async def pins(self) -> list[str]:
        return await self._guarded(self.inner.pins())

    async def add_pins(self, references: Sequence[str]) -> None:
        await self._guarded(self.inner.add_pins(references))

    async def remove_pins(self, references: Sequence[str]) -> int:
        return await self._guarded(self.inner.remove_pins(references))

    async def ping(self) -> bool:
        return await self.inner.ping()

    async def close(self) -> None:
        if self._own_health:
            await self.health.close()  # its probe pings through the inner store
        await self.inner.close()

    async def _read(self, call: Awaitable[T]) -> T | None:
        if not self._available():
            call.close()  # type: ignore[attr-defined]
            return None
        try:
            return await call
        except StoreUnavailable as exc:
            self.health.failed(exc)
            return None

    async def _write(self, call: Awaitable[None]) -> None:
        await self._read(call)

    async def _guarded(self, call: Awaitable[T]) -> T:
        """A graph call (or a listing): refused at once while the store is down, and a
        failure takes it down, as for the metadata calls; but raised, since its answer has
        no stand-in."""
        if not self._available():
            call.close()  # type: ignore[attr-defined]
            raise StoreUnavailable("the store is unavailable; a probe is waiting for it")
        try:
            return await call
        except StoreUnavailable as exc:
            self.health.failed(exc)
            raise

    def _available(self) -> bool:
        return self.health.available


class _GuardedGraph:
    """The content graph of a :class:`CachedStore`'s inner store, under its outage mode."""

    def __init__(self, store: CachedStore) -> None:
        self._store = store

    @property
    def _inner(self) -> ContentGraph:
        return self._store.inner.graph

    async def add_manifest(
        self, registry: str, repository: str, digest: str, refs: References
    ) -> None:
        await self._store._guarded(self._inner.add_manifest(registry, repository, digest, refs))

    async def blob_stored(self, digest: str, size: int, at: float) -> None:
        await self._store._guarded(self._inner.blob_stored(digest, size, at))

    async def blobs_removed(self, digests: Sequence[str]) -> None:
        await self._store._guarded(self._inner.blobs_removed(digests))

    async def record_pulls(
        self,
        blobs: Mapping[str, float],
        images: Mapping[ImageKey, float],
        tags: Mapping[TagKey, int] | None = None,
    ) -> None:
        await self._store._guarded(self._inner.record_pulls(blobs, images, tags))

    async def most_pulled(self, limit: int) -> list[tuple[TagKey, int]]:
        return await self._store._guarded(self._inner.most_pulled(limit))

    async def last_pulls(self, registry: str, repository: str) -> dict[str, float]:
        return await self._store._guarded(self._inner.last_pulls(registry, repository))

    async def oldest_blobs(
        self, limit: int, after: tuple[float, str] | None = None
    ) -> list[BlobEntry]:
        return await self._store._guarded(self._inner.oldest_blobs(limit, after))

    async def usage(self) -> Usage:
        return await self._store._guarded(self._inner.usage())

    async def holders(self, blob: str) -> set[tuple[str, str]]:
        return await self._store._guarded(self._inner.holders(blob))

    async def unreferenced(self, digests: Sequence[str]) -> set[str]:
        return await self._store._guarded(self._inner.unreferenced(digests))

    async def reconcile(self, on_disk: Mapping[str, tuple[int, float]]) -> list[str]:
        return await self._store._guarded(self._inner.reconcile(on_disk))
