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
from collections.abc import AsyncIterator, Callable
from typing import BinaryIO

import structlog

from mirror.content.blobs import MemoryCopy
from mirror.content.graph import ContentGraph
from mirror.content.storage import BlobStorage, BlobWriter, Copy, StorageError
from mirror.domain.reference import Digest

log = structlog.get_logger(__name__)


class Content:
    def __init__(
        self, blobs: BlobStorage, graph: ContentGraph, clock: Callable[[], float] = time.time
    ) -> None:
        self.blobs = blobs
        self._graph = graph
        self._clock = clock

    @property
    def local(self) -> bool:
        """Whether landed blobs are local files (sent with sendfile); else they stream
        from object storage (:meth:`chunks`)."""
        return self.blobs.local

    def present(self, digest: Digest) -> int | None:
        """The size of a blob that has landed, or None (one stat, or a lookup in memory for
        object storage, where another replica's blob may be missing: :meth:`find`)."""
        return self.blobs.size(digest)

    async def find(self, digest: Digest) -> int | None:
        """As :meth:`present`, but asking object storage when this process does not know:
        for whoever is about to fetch a blob from upstream, which another replica may have
        landed. The same stat for a local disk."""
        size = self.blobs.size(digest)
        if size is None and not self.blobs.local:
            try:
                size = await asyncio.to_thread(self.blobs.locate, digest)
            except StorageError:
                return None  # down: the blob comes from upstream, unstored, meanwhile
        return size

    def has_local(self, digest: Digest) -> bool:
        """Whether a landed blob has a local file for sendfile (in object storage: a copy
        in the hot tier; one stat)."""
        return self.blobs.has_local(digest)

    def open_local(self, digest: Digest) -> BinaryIO:
        """That local file (blocking); FileNotFoundError when it is gone."""
        return self.blobs.open_local(digest)

    def warm(self, digest: Digest, size: int) -> None:
        """A blob went out from object storage: keep a copy in the hot tier, if any."""
        self.blobs.warm(digest, size)

    def chunks(self, digest: Digest, start: int, stop: int) -> AsyncIterator[bytes]:
        """Bytes ``start``..``stop`` of a landed blob as they are read (object storage passes
        the range on); FileNotFoundError before the first when it is gone."""
        return self.blobs.chunks(digest, start, stop)

    async def presign(self, digest: Digest) -> str | None:
        """A URL a client may fetch the blob from itself (object storage with redirects)."""
        return await self.blobs.presign(digest)

    async def reachable(self) -> bool:
        """Whether the storage answers now (object storage; a disk always does)."""
        return await self.blobs.reachable()

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

    def new_partial(self, digest: Digest, spool: BlobWriter | None = None) -> BlobWriter:
        """Somewhere to write a blob before it lands (blocking): into ``spool`` (empty, from
        :meth:`new_spool`) when readers already read that."""
        return self.blobs.new_partial(digest, spool)

    def new_spool(self, digest: Digest) -> BlobWriter:
        """A local file for the readers of another replica's fill in object storage, the
        landed object copied into it (blocking); its writer discards it."""
        return self.blobs.new_spool(digest)

    async def land(
        self,
        partial: BlobWriter,
        digest: Digest,
        *,
        at: float | None = None,
        committed: Callable[[], None] = lambda: None,
    ) -> bool:
        """A blob whose bytes the writer verified against ``digest``: commit it atomically,
        tell ``committed`` (a fill lets its readers finish, before any graph call), then
        record it present. The blob has landed even if recording fails: the record follows
        at the next reconciliation. False when the storage refused it (object storage
        down): nothing was stored, and the writer's readers still finish. Cut short by a
        stop, object storage keeps nothing of it (a disk may: recorded at the next
        reconciliation)."""
        stored = await partial.complete()
        committed()
        if not stored:
            return False
        try:
            await self.landed(digest, partial.written, at)
        except Exception as exc:  # the graph serves eviction and listing, not the pull
            log.warning("graph_not_updated", digest=str(digest), error=str(exc))
        return True

    async def quarantine(self, digest: Digest, opened: os.stat_result) -> bool:
        """Take a blob found damaged while served out of service (the copy ``opened``)."""
        return await asyncio.to_thread(self.blobs.quarantine, digest, Copy.of(opened))

    def copy_of(self, file: BinaryIO) -> Copy:
        """Which copy of a blob an opened one is (what :meth:`remove` may remove)."""
        return self.blobs.copy_of(file)

    async def sweep(self, *, dry_run: bool = False, now: float | None = None) -> int:
        """Remove what crashed writers left (or only count it): partial files, and uploads
        to object storage abandoned for over an hour before ``now``."""
        return await asyncio.to_thread(self.blobs.sweep, dry_run=dry_run, now=now)

    async def on_disk(self) -> dict[str, tuple[int, float]]:
        """Every landed blob: digest -> (size, modification time). A walk of all of them."""
        return await asyncio.to_thread(self.blobs.on_disk)

    async def writable(self) -> bool:
        return await asyncio.to_thread(self.blobs.writable)

    async def landed(self, digest: Digest, size: int, at: float | None = None) -> None:
        """A blob's file appeared at its final path, verified: record it present."""
        await self._graph.blob_stored(str(digest), size, self._clock() if at is None else at)

    async def inspect(self, digest: Digest) -> Copy | None:
        """The blob's file as it is now, for :meth:`remove`; None when it is not on disk."""
        return await asyncio.to_thread(self.blobs.stat, digest)

    async def remove(self, digest: Digest, inspected: Copy) -> bool:
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
                await self.landed(digest, found.size)

    async def gone(self, digest: Digest) -> None:
        """A blob was found missing, or was removed: record it absent, then look again."""
        await self._graph.blobs_removed([str(digest)])
        found = await self.inspect(digest)
        if found is not None:  # landed again between the removal and its record
            await self.landed(digest, found.size)
