"""The engine's background tasks stop in one place, newest first, each before the next."""

from __future__ import annotations

import asyncio

from mirror.services.background import Background


async def test_tasks_stop_newest_first_each_awaited_before_the_next() -> None:
    stopped: list[str] = []
    running = asyncio.Event()

    async def work(name: str) -> None:
        try:
            running.set()
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0)  # a task still winding down holds up the next
            stopped.append(name)

    tasks = Background()
    told: list[str] = []
    tasks.start("flusher", work("flusher"))
    tasks.start("evictor", work("evictor"), stopping=lambda: told.append("evictor"))
    await running.wait()
    await tasks.stop()
    assert stopped == ["evictor", "flusher"]
    assert told == ["evictor"]


async def test_a_task_that_failed_does_not_keep_the_others_running() -> None:
    ended: list[str] = []

    async def fail() -> None:
        raise OSError("disk gone")

    async def wait() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            ended.append("waits")

    tasks = Background()
    tasks.start("waits", wait())
    tasks.start("fails", fail())
    await asyncio.sleep(0)  # both run: one fails at once, the other waits
    await tasks.stop()
    assert ended == ["waits"]
