"""What stops a process besides a signal: a task it serves with that fails."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from mirror.web.shutdown import Shutdown


async def runs_until_cancelled() -> None:
    await asyncio.Event().wait()


async def fails() -> None:
    await asyncio.sleep(0)
    raise NameError("cannot access free variable 'idle'")


async def ended(task: asyncio.Task[None]) -> None:
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0)  # done callbacks run on the next turn of the loop


async def test_a_failed_background_task_stops_the_process_with_exit_1() -> None:
    shutdown = Shutdown(5.0, 30.0, asyncio.Event())
    task = asyncio.create_task(fails(), name="shed_idle")
    shutdown.watch(task)
    with capture_logs() as logs:
        await ended(task)
    assert shutdown.requested.is_set()  # /readyz answers 503; the drain begins
    assert shutdown.exit_code == 1
    events = [(entry["event"], entry.get("task"), entry.get("reason")) for entry in logs]
    assert events == [
        ("background_task_failed", "shed_idle", None),
        ("shutdown_started", None, "background_task_failed"),
    ]


async def test_a_background_task_cancelled_at_the_stop_is_no_failure() -> None:
    shutdown = Shutdown(5.0, 30.0, asyncio.Event())
    task = asyncio.create_task(runs_until_cancelled())
    shutdown.watch(task)
    await asyncio.sleep(0)
    task.cancel()
    await ended(task)
    assert not shutdown.requested.is_set()
    assert shutdown.exit_code == 0
