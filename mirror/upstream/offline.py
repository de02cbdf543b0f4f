"""The upstream of an air-gapped mirror: there is none.

``serve --offline`` puts an :class:`OfflineUpstream` where each upstream client would be.
It never opens a connection; every request fails with an :class:`~mirror.domain.errors.Offline`
error, which is an upstream failure to the resolver (so what the mirror holds is served, as
when an upstream is down) and a 404 with the registry's usual code to the client, whose
message says the mirror is offline.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import NoReturn

from mirror.domain.errors import BlobOffline, ManifestOffline, NameOffline
from mirror.domain.manifests import Manifest
from mirror.domain.reference import Digest
from mirror.upstream.protocol import (
    BlobResponse,
    Health,
    ManifestHead,
    ReferrersPage,
    TagsPage,
)


class OfflineUpstream:
    def __init__(self, name: str) -> None:
        self.name = name

    async def head_manifest(
        self, repository: str, reference: str, accept: Sequence[str]
    ) -> ManifestHead:
        self._manifest(repository, reference)

    async def get_manifest(
        self, repository: str, reference: str, accept: Sequence[str]
    ) -> Manifest:
        self._manifest(repository, reference)

    async def head_blob(self, repository: str, digest: Digest) -> int | None:
        self._blob(repository, digest)

    @asynccontextmanager
    async def open_blob(self, repository: str, digest: Digest) -> AsyncIterator[BlobResponse]:
        self._blob(repository, digest)
        yield

    async def get_tags(self, repository: str, query: Mapping[str, str]) -> TagsPage:
        raise NameOffline(detail=self._detail(repository))

    async def get_referrers(
        self, repository: str, digest: Digest, query: Mapping[str, str]
    ) -> ReferrersPage:
        self._manifest(repository, f"referrers of {digest}")

    async def health(self) -> Health:
        return Health(reachable="offline")

    async def close(self) -> None:
        return None

    def _manifest(self, repository: str, reference: str) -> NoReturn:
        raise ManifestOffline(detail={**self._detail(repository), "reference": reference})

    def _blob(self, repository: str, digest: Digest) -> NoReturn:
        raise BlobOffline(detail={**self._detail(repository), "digest": str(digest)})

    def _detail(self, repository: str) -> dict[str, str]:
        return {"upstream": self.name, "repository": repository, "offline": "true"}
