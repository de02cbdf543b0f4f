"""The pull API of one upstream registry.

Upstream status codes stop here: every failure leaves this module as a
``mirror.errors`` exception. Blob downloads follow the registry's redirect to its CDN
by hand, so the Authorization header is never sent to a host other than the registry.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import NoReturn
from urllib.parse import urljoin, urlsplit

import aiohttp
import structlog
from multidict import CIMultiDict

from mirror import __version__
from mirror.errors import (
    BlobUnknown,
    IntegrityError,
    ManifestUnknown,
    NameUnknown,
    NotFound,
    RegistryError,
    TooManyRequests,
    UpstreamError,
)
from mirror.reference import Digest
from mirror.store.protocols import Manifest
from mirror.upstream.auth import TokenAuth, parse_challenge, pull_scope

log = structlog.get_logger(__name__)

USER_AGENT = f"mirror/{__version__} (registry pull-through cache)"
MAX_REDIRECTS = 5
# The distribution spec lets registries refuse manifests over 4 MiB; we refuse to cache them.
MAX_MANIFEST_SIZE = 4 * 1024 * 1024


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


class UpstreamClient:
    def __init__(self, base_url: str, session: aiohttp.ClientSession, auth: TokenAuth) -> None:
        self.base_url = base_url.rstrip("/")
        self._session = session
        self._auth = auth

    async def head_manifest(
        self, repository: str, reference: str, accept: Sequence[str]
    ) -> ManifestHead:
        async with self._call(
            "HEAD",
            repository,
            f"manifests/{reference}",
            headers=_accept(accept),
            not_found=ManifestUnknown,
        ) as response:
            digest = response.headers.get("Docker-Content-Digest")
            if digest is None:
                # Without a digest a HEAD proves nothing; callers then GET instead.
                raise UpstreamError("the upstream sent no Docker-Content-Digest on HEAD")
            return ManifestHead(
                digest=digest,
                media_type=_media_type(response),
                size=response.content_length,
            )

    async def get_manifest(
        self, repository: str, reference: str, accept: Sequence[str]
    ) -> Manifest:
        async with self._call(
            "GET",
            repository,
            f"manifests/{reference}",
            headers=_accept(accept),
            not_found=ManifestUnknown,
        ) as response:
            if (response.content_length or 0) > MAX_MANIFEST_SIZE:
                raise UpstreamError("the upstream manifest is larger than 4 MiB")
            body = await response.content.read(MAX_MANIFEST_SIZE + 1)
            if len(body) > MAX_MANIFEST_SIZE:
                raise UpstreamError("the upstream manifest is larger than 4 MiB")
            claimed = response.headers.get("Docker-Content-Digest")
            return _verified_manifest(body, _media_type(response), reference, claimed)

    async def head_blob(self, repository: str, digest: Digest) -> int | None:
        async with self._call(
            "HEAD", repository, f"blobs/{digest}", headers={}, not_found=BlobUnknown
        ) as response:
            return response.content_length

    @asynccontextmanager
    async def open_blob(self, repository: str, digest: Digest) -> AsyncIterator[BlobResponse]:
        async with self._call(
            "GET", repository, f"blobs/{digest}", headers={}, not_found=BlobUnknown
        ) as response:
            yield BlobResponse(size=response.content_length, content=response.content)

    async def get_tags(self, repository: str, query: Mapping[str, str]) -> TagsPage:
        async with self._call(
            "GET",
            repository,
            "tags/list",
            headers={"Accept": "application/json"},
            not_found=NameUnknown,
            query=query,
        ) as response:
            body = await response.content.read(MAX_MANIFEST_SIZE)
            return TagsPage(
                body, _media_type(response) or "application/json", response.headers.get("Link")
            )

    @asynccontextmanager
    async def _call(
        self,
        method: str,
        repository: str,
        path: str,
        *,
        headers: Mapping[str, str],
        not_found: type[NotFound],
        query: Mapping[str, str] | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        url = f"{self.base_url}/v2/{repository}/{path}"
        scope = pull_scope(repository)
        try:
            response = await self._authorized(method, url, scope, headers, query)
            try:
                if response.status >= 400:
                    _raise_for(response, not_found)
                yield response
            finally:
                response.release()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamError(detail={"error": _describe(exc)}) from exc

    async def _authorized(
        self,
        method: str,
        url: str,
        scope: str,
        headers: Mapping[str, str],
        query: Mapping[str, str] | None,
    ) -> aiohttp.ClientResponse:
        authorization = self._auth.header(scope)
        if authorization is None and self._auth.knows_challenge:
            authorization = await self._auth.authorize(scope)
        response = await self._follow(method, url, headers, authorization, query)
        if response.status != 401:
            return response
        challenge = parse_challenge(response.headers.get("WWW-Authenticate", ""))
        response.release()
        if challenge is None:
            raise NameUnknown(detail="the upstream registry refused access")
        authorization = await self._auth.authorize(scope, challenge)
        return await self._follow(method, url, headers, authorization, query)

    async def _follow(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        authorization: str | None,
        query: Mapping[str, str] | None,
    ) -> aiohttp.ClientResponse:
        origin = _origin(url)
        for _ in range(MAX_REDIRECTS + 1):
            sent = CIMultiDict(headers)
            if authorization is not None and _origin(url) == origin:
                sent["Authorization"] = authorization
            response = await self._session.request(
                method, url, headers=sent, params=query, allow_redirects=False
            )
            location = response.headers.get("Location")
            if response.status not in (301, 302, 303, 307, 308) or location is None:
                return response
            response.release()
            url, query = urljoin(url, location), None
            if method != "HEAD" and response.status == 303:
                method = "GET"
        raise UpstreamError("the upstream registry redirected too many times")


def _raise_for(response: aiohttp.ClientResponse, not_found: type[NotFound]) -> NoReturn:
    status = response.status
    if status == 404:
        raise not_found()
    if status in (401, 403):
        raise NameUnknown(detail="the upstream registry refused access to this repository")
    if status == 429:
        retry_after = response.headers.get("Retry-After")
        raise TooManyRequests(headers={"Retry-After": retry_after} if retry_after else {})
    raise UpstreamError(detail={"upstream_status": status})


def _verified_manifest(
    body: bytes, media_type: str, reference: str, claimed: str | None
) -> Manifest:
    expected = reference if ":" in reference else claimed
    algorithm = expected.partition(":")[0] if expected else "sha256"
    try:
        digest = Digest.of(body, algorithm)
    except ValueError as exc:
        raise IntegrityError(detail={"digest": expected}) from exc
    if expected is not None and str(digest) != expected:
        raise IntegrityError(detail={"expected": expected, "actual": str(digest)})
    return Manifest(body=body, media_type=media_type, digest=str(digest))


def _accept(accept: Sequence[str]) -> dict[str, str]:
    return {"Accept": ", ".join(accept)} if accept else {}


def _media_type(response: aiohttp.ClientResponse) -> str:
    return response.headers.get("Content-Type", "").split(";", 1)[0].strip()


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname, parts.port


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


__all__ = ["BlobResponse", "ManifestHead", "RegistryError", "TagsPage", "UpstreamClient"]
