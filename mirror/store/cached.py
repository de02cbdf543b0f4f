"""An in-process LRU in front of any metadata store.

Hot manifests and tag records are answered from memory, so a tag pulled inside its
freshness window touches neither the disk nor Redis. Tag records are cached with the
time the upstream confirmed them and trusted only inside the freshness window: past it
the inner store is asked again, since another replica may have revalidated the tag.
"""

from __future__ import annotations

import time

from cachetools import LRUCache

from mirror.store.protocols import Manifest, MetadataStore, TagRecord


class CachedStore:
    def __init__(self, inner: MetadataStore, *, max_entries: int, tag_ttl: float) -> None:
        self.inner = inner
        self._tag_ttl = tag_ttl
        self._manifests: LRUCache[tuple[str, str, str], Manifest] = LRUCache(max_entries)
        self._tags: LRUCache[tuple[str, str, str], TagRecord] = LRUCache(max_entries)

    async def get_manifest(self, registry: str, repository: str, digest: str) -> Manifest | None:
        key = (registry, repository, digest)
        manifest = self._manifests.get(key)
        if manifest is None:
            manifest = await self.inner.get_manifest(registry, repository, digest)
            if manifest is not None:
                self._manifests[key] = manifest
        return manifest

    async def put_manifest(self, registry: str, repository: str, manifest: Manifest) -> None:
        await self.inner.put_manifest(registry, repository, manifest)
        self._manifests[(registry, repository, manifest.digest)] = manifest

    async def get_tag(self, registry: str, repository: str, tag: str) -> TagRecord | None:
        key = (registry, repository, tag)
        record = self._tags.get(key)
        if record is not None and time.time() - record.checked_at < self._tag_ttl:
            return record
        record = await self.inner.get_tag(registry, repository, tag)
        if record is not None:
            self._tags[key] = record
        return record

    async def put_tag(self, registry: str, repository: str, tag: str, record: TagRecord) -> None:
        await self.inner.put_tag(registry, repository, tag, record)
        self._tags[(registry, repository, tag)] = record

    async def get_missing(self, registry: str, repository: str, tag: str) -> bool:
        return await self.inner.get_missing(registry, repository, tag)

    async def put_missing(self, registry: str, repository: str, tag: str, ttl: float) -> None:
        await self.inner.put_missing(registry, repository, tag, ttl)

    async def ping(self) -> bool:
        return await self.inner.ping()

    async def close(self) -> None:
        await self.inner.close()
