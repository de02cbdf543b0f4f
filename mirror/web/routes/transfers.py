"""Blob downloads under way, and the deadline that keeps a client that stops reading from
holding one for ever.

A download goes as fast as its client accepts bytes. One whose client accepts nothing for
``send_timeout`` seconds is ended, its connection cut. Each download also holds descriptors
beside its connection's (the blob file, and a duplicate of the socket for sendfile(2)), so
the server counts downloads against the descriptor limit: one that would not fit is refused
with a 503 before it takes any, and when descriptors run short the server ends first the
ones that have gone longest without progress (``mirror.web.server``).

While a connection's transport holds more than its high-water mark, the next pipelined
request waits for it to drain (:meth:`Transfers.drained`): what one connection can have
queued is bounded by that mark plus one answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import structlog
from aiohttp import web

from mirror.domain.errors import OutOfDescriptors
from mirror.logs import LogThrottle

log = structlog.get_logger(__name__)

T = TypeVar("T")

# What a download holds beside its connection: the blob file, the socket's duplicate.
DESCRIPTORS = 2
# A relay from object storage: the bucket's connection and its duplicate, the socket's
# duplicate, the two ends of the pipe between them.
RELAY_DESCRIPTORS = 5


class SendStalled(ConnectionResetError):
    """The client accepted nothing for ``send_timeout`` seconds, or the download was ended
    to free descriptors: the connection is cut."""


class Transfer:
    """One download: when it last moved, and how to end it from outside."""

    __slots__ = ("_deadline", "_timeout", "descriptors", "moved_at", "stopped", "transport")

    def __init__(
        self, transport: asyncio.Transport | None, timeout: float, descriptors: int = DESCRIPTORS
    ) -> None:
        self.transport = transport
        self.descriptors = descriptors  # what it holds beside its connection
        # Real time, not the engine's clock: the deadline is an event-loop timer on a real
        # socket, which no test clock can move.
        self.moved_at = time.monotonic()
        self.stopped = False
        self._timeout = timeout
        self._deadline: asyncio.Timeout | None = None

    def moved(self) -> None:
        self.moved_at = time.monotonic()

    async def wait(self, awaitable: Awaitable[T]) -> T:
        """``awaitable`` (a wait for the client to accept bytes), ended with SendStalled when
        the client accepts nothing in time or the download is stopped meanwhile."""
        if self.stopped:
            _close(awaitable)
            raise SendStalled("the download was ended")
        try:
            async with asyncio.timeout(self._timeout) as deadline:
                self._deadline = deadline
                result = await awaitable
        except TimeoutError:
            self.stop()
            raise SendStalled("the client accepted nothing in time") from None
        finally:
            self._deadline = None
        self.moved_at = time.monotonic()
        return result

    def stop(self) -> None:
        """Cut the connection, and end the wait the download is in, if any."""
        self.stopped = True
        if self.transport is not None:
            self.transport.abort()
        if self._deadline is not None and not self._deadline.expired():
            self._deadline.reschedule(asyncio.get_running_loop().time())


class Transfers:
    def __init__(self, send_timeout: float) -> None:
        self.send_timeout = send_timeout
        self._running: set[Transfer] = set()
        self._log = LogThrottle(10.0)
        self._budget = 1 << 62
        self._connections: Callable[[], int] = lambda: 0

    def share(self, budget: int, connections: Callable[[], int]) -> None:
        """Count downloads against ``budget`` descriptors, which ``connections`` (how many
        the server has open) also draw on; the server sets it."""
        self._budget, self._connections = budget, connections

    @contextlib.contextmanager
    def running(
        self, transport: asyncio.Transport | None, descriptors: int = DESCRIPTORS
    ) -> Iterator[Transfer]:
        """A download on ``transport`` holding up to ``descriptors`` beside it, counted
        while it runs; OutOfDescriptors (before any descriptor is taken) when the budget has
        no room for it."""
        if self._connections() + self.descriptors + descriptors > self._budget:
            self._note("download_refused_no_descriptors", budget=self._budget)
            raise OutOfDescriptors
        transfer = Transfer(transport, self.send_timeout, descriptors)
        self._running.add(transfer)
        try:
            yield transfer
        finally:
            self._running.discard(transfer)
            if transfer.stopped:
                self._note("download_stalled_ended", stalled=time.monotonic() - transfer.moved_at)

    @property
    def descriptors(self) -> int:
        """Descriptors the downloads under way hold beside their connections."""
        return sum(transfer.descriptors for transfer in self._running)

    def __len__(self) -> int:
        return len(self._running)

    def shed(self, count: int, stalled_for: float) -> int:
        """End up to ``count`` downloads that have gone ``stalled_for`` seconds or more
        without progress, those waiting longest first; how many were ended."""
        if count <= 0:
            return 0
        since = time.monotonic() - stalled_for
        stalled = sorted(
            (t for t in self._running if t.moved_at <= since and not t.stopped),
            key=lambda t: t.moved_at,
        )[:count]
        for transfer in stalled:
            transfer.stop()
        return len(stalled)

    async def drained(self, request: web.Request) -> None:
        """Wait, within the deadline, until the connection holds fewer unsent bytes than its
        transport's low-water mark: for a connection whose writing is paused (answers to
        earlier pipelined requests the client has not read)."""
        try:
            await Transfer(request.transport, self.send_timeout).wait(request.writer.drain())
        except SendStalled:
            self._note("unread_answers_connection_cut", after=self.send_timeout)
            raise

    def _note(self, event: str, **values: float) -> None:
        suppressed = self._log.admit(event)
        if suppressed is not None:
            log.warning(event, suppressed=suppressed, **{k: round(v, 1) for k, v in values.items()})


def _close(awaitable: Awaitable[object]) -> None:
    close = getattr(awaitable, "close", None)  # a coroutine never awaited would warn
    if close is not None:
        close()
