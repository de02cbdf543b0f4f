"""Run one mirror process: the app on its port (or on a socket it is handed).

Besides serving, the process looks after its file descriptors, which every connection and
every TLS handshake under way costs one of and every blob download two more
(``mirror.web.routes.transfers``): it raises its soft limit to the hard limit at start, and
when they near that limit it ends TLS handshakes that have gone on for a second, then idle
keep-alive connections, then the downloads that have gone longest without the client
accepting a byte, so no crowd (idle, never finishing its handshake, never reading) can lock
everyone out. Downloads past the limit are refused with a 503 before they take a
descriptor, and accepting pauses short of it (``mirror.web.listener``), so that running out
never resets the connections waiting to be accepted. Failures the loop reports for lack
of descriptors become one short line per interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import resource
import signal
import socket
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from mirror.config import Settings
from mirror.logs import LogThrottle, configure
from mirror.web.app import create_app
from mirror.web.listener import Listener, idle, listening_socket
from mirror.web.routes.middleware import AccessLogger
from mirror.web.routes.state import ENGINE, STOPPING, TRANSFERS
from mirror.web.routes.transfers import DESCRIPTORS, RELAY_DESCRIPTORS, Transfers
from mirror.web.shutdown import CUT_TIMEOUT, Shutdown
from mirror.web.tls import ServerTLS

log = structlog.get_logger(__name__)

# Seconds an idle keep-alive connection stays open (what web.run_app uses).
KEEPALIVE_TIMEOUT = 75.0
# Descriptors kept for everything but client connections: blob files, upstream, stores.
RESERVED_FDS = 64
SHED_INTERVAL = 0.1
# A download shed to free descriptors has gone at least this long without progress.
STALLED_FOR = 2.0
# A TLS handshake shed to free descriptors has gone on at least this long.
SLOW_HANDSHAKE = 1.0
_FD_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def serve_one(
    settings: Settings,
    *,
    sock: socket.socket | None = None,
    stop_signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT),
) -> int:
    """Serve until one of ``stop_signals``; the exit code (``mirror.web.shutdown``). Raises
    OSError when the port cannot be bound."""
    configure(settings.log_level, settings.log_format)
    with asyncio.Runner(loop_factory=loop_factory(settings.event_loop)) as runner:
        return runner.run(_serve(settings, sock, stop_signals))


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed (``auto``) or asked for; else asyncio's own loop.

    uvloop answers a small request in two thirds of the time asyncio's loop takes; the blob
    path keeps sendfile(2) either way (``mirror.web.routes.v2``)."""
    if choice == "asyncio":
        return None
    try:
        import uvloop  # noqa: PLC0415 (optional: the mirror runs without it)
    except ImportError:
        if choice == "uvloop":
            raise OSError("event_loop: uvloop is not installed (pip install uvloop)") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard limit; the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.info("fd_limit_raised", soft=soft, now=hard)
            soft = hard
    return soft


async def _serve(
    settings: Settings, sock: socket.socket | None, stop_signals: tuple[signal.Signals, ...]
) -> int:
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_loop_exception_handler(LogThrottle(10.0)))
    limit = raise_fd_limit()
    app = create_app(settings)
    runner = web.AppRunner(
        app,
        access_log_class=AccessLogger,
        keepalive_timeout=KEEPALIVE_TIMEOUT,
        handle_signals=False,
        # Shutdown.drain has given transfers their grace by the time cleanup runs.
        shutdown_timeout=CUT_TIMEOUT,
    )
    await runner.setup()
    tls = server_tls(settings)
    try:
        if sock is None:
            sock = listening_socket(settings.listen_host, settings.listen_port)
        site = Listener(runner, sock, ssl_context=tls.context if tls is not None else None)
        await site.start()
        log.info("listening", address=site.name, fd_limit=limit, tls=tls is not None)
        shutdown = Shutdown(settings.shutdown_delay, settings.shutdown_grace, app[STOPPING])
        for signum in stop_signals:
            loop.add_signal_handler(signum, shutdown.signal, signum)
        assert runner.server is not None
        shedding = _shed_idle(runner.app[TRANSFERS], site, limit)
        tasks = [asyncio.create_task(shedding, name="shed_idle")]
        if tls is not None:
            tasks.append(asyncio.create_task(tls.watch(), name="tls_watch"))
        for task in tasks:
            shutdown.watch(task)
        await shutdown.requested.wait()
        fills = app[ENGINE].fills
        await shutdown.drain(site, fills.in_flight, fills.landings)
        for task in tasks:
            task.cancel()
    finally:
        await runner.cleanup()
    return shutdown.exit_code


