"""The content graph: what the mirror holds, and how its parts hang together.

    registry/repository
        tags ──► manifest ──► child manifests (an index's platforms)
                     └──────► blobs (config and layers), each with its size
    blobs: size, present on disk or not, last pulled
    images: last pulled (per tag or manifest digest)

Manifests are recorded when they are stored, blobs when a fill lands on disk, pulls in
batches by :class:`mirror.services.pulls.PullRecorder` (never a write per request). Eviction reads
the blobs oldest-pull first from an index, ``gc`` what nothing references, ``ls`` and pins
what an image needs, access control which repositories hold a blob. The embedded store
(SQLite, ``mirror.content.graph_embedded``) and Redis (``mirror.content.graph_redis``) keep it
behind this one protocol, contract-tested alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from mirror.domain.manifests import References


@dataclass(frozen=True, slots=True)
class BlobEntry:
    digest: str
    size: int
    last_pulled: float


@dataclass(frozen=True, slots=True)
class Usage:
    blobs: int
    bytes: int
    # Does the graph still hold the mark its last reconcile left? Not when its records were
    # lost (a Redis restarted empty, or flushed): it then counts only what landed since.
    reconciled: bool = field(default=True, compare=False)


# An image pull: (registry, repository, manifest digest).
ImageKey = tuple[str, str, str]
# A tag: (registry, repository, tag).
TagKey = tuple[str, str, str]


class ContentGraph(Protocol):
    async def add_manifest(
        self, registry: str, repository: str, digest: str, refs: References
    ) -> None:
        """Record what a stored manifest references."""
        ...

    async def blob_stored(self, digest: str, size: int, at: float) -> None:
        """A blob landed on disk (verified); it counts as pulled ``at``."""
        ...

    async def blobs_removed(self, digests: Sequence[str]) -> None:
        """Blobs left the disk (evicted, repaired, found missing)."""
        ...

    async def record_pulls(
        self,
        blobs: Mapping[str, float],
        images: Mapping[ImageKey, float],
        tags: Mapping[TagKey, int] | None = None,
    ) -> None:
        """Last-pull times, a batch at once (a time never moves backwards); and how many
        times each tag was pulled in the batch, added to its count."""
        ...

    async def most_pulled(self, limit: int) -> list[tuple[TagKey, int]]:
        """The tags pulled most often, with their counts, most first."""
        ...

    async def last_pulls(self, registry: str, repository: str) -> dict[str, float]:
        """When each manifest of the repository was last pulled: digest -> time."""
        ...

    async def oldest_blobs(
        self, limit: int, after: tuple[float, str] | None = None
    ) -> list[BlobEntry]:
        """Present blobs, least recently pulled first, from after ``(last_pulled, digest)``."""
        ...

    async def usage(self) -> Usage:
        """How many blobs are present, and their bytes; and whether the records are those
        the last reconcile aligned (a store that cannot lose them says yes)."""
        ...

    async def holders(self, blob: str) -> set[tuple[str, str]]:
        """The (registry, repository) pairs holding a manifest that references ``blob``."""
        ...

    async def unreferenced(self, digests: Sequence[str]) -> set[str]:
        """Those of ``digests`` that no manifest references."""
        ...

    async def reconcile(self, on_disk: Mapping[str, tuple[int, float]]) -> list[str]:
        """Align blob records with the disk: ``on_disk`` maps every blob file present to its
        (size, modification time); records of blobs not in it are marked absent, and
        returned (the caller looks at the disk again: one may have landed since the walk).
        Leaves the mark :attr:`Usage.reconciled` looks for."""
        ...
