"""The engine: every part of the mirror, opened and closed in one place.

``mirror serve`` runs the engine behind the HTTP API (``mirror.web.app``); the offline
subcommands (``ls``, ``gc``, ``verify``, ...) open the very same engine on the same data
dir without a web server, the way devpi-server's XOM serves both its server and its fsck.
Tests and embedding programs swap collaborators through :class:`Overrides`.

    Engine
    ├── store        metadata (manifests, tags, negative answers): embedded SQLite or Redis,
    │                behind the in-process CachedStore
    ├── health       one verdict on that store, shared by everything on its Redis; one probe
    ├── blobs        blob bytes by digest: files in the data dir, or objects in a bucket
    ├── coordinator  leases across workers (flock) and replicas (Redis)
    ├── fills        blob downloads shared by their readers
    ├── upstreams    one client per upstream registry (token auth, quota, circuit breaker),
    │                or the offline stand-in that contacts nothing (``serve --offline``)
    └── resolver     the pull-through policy over all of the above
"""

from __future__ import annotations

import asyncio
import math
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import aiohttp
import structlog

from mirror.clock import Clock, as_clock
from mirror.config import Settings, UpstreamSettings
from mirror.content.blobs import BlobStore
from mirror.content.cached import CachedStore
from mirror.content.embedded import EmbeddedStore
from mirror.content.layer import Content
from mirror.content.protocols import MetadataStore
from mirror.content.redis_store import RedisStore
from mirror.content.s3 import open_s3
from mirror.content.storage import BlobStorage
from mirror.domain.reference import Digest
from mirror.domain.units import SizeOrShare
from mirror.health import StoreHealth
from mirror.metrics import Metrics
from mirror.services.background import Background
from mirror.services.clients import PerClient
from mirror.services.coordination import (
    Coordinator,
    LocalCoordinator,
    RedisCoordinator,
    data_dir_identity,
)
from mirror.services.eviction import INTERVAL, Budget, Evictor
from mirror.services.fills import Fills
from mirror.services.pulls import PullRecorder
from mirror.services.resolver import Resolver
from mirror.services.status import RecentErrors
from mirror.upstream.auth import TokenAuth
from mirror.upstream.client import USER_AGENT, UpstreamClient
from mirror.upstream.offline import OfflineUpstream
from mirror.upstream.protocol import Upstream
from mirror.upstream.ratelimit import RateLimit
from mirror.upstream.shared_state import FileState, RedisState, UpstreamState

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Overrides:
    """Collaborators a test (or an embedding program) provides instead of the defaults."""

    store: MetadataStore | None = None
    # The clock, or a wall-time callable (intervals then measured by the system's).
    clock: Clock | Callable[[], float] | None = None
    probe_interval: float = 5.0
    eviction_interval: float = INTERVAL


@dataclass(frozen=True, slots=True)
class Engine:
    settings: Settings
    metrics: Metrics
    store: CachedStore
    blobs: BlobStorage
    content: Content  # blobs in and out, and their records: the only way to them
    coordinator: Coordinator
    fills: Fills
    upstreams: Mapping[str, Upstream]
    resolver: Resolver
    pulls: PullRecorder
    evictor: Evictor
    errors: RecentErrors
    background: Background  # every task besides answering: started there, stopped together
    clock: Clock  # what every part above measures time by