def warn_at_start(settings: Settings) -> None:
    """What an operator should read once a start, not once a worker."""
    if settings.auth is not None and settings.tls_cert is None:
        log.warning(
            "logins_over_plain_http",
            hint="passwords cross the network in clear: serve HTTPS (tls_cert, tls_key)"
            " or put a TLS proxy in front",
        )


def server_tls(settings: Settings) -> ServerTLS | None:
    """The TLS the settings ask for; raises CertificateError when it cannot be had."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    return ServerTLS(settings.tls_cert, settings.tls_key)


async def _shed_idle(transfers: Transfers, listener: Listener, fd_limit: int) -> None:
    """While connections, TLS handshakes and downloads crowd the descriptor limit, end
    handshakes that have gone on a while, then idle keep-alive connections, then stalled
    downloads, each oldest first; no connection is accepted and no download begins (503)
    past the limit."""
    high = max(fd_limit - RESERVED_FDS, fd_limit * 3 // 4)
    low = high * 4 // 5

    transfers.share(high, lambda: listener.held)
    # Connections are still taken past ``high`` (a download then gets a 503 at once, and
    # an idle connection is shed), but not into the descriptors files and upstreams need.
    ceiling = high + (fd_limit - high) // 2
    listener.room = lambda: listener.held + transfers.descriptors < ceiling
    throttle = LogThrottle(10.0)
    seen: set[RequestHandler] = set()
    while True:
        await asyncio.sleep(SHED_INTERVAL)
        connections = listener.connections
        used = len(connections) + listener.handshakes + transfers.descriptors
        # Shed from when the largest download (a relay) would be refused, else a crowd
        # that holds the budget just short of ``high`` is never shed and every new
        # download gets a 503 until the crowd's send deadline.
        if used + RELAY_DESCRIPTORS <= high:
            seen.clear()
            continue
        excess = used - low
        ended = listener.shed(excess, SLOW_HANDSHAKE)
        # Oldest first; one accepted since the last look has had no time to send its request.
        idle_ones = [handler for handler in connections if handler in seen and idle(handler)]
        seen = set(connections)
        shed = idle_ones[: excess - ended]
        for handler in shed:
            handler.force_close()
        # A download ended frees its connection's descriptor too.
        left = excess - ended - len(shed)
        stalled = transfers.shed(-(-left // (DESCRIPTORS + 1)), STALLED_FOR)
        if not (ended or shed or stalled):
            continue
        suppressed = throttle.admit("shed")
        if suppressed is not None:
            log.warning(
                "idle_connections_shed",
                closed=len(shed),
                tls_handshakes_shed=ended,
                stalled_downloads_ended=stalled,
                connections=len(connections),
                downloads=len(transfers),
                fd_limit=fd_limit,
                suppressed=suppressed,
            )


def _loop_exception_handler(throttle: LogThrottle) -> Any:
    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _FD_ERRNOS:
            # asyncio retries the accept a second later, and would log each failure.
            suppressed = throttle.admit(exc.errno)
            if suppressed is not None:
                log.error(
                    "accept_failed",
                    error=exc.strerror or str(exc),
                    hint="out of file descriptors: connections wait",
                    suppressed=suppressed,
                )
            return
        loop.default_exception_handler(context)

    return handle
