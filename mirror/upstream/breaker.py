"""A circuit breaker per upstream: stop waiting on a registry that keeps failing.

After ``threshold`` consecutive connection failures or timeouts the circuit opens:
requests fail at once instead of each waiting for a timeout, so cached content keeps
being served quickly. While open, a background probe asks the upstream's ``/v2/``
every ``probe_interval`` seconds; any HTTP answer closes the circuit again.

The open circuit is shared with the other processes serving the site (the shared
upstream state's ``open_until``, renewed by the prober while it keeps failing), so one
process finding the upstream down spares the others their timeouts too.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import structlog

from mirror.upstream.shared_state import LocalState, UpstreamState

log = structlog.get_logger(__name__)


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        probe: Callable[[], Awaitable[bool]],
        *,
        threshold: int = 5,
        probe_interval: float = 5.0,
        on_change: Callable[[bool], None] | None = None,
        shared: UpstreamState | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self._probe = probe
        self._threshold = threshold
        self._probe_interval = probe_interval
        self._on_change = on_change
        self._failures = 0
        self._prober: asyncio.Task[None] | None = None
        self._check: asyncio.Task[None] | None = None
        self._shared = shared or LocalState()
        self._clock = clock
        self._open_elsewhere_until = 0.0
        # Whether any request has reached the upstream (or failed to) since start.
        self.contacted = False
        self._note: asyncio.Task[None] | None = None

    @property
    def open(self) -> bool:
        return self._prober is not None or self._open_elsewhere_until > self._clock()

    async def sync(self) -> None:
        """Learn whether another process found the upstream down."""
        if self._prober is None:
            shared = await self._shared.read()
            self._open_elsewhere_until = shared.get("open_until", 0.0)

    def suspect(self) -> None:
        """A 5xx: maybe the upstream is unwell, maybe only that request upset it. Ask its
        ``/v2/`` (one question at a time) and count a failure only if that fails too, so a
        client sending names the upstream chokes on cannot open the circuit for everyone."""
        if self._prober is None and (self._check is None or self._check.done()):
            self._check = asyncio.create_task(self._verdict())

    async def _verdict(self) -> None:
        try:
            well = await self._probe()
        except Exception:
            well = False
        if well:
            self.success()
        else:
            self.failure()

    def success(self) -> None:
        self._failures = 0
        self._contact()

    def failure(self) -> None:
        self._failures += 1
        self._contact()
        if self._failures >= self._threshold and self._prober is None:
            log.warning("upstream_circuit_open", upstream=self.name, failures=self._failures)
            self._prober = asyncio.create_task(self._probe_until_back())
            self._changed(True)

    def _contact(self) -> None:
        if not self.contacted:
            self.contacted = True  # and for the other processes (the status page)
            self._note = asyncio.create_task(self._shared.write({"contacted_at": self._clock()}))

    async def state(self) -> tuple[bool, bool]:
        """(contacted, open) as the processes of the site know it together."""
        shared = await self._shared.read()
        contacted = self.contacted or shared.get("contacted_at", 0.0) > 0
        return contacted, self.open or shared.get("open_until", 0.0) > self._clock()

    async def _probe_until_back(self) -> None:
        while True:
            # Open for the others until a little after the next probe could renew it.
            await self._shared.write({"open_until": self._clock() + 2 * self._probe_interval})
            await asyncio.sleep(self._probe_interval)
            with contextlib.suppress(Exception):
                if await self._probe():
                    break
        log.info("upstream_circuit_closed", upstream=self.name)
        self._failures = 0
        self._prober = None
        self._open_elsewhere_until = 0.0
        await self._shared.write({"open_until": 0.0})
        self._changed(False)

    def _changed(self, is_open: bool) -> None:
        if self._on_change is not None:
            self._on_change(is_open)

    async def close(self) -> None:
        if self._note is not None:
            with contextlib.suppress(Exception):
                await self._note
        if self._check is not None:
            self._check.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._check
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
            self._prober = None
