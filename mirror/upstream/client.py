"""The pull API of one upstream registry.

Upstream status codes stop here: every failure leaves this module as a
``mirror.domain.errors`` exception. Blob downloads follow the registry's redirect to its CDN
by hand, so the Authorization header is never sent to a host other than the registry.
The client also keeps the upstream's health: its pull quota (``RateLimit``) and a
circuit breaker that fails fast while the upstream is unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import NoReturn
from urllib.parse import urljoin, urlsplit

import aiohttp
import structlog
from multidict import CIMultiDict

from mirror import __version__
from mirror.clock import SYSTEM, Clock
from mirror.domain.errors import (
    BlobUnknown,
    IntegrityError,
    ManifestUnknown,
    NameUnknown,
    NotFound,
    RegistryError,
    TooManyRequests,
    UpstreamError,
)
from mirror.domain.manifests import Manifest
from mirror.domain.mediatypes import (
    DOCKER_SCHEMA1,
    DOCKER_SCHEMA1_SIGNED,
    KNOWN_MANIFEST_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
)
from mirror.domain.reference import Digest
from mirror.logs import LogThrottle
from mirror.metrics import Metrics
from mirror.upstream.auth import Challenge, TokenAuth, parse_challenge, pull_scope
from mirror.upstream.breaker import CircuitBreaker
from mirror.upstream.protocol import (
    BlobResponse,
    Health,
    ManifestHead,
    ReferrersPage,
    TagsPage,
)
from mirror.upstream.ratelimit import RateLimit
from mirror.upstream.shared_state import UpstreamState

log = structlog.get_logger(__name__)

USER_AGENT = f"mirror/{__version__} (registry pull-through cache)"
MAX_REDIRECTS = 5
# The distribution spec lets registries refuse manifests over 4 MiB; we refuse to cache them.
MAX_MANIFEST_SIZE = 4 * 1024 * 1024
# Upstream answers that may mean "the upstream is unwell": the breaker checks /v2/ to know.
_UNWELL = frozenset({500, 502, 503, 504})


class UpstreamClient:
    def __init__(
        self,
        name: str,
        base_url: str,
        session: aiohttp.ClientSession,
        auth: TokenAuth,
        *,
        metrics: Metrics | None = None,
        ratelimit: RateLimit | None = None,
        breaker_threshold: int = 5,
        probe_interval: float = 5.0,
        shared: UpstreamState | None = None,
        request_timeout: float = 10.0,
        on_error: Callable[[str, str, str], None] | None = None,
        clock: Clock = SYSTEM,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self._session = session
        self._auth = auth
        self.metrics = metrics or Metrics()
        auth.on_token_response = lambda status: self.metrics.upstream_requests.labels(
            name, "token", status
        ).inc()
        self.ratelimit = ratelimit or RateLimit()
        self._realm: str | None = None  # the token realm the registry's /v2/ names
        self._request_timeout = request_timeout
        self._failure_log = LogThrottle()
        # Told (upstream, kind, error) of failures worth an operator's eye (the status page).
        self._on_error = on_error or (lambda upstream, kind, error: None)
        self.breaker = CircuitBreaker(
            name,
            self._ping,
            threshold=breaker_threshold,
            probe_interval=probe_interval,
            on_change=lambda is_open: self.metrics.circuit_open.labels(name).set(int(is_open)),
            shared=shared,
            clock=clock.time,
        )

    @property
    def cached_tokens(self) -> int:
        """Bearer tokens held for this upstream (bounded)."""
        return self._auth.cached_tokens

    async def head_manifest(
        self, repository: str, reference: str, accept: Sequence[str]
    ) -> ManifestHead:
        async with self._call(
            "manifest_head",
            "HEAD",
            repository,
            f"manifests/{reference}",
            headers=_accept(accept),
            not_found=ManifestUnknown,
        ) as response:
            digest = _supported_digest(response.headers.get("Docker-Content-Digest"))
            if digest is None:
                raise UpstreamError("the upstream sent no usable Docker-Content-Digest on HEAD")
            return ManifestHead(str(digest), _media_type(response), response.content_length)

    async def get_manifest(
        self, repository: str, reference: str, accept: Sequence[str]
    ) -> Manifest:
        await self._spend_quota(repository, reference, accept)
        async with self._call(
            "manifest_get",
            "GET",
            repository,
            f"manifests/{reference}",
            headers=_accept(accept),
            not_found=ManifestUnknown,
        ) as response:
            body = await _read_limited(response, MAX_MANIFEST_SIZE)
            claimed = response.headers.get("Docker-Content-Digest")
            return _verified_manifest(body, _media_type(response), reference, claimed)

    async def head_blob(self, repository: str, digest: Digest) -> int | None:
        async with self._call(
            "blob_head", "HEAD", repository, f"blobs/{digest}", headers={}, not_found=BlobUnknown
        ) as response:
            return response.content_length

    @asynccontextmanager
    async def open_blob(self, repository: str, digest: Digest) -> AsyncIterator[BlobResponse]:
        async with self._call(
            "blob_get", "GET", repository, f"blobs/{digest}", headers={}, not_found=BlobUnknown
        ) as response:
            yield BlobResponse(size=response.content_length, content=response.content)

    async def get_tags(self, repository: str, query: Mapping[str, str]) -> TagsPage:
        async with self._call(
            "tags",
            "GET",
            repository,
            "tags/list",
            headers={"Accept": "application/json"},
            not_found=NameUnknown,
            query=query,
        ) as response:
            body = await _read_limited(response, MAX_MANIFEST_SIZE)
            content_type = _media_type(response) or "application/json"
            return TagsPage(body, content_type, response.headers.get("Link"))

    async def get_referrers(
        self, repository: str, digest: Digest, query: Mapping[str, str]
    ) -> ReferrersPage:
        # Free on Docker Hub, but after a 429 nothing is sent until Retry-After has passed.
        await self.ratelimit.sync()
        wait = self.ratelimit.retry_after()
        if wait > 0:
            raise TooManyRequests(
                detail={"upstream": self.name},
                headers={"Retry-After": str(max(int(wait), 1))},
            )
        async with self._call(
            "referrers",
            "GET",
            repository,
            f"referrers/{digest}",
            headers={"Accept": OCI_INDEX},
            not_found=ManifestUnknown,
            query=query,
        ) as response:
            body = await _read_limited(response, MAX_MANIFEST_SIZE)
            return ReferrersPage(body, response.headers.get("Link"))

    async def health(self) -> Health:
        """The upstream as the processes of the site know it together."""
        contacted, is_open = await self.breaker.state()
        await self.ratelimit.sync()
        return Health(
            # Nothing is claimed of an upstream nothing has asked yet.
            reachable=not is_open if contacted else "unknown",
            ratelimit_remaining=self.ratelimit.remaining,
            retry_after=round(self.ratelimit.retry_after(), 1),
        )

    async def close(self) -> None:
        await self.breaker.close()
        await self.ratelimit.close()

    async def _spend_quota(self, repository: str, reference: str, accept: Sequence[str]) -> None:
        """Refuse a manifest GET the pull limit cannot pay for, before it is sent."""
        await self.ratelimit.sync()
        wait = self.ratelimit.retry_after()
        if wait == 0 and self.ratelimit.below_reserve:
            # A HEAD is free and carries the current quota: read it before refusing.
            await self.head_manifest(repository, reference, accept)
            if self.ratelimit.below_reserve:
                wait = 60.0
        if wait > 0:
            raise TooManyRequests(
                "the upstream's pull limit is spent; retry later",
                detail={"upstream": self.name, "remaining": self.ratelimit.remaining},
                headers={"Retry-After": str(max(int(wait), 1))},
            )

    @asynccontextmanager
    async def _call(
        self,
        kind: str,
        method: str,
        repository: str,
        path: str,
        *,
        headers: Mapping[str, str],
        not_found: type[NotFound],
        query: Mapping[str, str] | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        await self.breaker.sync()
        if self.breaker.open:
            raise UpstreamError(
                "the upstream registry is unreachable; not retrying for now",
                detail={"upstream": self.name},
            )
        url = f"{self.base_url}/v2/{repository}/{path}"
        try:
            # The answer's headers (token, redirects and all) come within the short deadline;
            # so does the body of everything but a blob, which only has to keep flowing.
            async with asyncio.timeout(self._request_timeout):
                response = await self._authorized(
                    kind, method, url, scope=pull_scope(repository), headers=headers, query=query
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.metrics.upstream_requests.labels(self.name, kind, "error").inc()
            raise self._failed(kind, exc) from exc
        body_deadline = (
            contextlib.nullcontext()
            if kind == "blob_get"
            else asyncio.timeout(self._request_timeout)
        )
        try:
            async with body_deadline:
                self._observe(kind, response)
                if response.status >= 400:
                    await self._raise_for(response, not_found)
                yield response
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._failed(kind, exc) from exc
        finally:
            response.release()

    def _failed(self, kind: str, exc: BaseException) -> UpstreamError:
        """A request that got no answer: counted by the breaker, logged once a minute per
        kind and cause, and turned into the error the client sees."""
        self.breaker.failure()
        cause = _describe(exc) if str(exc) else f"{type(exc).__name__} (no answer in time)"
        suppressed = self._failure_log.admit((kind, type(exc).__name__))
        self._on_error(self.name, kind, cause)
        if suppressed is not None:
            log.warning(
                "upstream_request_failed",
                upstream=self.name,
                kind=kind,
                error=cause,
                suppressed=suppressed,
            )
        return UpstreamError(detail={"upstream": self.name, "error": cause})

    def _observe(self, kind: str, response: aiohttp.ClientResponse) -> None:
        self.metrics.upstream_requests.labels(self.name, kind, str(response.status)).inc()
        if response.status in _UNWELL:
            self.breaker.suspect()
        else:
            self.breaker.success()
        if kind.startswith("manifest"):
            self.ratelimit.observe(response.headers)
            if self.ratelimit.remaining is not None:
                self.metrics.ratelimit_remaining.labels(self.name).set(self.ratelimit.remaining)
            if self.ratelimit.limit is not None:
                self.metrics.ratelimit_limit.labels(self.name).set(self.ratelimit.limit)

    async def _raise_for(
        self, response: aiohttp.ClientResponse, not_found: type[NotFound]
    ) -> NoReturn:
        status = response.status
        if status == 404:
            if await _error_code(response) == "NAME_UNKNOWN":
                raise NameUnknown(detail="the upstream registry does not know this repository")
            raise not_found()
        if status in (401, 403):
            raise NameUnknown(detail="the upstream registry refused access to this repository")
        if status == 429:
            retry_after = response.headers.get("Retry-After")
            await self.ratelimit.rejected(retry_after)
            log.warning("upstream_rate_limited", upstream=self.name, retry_after=retry_after)
            self._on_error(self.name, "ratelimit", f"429, Retry-After {retry_after}")
            raise TooManyRequests(
                detail={"upstream": self.name},
                headers={"Retry-After": str(max(int(self.ratelimit.retry_after()), 1))},
            )
        self._on_error(self.name, "status", f"{response.method} answered {status}")
        raise UpstreamError(detail={"upstream": self.name, "upstream_status": status})

    async def _authorized(
        self,
        kind: str,
        method: str,
        url: str,
        *,
        scope: str,
        headers: Mapping[str, str],
        query: Mapping[str, str] | None,
    ) -> aiohttp.ClientResponse:
        authorization = self._auth.header(scope)
        fresh = False
        if authorization is None and self._auth.knows_challenge:
            authorization = await self._auth.authorize(scope)
            fresh = True
        response = await self._follow(method, url, headers, authorization, query)
        if response.status != 401 or fresh:
            # A token issued a moment ago and refused means no access to this repository
            # (Docker Hub's answer for names it does not have): asking again changes nothing.
            return response
        self.metrics.upstream_requests.labels(self.name, kind, "401").inc()
        challenge = parse_challenge(response.headers.get("WWW-Authenticate", ""))
        response.release()
        if challenge is None:
            raise NameUnknown(detail="the upstream registry refused access")
        authorization = await self._auth.authorize(scope, await self._trusted(challenge))
        return await self._follow(method, url, headers, authorization, query)

    async def _trusted(self, challenge: Challenge) -> Challenge:
        """``challenge`` if it names the token realm of the registry's own ``/v2/``, over
        https unless the registry itself is plain http; otherwise no credentials go there."""
        if challenge.scheme != "bearer":
            return challenge  # Basic: the credentials go to the registry itself
        if self._realm is None:
            async with self._session.get(
                f"{self.base_url}/v2/", allow_redirects=False
            ) as response:
                own = parse_challenge(response.headers.get("WWW-Authenticate", ""))
            if own is None or own.scheme != "bearer":
                raise UpstreamError(
                    "the upstream registry's /v2/ names no token realm",
                    detail={"upstream": self.name},
                )
            self._realm = own.realm
        realm = urlsplit(challenge.realm)
        secure_enough = realm.scheme == "https" or (
            realm.scheme == "http" and urlsplit(self.base_url).scheme == "http"
        )
        if challenge.realm != self._realm or not secure_enough:
            log.warning(
                "upstream_realm_refused", upstream=self.name, realm=challenge.realm[:200]
            )
            raise UpstreamError(
                "the upstream named a token realm other than its own; no credentials sent",
                detail={"upstream": self.name},
            )
        return challenge

    async def _follow(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        authorization: str | None,
        query: Mapping[str, str] | None,
    ) -> aiohttp.ClientResponse:
        """The response at the end of the redirects. A 401 from a host a redirect led to (a
        CDN) is a failure: it gets no credentials, and its challenge is never learnt."""
        origin = _origin(url)
        for _ in range(MAX_REDIRECTS + 1):
            sent = CIMultiDict(headers)
            at_registry = _origin(url) == origin
            if authorization is not None and at_registry:
                sent["Authorization"] = authorization
            response = await self._session.request(
                method, url, headers=sent, params=query, allow_redirects=False
            )
            location = response.headers.get("Location")
            if response.status not in (301, 302, 303, 307, 308) or location is None:
                if response.status == 401 and not at_registry:
                    response.release()
                    raise UpstreamError(
                        "a host the upstream registry redirected to refused access",
                        detail={"upstream": self.name, "host": urlsplit(url).hostname},
                    )
                return response
            response.release()
            url, query = urljoin(url, location), None
            if method != "HEAD" and response.status == 303:
                method = "GET"
        raise UpstreamError("the upstream registry redirected too many times")

    async def _ping(self) -> bool:
        """The circuit breaker's probe: does the upstream answer HTTP at all, in time?"""
        async with asyncio.timeout(self._request_timeout), self._session.get(
            f"{self.base_url}/v2/", allow_redirects=False
        ) as response:
            return response.status < 500


