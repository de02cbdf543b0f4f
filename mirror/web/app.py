"""The web face of the engine: the HTTP API over the parts ``mirror.engine`` opens.

Tests swap collaborators through ``overrides`` instead of patching modules.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from typing import Any

import structlog
from aiohttp import web

from mirror.clock import as_clock
from mirror.config import Settings
from mirror.engine import Engine, Overrides, open_engine
from mirror.logs import LogThrottle
from mirror.metrics import Metrics
from mirror.services.clients import Htpasswd, LoginThrottle
from mirror.services.referrers import Referrers
from mirror.services.signatures import SignaturePolicy
from mirror.services.status import History, started_at, store_degraded, totals
from mirror.web.routes import ops, status, v2
from mirror.web.routes.middleware import add_fallback_route, server_logger
from mirror.web.routes.state import (
    ENGINE,
    HISTORY,
    HTPASSWD,
    LOG_THROTTLE,
    LOGIN_THROTTLE,
    METRICS,
    REFERRERS,
    RESOLVER,
    SETTINGS,
    SIGNATURES,
    STARTED,
    STOPPING,
    TRANSFERS,
)
from mirror.web.routes.transfers import Transfers

__all__ = ["Overrides", "create_app"]

log = structlog.get_logger(__name__)

HEALTH_INTERVAL = 10.0


def create_app(settings: Settings, *, overrides: Overrides | None = None) -> web.Application:
    overrides = overrides or Overrides()
    clock = as_clock(overrides.clock)  # the engine's, for the logins too
    throttle = LogThrottle()
    app = web.Application(
        handler_args={"max_field_size": 16384, "logger": server_logger(throttle)},
    )
    app[SETTINGS] = settings
    app[METRICS] = Metrics(upstreams=tuple(settings.upstreams))
    app[LOG_THROTTLE] = throttle
    app[TRANSFERS] = Transfers(settings.send_timeout)
    if settings.auth is not None:
        app[HTPASSWD] = Htpasswd(settings.auth.htpasswd, clock=clock.monotonic)
        app.cleanup_ctx.append(_closing(app[HTPASSWD]))
    app[LOGIN_THROTTLE] = LoginThrottle(clock.monotonic)
    app[STOPPING] = asyncio.Event()
    app.cleanup_ctx.append(_lifecycle(settings, overrides))
    v2.add_routes(app)
    ops.add_routes(app)
    status.add_routes(app)
    add_fallback_route(app)
    return app


def _lifecycle(settings: Settings, overrides: Overrides) -> Any:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        async with open_engine(
            settings, metrics=app[METRICS], overrides=overrides, background=True
        ) as engine:
            app[ENGINE] = engine
            app[RESOLVER] = engine.resolver
            app[REFERRERS] = Referrers(engine.resolver)
            if settings.signatures is not None:
                app[SIGNATURES] = SignaturePolicy(
                    settings.signatures.keys,
                    settings.signatures.repositories,
                    engine.resolver,
                    app[REFERRERS],
                    recheck=settings.tag_ttl,
                )
            metrics = app[METRICS]
            app[STARTED] = started_at(settings.data_dir / "run", time.time())
            app[HISTORY] = History(lambda: totals(metrics.render(), time.time()), app[STARTED])
            engine.background.start("status_history", app[HISTORY].run())
            engine.background.start("health_gauges", _watch_health(engine))
            log.info(
                "mirror_started",
                listen=_address(settings.listen_host, settings.listen_port),
                data_dir=str(settings.data_dir),
                store="redis" if settings.redis_url else "embedded",
                **_upstreams(settings),
            )
            try:
                yield
            finally:
                metrics.flush()

    return lifecycle


def _upstreams(settings: Settings) -> dict[str, Any]:
    """The start-up line's upstreams: their URLs, or offline and the registries served
    (no URL is contacted, so none is listed)."""
    if settings.offline:
        return {"offline": True, "registries": sorted(settings.upstreams)}
    return {"upstreams": {name: u.url for name, u in settings.upstreams.items()}}


def _closing(htpasswd: Htpasswd) -> Any:
    async def closing(app: web.Application) -> AsyncIterator[None]:
        yield
        htpasswd.close()  # its bcrypt threads

    return closing


async def _watch_health(engine: Engine, interval: float = HEALTH_INTERVAL) -> None:
    """Keep the readiness, store and disk gauges current, probed or not (for alerts)."""
    metrics, data_dir = engine.metrics, engine.settings.data_dir
    while True:
        try:
            writable = await engine.resolver.writable()
            metrics.ready.set(1 if writable else 0)
            metrics.store_degraded.set(1 if store_degraded(engine) else 0)
            usage = await asyncio.to_thread(shutil.disk_usage, data_dir)
            metrics.disk_free.set(usage.free)
            metrics.disk_total.set(usage.total)
        except OSError:
            metrics.ready.set(0)
        await asyncio.sleep(interval)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
