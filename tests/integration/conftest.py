"""Fixtures that run the mirror in front of the fake Docker Hub."""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.support.fakehub import FakeHub
from tests.support.mirror import FakeClock, RunningMirror, settings_for


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest_asyncio.fixture
async def mirror(
    fake_hub: FakeHub, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[RunningMirror]:
    settings = settings_for(fake_hub.url, tmp_path / "data", tag_ttl=300.0)
    async with RunningMirror(settings, clock=clock) as running:
        yield running
