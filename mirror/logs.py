"""structlog set-up, and a throttle that keeps a repeating event to one line per interval.

JSON lines when not on a terminal, readable lines otherwise. Events that a client or an
outage can repeat thousands of times a second (a rejected request, an upstream failure, a
failed accept) go through :class:`LogThrottle`: the first occurrence of each key is logged,
the repeats within the interval are only counted, and the next line says how many were
suppressed.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Hashable

import structlog
from cachetools import LRUCache


def configure(level: str = "info", fmt: str = "auto") -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        # One write() per line: print() writes the line and its newline apart, so with
        # unbuffered output (PYTHONUNBUFFERED) the lines of --workers processes interleave.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # aiohttp and asyncio report through the standard library; route them to stderr too.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")


# Keys remembered at once; a client inventing keys cannot grow the throttle without bound.
MAX_THROTTLE_KEYS = 1024


class LogThrottle:
    """Decides, per key, whether an event is logged now: at most once per ``interval``."""

    def __init__(
        self, interval: float = 60.0, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._interval = interval
        self._clock = clock
        # key -> (time of the last line logged, occurrences suppressed since)
        self._seen: LRUCache[Hashable, tuple[float, int]] = LRUCache(maxsize=MAX_THROTTLE_KEYS)

    def admit(self, key: Hashable) -> int | None:
        """None when this occurrence is to be suppressed; otherwise how many were suppressed
        since the last line for ``key`` (to log as ``suppressed=``)."""
        now = self._clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self._interval:
            self._seen[key] = (last[0], last[1] + 1)
            return None
        self._seen[key] = (now, 0)
        return 0 if last is None else last[1]
