"""One verdict on the store's health: one warning, one probe, listeners told when it is back."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from mirror.health import StoreHealth


class Store:
    """A store whose answers to PING the test gives, one at a time."""

    def __init__(self) -> None:
        self.answers: asyncio.Queue[bool] = asyncio.Queue()
        self.pings = 0
        self.pinged = asyncio.Event()

    async def ping(self) -> bool:
        self.pings += 1
        self.pinged.set()
        return await self.answers.get()


async def test_failures_of_one_outage_start_one_probe_and_its_end_is_told_once() -> None:
    store = Store()
    health = StoreHealth(store.ping, retry_interval=0)
    back: list[bool] = []
    told = asyncio.Event()

    def listener() -> None:
        back.append(health.available)
        told.set()

    health.when_back(listener)
    with capture_logs() as logs:
        for error in ("timeout", "timeout again", "connection refused"):
            health.failed(ConnectionError(error))
        assert not health.available
        for answer in (False, False, True):
            await store.answers.put(answer)
        await told.wait()
    assert store.pings == 3  # one probe: its pings one after another, none beside them
    assert back == [True]  # told once, and once the verdict says so
    assert [line["event"] for line in logs] == ["store_unavailable", "store_available"]
    await health.close()


async def test_close_stops_the_probe() -> None:
    store = Store()
    health = StoreHealth(store.ping, retry_interval=0)
    health.failed(ConnectionError("gone"))
    await store.pinged.wait()
    await health.close()
    probes = [t for t in asyncio.all_tasks() if t.get_name() == "store_probe"]
    assert probes == []
    assert not health.available
