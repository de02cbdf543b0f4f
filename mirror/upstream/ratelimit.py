"""Docker Hub's pull limit, as announced by the upstream itself.

Docker Hub counts manifest GETs (HEADs are free) and reports the quota on both in
``ratelimit-limit: 100;w=21600`` and ``ratelimit-remaining: 76;w=21600``. After a 429
no manifest GET is sent until its Retry-After has passed; with a reserve configured,
GETs stop while the remaining quota is below it, and a free HEAD re-reads the quota
before each GET that would otherwise be refused.

The promise holds for the whole site: a 429 and the quota are written to the shared
upstream state (``mirror.upstream.shared_state``), and :meth:`RateLimit.sync` reads what
the other processes learnt before a GET is sent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping

from cachetools import TTLCache

from mirror.upstream.shared_state import LocalState, UpstreamState

# How long to back off after a 429 that names no Retry-After.
DEFAULT_RETRY_AFTER = 60.0


class RateLimit:
    def __init__(
        self,
        *,
        reserve: int = 0,
        shared: UpstreamState | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.reserve = reserve
        self.limit: int | None = None
        self.remaining: int | None = None
        self._blocked_until = 0.0  # wall-clock seconds, comparable across processes
        self._shared = shared or LocalState()
        self._clock = clock
        self._writes: set[asyncio.Task[None]] = set()

    def observe(self, headers: Mapping[str, str]) -> None:
        limit = _quota(headers.get("ratelimit-limit"))
        remaining = _quota(headers.get("ratelimit-remaining"))
        if limit is not None:
            self.limit = limit
        if remaining is not None:
            self.remaining = remaining
        if limit is not None or remaining is not None:
            self._publish({"remaining": self.remaining, "limit": self.limit})

    async def rejected(self, retry_after: str | None) -> None:
        """The upstream answered 429: shared before the client hears of it, so no other
        process can send a GET in between."""
        self._blocked_until = self._clock() + _seconds(retry_after)
        self.remaining = 0
        await self._shared.write({"blocked_until": self._blocked_until, "remaining": 0})

    async def sync(self) -> None:
        """Learn what the other processes sharing this upstream learnt."""
        shared = await self._shared.read()
        self._blocked_until = max(self._blocked_until, shared.get("blocked_until", 0.0))
        if "remaining" in shared:
            self.remaining = int(shared["remaining"])
        if "limit" in shared:
            self.limit = int(shared["limit"])

    def retry_after(self) -> float:
        """Seconds until a manifest GET may be sent again; 0 when it may be sent now."""
        return max(self._blocked_until - self._clock(), 0.0)

    @property
    def below_reserve(self) -> bool:
        return self.reserve > 0 and self.remaining is not None and self.remaining < self.reserve

    async def close(self) -> None:
        await asyncio.gather(*self._writes, return_exceptions=True)

    def _publish(self, values: Mapping[str, float | None]) -> None:
        known = {key: float(value) for key, value in values.items() if value is not None}
        task = asyncio.ensure_future(self._shared.write(known))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)


def _quota(value: str | None) -> int | None:
    if not value:
        return None
    try:
        return int(value.split(";", 1)[0].strip())
    except ValueError:
        return None


def _seconds(value: str | None) -> float:
    try:
        return max(float(value), 1.0) if value else DEFAULT_RETRY_AFTER
    except ValueError:
        return DEFAULT_RETRY_AFTER  # an HTTP date: rare from registries; back off the default


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; ``rate`` 0 never refuses."""

    def __init__(
        self, rate: float, burst: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._clock = clock
        self._at = clock()

    def take(self) -> float:
        """0 when a token was taken; otherwise the seconds until one will be there."""
        wait = self.wait()
        if wait == 0 and self._rate > 0:
            self._tokens -= 1
        return wait

    def wait(self) -> float:
        """0 when a token is there (none is taken); otherwise the seconds until one will be."""
        if self._rate <= 0:
            return 0.0
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) / self._rate


def take_all(*buckets: TokenBucket | None) -> tuple[int, float] | None:
    """A token from every bucket given, or from none: None when taken; else the position of
    the first bucket that refuses, and the seconds until it would not."""
    for position, bucket in enumerate(buckets):
        wait = 0.0 if bucket is None else bucket.wait()
        if wait > 0:
            return position, wait
    for bucket in buckets:
        if bucket is not None:
            bucket.take()
    return None


class FairBudget:
    """A budget every client draws on (``rate`` a second, ``burst`` at once), of which one
    client may take at most ``share`` of both: a client spending all it may still leaves
    the rest to everyone else."""

    def __init__(
        self,
        rate: float,
        burst: float,
        *,
        share: float = 0.5,
        clients: int = 65536,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.shared = TokenBucket(rate, burst, clock=clock)
        self._rate, self._burst = rate * share, max(burst * share, 1.0)
        self._clock = clock
        # A share left alone this long is full again: forgetting it then changes nothing.
        refilled = self._burst / self._rate if self._rate > 0 else 1.0
        self._shares: TTLCache[str, TokenBucket] = TTLCache(clients, ttl=refilled, timer=clock)

    def share_of(self, client: str | None) -> TokenBucket | None:
        """The part of the budget ``client`` may still take; None when it is not bounded."""
        if client is None or self._rate <= 0:
            return None
        share = self._shares.get(client)
        if share is None:
            share = TokenBucket(self._rate, self._burst, clock=self._clock)
        self._shares[client] = share  # forgotten only once left alone long enough to refill
        return share
