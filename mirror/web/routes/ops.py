"""Operational endpoints: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from aiohttp import web

from mirror.metrics import CONTENT_TYPE_LATEST
from mirror.services.status import backends
from mirror.web.routes.middleware import NOSNIFF, NOSNIFF_HEADER, add_route
from mirror.web.routes.state import ENGINE, EXCHANGE, HTPASSWD, METRICS, RESOLVER, STOPPING
from mirror.web.routes.v2 import check_method

_HEADERS = {NOSNIFF_HEADER: NOSNIFF}


def add_routes(app: web.Application) -> None:
    # Any method, refused in the handler: the fallback route (mirror.web.app) would otherwise
    # take a POST as a path it does not know.
    for path, handler in (("/healthz", healthz), ("/readyz", readyz), ("/metrics", metrics)):
        add_route(app, path, handler)


async def healthz(request: web.Request) -> web.Response:
    request[EXCHANGE].route = "ops"
    check_method(request)
    return web.json_response({"status": "ok"}, headers=_HEADERS)


async def readyz(request: web.Request) -> web.Response:
    """Ready when the data dir is usable, the process is not stopping and, with logins on,
    the password file readable. The store and the upstreams are reported, not required:
    with Redis or the upstream down the mirror still serves what it holds."""
    request[EXCHANGE].route = "ops"
    check_method(request)
    if request.app[STOPPING].is_set():
        # Told to stop: load balancers and Kubernetes endpoints stop sending new pulls here.
        return web.json_response({"status": "stopping"}, status=503, headers=_HEADERS)
    resolver = request.app[RESOLVER]
    writable = await resolver.writable()
    checks = {"data_dir": "ok" if writable else "not writable"}
    if HTPASSWD in request.app:  # logins on: a mirror that must refuse them all is not ready
        htpasswd = request.app[HTPASSWD]
        await htpasswd.refresh()
        checks["logins"] = htpasswd.problem or "ok"
    engine = request.app[ENGINE]
    upstreams: dict[str, Any] = {}
    for name, client in resolver.upstreams.items():
        upstreams[name] = asdict(await client.health())
    reported = await backends(engine)
    ready = all(value == "ok" for value in checks.values())
    healthy = all(value == "ok" for value in reported.values())
    status = "not ready" if not ready else "ready" if healthy else "degraded"
    body = {
        "status": status,
        "offline": engine.settings.offline,
        "checks": {**checks, **reported},
        "upstreams": upstreams,
    }
    return web.json_response(body, status=200 if ready else 503, headers=_HEADERS)


async def metrics(request: web.Request) -> web.Response:
    request[EXCHANGE].route = "ops"
    check_method(request)
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={**_HEADERS, "Content-Type": CONTENT_TYPE_LATEST})