async def _read_limited(response: aiohttp.ClientResponse, limit: int) -> bytes:
    if (response.content_length or 0) > limit:
        raise UpstreamError(f"the upstream response is larger than {limit} bytes")
    body = bytearray()
    async for chunk in response.content.iter_any():
        body += chunk
        if len(body) > limit:
            raise UpstreamError(f"the upstream response is larger than {limit} bytes")
    return bytes(body)


def _verified_manifest(
    body: bytes, media_type: str, reference: str, claimed: str | None
) -> Manifest:
    """The manifest as the mirror will serve it: named by the digest it computes itself,
    with a manifest media type it knows. Nothing the upstream claims is passed on unchecked."""
    by_digest = ":" in reference  # then already parsed: sha256 or sha512
    expected = Digest.parse(reference) if by_digest else _supported_digest(claimed)
    if expected is not None and Digest.of(body, expected.algorithm) != expected:
        raise IntegrityError(
            detail={"expected": str(expected), "actual": str(Digest.of(body, expected.algorithm))}
        )
    # Pulled by digest, it is kept under that digest; by tag, under the sha256 of its bytes.
    digest = expected if by_digest and expected is not None else Digest.of(body)
    return Manifest(body=body, media_type=_manifest_type(body, media_type), digest=str(digest))


