"""Operational endpoints: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from aiohttp import web

from mirror.metrics import CONTENT_TYPE_LATEST
from mirror.routes.state import METRICS, RESOLVER, ROUTE


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)


async def healthz(request: web.Request) -> web.Response:
    request[ROUTE] = "ops"
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when the store and the data dir are usable; upstream state is reported only,
    since a mirror whose upstream is down still serves everything it holds."""
    request[ROUTE] = "ops"
    resolver = request.app[RESOLVER]
    writable = await asyncio.to_thread(os.access, resolver.blobs.root, os.W_OK)
    checks = {
        "data_dir": "ok" if writable else "not writable",
        "store": "ok" if await resolver.store.ping() else "unavailable",
    }
    upstreams: dict[str, Any] = {}
    for name, client in resolver.upstreams.items():
        upstreams[name] = {
            "reachable": not client.breaker.open,
            "ratelimit_remaining": client.ratelimit.remaining,
            "retry_after": round(client.ratelimit.retry_after(), 1),
        }
    ready = all(value == "ok" for value in checks.values())
    return web.json_response(
        {"status": "ready" if ready else "not ready", "checks": checks, "upstreams": upstreams},
        status=200 if ready else 503,
    )


async def metrics(request: web.Request) -> web.Response:
    request[ROUTE] = "ops"
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
