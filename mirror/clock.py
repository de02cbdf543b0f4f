"""One clock for everything that measures time, built once by the engine and handed down,
so tests move time instead of sleeping.

``time()`` is wall-clock seconds (what is stored and compared across processes: tag
checks, pull times, shared rate-limit and breaker state); ``monotonic()`` measures
intervals within the process (token lifetimes, how long a store has been down).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float: ...

    def monotonic(self) -> float: ...


class SystemClock:
    __slots__ = ()

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


SYSTEM = SystemClock()


class _WallOnly:
    """A clock whose wall time a test sets (a callable), intervals measured as usual."""

    __slots__ = ("time",)

    def __init__(self, wall: Callable[[], float]) -> None:
        self.time = wall

    def monotonic(self) -> float:
        return time.monotonic()


def as_clock(given: Clock | Callable[[], float] | None) -> Clock:
    """The clock to use: the system's; or ``given`` (a clock, or a wall-time callable)."""
    if given is None:
        return SYSTEM
    if callable(given):
        return _WallOnly(given)
    return given
