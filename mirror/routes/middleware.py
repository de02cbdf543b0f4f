"""Request-wide behaviour: the registry's JSON error body and one access-log line per request."""

from __future__ import annotations

import itertools
import logging
import os
import secrets

import structlog
from aiohttp import HttpVersion11, web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler

from mirror.errors import NotFound, RegistryError, Unsupported
from mirror.routes.state import (
    BYTES_SENT,
    CACHE_OUTCOME,
    LOG_THROTTLE,
    METRICS,
    REGISTRY,
    REQUEST_ID,
    ROUTE,
)

log = structlog.get_logger("mirror.access")

API_VERSION_HEADER = "Docker-Distribution-API-Version"
API_VERSION = "registry/2.0"
# On every answer: no browser may guess a type for content the mirror did not write itself.
NOSNIFF_HEADER = "X-Content-Type-Options"
NOSNIFF = "nosniff"
# Request ids: unique per process start, cheap per request (uuid4 costs more than a handler).
_PROCESS_TAG = f"{os.getpid():x}{secrets.token_hex(2)}"
_request_numbers = itertools.count(1)
# Characters of a client-chosen value (user agent, ns) an access-log line carries.
MAX_LOGGED = 200


def error_response(error: RegistryError) -> web.Response:
    response = web.json_response(error.body(), status=error.status, headers=error.headers)
    response.headers[API_VERSION_HEADER] = API_VERSION
    response.headers[NOSNIFF_HEADER] = NOSNIFF
    return response


async def expect_handler(request: web.Request) -> None:
    """``Expect`` for every route: 100-continue answered as aiohttp answers it, any other
    expectation ignored, as RFC 9110 allows. aiohttp's own handler answers those before the
    middleware runs, with a text/plain 417, or a 500 when the value is not UTF-8."""
    if request.version != HttpVersion11:
        return
    if request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the body has not started


def add_fallback_route(app: web.Application) -> None:
    """Route every path nothing else took to a 404, so that it too goes through
    ``expect_handler`` and the middleware. Added last: it matches anything."""
    app.router.add_route("*", "/{tail:.*}", _no_route, expect_handler=expect_handler)


async def _no_route(request: web.Request) -> web.StreamResponse:
    raise NotFound(f"no route for {request.path[:200]}")


@web.middleware
async def registry_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every request: an id for its log lines, domain errors turned into the registry's error
    body, and the request counted by route, status and cache outcome."""
    request_id = f"{_PROCESS_TAG}-{next(_request_numbers):x}"
    request[REQUEST_ID] = request_id
    # Each connection's task has its own context, so binding without a reset cannot leak
    # into another connection; the next request on this one binds its own id.
    structlog.contextvars.bind_contextvars(request_id=request_id)
    try:
        response = await handler(request)
    except RegistryError as error:
        response = error_response(error)
    except web.HTTPMethodNotAllowed:
        response = error_response(Unsupported())
    except web.HTTPNotFound:
        response = error_response(NotFound(f"no route for {request.path[:200]}"))
    except web.HTTPException:
        raise  # aiohttp's own answers (a body too large, say): already what they should be
    except Exception as error:  # the boundary: nothing unexpected leaves it raw
        response = _unexpected(request, error)
    _count(request, response)
    return response


def _unexpected(request: web.Request, error: Exception) -> web.StreamResponse:
    """A bug, or a part failing in a way nothing foresaw: the registry's error body, and the
    traceback once per interval for each place that raises (a broken part fails every
    request; its traceback need not be in the log a thousand times)."""
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    where = (frame.tb_frame.f_code.co_filename, frame.tb_lineno) if frame else None
    suppressed = request.app[LOG_THROTTLE].admit(("unexpected_error", type(error), where))
    if suppressed is not None:
        log.error(
            "unexpected_error",
            method=request.method,
            path=request.path[:200],
            suppressed=suppressed,
            exc_info=error,
        )
    if request.writer.output_size > 0 and request.transport is not None:
        # The answer has begun: the client can only be told by a cut connection.
        request.transport.abort()
    return error_response(RegistryError("internal error"))


def _count(request: web.Request, response: web.StreamResponse) -> None:
    metrics = request.app[METRICS]
    route = request.get(ROUTE, "other")
    cache = request.get(CACHE_OUTCOME, "none")
    metrics.count_request(route, request.method, response.status, cache)
    if route == "blob" and response.status in (200, 206):
        source = "cache" if cache == "hit" else "upstream"
        metrics.bytes_served.labels(source).inc(_body_bytes(request, response))


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
            # Client input, cut short: a header of 8 KiB must not become a log line of 8 KiB.
            ns=_clip(request.get(REGISTRY)),
            client=request.remote,
            user_agent=_clip(request.headers.get("User-Agent")),
        )

    @property
    def enabled(self) -> bool:
        # aiohttp skips the call altogether when the level filters the line out anyway.
        return bool(log.is_enabled_for(logging.INFO))


def _clip(value: str | None) -> str | None:
    return value if value is None or len(value) <= MAX_LOGGED else value[:MAX_LOGGED] + "..."


def _body_bytes(request: web.BaseRequest, response: web.StreamResponse) -> int:
    if request.method == "HEAD" or response.status in (204, 304):
        return 0
    sent = request.get(BYTES_SENT)
    if sent is not None:
        return int(sent)
    return response.content_length or 0