@asynccontextmanager
async def open_engine(
    settings: Settings,
    *,
    metrics: Metrics | None = None,
    overrides: Overrides | None = None,
    background: bool = False,
) -> AsyncIterator[Engine]:
    """Open every part on ``settings.data_dir``; close them all, in reverse, on exit.

    ``background`` starts the work a server does besides answering: writing pull times and
    keeping the disk budget. The offline subcommands leave it off.
    """
    overrides = overrides or Overrides()
    metrics = metrics or Metrics()
    clock = as_clock(overrides.clock)
    async with AsyncExitStack() as stack:
        blobs, scope = await _open_storage(stack, settings, metrics, sweep=background)
        inner = overrides.store or await _open_store(settings, scope, clock)
        # One Redis, one verdict on it: the store, its graph, the leases and the upstreams'
        # shared state all follow it, and its one probe pings through the store's client.
        health = StoreHealth(inner.ping, clock=clock)
        store = CachedStore(
            inner,
            max_entries=settings.manifest_cache_size,
            max_bytes=settings.manifest_cache_bytes,
            tag_ttl=settings.tag_ttl,
            clock=clock,
            health=health,
        )
        stack.push_async_callback(store.close)
        stack.push_async_callback(health.close)  # the probe stops before the store closes
        coordinator = await asyncio.to_thread(_coordinator, settings, inner, scope, health)
        stack.push_async_callback(coordinator.close)
        if isinstance(inner, RedisStore) and inner.unreachable is not None:
            health.failed(inner.unreachable)
        errors = RecentErrors(settings.data_dir / "run", clock=clock.time)
        upstreams = await stack.enter_async_context(
            _upstreams(
                settings, metrics, coordinator, overrides, errors, health=health, clock=clock
            )
        )
        budget = Budget(
            settings.max_cache_size,
            # Blobs in a bucket take no room on the data dir's disk: nothing to free there.
            settings.min_free_space if blobs.local else SizeOrShare(bytes=0),
            settings.evict_unused_after,
            settings.pins,
        )
        pulls = PullRecorder(store, clock=clock.time)
        content = Content(blobs, store.graph, clock.time)
        evictor = Evictor(
            store=store,
            content=content,
            coordinator=coordinator,
            budget=budget,
            metrics=metrics,
            data_dir=settings.data_dir,
            clock=clock.time,
            interval=overrides.eviction_interval,
            before_pass=pulls.flush,
        )
        health.when_back(evictor.realign)  # blob records of the outage were dropped

        async def stored(digest: Digest, size: int) -> None:
            evictor.poke()

        fills = Fills(
            content,
            coordinator,
            stall_timeout=settings.read_timeout,
            on_change=metrics.fills_in_flight.set,
            on_stored=stored,
            keep=budget.keeps,
            clock=clock.monotonic,
        )
        stack.push_async_callback(fills.close)
        resolver = Resolver(
            store=store,
            content=content,
            fills=fills,
            upstreams=upstreams,
            coordinator=coordinator,
            # Offline, nothing can revalidate a tag and no lookup costs anything: what is
            # held is current, whatever its age.
            tag_ttl=math.inf if settings.offline else settings.tag_ttl,
            max_stale=settings.max_stale,
            negative_ttl=settings.negative_ttl,
            cold_lookup_rate=0.0 if settings.offline else settings.cold_lookup_rate,
            clients=PerClient(
                max_transfers=settings.client_max_transfers,
                miss_rate=settings.client_miss_limit,
                clock=clock.monotonic,
            ),
            pulls=pulls,
            clock=clock,
        )
        tasks = Background()
        if background:
            stack.push_async_callback(pulls.flush)  # the last times, once the flusher stopped
            tasks.start("pull_times", pulls.flush_forever())
            tasks.start("evictor", evictor.run_forever(), stopping=evictor.stop)
        # Every background task (the app's too) stops here, before anything it uses closes.
        stack.push_async_callback(tasks.stop)
        yield Engine(
            settings,
            metrics,
            store,
            blobs,
            content,
            coordinator,
            fills,
            upstreams,
            resolver,
            pulls,
            evictor,
            errors,
            tasks,
            clock,
        )


@asynccontextmanager
async def _upstreams(
    settings: Settings,
    metrics: Metrics,
    coordinator: Coordinator,
    overrides: Overrides,
    errors: RecentErrors,
    *,
    health: StoreHealth,
    clock: Clock,
) -> AsyncIterator[dict[str, Upstream]]:
    """One client per upstream registry, sharing one HTTP session; or, offline, the
    client that never connects anywhere."""
    if settings.offline:
        metrics.offline.set(1)
        yield {name: OfflineUpstream(name) for name in settings.upstreams}
        return
    async with AsyncExitStack() as stack:
        upstreams: dict[str, Upstream] = {}
        for name, upstream in settings.upstreams.items():
            # A session each: the registry, its token realm and its CDN share its trust.
            session = _upstream_session(settings, upstream)
            stack.push_async_callback(session.close)
            shared = _shared_state(settings, coordinator, health, name)
            client = UpstreamClient(
                name,
                upstream.url,
                session,
                TokenAuth(
                    session, username=upstream.username, password=upstream.password, clock=clock
                ),
                metrics=metrics,
                ratelimit=RateLimit(
                    reserve=settings.ratelimit_reserve, shared=shared, clock=clock.time
                ),
                probe_interval=overrides.probe_interval,
                shared=shared,
                request_timeout=settings.request_timeout,
                on_error=errors.add,
                clock=clock,
            )
            stack.push_async_callback(client.close)
            upstreams[name] = client
        yield upstreams


