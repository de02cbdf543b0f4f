"""Waiting for an outcome instead of sleeping for a guess of how long it takes.

A sleep is either too short on a loaded machine (the test flakes) or longer than needed
everywhere (the suite crawls). :func:`eventually` asks for what the test means to see,
often, until a deadline far past any normal run; only a broken behaviour waits that long.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

DEADLINE = 10.0
POLL = 0.02


async def eventually(
    condition: Callable[[], T], what: str, *, deadline: float = DEADLINE, poll: float = POLL
) -> T:
    """The first truthy value ``condition`` returns; the test fails, naming ``what`` it
    waited for, when none comes within ``deadline`` seconds."""
    give_up = time.monotonic() + deadline
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > give_up:
            raise AssertionError(f"gave up after {deadline} s waiting for {what}")
        await asyncio.sleep(poll)
