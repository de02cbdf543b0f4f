"""The pull-through policy: what is answered from the cache and what goes upstream.

- A tag inside its freshness window is answered from the store with no upstream call.
- Past the window a HEAD (free on Docker Hub) revalidates it; a GET follows only when
  the digest changed to one we do not hold.
- A manifest pulled by digest never goes upstream once cached.
- Concurrent misses for one tag, one digest or one blob make one upstream request.
- When the upstream fails or is out of quota, a tag we hold is served stale (up to
  ``max_stale`` past its window) rather than failing the pull.
- An upstream "not found" is remembered for ``negative_ttl`` seconds: for a tag, a manifest
  or blob digest, and a whole repository the upstream does not know or refuses, so
  repeating a miss costs no upstream request.
- Lookups the cache cannot answer at all (a tag or digest never seen) go upstream at a
  bounded rate per upstream (``cold_lookup_rate``), so a client inventing names cannot
  spend the pull quota as fast as it can send requests; one client address may take at
  most half of that budget, and a lookup refused for its own client costs it nothing.
- Tag lists are served from memory for ``tag_ttl`` seconds; when the upstream cannot answer
  (down, out of quota, or none at all: ``serve --offline``), from the tags the mirror holds.
"""

from __future__ import annotations

import asyncio
import enum
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import BinaryIO
from urllib.parse import urlencode

import structlog
from cachetools import LRUCache, TTLCache

from mirror.clock import SYSTEM, Clock
from mirror.content.blobs import MemoryCopy
from mirror.content.cached import CachedStore
from mirror.content.layer import Content
from mirror.content.protocols import REPOSITORY_MISSING, StoreUnavailable, blob_missing

# What reading a stored blob raises when object storage fails: the web layer meets storage
# only through the resolver's blobs.
from mirror.content.storage import StorageError as StorageError  # noqa: PLC0414 - re-exported
from mirror.domain.errors import (
    BlobUnknown,
    ManifestUnknown,
    NameUnknown,
    NotFound,
    TooManyRequests,
    UpstreamError,
)
from mirror.domain.manifests import Manifest, ManifestParseError, TagRecord, parse
from mirror.domain.mediatypes import MANIFEST_TYPES, UNACCEPTED_OCI, accepts, upstream_accept
from mirror.domain.pins import Pin
from mirror.domain.reference import Digest, Reference
from mirror.logs import LogThrottle
from mirror.services.clients import CLIENT, PerClient
from mirror.services.closure import reached_by
from mirror.services.coordination import Coordinator
from mirror.services.fills import Fill, FillHandover, Fills
from mirror.services.pulls import PullRecorder
from mirror.services.singleflight import SingleFlight
from mirror.upstream.protocol import TagsPage, Upstream
from mirror.upstream.ratelimit import FairBudget, take_all

log = structlog.get_logger(__name__)


MISS_LIMIT = "this client has caused too many upstream fetches; retry later"
# How long a process waits for another one resolving the same tag, and how often it looks.
HOLDER_WAIT = 10.0
HOLDER_POLL = 0.05
# What a registry gives a client that cannot read a multi-platform index.
DEFAULT_PLATFORM = "linux/amd64"
# Tag-list pages kept in memory (each up to MAX_MANIFEST_SIZE, usually a few KiB).
TAG_PAGES = 256
BLOB_GRANTS = 65536
# Blobs up to this size (configs, small layers: most of a pull's requests) are kept in
# memory once read, up to SMALL_BLOBS_BYTES in all, and answered with one write.
SMALL_BLOB = 64 * 1024
SMALL_BLOBS_BYTES = 32 * 1024 * 1024


class Outcome(enum.Enum):
    HIT = "hit"
    MISS = "miss"
    REVALIDATED = "revalidated"
    COALESCED = "coalesced"
    STALE = "stale"


@dataclass(frozen=True, slots=True)
class CachedBlob:
    # Opens the landed blob (blocking: off the loop); None for a small blob from memory.
    open: Callable[[], BinaryIO] | None
    size: int
    data: bytes | None = None  # the whole blob, when it is small enough to be kept in memory
    # In object storage: bytes start..stop as they arrive; and, with redirects on, the
    # presigned URL a client is sent to instead.
    stream: Callable[[int, int], AsyncIterator[bytes]] | None = None
    location: str | None = None


