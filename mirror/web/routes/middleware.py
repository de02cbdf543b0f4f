"""Request-wide behaviour, for every route: the registry's JSON error body, one access-log
line per request, and short, rate-limited lines for what aiohttp's HTTP server itself
reports."""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import secrets
from http import HTTPStatus
from time import perf_counter

import structlog
from aiohttp import HttpVersion11, web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler

from mirror.domain.errors import NotFound, OutOfDescriptors, RegistryError, Unsupported
from mirror.logs import ACCESS, REQUEST_ID, LogThrottle, clip
from mirror.web.routes.access import admit
from mirror.web.routes.state import EXCHANGE, LOG_THROTTLE, METRICS, Exchange

log = structlog.get_logger("mirror.access")
server_log = structlog.get_logger("mirror.http")

API_VERSION_HEADER = "Docker-Distribution-API-Version"
API_VERSION = "registry/2.0"
# On every answer: no browser may guess a type for content the mirror did not write itself.
NOSNIFF_HEADER = "X-Content-Type-Options"
NOSNIFF = "nosniff"
# Request ids: unique per process start, cheap per request (uuid4 costs more than a handler).
_PROCESS_TAG = f"{os.getpid():x}{secrets.token_hex(2)}"
_request_numbers = itertools.count(1)
# nginx's status for "the client closed the connection before the answer": for the access
# log and the metrics, never sent.
CLIENT_CLOSED_REQUEST = 499
_OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE})


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


def add_route(app: web.Application, path: str, handler: Handler, *, expect: bool = True) -> None:
    """Route every method of ``path`` to ``handler``, run through ``answered``; ``expect``
    answers ``Expect`` headers with ``expect_handler``."""
    app.router.add_route(
        "*", path, answered(handler), expect_handler=expect_handler if expect else None
    )


def add_fallback_route(app: web.Application) -> None:
    """Route every path nothing else took to a 404, so that it too goes through
    ``expect_handler`` and ``answered``. Added last: it matches anything."""
    add_route(app, "/{tail:.*}", _no_route)


async def _no_route(request: web.Request) -> web.StreamResponse:
    raise NotFound(f"no route for {request.path[:200]}")


def answered(handler: Handler) -> Handler:
    """``handler`` as every route runs it: an id for its log lines, domain errors turned into
    the registry's error body, and the request counted by route, status and cache outcome.

    A wrapper per route rather than an aiohttp middleware: every route takes every method
    and the fallback route takes every path, so the router never answers by itself, and
    without middlewares aiohttp calls the handler directly (a middleware chain costs two
    more coroutines per request)."""

    @functools.wraps(handler)
    async def answer(request: web.Request) -> web.StreamResponse:
        started = perf_counter()
        exchange = Exchange(f"{_PROCESS_TAG}-{next(_request_numbers):x}", started)
        request[EXCHANGE] = exchange
        # Each connection's task has its own context, so setting it without a reset cannot
        # leak into another connection; the next request on this one sets its own id.
        REQUEST_ID.set(exchange.id)
        try:
            await admit(request)
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
            if isinstance(error, ConnectionError) and _client_closed(request):
                response = _client_gone(request)
            else:
                response = _unexpected(request, error)
        route, status = exchange.route, response.status
        metrics = request.app[METRICS]
        metrics.count_request(
            route, request.method, status, exchange.cache or "none", perf_counter() - started
        )
        if route == "blob" and status in (200, 206):
            source = "cache" if exchange.cache == "hit" else "upstream"
            metrics.count_bytes_served(source, _body_bytes(request, response, exchange))
        return response

    return answer


def _client_closed(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


def _client_gone(request: web.Request) -> web.StreamResponse:
    """The client went away (or half-closed) before its answer could be written: nothing
    to log but the access line, and nothing left to say."""
    if request.transport is not None:
        request.transport.abort()
    return web.Response(status=CLIENT_CLOSED_REQUEST)


def _unexpected(request: web.Request, error: Exception) -> web.StreamResponse:
    """A bug, or a part failing in a way nothing foresaw: the registry's error body, and the
    traceback once per interval for each place that raises (a broken part fails every
    request; its traceback need not be in the log a thousand times)."""
    if isinstance(error, OSError) and error.errno in _OUT_OF_DESCRIPTORS:
        return _out_of_descriptors(request, error)
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


def _out_of_descriptors(request: web.Request, error: OSError) -> web.StreamResponse:
    """No descriptor left for a file or a socket: a load to shed, not a bug. 503 with
    Retry-After, and one short line per interval."""
    suppressed = request.app[LOG_THROTTLE].admit("out_of_descriptors")
    if suppressed is not None:
        log.error("out_of_descriptors", error=error.strerror, suppressed=suppressed)
    if request.writer.output_size > 0 and request.transport is not None:
        request.transport.abort()  # the answer has begun: only a cut connection tells
    return error_response(OutOfDescriptors())


class AccessLogger(AbstractAccessLogger):
    """aiohttp calls this once the response is sent, so the byte count is what went out.

    The duration is timed from the start of the handler with ``time.perf_counter``, not
    taken from aiohttp: aiohttp times with ``loop.time()``, which under uvloop is the
    loop's cached clock in whole milliseconds (a cached tag logged 0.00 or 1.00 ms)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        try:
            exchange = request[EXCHANGE]
        except KeyError:  # the HTTP parser refused it, or it never reached a handler
            if response.status == HTTPStatus.BAD_REQUEST:
                return  # the server logger's throttled line reports it
            exchange = Exchange(None)
        if exchange.started:
            time = perf_counter() - exchange.started
        ACCESS.request(
            exchange.id,
            request.method,
            request.path,
            response.status,
            _body_bytes(request, response, exchange),
            time * 1000,
            exchange.cache,
            exchange.registry,
            request.remote,
            exchange.user,
            request.headers.get("User-Agent"),
        )

    @property
    def enabled(self) -> bool:
        # aiohttp skips the call altogether when the level filters the line out anyway.
        return ACCESS.enabled


def server_logger(throttle: LogThrottle) -> logging.Logger:
    """The logger for aiohttp's HTTP server (``handler_args={"logger": ...}``). aiohttp logs
    every request its parser refuses, and every client lost mid-answer, as an ERROR with a
    traceback: 750 bytes of log for a 50-byte request. Those become one short line per kind
    per interval; anything else goes on to the ``aiohttp.server`` logger as before."""
    logger = logging.Logger("mirror.http")  # not registered: its filter stays its own
    logger.parent = logging.getLogger("aiohttp.server")
    logger.addFilter(_ServerLogFilter(throttle))
    return logger


class _ServerLogFilter(logging.Filter):
    def __init__(self, throttle: LogThrottle) -> None:
        super().__init__()
        self._throttle = throttle

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            event, reason = "request_rejected", clip(error.message.splitlines()[0])
        elif isinstance(error, ConnectionError):
            event, reason = "client_connection_lost", clip(str(error))
        else:
            return True
        kind = type(error).__name__
        suppressed = self._throttle.admit((event, kind))
        if suppressed is not None:
            client = record.args[0] if isinstance(record.args, tuple) and record.args else None
            server_log.warning(
                event, error=kind, reason=reason, client=client, suppressed=suppressed
            )
        return False


def _body_bytes(request: web.BaseRequest, response: web.StreamResponse, exchange: Exchange) -> int:
    if exchange.sent is not None:  # what a handler counted (0 for HEAD and 304)
        return exchange.sent
    if request.method == "HEAD" or response.status in (204, 304):
        return 0
    return response.content_length or 0
