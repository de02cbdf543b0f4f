"""What the resolver and the fills need of an upstream registry.

Two implementations: :class:`mirror.upstream.client.UpstreamClient` speaks to a registry
over HTTP; :class:`mirror.upstream.offline.OfflineUpstream` stands in for every upstream of
an air-gapped mirror (``serve --offline``) and answers that nothing is there. The rest of
the mirror never asks which one it has.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Literal, Protocol

import aiohttp

from mirror.domain.manifests import Manifest
from mirror.domain.reference import Digest


@dataclass(frozen=True, slots=True)
class ManifestHead:
    digest: str
    media_type: str
    size: int | None


@dataclass(slots=True)
class BlobResponse:
    size: int | None
    content: aiohttp.StreamReader


@dataclass(frozen=True, slots=True)
class TagsPage:
    body: bytes
    content_type: str
    link: str | None


@dataclass(frozen=True, slots=True)
class ReferrersPage:
    body: bytes  # an image index
    link: str | None  # the next page, if the upstream pages its answer


@dataclass(frozen=True, slots=True)
class Health:
    """An upstream as ``/readyz`` reports it."""

    # True, False (circuit open), "unknown" (never asked yet) or "offline".
    reachable: bool | Literal["unknown", "offline"]
    ratelimit_remaining: int | None = None
    retry_after: float = 0.0


class Upstream(Protocol):
    name: str

    async def head_manifest(
        self, repository: str, reference: str, accept: Sequence[str]
    ) -> ManifestHead: ...

    async def get_manifest(
        self, repository: str, reference: str, accept: Sequence[str]
    ) -> Manifest: ...

    async def head_blob(self, repository: str, digest: Digest) -> int | None: ...

    def open_blob(
        self, repository: str, digest: Digest
    ) -> AbstractAsyncContextManager[BlobResponse]: ...

    async def get_tags(self, repository: str, query: Mapping[str, str]) -> TagsPage: ...

    async def get_referrers(
        self, repository: str, digest: Digest, query: Mapping[str, str]
    ) -> ReferrersPage:
        """The upstream's referrers API; ``ManifestUnknown`` when it has none (404)."""
        ...

    async def health(self) -> Health: ...

    async def close(self) -> None: ...
