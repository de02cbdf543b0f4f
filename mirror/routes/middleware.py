"""Request-wide behaviour: the registry's JSON error body and one access-log line per request."""

from __future__ import annotations

import uuid

import structlog
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler

from mirror.errors import NotFound, RegistryError, Unsupported
from mirror.routes.state import BYTES_SENT, CACHE_OUTCOME, METRICS, REQUEST_ID, ROUTE

log = structlog.get_logger("mirror.access")

API_VERSION_HEADER = "Docker-Distribution-API-Version"
API_VERSION = "registry/2.0"


def error_response(error: RegistryError) -> web.Response:
    response = web.json_response(error.body(), status=error.status, headers=error.headers)
    response.headers[API_VERSION_HEADER] = API_VERSION
    return response


@web.middleware
async def registry_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = uuid.uuid4().hex[:16]
    request[REQUEST_ID] = request_id
    with structlog.contextvars.bound_contextvars(request_id=request_id):
        try:
            return await handler(request)
        except RegistryError as error:
            return error_response(error)
        except web.HTTPMethodNotAllowed:
            return error_response(Unsupported())
        except web.HTTPNotFound:
            return error_response(NotFound(f"no route for {request.path[:200]}"))


@web.middleware
async def count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    metrics = request.app[METRICS]
    route = request.get(ROUTE, "other")
    cache = request.get(CACHE_OUTCOME, "none")
    metrics.requests.labels(route, request.method, str(response.status), cache).inc()
    if route == "blob" and response.status in (200, 206):
        source = "cache" if cache == "hit" else "upstream"
        metrics.bytes_served.labels(source).inc(_body_bytes(request, response))
    return response


class AccessLogger(AbstractAccessLogger):
    """aiohttp calls this once the response is sent, so the byte count is what went out."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        log.info(
            "request",
            request_id=request.get(REQUEST_ID),
            method=request.method,
            path=request.path,
            status=response.status,
            bytes=_body_bytes(request, response),
            duration_ms=round(time * 1000, 2),
            cache=request.get(CACHE_OUTCOME),
        )

    @property
    def enabled(self) -> bool:
        return True


def _body_bytes(request: web.BaseRequest, response: web.StreamResponse) -> int:
    if request.method == "HEAD" or response.status in (204, 304):
        return 0
    sent = request.get(BYTES_SENT)
    if sent is not None:
        return int(sent)
    return response.content_length or 0
