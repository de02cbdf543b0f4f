"""Shared fixtures; the machinery behind them lives in tests/support."""

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from tests.support import secrets
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


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the whole session: no log the mirror (or a client, or the proxy) wrote holds a
    password or a token the tests handed it."""
    yield
    base = tmp_path_factory.getbasetemp()
    leaks = []
    for path in base.rglob("*.log"):
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        leaks += [f"{path}: {secret}" for secret in secrets.ALL if secret in text]
    assert not leaks, "credentials in logs:\n" + "\n".join(leaks)
