"""Stopping without failing a pull: what SIGTERM (or SIGINT) starts in ``mirror serve``.

1. ``/readyz`` answers 503 at once, while the port keeps accepting for ``shutdown_delay``:
   Kubernetes endpoints and load balancers notice late, and a connection refused before
   they do is a failed pull.
2. Then the mirror's listener (``mirror.web.listener``) stops accepting: the port closes, TLS
   handshakes under way are ended (no request has been sent on them yet), idle keep-alive
   connections are closed, and the transfers in flight get up to ``shutdown_grace`` to
   finish, their connections closed once they have; a fill a client is still reading goes
   on with it (the client is sent its last byte only once the fill is verified). Blobs
   verified but still landing in object storage get what is left of the grace to land.
3. aiohttp's cleanup then cuts whatever is left and closes the engine, which stops the
   fills nobody reads any more: their partial files go and their leases are released, so
   the next pull, here or on another replica, starts them again.

A second signal skips what is left of the waiting. A task the process serves with
(shedding descriptors, reloading the certificate) that fails starts the same stop, and
the process then exits 1, so that whatever supervises it starts a sound one: without
its shedding a process would hang once a crowd took every descriptor.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable

import structlog

from mirror.web.listener import Listener, idle

log = structlog.get_logger(__name__)

# How often the drain looks whether the transfers in flight are done.
POLL = 0.05
# What aiohttp's cleanup gives a handler left over after the grace to unwind once cut.
CUT_TIMEOUT = 1.0


class Shutdown:
    """The stop requested by signals: the first drains, a second hurries it."""

    def __init__(self, delay: float, grace: float, stopping: asyncio.Event) -> None:
        self.delay = delay
        self.grace = grace
        self.requested = stopping  # set: /readyz answers 503
        self.forced = asyncio.Event()
        self.exit_code = 0

    def signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.requested.is_set():
            log.warning("shutdown_forced", signal=name)
            self.forced.set()
            return
        self._start(signal=name)

    def watch(self, task: asyncio.Task[None]) -> None:
        """Stop, and exit 1, should ``task`` (one that runs until cancelled) fail."""
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or (error := task.exception()) is None:
            return
        log.error("background_task_failed", task=task.get_name(), exc_info=error)
        self.exit_code = 1
        if not self.requested.is_set():
            self._start(reason="background_task_failed")

    def _start(self, **cause: str) -> None:
        log.info("shutdown_started", **cause, delay=self.delay, grace=self.grace)
        self.requested.set()

    async def drain(
        self, listener: Listener, fills_in_flight: int, landings: Callable[[], int] = lambda: 0
    ) -> None:
        """Keep accepting for the delay, then stop accepting and wait for the transfers in
        flight and the ``landings`` (blobs their clients had whole, still going into object
        storage), up to the grace; log what was waited for."""
        await self._wait(self.delay)
        handshakes = listener.handshakes
        await listener.stop()
        busy = listener.close_connections()
        log.info(
            "shutdown_draining",
            transfers=busy,
            handshakes_ended=handshakes,
            fills=fills_in_flight,
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.grace
        while (
            (listener.connections or landings())
            and loop.time() < deadline
            and not self.forced.is_set()
        ):
            await self._wait(min(POLL, deadline - loop.time()))
        left = sum(not idle(handler) for handler in listener.connections)
        log.info(
            "shutdown_drained",
            waited=round(loop.time() - started, 2),
            finished=max(busy - left, 0),
            cut=left,
            landing=landings(),
        )

    async def _wait(self, seconds: float) -> None:
        """Sleep, unless a second signal comes first."""
        if seconds <= 0 or self.forced.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.forced.wait(), seconds)

