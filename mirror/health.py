"""One verdict on whether the store answers, and the one probe that finds it back.

With Redis configured, the metadata store and its content graph, the leases and the
upstreams' shared quota and breaker state all talk to one Redis through one client; without
it, the metadata store talks to SQLite. Whichever of them first sees the store fail tells
:class:`StoreHealth`: one warning, and from then on none of them sends the store a command
(each has its stand-in: memory, local locks, the host's state file), so an outage costs one
timeout, not one per request. One background probe pings the store every
``retry_interval`` seconds through the store's own client (behind Sentinel each new
connection asks the sentinels where the master is); when it answers, one line says so and
the listeners are told: the evictor then aligns the content graph with the disk, since the
blob records of the outage were never written.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

from mirror.clock import SYSTEM, Clock

log = structlog.get_logger(__name__)

# After the store failed, how often the probe asks whether it is back.
RETRY_INTERVAL = 2.0


class StoreHealth:
    def __init__(
        self,
        ping: Callable[[], Awaitable[bool]],
        *,
        retry_interval: float = RETRY_INTERVAL,
        clock: Clock = SYSTEM,
    ) -> None:
        """``ping`` asks the store once whether it answers (never raising is best; an
        exception counts as no)."""
        self._ping = ping
        self._retry_interval = retry_interval
        self._clock = clock
        self._down_since: float | None = None
        self._probe: asyncio.Task[None] | None = None
        self._back: list[Callable[[], None]] = []

    @property
    def available(self) -> bool:
        """Is the store worth asking now? False from its first failure until the probe
        hears it answer."""
        return self._down_since is None

    def failed(self, exc: Exception) -> None:
        """A user of the store saw it fail: the first failure of an outage logs it and
        starts the probe; later ones (calls already under way) change nothing."""
        if self._down_since is not None:
            return
        self._down_since = self._clock.monotonic()
        log.warning("store_unavailable", error=str(exc), retry_interval=self._retry_interval)
        self._probe = asyncio.create_task(self._probe_until_back(), name="store_probe")

    def when_back(self, listener: Callable[[], None]) -> None:
        """Tell ``listener`` each time the store answers again after an outage."""
        self._back.append(listener)

    async def close(self) -> None:
        """Stop the probe, if one runs (the engine calls this before closing the store)."""
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probe

    async def _probe_until_back(self) -> None:
        while True:
            await asyncio.sleep(self._retry_interval)
            with contextlib.suppress(Exception):
                if await self._ping():
                    break
        assert self._down_since is not None
        down_for = self._clock.monotonic() - self._down_since
        self._down_since = None
        self._probe = None
        log.info("store_available", down_for=round(down_for, 1))
        for listener in self._back:
            listener()
