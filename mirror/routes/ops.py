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
    """Ready when the data dir is usable. The store and the upstreams are reported, not
    required: with Redis or the upstream down the mirror still serves what it holds."""
    request[ROUTE] = "ops"
    resolver = request.app[RESOLVER]
    writable = await asyncio.to_thread(os.access, resolver.blobs.root, os.W_OK)
    checks = {"data_dir": "ok" if writable else "not writable"}
    store = "ok" if await resolver.store.ping() else "degraded"
    upstreams: dict[str, Any] = {}
    for name, client in resolver.upstreams.items():
        upstreams[name] = {
            "reachable": not client.breaker.open,
            "ratelimit_remaining": client.ratelimit.remaining,
            "retry_after": round(client.ratelimit.retry_after(), 1),
        }
    ready = all(value == "ok" for value in checks.values())
    status = "not ready" if not ready else "ready" if store == "ok" else "degraded"
    body = {"status": status, "checks": {**checks, "store": store}, "upstreams": upstreams}
    return web.json_response(body, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    request[ROUTE] = "ops"
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
