"""Operational endpoints: liveness and readiness."""

from __future__ import annotations

import asyncio
import os

from aiohttp import web

from mirror.routes.v2 import RESOLVER


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    resolver = request.app[RESOLVER]
    root = resolver.blobs.root
    writable = await asyncio.to_thread(os.access, root, os.W_OK)
    checks = {"data_dir": "ok" if writable else "not writable"}
    ready = all(value == "ok" for value in checks.values())
    return web.json_response(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status=200 if ready else 503,
    )
