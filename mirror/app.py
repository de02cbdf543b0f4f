"""The composition root: everything the mirror is made of is built here, from Settings.

Tests swap collaborators through ``overrides`` instead of patching modules.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from mirror.config import Settings
from mirror.coordination import (
    Coordinator,
    LocalCoordinator,
    RedisCoordinator,
    data_dir_identity,
)
from mirror.fills import Fills
from mirror.metrics import Metrics
from mirror.resolver import Resolver
from mirror.routes import ops, v2
from mirror.routes.middleware import registry_middleware
from mirror.routes.state import METRICS, RESOLVER, SETTINGS
from mirror.store.blobs import BlobStore
from mirror.store.cached import CachedStore
from mirror.store.embedded import EmbeddedStore
from mirror.store.protocols import MetadataStore
from mirror.store.redis_store import RedisStore
from mirror.upstream.auth import TokenAuth
from mirror.upstream.client import USER_AGENT, UpstreamClient
from mirror.upstream.ratelimit import RateLimit

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Overrides:
    """Collaborators a test (or an embedding program) provides instead of the defaults."""

    store: MetadataStore | None = None
    clock: Callable[[], float] | None = None
    probe_interval: float = 5.0


def create_app(settings: Settings, *, overrides: Overrides | None = None) -> web.Application:
    app = web.Application(middlewares=[registry_middleware], handler_args={"max_field_size": 16384})
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app.cleanup_ctx.append(_lifecycle(settings, overrides or Overrides()))
    v2.add_routes(app)
    ops.add_routes(app)
    return app


def _lifecycle(settings: Settings, overrides: Overrides) -> Any:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        metrics = app[METRICS]
        data_dir = settings.data_dir
        await asyncio.to_thread(data_dir.mkdir, parents=True, exist_ok=True)
        blobs = BlobStore(data_dir / "blobs")
        await asyncio.to_thread(blobs.root.mkdir, exist_ok=True)
        await asyncio.to_thread(blobs.sweep)
        inner = overrides.store or await _open_store(settings)
        store = CachedStore(
            inner, max_entries=settings.manifest_cache_size, tag_ttl=settings.tag_ttl
        )
        session = _upstream_session(settings)
        upstreams = {
            name: UpstreamClient(
                name,
                upstream.url,
                session,
                TokenAuth(session, username=upstream.username, password=upstream.password),
                metrics=metrics,
                ratelimit=RateLimit(reserve=settings.ratelimit_reserve),
                probe_interval=overrides.probe_interval,
            )
            for name, upstream in settings.upstreams.items()
        }
        coordinator = await asyncio.to_thread(_coordinator, settings, inner)
        fills = Fills(
            blobs,
            coordinator,
            stall_timeout=settings.read_timeout,
            on_change=metrics.fills_in_flight.set,
        )
        app[RESOLVER] = Resolver(
            store=store,
            blobs=blobs,
            fills=fills,
            upstreams=upstreams,
            coordinator=coordinator,
            tag_ttl=settings.tag_ttl,
            max_stale=settings.max_stale,
            negative_ttl=settings.negative_ttl,
            **({"clock": overrides.clock} if overrides.clock else {}),
        )
        log.info(
            "mirror_started",
            data_dir=str(data_dir),
            store="redis" if settings.redis_url else "embedded",
            upstreams={name: u.url for name, u in settings.upstreams.items()},
        )
        try:
            yield
        finally:
            await fills.close()
            for client in upstreams.values():
                await client.close()
            await session.close()
            await coordinator.close()
            await store.close()

    return lifecycle


async def _open_store(settings: Settings) -> MetadataStore:
    if settings.redis_url is not None:
        return await RedisStore.open(settings.redis_url)
    return await EmbeddedStore.open(settings.data_dir)


def _coordinator(settings: Settings, store: MetadataStore) -> Coordinator:
    local = LocalCoordinator(settings.data_dir / "locks")
    if isinstance(store, RedisStore):
        scope = data_dir_identity(settings.data_dir)
        return RedisCoordinator(store.client, local, scope=scope)
    return local


def _upstream_session(settings: Settings) -> aiohttp.ClientSession:
    timeout = aiohttp.ClientTimeout(
        total=None, connect=settings.connect_timeout, sock_read=settings.read_timeout
    )
    return aiohttp.ClientSession(
        timeout=timeout,
        # Blobs must reach the disk byte for byte, so nothing is decoded on the way.
        headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
        auto_decompress=False,
        trust_env=True,
    )
