"""What the cache holds: the one place where a blob lands, is found, and leaves, and where
its record in the content graph changes.

The file on disk is the truth and the graph's record follows it. A blob is recorded
present when it has landed, and absent only after the copy that was inspected is gone;
whoever records an absence then looks at the disk again, so a copy that a fill or an
import landed meanwhile stays recorded present (and counted, and evictable).

Eviction (and its reconciliation at start), ``gc``, ``verify``, fills and ``import`` all
go through :class:`Content`; nobody else writes ``blob_stored``, ``blobs_removed`` or
``reconcile``. Its bytes sit behind :class:`~mirror.content.storage.BlobStorage`; nobody
outside this layer builds a blob's path, renames a blob file or opens one by name.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import BinaryIO

import structlog

from mirror.content.blobs import MemoryCopy
from mirror.content.graph import ContentGraph
from mirror.content.storage import BlobStorage, BlobWriter
from mirror.domain.reference import Digest

log = structlog.get_logger(__name__)


class Content:
    def __init__(
        self, blobs: BlobStorage, graph: ContentGraph, clock: Callable[[], float] = time.time
    ) -> None:
        self.blobs = blobs
        self._graph = graph
        self._clock = clock

    def present(self, digest: Digest) -> int | None:
        """The size of a blob that has landed, or None (one stat: fit for the hot path)."""
        return self.blobs.size(digest)

    def open(self, digest: Digest) -> BinaryIO:
        """A landed blob's bytes, for serving (blocking: off the loop); FileNotFoundError
        when it is gone."""
        return self.blobs.open(digest)

    def open_landed(self, digest: Digest) -> int | None:
        """A descriptor on a landed blob, or None (blocking, but cheap: a follower's poll)."""
        return self.blobs.open_landed(digest)

    def open_partial(self, digest: Digest, name: str) -> int | None:
        """A descriptor on another writer's blob in progress, or None when it is gone."""
        return self.blobs.open_partial(digest, name)

    def read(self, digest: Digest) -> MemoryCopy | None:
        """A landed blob's whole bytes (blocking: for small blobs, off the loop)."""
        return self.blobs.read(digest)

    def new_partial(self, digest: Digest) -> BlobWriter:
        """Somewhere to write a blob before it lands (blocking)."""
        return self.blobs.new_partial(digest)

    async def land(
        self,
        partial: BlobWriter,
        digest: Digest,
        *,
        at: float | None = None,
        committed: Callable[[], None] = lambda: None,
    ) -> None:
        """A blob whose bytes the writer verified against ``digest``: commit it atomically,
        tell ``committed`` (a fill lets its readers finish, before any graph call), then
        record it present. The blob has landed even if recording fails: the record follows
        at the next reconciliation."""
        await asyncio.to_thread(partial.commit)
        committed()
        try:
            await self.landed(digest, partial.written, at)
        except Exception as exc:  # the graph serves eviction and listing, not the pull
            log.warning("graph_not_updated", digest=str(digest), error=str(exc))

    async def quarantine(self, digest: Digest, opened: os.stat_result) -> bool:
        """Take a blob found damaged while served out of service (the copy ``opened``)."""
        return await asyncio.to_thread(self.blobs.quarantine, digest, opened)

    async def sweep(self, *, dry_run: bool = False) -> int:
        """Remove what crashed writers left (or only count it)."""
        return await asyncio.to_thread(self.blobs.sweep, dry_run=dry_run)

    async def on_disk(self) -> dict[str, tuple[int, float]]:
        """Every landed blob: digest -> (size, modification time). A walk of all of them."""
        return await asyncio.to_thread(self.blobs.on_disk)

    async def writable(self) -> bool:
        return await asyncio.to_thread(self.blobs.writable)

    async def landed(self, digest: Digest, size: int, at: float | None = None) -> None:
        """A blob's file appeared at its final path, verified: record it present."""
        await self._graph.blob_stored(str(digest), size, self._clock() if at is None else at)

    async def inspect(self, digest: Digest) -> os.stat_result | None:
        """The blob's file as it is now, for :meth:`remove`; None when it is not on disk."""
        return await asyncio.to_thread(self.blobs.stat, digest)

    async def remove(self, digest: Digest, inspected: os.stat_result) -> bool:
        """Remove the copy that was inspected, and record it right away: absent, unless
        another copy landed meanwhile. Whether the inspected copy went."""
        removed = await asyncio.to_thread(self.blobs.remove, digest, inspected)
        await self.gone(digest)
        return removed

    async def reconcile(self) -> None:
        """Align every record with the disk (a walk of it: at start, and after the graph
        missed landings). Pulls go on meanwhile: a blob that landed after the walk is
        looked at again, not left on disk recorded absent."""
        for name in await self._graph.reconcile(await self.on_disk()):
            digest = Digest.parse(name)
            if (found := await self.inspect(digest)) is not None:
                await self.landed(digest, found.st_size)

    async def gone(self, digest: Digest) -> None:
        """A blob was found missing, or was removed: record it absent, then look again."""
        await self._graph.blobs_removed([str(digest)])
        found = await self.inspect(digest)
        if found is not None:  # landed again between the removal and its record
            await self.landed(digest, found.st_size)
