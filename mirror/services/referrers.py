"""The OCI 1.1 referrers API through the mirror: what points at an image by its ``subject``
(cosign signatures, SBOMs, attestations).

- The upstream's referrers API answers; the answer is kept like a tag, under a key no tag can
  take (:func:`mirror.content.protocols.referrers_key`): from the store for ``tag_ttl`` seconds,
  and served stale when the upstream is down or out of quota (up to ``max_stale``).
- An upstream without the API (it answers 404) is read through its fallback tag
  ``sha256-<hex>``, an image index the resolver keeps like any other tag.
- No referrers at all: an empty image index with status 200, never a 404 for a valid digest.
- ``artifactType`` is filtered here, whatever the upstream supports, and the answer says so
  with ``OCI-Filters-Applied``.

The referring manifests and their blobs are ordinary manifests and blobs of the repository:
they pull through the resolver, under the same access rules as any image.

Across the air gap (``seed``, ``export``, ``import``) the kept answer travels as the fallback
tag ``sha256-<hex>`` (an image index whose children are the referrers, so the bundle carries
them and their blobs, and other tools read it as the OCI spec says), beside cosign's own
``.sig``, ``.att`` and ``.sbom`` tags; ``import`` keeps it as the answer again, so an offline
mirror answers the API. Offline, an image held with no answer kept has none: an empty index.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import structlog

from mirror.content.protocols import MetadataStore, referrers_key
from mirror.domain.errors import (
    ManifestUnknown,
    Offline,
    RegistryError,
    TooManyRequests,
    UpstreamError,
)
from mirror.domain.manifests import Manifest, TagRecord
from mirror.domain.mediatypes import OCI_INDEX
from mirror.domain.reference import Digest, Reference
from mirror.services.resolver import Outcome, Resolver
from mirror.upstream.protocol import Upstream

log = structlog.get_logger(__name__)

# Pages of an upstream's answer followed (each up to 4 MiB): enough for any real image.
MAX_PAGES = 16
FILTERS_HEADER = "OCI-Filters-Applied"
# cosign's tags beside an image: signatures, attestations, SBOMs.
COSIGN_SUFFIXES = (".sig", ".att", ".sbom")
_REFERRERS_TAG = re.compile(r"(?:sha256|sha512)-[0-9a-f]{64}(?:\.(?:sig|att|sbom))?")


def fallback_tag(digest: Digest) -> str:
    """The tag the OCI spec names for the referrers of ``digest`` on a registry without
    the API: ``sha256-<hex>`` (the spec truncates each part, for sha512 to fit a tag)."""
    return f"{digest.algorithm[:32]}-{digest.hex[:64]}"


def is_referrers_tag(tag: str | None) -> bool:
    """Is ``tag`` a fallback tag or one of cosign's tags (what ``--no-referrers`` leaves out)?"""
    return tag is not None and _REFERRERS_TAG.fullmatch(tag) is not None


def subject_of_fallback_tag(tag: str) -> Digest | None:
    """The digest a fallback tag ``sha256-<hex>`` is named after (None for any other tag)."""
    if "." in tag or not is_referrers_tag(tag):
        return None
    try:
        return Digest.parse(tag.replace("-", ":", 1))
    except RegistryError:
        return None  # truncated (sha512): the subject cannot be read back


async def kept_answer(
    store: MetadataStore, registry: str, repository: str, digest: Digest
) -> Manifest | None:
    """The referrers answer kept for ``digest``, whatever its age."""
    record = await store.get_tag(registry, repository, referrers_key(str(digest)))
    if record is None:
        return None
    return await store.get_manifest(registry, repository, record.digest)


async def held_referrers(
    store: MetadataStore, registry: str, repository: str, digest: Digest
) -> list[tuple[str, Manifest]]:
    """What travels with an image across the air gap, as (tag, manifest): its referrers
    (the upstream's fallback tag if held, else the kept answer, unless it is empty) and
    cosign's tags that are held."""
    found: list[tuple[str, Manifest]] = []
    for tag in (fallback_tag(digest), *(fallback_tag(digest) + s for s in COSIGN_SUFFIXES)):
        record = await store.get_tag(registry, repository, tag)
        manifest = None
        if record is not None:
            manifest = await store.get_manifest(registry, repository, record.digest)
        elif "." not in tag:
            manifest = await kept_answer(store, registry, repository, digest)
            if manifest is not None and not descriptors_of(manifest.body):
                manifest = None  # nothing refers to it: nothing to carry
        if manifest is not None:
            found.append((tag, manifest))
    return found


async def count_held(store: MetadataStore, registry: str, repository: str, digest: Digest) -> int:
    """How many referrers an image has, as far as the mirror knows (``mirror ls``): those of
    its kept answer, and cosign's tags held beside it."""
    answer = await kept_answer(store, registry, repository, digest)
    count = len(descriptors_of(answer.body)) if answer is not None else 0
    for suffix in COSIGN_SUFFIXES:
        if await store.get_tag(registry, repository, fallback_tag(digest) + suffix) is not None:
            count += 1
    return count


