"""The status page: ``GET /`` for people, ``GET /status.json`` for scripts.

The page is one self-contained document (no external assets: it works air-gapped) that
fetches ``/status.json`` every ten seconds and draws it; every value is put in the page as
text, never as markup, so names that came from an upstream or a client cannot inject any.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import asdict
from typing import Any

from aiohttp import web

from mirror.services import status
from mirror.web.routes.middleware import NOSNIFF, NOSNIFF_HEADER, add_route
from mirror.web.routes.state import ENGINE, EXCHANGE, HISTORY, METRICS, STARTED
from mirror.web.routes.status_page import PAGE
from mirror.web.routes.v2 import check_method

_PAGE_HEADERS = {
    NOSNIFF_HEADER: NOSNIFF,
    # Nothing but the page's own inline script and style, and requests to its own origin.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; frame-ancestors 'none'"
    ),
    "Cache-Control": "no-cache",
    "Referrer-Policy": "no-referrer",
}


def add_routes(app: web.Application) -> None:
    add_route(app, "/", page, expect=False)
    add_route(app, "/status.json", status_json, expect=False)


async def page(request: web.Request) -> web.Response:
    request[EXCHANGE].route = "status"
    check_method(request)
    return web.Response(text=PAGE, content_type="text/html", headers=_PAGE_HEADERS)


async def status_json(request: web.Request) -> web.Response:
    request[EXCHANGE].route = "status"
    check_method(request)
    return web.json_response(await collect(request.app), headers={NOSNIFF_HEADER: NOSNIFF})


async def collect(app: web.Application) -> dict[str, Any]:
    engine, history = app[ENGINE], app[HISTORY]
    metrics = app[METRICS]
    now = await asyncio.to_thread(lambda: status.totals(metrics.render(), time.time()))
    hour, chart = history.last_hour(now)
    settings = engine.settings
    disk: dict[str, Any] = {"budget": settings.max_cache_size}
    with contextlib.suppress(OSError):
        disk |= await asyncio.to_thread(status.disk, settings.data_dir)
    held, top = await status.held(engine)
    disk |= held
    return status.document(
        started=app[STARTED],
        now=now,
        hour=hour,
        chart=chart,
        upstreams={
            name: asdict(await c.health()) | {"url": status.shown_url(settings.upstreams[name].url)}
            for name, c in engine.upstreams.items()
        },
        offline=settings.offline,
        disk_state=disk,
        top_images=top,
        errors=await asyncio.to_thread(engine.errors.latest, 20),
    )
