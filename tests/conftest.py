"""Shared fixtures; the machinery behind them lives in tests/support."""

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from tests.support.binaries import require_binary
from tests.support.fakehub import FakeHub
from tests.support.realregistry import RealRegistry


@pytest_asyncio.fixture
async def fake_hub() -> AsyncIterator[FakeHub]:
    async with FakeHub() as hub:
        yield hub


@pytest.fixture(scope="session")
def real_registry() -> Iterator[RealRegistry]:
    require_binary("docker-registry")
    require_binary("skopeo")
    with RealRegistry() as registry:
        yield registry