async def _open_storage(
    stack: AsyncExitStack, settings: Settings, metrics: Metrics, *, sweep: bool
) -> tuple[BlobStorage, str]:
    """Where blobs live, and the scope of their records and leases in a shared Redis: the
    data dir's, or, in object storage, the bucket's (replicas then share no disk)."""
    if settings.storage is None:
        blobs = await asyncio.to_thread(_open_blobs, settings, sweep=sweep)
        return blobs, await asyncio.to_thread(data_dir_identity, settings.data_dir)
    await asyncio.to_thread(settings.data_dir.mkdir, parents=True, exist_ok=True)
    bucket = await stack.enter_async_context(
        open_s3(
            settings.storage,
            settings.data_dir / "spool",
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.request_timeout,
            metrics=metrics,
            hot=settings.data_dir / "hot",
        )
    )
    if sweep:
        await asyncio.to_thread(bucket.sweep)
    await asyncio.to_thread(bucket.on_disk)  # what it holds, known to the hot path
    return bucket, bucket.identity()


def _open_blobs(settings: Settings, *, sweep: bool) -> BlobStore:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    blobs = BlobStore(settings.data_dir / "blobs")
    blobs.root.mkdir(exist_ok=True)
    if sweep:  # a server starting; the offline commands leave partial files to gc
        blobs.sweep()
    return blobs


async def check_store(settings: Settings) -> None:
    """Open and close a Redis store once, before a server starts any worker: keys a newer
    release laid out (``NewerSchema``) stop the start here, in one line."""
    if settings.redis_url is not None:
        store = await RedisStore.open(settings.redis_url, ca_file=settings.redis_ca_file)
        await store.close()


async def _open_store(settings: Settings, scope: str, clock: Clock) -> MetadataStore:
    if settings.redis_url is not None:
        # Blob records are the storage's: replicas with data dirs of their own keep theirs.
        return await RedisStore.open(
            settings.redis_url, scope=scope, ca_file=settings.redis_ca_file
        )
    return await EmbeddedStore.open(settings.data_dir, clock=clock.time)


def _shared_state(
    settings: Settings, coordinator: Coordinator, health: StoreHealth, upstream: str
) -> UpstreamState:
    """Where the processes of the site share an upstream's quota and circuit state."""
    on_host = FileState(settings.data_dir / "run", upstream)
    if isinstance(coordinator, RedisCoordinator):
        return RedisState(coordinator.client, upstream, on_host, health)
    return on_host


def _coordinator(
    settings: Settings, store: MetadataStore, scope: str, health: StoreHealth
) -> Coordinator:
    local = LocalCoordinator(settings.data_dir / "locks")
    if isinstance(store, RedisStore):
        return RedisCoordinator(store.client, local, scope=scope, health=health)
    return local


def _upstream_session(settings: Settings, upstream: UpstreamSettings) -> aiohttp.ClientSession:
    timeout = aiohttp.ClientTimeout(
        total=None, connect=settings.connect_timeout, sock_read=settings.read_timeout
    )
    return aiohttp.ClientSession(
        timeout=timeout,
        connector=aiohttp.TCPConnector(ssl=upstream_tls(upstream)),
        # Blobs must reach the disk byte for byte, so nothing is decoded on the way.
        headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
        auto_decompress=False,
        # HTTPS_PROXY, HTTP_PROXY and NO_PROXY: the egress proxy most sites have.
        trust_env=True,
    )


def upstream_tls(upstream: UpstreamSettings) -> ssl.SSLContext | bool:
    """How an upstream's certificates are checked: the system CAs, plus its ``ca_file``;
    or, with ``insecure``, not at all."""
    if upstream.insecure:
        log.warning(
            "upstream_tls_unverified",
            upstream=upstream.registry,
            hint="insecure: true; anyone on the path can impersonate this registry",
        )
        return False
    if upstream.ca_file is None:
        return True
    context = ssl.create_default_context()
    context.load_verify_locations(cafile=str(upstream.ca_file))
    return context
