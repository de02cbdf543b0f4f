"""Docker Hub's pull limit, as announced by the upstream itself.

Docker Hub counts manifest GETs (HEADs are free) and reports the quota on both in
``ratelimit-limit: 100;w=21600`` and ``ratelimit-remaining: 76;w=21600``. After a 429
no manifest GET is sent until its Retry-After has passed; with a reserve configured,
GETs stop while the remaining quota is below it, and a free HEAD re-reads the quota
before each GET that would otherwise be refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

# How long to back off after a 429 that names no Retry-After.
DEFAULT_RETRY_AFTER = 60.0


class RateLimit:
    def __init__(self, *, reserve: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        self.reserve = reserve
        self.limit: int | None = None
        self.remaining: int | None = None
        self._blocked_until = 0.0
        self._clock = clock

    def observe(self, headers: Mapping[str, str]) -> None:
        limit = _quota(headers.get("ratelimit-limit"))
        remaining = _quota(headers.get("ratelimit-remaining"))
        if limit is not None:
            self.limit = limit
        if remaining is not None:
            self.remaining = remaining

    def rejected(self, retry_after: str | None) -> None:
        """The upstream answered 429."""
        self._blocked_until = self._clock() + _seconds(retry_after)
        self.remaining = 0

    def retry_after(self) -> float:
        """Seconds until a manifest GET may be sent again; 0 when it may be sent now."""
        return max(self._blocked_until - self._clock(), 0.0)

    @property
    def below_reserve(self) -> bool:
        return self.reserve > 0 and self.remaining is not None and self.remaining < self.reserve


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