def index_of(descriptors: list[dict[str, Any]]) -> bytes:
    """The image index the referrers API answers with."""
    document = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
    return json.dumps(document, separators=(",", ":")).encode()


def descriptors_of(body: bytes) -> list[dict[str, Any]]:
    """The descriptors of an image index; a ValueError when it is not one."""
    document = json.loads(body)
    items = document.get("manifests") if isinstance(document, dict) else None
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise ValueError("not an image index")
    return items


def filtered(body: bytes, artifact_type: str | None) -> bytes:
    """The answer for a client that asked only for ``artifact_type``."""
    if artifact_type is None:
        return body
    kept = [d for d in descriptors_of(body) if d.get("artifactType") == artifact_type]
    return index_of(kept)


class Referrers:
    """The referrers answers of every upstream, kept and served as the resolver keeps tags."""

    def __init__(self, resolver: Resolver) -> None:
        self._resolver = resolver

    async def answer(
        self, registry: str, repository: str, digest: Digest
    ) -> tuple[Manifest, Outcome]:
        resolver = self._resolver
        client = resolver.upstream(registry)
        store = resolver.store
        key = referrers_key(str(digest))
        record = await store.get_tag(registry, repository, key)
        if record is not None and resolver.fresh(record):
            held = await store.get_manifest(registry, repository, record.digest)
            if held is not None:
                return held, Outcome.HIT
        await resolver._may_ask_upstream(registry, repository, cold=record is None)
        try:
            return await resolver._coalesced(
                ("referrers", registry, repository, str(digest)),
                lambda: self._refresh(client, registry, repository, digest),
            )
        except (UpstreamError, TooManyRequests) as exc:
            stale = await resolver._stale(registry, repository, record)
            if stale is None:
                return await self._offline_answer(registry, repository, digest, exc)
            log.warning(
                "serving_stale_referrers",
                repository=repository,
                digest=str(digest),
                reason=exc.message,
            )
            return stale[0], Outcome.STALE

    async def _offline_answer(
        self, registry: str, repository: str, digest: Digest, exc: RegistryError
    ) -> tuple[Manifest, Outcome]:
        """Offline, an image held with no answer kept has no referrers: they travel with it
        (``import``). Anything else re-raises the failure."""
        held = await self._resolver.store.get_manifest(registry, repository, str(digest))
        if not isinstance(exc, Offline) or held is None:
            raise exc
        body = index_of([])
        return Manifest(body, OCI_INDEX, str(Digest.of(body))), Outcome.HIT

    async def _refresh(
        self, client: Upstream, registry: str, repository: str, digest: Digest
    ) -> tuple[Manifest, Outcome]:
        try:
            descriptors = await self._from_api(client, repository, digest)
        except ManifestUnknown:  # no referrers API: a registry that has one never says 404
            descriptors = await self._from_fallback_tag(registry, repository, digest)
        body = index_of(descriptors)
        answer = Manifest(body, OCI_INDEX, str(Digest.of(body)))
        await self.remember(registry, repository, digest, answer)
        return answer, Outcome.MISS

    async def remember(
        self, registry: str, repository: str, digest: Digest, answer: Manifest
    ) -> None:
        """Keep an answer for ``digest`` as confirmed now (also used by ``import``)."""
        store = self._resolver.store
        await store.put_manifest(registry, repository, answer)
        record = TagRecord(answer.digest, OCI_INDEX, self._resolver.now())
        await store.put_tag(registry, repository, referrers_key(str(digest)), record)

    async def _from_api(
        self, client: Upstream, repository: str, digest: Digest
    ) -> list[dict[str, Any]]:
        descriptors: list[dict[str, Any]] = []
        query: dict[str, str] = {}
        for _ in range(MAX_PAGES):
            page = await client.get_referrers(repository, digest, query)
            try:
                descriptors += descriptors_of(page.body)
            except ValueError:
                raise UpstreamError(
                    "the upstream's referrers answer is not an image index",
                    detail={"upstream": client.name, "digest": str(digest)},
                ) from None
            query = _next_query(page.link)
            if not query:
                break
        return descriptors

    async def _from_fallback_tag(
        self, registry: str, repository: str, digest: Digest
    ) -> list[dict[str, Any]]:
        reference = Reference(tag=fallback_tag(digest))
        try:
            index, _ = await self._resolver.manifest(registry, repository, reference, (OCI_INDEX,))
        except ManifestUnknown:
            return []  # no fallback tag: no referrers
        try:
            return descriptors_of(index.body)
        except ValueError:
            log.warning(
                "referrers_fallback_not_an_index", repository=repository, tag=str(reference)
            )
            return []


def _next_query(link: str | None) -> dict[str, str]:
    """The query of a ``Link: <...>; rel="next"`` header: how to ask for the next page."""
    if not link or 'rel="next"' not in link.replace("'", '"'):
        return {}
    url = link.partition("<")[2].partition(">")[0]
    return dict(parse_qsl(urlsplit(url).query))
