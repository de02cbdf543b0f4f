"""The work a server does besides answering (the evictor, the pull-time flusher, the status
page's sampler and health gauges), owned by the engine: each task is started here by name
and all are stopped in one place, the last started first, each awaited before the next.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

log = structlog.get_logger(__name__)


class Background:
    def __init__(self) -> None:
        self._tasks: list[tuple[str, asyncio.Task[None], Callable[[], None]]] = []

    def start(
        self,
        name: str,
        work: Coroutine[Any, Any, None],
        *,
        stopping: Callable[[], None] = lambda: None,
    ) -> None:
        """Run ``work`` until :meth:`stop`; ``stopping`` is told first (a loop that must not
        start another round even if the cancellation lands where it is swallowed)."""
        self._tasks.append((name, asyncio.create_task(work, name=name), stopping))

    async def stop(self) -> None:
        """Stop every task, newest first: one started later may use one started earlier."""
        while self._tasks:
            name, task, stopping = self._tasks.pop()
            stopping()
            task.cancel()
            try:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            except Exception as exc:  # it failed before: say so, and stop the others
                log.warning("background_task_failed", task=name, error=str(exc))