class Resolver:
    def __init__(
        self,
        *,
        store: CachedStore,
        content: Content,
        fills: Fills,
        upstreams: Mapping[str, Upstream],
        coordinator: Coordinator,
        tag_ttl: float,
        max_stale: float | None = None,
        negative_ttl: float = 30.0,
        cold_lookup_rate: float = 0.0,
        pulls: PullRecorder | None = None,
        clients: PerClient | None = None,
        clock: Clock = SYSTEM,
    ) -> None:
        self.store = store
        self._content = content
        self.fills = fills
        self.upstreams = upstreams
        self._coordinator = coordinator
        self._tag_ttl = tag_ttl
        self._max_stale = max_stale
        self._negative_ttl = negative_ttl
        self._clock = clock.time
        self._manifest_flights: SingleFlight[tuple[Manifest, Outcome]] = SingleFlight()
        self.pulls = pulls or PullRecorder(store)
        self._graph_log = LogThrottle()
        # Ten seconds' worth at once, so one client's half is the five seconds' worth a
        # pull of several fresh images may need.
        self._cold_lookups = {
            name: FairBudget(
                cold_lookup_rate, max(cold_lookup_rate * 10, 2.0), clock=clock.monotonic
            )
            for name in upstreams
        }
        self._tag_pages: TTLCache[tuple[str, ...], TagsPage] = TTLCache(
            TAG_PAGES, ttl=max(tag_ttl, 1e-9), timer=clock.time
        )
        # What each client address may hold and spend (the web face sets CLIENT).
        self.clients = clients or PerClient(max_transfers=1 << 30, miss_rate=0.0)
        # (registry, repository, blob) found allowed: a manifest there references the blob,
        # or the upstream said the repository has it.
        self._blob_grants: LRUCache[tuple[str, str, str], bool] = LRUCache(BLOB_GRANTS)
        self._small: LRUCache[Digest, MemoryCopy] = LRUCache(
            SMALL_BLOBS_BYTES, getsizeof=lambda copy: len(copy.data)
        )

    def upstream(self, registry: str) -> Upstream:
        try:
            return self.upstreams[registry]
        except KeyError:
            raise NameUnknown(
                f"registry {registry!r} is not mirrored here", detail={"ns": registry}
            ) from None

    async def manifest(
        self, registry: str, repository: str, reference: Reference, accept: Sequence[str]
    ) -> tuple[Manifest, Outcome]:
        client = self.upstream(registry)
        try:
            if reference.digest is not None:
                manifest, outcome = await self._by_digest(
                    client, registry, repository, reference.digest, accept
                )
            else:
                assert reference.tag is not None
                manifest, outcome = await self._by_tag(
                    client, registry, repository, reference.tag
                )
        except NameUnknown as exc:
            await self._remember_unknown(registry, repository, exc)
            raise
        self.pulls.image(registry, repository, manifest.digest, reference.tag)
        if accepts(accept, manifest.media_type) or reference.digest is not None:
            return manifest, outcome  # a digest names these bytes, whatever the Accept
        # The client cannot read what the tag resolves to for everyone (an old client and a
        # multi-platform index): give it what Docker Hub gives it, the index's linux/amd64
        # manifest, held by digest, or the 404 it gives for an OCI type it cannot read; ask
        # upstream only when what is held does not say.
        chosen = await self._default_platform(client, registry, repository, manifest, accept)
        if chosen is not None:
            return chosen, outcome
        refusal = UNACCEPTED_OCI.get(manifest.media_type)
        if refusal is not None:
            raise ManifestUnknown(refusal, detail={"tag": reference.tag, "held": manifest.digest})
        wanted = upstream_accept(accept)
        return await self._fetch(client, registry, repository, str(reference), wanted)

    async def _default_platform(
        self,
        client: Upstream,
        registry: str,
        repository: str,
        index: Manifest,
        accept: Sequence[str],
    ) -> Manifest | None:
        try:
            refs = parse(index.body, index.media_type)
        except ManifestParseError:
            return None
        for child in refs.children:
            if child.platform == DEFAULT_PLATFORM and accepts(tuple(accept), child.media_type):
                digest = Digest.parse(child.digest)
                manifest, _ = await self._by_digest(client, registry, repository, digest, accept)
                return manifest
        return None

    def fresh(self, record: TagRecord) -> bool:
        """Is a tag record (or a kept referrers answer) inside its freshness window?"""
        return self._clock() - record.checked_at < self._tag_ttl

    def now(self) -> float:
        return self._clock()

    async def _by_tag(
        self, client: Upstream, registry: str, repository: str, tag: str
    ) -> tuple[Manifest, Outcome]:
        record = await self.store.get_tag(registry, repository, tag)
        if record is not None and self.fresh(record):
            manifest = await self.store.get_manifest(registry, repository, record.digest)
            if manifest is not None:
                return manifest, Outcome.HIT
        if await self.store.get_missing(registry, repository, tag):
            raise ManifestUnknown(detail={"tag": tag, "cached": "upstream answered 404"})
        await self.may_ask_upstream(registry, repository, cold=record is None)
        try:
            return await self.coalesced(
                ("tag", registry, repository, tag),
                lambda: self._refresh_tag_once(client, registry, repository, tag, record),
            )
        except ManifestUnknown:
            await self.store.put_missing(registry, repository, tag, self._negative_ttl)
            raise
        except (UpstreamError, TooManyRequests) as exc:
            stale = await self.stale_record(registry, repository, record)
            if stale is None:
                raise
            log.warning(
                "serving_stale",
                repository=repository,
                tag=tag,
                reason=exc.message,
                age=round(self._clock() - stale[1], 1),
            )
            return stale[0], Outcome.STALE

    async def stale_record(
        self, registry: str, repository: str, record: TagRecord | None
    ) -> tuple[Manifest, float] | None:
        """The manifest a tag last pointed to, if it may still be served past its window."""
        if record is None:
            return None
        overdue = self._clock() - record.checked_at - self._tag_ttl
        if self._max_stale is not None and overdue > self._max_stale:
            return None
        manifest = await self.store.get_manifest(registry, repository, record.digest)
        return None if manifest is None else (manifest, record.checked_at)

    async def _refresh_tag_once(
        self,
        client: Upstream,
        registry: str,
        repository: str,
        tag: str,
        record: TagRecord | None,
    ) -> tuple[Manifest, Outcome]:
        """Refresh a tag in one process of many: the others wait for its answer in the store."""
        key = f"tag:{registry}/{repository}:{tag}"
        lease = await self._coordinator.acquire(key)
        if lease is None:
            answer = await self._answer_of_holder(key, registry, repository, tag, record)
            if answer is not None:
                return answer
            lease = await self._coordinator.acquire(key)  # none: go ahead without one
        try:
            return await self._refresh_tag(client, registry, repository, tag, record)
        finally:
            if lease is not None:
                await lease.release()

    async def _answer_of_holder(
        self, key: str, registry: str, repository: str, tag: str, old: TagRecord | None
    ) -> tuple[Manifest, Outcome] | None:
        """Wait while another process resolves the tag; its result, or None if it left none."""
        for _ in range(int(HOLDER_WAIT / HOLDER_POLL)):
            await asyncio.sleep(HOLDER_POLL)
            record = await self.store.get_tag(registry, repository, tag)
            if record is not None and (old is None or record.checked_at > old.checked_at):
                manifest = await self.store.get_manifest(registry, repository, record.digest)
                if manifest is not None:
                    return manifest, Outcome.COALESCED
            if await self.store.get_missing(registry, repository, tag):
                raise ManifestUnknown(detail={"tag": tag})
            if await self._coordinator.holder(key) is None:
                return None
        return None

    async def _refresh_tag(
        self,
        client: Upstream,
        registry: str,
        repository: str,
        tag: str,
        record: TagRecord | None,
    ) -> tuple[Manifest, Outcome]:
        if record is not None:
            head = await client.head_manifest(repository, tag, MANIFEST_TYPES)
            manifest = await self.store.get_manifest(registry, repository, head.digest)
            if manifest is not None:
                await self._remember_tag(registry, repository, tag, manifest)
                return manifest, Outcome.REVALIDATED
            self._charge_miss()  # a tag never seen was charged when it was let through
        manifest = await client.get_manifest(repository, tag, MANIFEST_TYPES)
        await self._store_manifest(registry, repository, manifest)
        await self._remember_tag(registry, repository, tag, manifest)
        return manifest, Outcome.MISS

    async def _store_manifest(self, registry: str, repository: str, manifest: Manifest) -> None:
        """Keep a manifest, and record in the content graph what it references."""
        await self.store.put_manifest(registry, repository, manifest)
        try:
            refs = parse(manifest.body, manifest.media_type)
            await self.store.graph.add_manifest(registry, repository, manifest.digest, refs)
        except Exception as exc:  # the graph serves eviction and listing, never the pull
            suppressed = self._graph_log.admit(type(exc).__name__)
            if suppressed is not None:
                log.warning("graph_not_updated", error=str(exc), suppressed=suppressed)

    async def _remember_tag(
        self, registry: str, repository: str, tag: str, manifest: Manifest
    ) -> None:
        record = TagRecord(manifest.digest, manifest.media_type, self._clock())
        await self.store.put_tag(registry, repository, tag, record)

    async def _by_digest(
        self,
        client: Upstream,
        registry: str,
        repository: str,
        digest: Digest,
        accept: Sequence[str],
    ) -> tuple[Manifest, Outcome]:
        manifest = await self.store.get_manifest(registry, repository, str(digest))
        if manifest is not None:
            return manifest, Outcome.HIT
        if await self.store.get_missing(registry, repository, str(digest)):
            raise ManifestUnknown(detail={"digest": str(digest), "cached": "upstream answered 404"})
        await self.may_ask_upstream(registry, repository, cold=True)
        wanted = (*MANIFEST_TYPES, *(t for t in accept if t not in MANIFEST_TYPES))
        try:
            return await self._fetch(client, registry, repository, str(digest), wanted)
        except ManifestUnknown:
            await self.store.put_missing(registry, repository, str(digest), self._negative_ttl)
            raise

    async def may_ask_upstream(self, registry: str, repository: str, *, cold: bool) -> None:
        """Refuse what the negative cache or the cold-lookup rate says not to send upstream."""
        await self._refuse_unknown_repository(registry, repository)
        if cold:
            self._admit_cold(registry)

    def _admit_cold(self, registry: str) -> None:
        """Charge a lookup the cache cannot answer to the client's miss limit, its share of
        the upstream's cold-lookup budget and that budget, all three or none: a lookup
        refused for its own client costs everyone else nothing."""
        address = CLIENT.get()
        budget = self._cold_lookups[registry]
        refused = take_all(self.clients.misses_of(address), budget.share_of(address), budget.shared)
        if refused is None:
            return
        which, wait = refused
        headers = {"Retry-After": str(max(int(wait + 0.999), 1))}
        if which == 0:
            raise TooManyRequests(MISS_LIMIT, detail={"client": address}, headers=headers)
        if which == 1:
            raise TooManyRequests(
                "this client has made too many lookups of names this mirror does not know;"
                " retry later",
                detail={"client": address, "upstream": registry},
                headers=headers,
            )
        raise TooManyRequests(
            "too many lookups of names this mirror does not know; retry later",
            detail={"upstream": registry},
            headers=headers,
        )

    async def _refuse_unknown_repository(self, registry: str, repository: str) -> None:
        """The negative answer for a whole repository, while it lasts."""
        if await self.store.get_missing(registry, repository, REPOSITORY_MISSING):
            raise NameUnknown(
                detail={"repository": repository, "cached": "the upstream does not serve it"}
            )

    async def _remember_unknown(self, registry: str, repository: str, exc: NameUnknown) -> None:
        cached = isinstance(exc.detail, dict) and "cached" in exc.detail
        if not cached and registry in self.upstreams:
            await self.store.put_missing(
                registry, repository, REPOSITORY_MISSING, self._negative_ttl
            )

    async def _fetch(
        self,
        client: Upstream,
        registry: str,
        repository: str,
        reference: str,
        accept: Sequence[str],
    ) -> tuple[Manifest, Outcome]:
        async def fetch() -> tuple[Manifest, Outcome]:
            manifest = await client.get_manifest(repository, reference, accept)
            await self._store_manifest(registry, repository, manifest)
            return manifest, Outcome.MISS

        return await self.coalesced(("get", registry, repository, reference, *accept), fetch)

    def _charge_miss(self) -> None:
        """A manifest GET upstream is about to be spent for the client being served: refused
        when that client is over ``client_miss_limit`` (other clients are not)."""
        address = CLIENT.get()
        wait = self.clients.miss(address)
        if wait > 0:
            raise TooManyRequests(
                MISS_LIMIT,
                detail={"client": address},
                headers={"Retry-After": str(max(int(wait + 0.999), 1))},
            )

    async def coalesced(
        self, key: tuple[str, ...], work: Callable[[], Awaitable[tuple[Manifest, Outcome]]]
    ) -> tuple[Manifest, Outcome]:
        (manifest, outcome), shared = await self._manifest_flights.run(key, work)
        return manifest, Outcome.COALESCED if shared else outcome

    async def blob(self, registry: str, repository: str, digest: Digest) -> CachedBlob | Fill:
        """A cached blob, or the running fill for it (the caller is attached as a reader)."""
        client = self.upstream(registry)
        await self._may_read(client, registry, repository, digest)
        held = self._small_blob(digest)
        if held is not None:
            self.pulls.blob(str(digest))
            return CachedBlob(None, len(held), held)
        for _ in range(3):
            landing = self.fills.landing(digest)
            if landing is not None:  # verified here, not yet complete in the bucket
                landing.attach()
                self.pulls.blob(str(digest))
                return landing
            size = await self._content.find(digest)
            if size is not None and not self._content.local:
                self.pulls.blob(str(digest))
                return await self._stored_blob(digest, size)
            if size is not None:
                self.pulls.blob(str(digest))
                data = None
                if size <= SMALL_BLOB:
                    copy = await asyncio.to_thread(_read_verified, self._content, digest)
                    if copy is not None:
                        self._small[digest] = copy
                        data = copy.data
                return CachedBlob(partial(self._content.open, digest), size, data)
            await self._blob_not_known_missing(registry, repository, digest)
            fill = await self.fills.open(client, repository, digest)
            if fill is None:
                continue  # it landed on disk meanwhile
            try:
                await fill.ready
            except FillHandover:
                fill.detach()  # the process we followed died: take the fill over
                continue
            except NotFound as exc:
                fill.detach()
                await self._remember_missing_blob(registry, repository, digest, exc)
                raise
            except BaseException:
                fill.detach()
                raise
            self.pulls.blob(str(digest))
            return fill
        raise UpstreamError(
            "the blob transfer could not be started", detail={"digest": str(digest)}
        )

    async def _stored_blob(self, digest: Digest, size: int) -> CachedBlob:
        """A blob in object storage: from its copy in the hot tier when there is one (with
        sendfile); else streamed from the bucket, or a presigned URL to it."""
        if self._content.has_local(digest):
            return CachedBlob(partial(self._content.open_local, digest), size)
        self._content.warm(digest, size)
        return CachedBlob(
            partial(self._content.open, digest),
            size,
            stream=partial(self._content.chunks, digest),
            location=await self._content.presign(digest),
        )

    def _small_blob(self, digest: Digest) -> bytes | None:
        """A small blob's bytes from memory, while the file they were read from is in place:
        ``verify --repair``, gc, eviction or another process taking it out of service takes
        this copy out too, and the next pull fetches the blob again."""
        copy = self._small.get(digest)
        if copy is None:
            return None
        if not copy.in_place():
            del self._small[digest]
            return None
        return copy.data

    async def covered(
        self, registry: str, repository: str, rules: tuple[Pin, ...], *, blobs: bool
    ) -> set[str]:
        """The digests that access rules' tags and digests reach in a repository (manifests,
        or with ``blobs`` the blobs they need), as far as the store knows."""
        try:
            return await reached_by(self.store, registry, repository, rules, blobs)
        except StoreUnavailable:
            raise UpstreamError(
                "the metadata store is unavailable: access cannot be decided"
            ) from None

    def holds(self, digest: Digest) -> bool:
        """Whether the blob has landed here (one stat), or is landing from a fill here."""
        return self._content.present(digest) is not None or self.fills.landing(digest) is not None

    async def quarantine(self, digest: Digest, opened: os.stat_result) -> bool:
        """Take a blob found damaged while served (the copy ``opened``) out of service."""
        return await self._content.quarantine(digest, opened)

    async def writable(self) -> bool:
        """Whether blobs can be written here (readiness)."""
        return await self._content.writable()

    async def blob_size(self, registry: str, repository: str, digest: Digest) -> int | None:
        """For HEAD: the size of a blob, from disk or upstream, without downloading it."""
        client = self.upstream(registry)
        await self._may_read(client, registry, repository, digest)
        size = self._content.present(digest)
        if size is not None:
            return size
        landing = self.fills.landing(digest)
        if landing is not None:
            return landing.size
        await self._blob_not_known_missing(registry, repository, digest)
        try:
            return await client.head_blob(repository, digest)
        except NotFound as exc:
            await self._remember_missing_blob(registry, repository, digest, exc)
            raise

    async def _may_read(
        self, client: Upstream, registry: str, repository: str, digest: Digest
    ) -> None:
        """A blob is served for a repository only when a manifest the mirror holds there
        references it, or the upstream says (to a HEAD with that repository's own token
        scope) that the repository has it: no name, allowed or guessed, reads another
        repository's blobs. A pull fetches its manifest first, so it never pays the HEAD."""
        key = (registry, repository, str(digest))
        if key in self._blob_grants:
            return
        holders = await self.store.holders(str(digest))  # None: the store is down
        if holders is None or (registry, repository) not in holders:
            await self._blob_not_known_missing(registry, repository, digest)
            try:
                await client.head_blob(repository, digest)
            except NotFound as exc:
                await self._remember_missing_blob(registry, repository, digest, exc)
                raise
        self._blob_grants[key] = True

    async def _blob_not_known_missing(self, registry: str, repository: str, digest: Digest) -> None:
        await self._refuse_unknown_repository(registry, repository)
        if await self.store.get_missing(registry, repository, blob_missing(str(digest))):
            raise BlobUnknown(detail={"digest": str(digest), "cached": "upstream answered 404"})

    async def _remember_missing_blob(
        self, registry: str, repository: str, digest: Digest, exc: NotFound
    ) -> None:
        if isinstance(exc, NameUnknown):
            await self._remember_unknown(registry, repository, exc)
        elif isinstance(exc, BlobUnknown):
            key = blob_missing(str(digest))
            await self.store.put_missing(registry, repository, key, self._negative_ttl)

    async def tags(self, registry: str, repository: str, query: Mapping[str, str]) -> TagsPage:
        """A tag-list page, from memory inside the freshness window."""
        client = self.upstream(registry)
        key = (registry, repository, *(f"{k}={v}" for k, v in sorted(query.items())))
        page = self._tag_pages.get(key)
        if page is not None:
            return page
        await self.may_ask_upstream(registry, repository, cold=False)
        try:
            page = await client.get_tags(repository, query)
        except NameUnknown as exc:
            await self._remember_unknown(registry, repository, exc)
            raise
        except (UpstreamError, TooManyRequests):
            known = await self._known_tags(registry, repository, query)
            if known is None:
                raise
            return known
        if self._tag_ttl > 0:
            self._tag_pages[key] = page
        return page

    async def _known_tags(
        self, registry: str, repository: str, query: Mapping[str, str]
    ) -> TagsPage | None:
        """The tags the mirror holds for a repository, paged as the spec pages them: for a
        mirror that is offline or whose upstream is down. None when it holds none."""
        tags = [t.tag for t in await self.store.list_tags(registry, repository)]
        if not tags:
            return None
        tags.sort()
        if "last" in query:
            tags = [tag for tag in tags if tag > query["last"]]
        link = None
        if "n" in query:
            size = int(query["n"])
            if len(tags) > size:
                link = f"<?{urlencode({'n': size, 'last': tags[size - 1]})}>; rel=\"next\""
            tags = tags[:size]
        body = json.dumps({"name": repository, "tags": tags}).encode()
        return TagsPage(body, "application/json", link)


def _read_verified(content: Content, digest: Digest) -> MemoryCopy | None:
    """A small blob's bytes, checked against its digest once, before memory keeps them (a
    file damaged on disk since its fill is then not served from memory for ever); None when
    it is gone or does not match."""
    copy = content.read(digest)
    if copy is None or Digest.of(copy.data, digest.algorithm) != digest:
        return None
    return copy
