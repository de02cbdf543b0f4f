"""What the cache holds: the one place where a blob's record in the content graph changes.

The file on disk is the truth and the graph's record follows it. A blob is recorded
present when it has landed, and absent only after the copy that was inspected is gone;
whoever records an absence then looks at the disk again, so a copy that a fill or an
import landed meanwhile stays recorded present (and counted, and evictable).

Eviction (and its reconciliation at start), ``gc``, ``verify``, fills and ``import`` all
go through :class:`Content`; nobody else writes ``blob_stored``, ``blobs_removed`` or
``reconcile``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

from mirror.reference import Digest
from mirror.store.blobs import BlobStore
from mirror.store.graph import ContentGraph


class Content:
    def __init__(
        self, blobs: BlobStore, graph: ContentGraph, clock: Callable[[], float] = time.time
    ) -> None:
        self.blobs = blobs
        self._graph = graph
        self._clock = clock

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
        """Align every record with the disk (a walk of it: once, at start)."""
        await self._graph.reconcile(await asyncio.to_thread(self.blobs.on_disk))

    async def gone(self, digest: Digest) -> None:
        """A blob was found missing, or was removed: record it absent, then look again."""
        await self._graph.blobs_removed([str(digest)])
        found = await self.inspect(digest)
        if found is not None:  # landed again between the removal and its record
            await self.landed(digest, found.st_size)
