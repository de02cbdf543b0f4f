"""The listening socket, accepted on here rather than by the loop's own server.

Two things need it. Accepting pauses while descriptors are short (``room``): the loop's
server, uvloop's at least, accepts regardless and, once out of descriptors, resets every
connection waiting in the backlog; here they wait there until the server has shed enough.
And every TLS handshake under way is known: the loop's own TLS server hides one until it
finishes and gives it 60 s, so half-finished handshakes could hold every descriptor. Here
each has HANDSHAKE_TIMEOUT seconds, and the server counts them and ends the oldest first
when descriptors run short (``mirror.web.server``).

The listener is also where the connections are counted and told apart (handshakes under
way, idle keep-alive connections, connections with a request in progress), for shedding
and for a graceful stop (``mirror.web.shutdown``) alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import Callable

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from yarl import URL

from mirror.logs import LogThrottle

log = structlog.get_logger(__name__)

HANDSHAKE_TIMEOUT = 10.0
# How long accepting waits, when there is no room or accept(2) failed, before it looks again.
ACCEPT_RETRY = 0.1
# Connections the kernel holds until they are accepted: a burst, or a crowd that arrives
# while accepting pauses, waits there (what ``serve --workers`` listens with).
BACKLOG = 1024
ACCEPT_BATCH = 128


def listening_socket(host: str, port: int) -> socket.socket:
    """Bound and listening; an OSError that says so as asyncio's own server would."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=BACKLOG)
    except OSError as exc:
        reason = (exc.strerror or str(exc)).split(" (while")[0].lower()
        raise OSError(
            exc.errno, f"error while attempting to bind on address {(host, port)!r}: {reason}"
        ) from None


class Listener(web.BaseSite):
    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._sock = sock
        self._accepting: asyncio.Task[None] | None = None
        self._handshakes: dict[asyncio.Task[None], float] = {}  # -> when it began
        self._log = LogThrottle(10.0)
        self.room: Callable[[], bool] = lambda: True  # the server sets it

    @property
    def name(self) -> str:
        host, port = self._sock.getsockname()[:2]
        scheme = "https" if self._ssl_context is not None else "http"
        return str(URL.build(scheme=scheme, host=host, port=port))

    @property
    def handshakes(self) -> int:
        """TLS handshakes (and plain connections being set up) under way: a descriptor each."""
        return len(self._handshakes)

    @property
    def connections(self) -> list[RequestHandler]:
        """The connections set up, the oldest first."""
        return self._web_server().connections

    @property
    def held(self) -> int:
        """Descriptors the connections hold: those set up and those being set up."""
        # The server's public ``connections`` copies its list; this is asked very often.
        return len(self._web_server()._connections) + len(self._handshakes)

    def close_connections(self) -> int:
        """Close the idle keep-alive connections now and the others once the response in
        progress is sent; how many had one in progress."""
        busy = 0
        for handler in self.connections:
            if idle(handler):
                handler.force_close()
            else:
                handler.close()
                busy += 1
        return busy

    def shed(self, count: int, older_than: float) -> int:
        """End up to ``count`` handshakes begun ``older_than`` seconds ago or more, the
        oldest first; how many were ended."""
        # Real time, not the engine's clock: handshakes run on real sockets.
        since = time.monotonic() - older_than
        # A dict keeps the order they began in.
        old = [task for task, began in self._handshakes.items() if began <= since][:count]
        for task in old:
            task.cancel()
        return len(old)

    async def start(self) -> None:
        await super().start()
        self._sock.setblocking(False)
        self._accepting = asyncio.create_task(self._accept())

    async def stop(self) -> None:
        """Stop accepting: the port closes, so what waits in its backlog is refused, and
        handshakes under way are ended, as none of them has sent a request yet."""
        waits = list(self._handshakes)
        if self._accepting is not None:
            waits.append(self._accepting)
        for task in waits:
            task.cancel()
        # The socket is closed once nothing is waiting on it any more.
        await asyncio.gather(*waits, return_exceptions=True)
        self._sock.close()
        await super().stop()

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.room():
                await asyncio.sleep(ACCEPT_RETRY)
                continue
            try:
                conn, _ = await loop.sock_accept(self._sock)
                self._begin(loop, conn)
                # Whatever else waits in the backlog, at once: one wake-up per connection
                # would let a burst overflow the backlog (a dropped SYN costs a second).
                for _ in range(ACCEPT_BATCH):
                    if not self.room():
                        break
                    conn, _ = self._sock.accept()
                    self._begin(loop, conn)
            except BlockingIOError:
                continue
            except OSError as exc:
                # Out of descriptors, most likely: the connection waits in the backlog.
                suppressed = self._log.admit(exc.errno)
                if suppressed is not None:
                    log.error(
                        "accept_failed",
                        error=exc.strerror or str(exc),
                        hint="out of file descriptors: connections wait",
                        suppressed=suppressed,
                    )
                await asyncio.sleep(ACCEPT_RETRY)

    def _begin(self, loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
        task = loop.create_task(self._connect(conn))
        self._handshakes[task] = time.monotonic()
        task.add_done_callback(self._connected)

    def _web_server(self) -> web.Server:
        server = self._runner.server
        assert server is not None
        return server

    async def _connect(self, conn: socket.socket) -> None:
        server = self._web_server()
        loop = asyncio.get_running_loop()
        # The transport owns the socket from here, and closes it if the handshake fails,
        # times out or is cancelled. A client that could not or would not finish its
        # handshake is nothing to log.
        with contextlib.suppress(OSError):
            if self._ssl_context is None:
                await loop.connect_accepted_socket(server, conn)
            else:
                await loop.connect_accepted_socket(
                    server,
                    conn,
                    ssl=self._ssl_context,
                    ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
                )

    def _connected(self, task: asyncio.Task[None]) -> None:
        self._handshakes.pop(task, None)


def idle(handler: RequestHandler) -> bool:
    """Waiting for the next request's first bytes, with none in progress."""
    # aiohttp keeps no public "idle" flag; this is the state its own keep-alive timer closes.
    waiter = handler._waiter
    return not handler._request_in_progress and waiter is not None and not waiter.done()