async def _error_code(response: aiohttp.ClientResponse) -> str | None:
    """The first error code of a registry's JSON error body, if it sent one."""
    try:
        body = json.loads(await _read_limited(response, 64 * 1024))
        code = body["errors"][0]["code"]
    except (ValueError, KeyError, IndexError, TypeError, UpstreamError, aiohttp.ClientError):
        return None
    return code if isinstance(code, str) else None


def _supported_digest(claimed: str | None) -> Digest | None:
    """A ``Docker-Content-Digest`` worth checking against: one of the algorithms the mirror
    computes (an ``md5:`` or malformed claim is ignored, never passed on)."""
    if not claimed:
        return None
    try:
        return Digest.parse(claimed.strip())
    except RegistryError:
        return None


def _manifest_type(body: bytes, content_type: str) -> str:
    """The media type to keep: the upstream's Content-Type if it names a manifest type; else
    the document's own ``mediaType``; else (schema 1 says neither) its schema version."""
    if content_type in KNOWN_MANIFEST_TYPES:
        return content_type
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if isinstance(document, dict):
        declared = document.get("mediaType")
        if isinstance(declared, str) and declared in KNOWN_MANIFEST_TYPES:
            return declared
        if declared is None and document.get("schemaVersion") == 1:
            return DOCKER_SCHEMA1_SIGNED if "signatures" in document else DOCKER_SCHEMA1
        if declared is None and "manifests" in document:
            return OCI_INDEX
        if declared is None and "layers" in document:
            return OCI_MANIFEST
    raise UpstreamError(
        "the upstream sent a manifest of a type the mirror does not know",
        detail={"content_type": content_type[:100]},
    )


def _accept(accept: Sequence[str]) -> dict[str, str]:
    return {"Accept": ", ".join(accept)} if accept else {}


def _media_type(response: aiohttp.ClientResponse) -> str:
    return response.headers.get("Content-Type", "").split(";", 1)[0].strip()


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname, parts.port


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
