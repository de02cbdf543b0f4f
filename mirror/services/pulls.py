"""Last-pull times, gathered on the request path and written to the content graph in batches.

The request path calls :meth:`PullRecorder.blob` and :meth:`PullRecorder.image`, each one
dict assignment. Every ``interval`` seconds (and on close) the batch goes to the graph in
one write; an image pull also refreshes the blobs that image needs, since a node that
already holds the layers pulls only the manifest, and its image is still in use.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

import structlog

from mirror.content.graph import ImageKey, TagKey
from mirror.content.protocols import MetadataStore
from mirror.logs import LogThrottle
from mirror.services.closure import blobs_needed

log = structlog.get_logger(__name__)

FLUSH_INTERVAL = 10.0


class PullRecorder:
    def __init__(
        self,
        store: MetadataStore,
        *,
        interval: float = FLUSH_INTERVAL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._graph = store.graph
        self._interval = interval
        self._clock = clock
        self._blobs: dict[str, float] = {}
        self._images: dict[ImageKey, float] = {}
        self._tags: Counter[TagKey] = Counter()
        self._throttle = LogThrottle()

    def blob(self, digest: str) -> None:
        self._blobs[digest] = self._clock()

    def image(self, registry: str, repository: str, digest: str, tag: str | None = None) -> None:
        self._images[(registry, repository, digest)] = self._clock()
        if tag is not None:
            self._tags[(registry, repository, tag)] += 1

    async def flush(self) -> None:
        blobs, images, tags = self._blobs, self._images, self._tags
        if not blobs and not images:
            return
        self._blobs, self._images, self._tags = {}, {}, Counter()
        try:
            for (registry, repository, digest), at in images.items():
                for blob in await blobs_needed(self._store, registry, repository, digest):
                    blobs[blob] = max(blobs.get(blob, at), at)
            await self._graph.record_pulls(blobs, images, tags)
        except Exception as exc:  # the times are a hint for eviction; losing a batch is fine
            suppressed = self._throttle.admit(type(exc).__name__)
            if suppressed is not None:
                log.warning("pull_times_not_recorded", error=str(exc), suppressed=suppressed)

    async def flush_forever(self) -> None:
        """Write the pull times every interval (the engine's background; it flushes once
        more after stopping this)."""
        while True:
            await asyncio.sleep(self._interval)
            await self.flush()
