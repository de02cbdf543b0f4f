"""Fixtures that run the mirror in front of the fake Docker Hub."""

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.support.binaries import require_binary
from tests.support.clients import Containerd, Dockerd, Podman, remove_tree, short_tempdir
from tests.support.fakehub import FakeHub
from tests.support.mirror import FakeClock, RunningMirror, settings_for
from tests.support.process import MirrorProcess
from tests.support.realregistry import RealRegistry


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


# -- real clients pulling through a mirror process, started once per session -------------


def _require_root() -> None:
    # The daemons need root (mounts, cgroups); CI runs as root, so there it is a failure.
    if os.geteuid() == 0:
        return
    if os.environ.get("CI") == "true":
        pytest.fail("the real-client tests need root (CI=true, so this is a failure, not a skip)")
    pytest.skip("the real-client tests need root")


@pytest.fixture(scope="session")
def second_registry() -> Iterator[RealRegistry]:
    """Another real registry, mirrored as ghcr.io by the session mirror."""
    with RealRegistry() as registry:
        yield registry


@pytest.fixture(scope="session")
def session_mirror(
    real_registry: RealRegistry,
    second_registry: RealRegistry,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[MirrorProcess]:
    """One mirror process in front of the session's real registries, for the long-lived
    clients: docker.io is the first, ghcr.io the second."""
    process = MirrorProcess(
        tmp_path_factory.mktemp("session-mirror") / "data",
        real_registry.url,
        "--upstream",
        f"ghcr.io={second_registry.url}",
    )
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def containerd() -> Iterator[Containerd]:
    binary = require_binary("containerd")
    ctr = require_binary("ctr")
    _require_root()
    directory = short_tempdir("containerd-")
    daemon = Containerd(directory, binary, ctr)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
        remove_tree(directory)


@pytest.fixture(scope="session")
def dockerd(containerd: Containerd, session_mirror: MirrorProcess) -> Iterator[Dockerd]:
    """dockerd with `--registry-mirror` on the session mirror, which therefore starts first."""
    binary = require_binary("dockerd")
    # The CLI packaged with this dockerd, when there is one, rather than any newer one on PATH.
    packaged = Path(binary).with_name("docker")
    cli = str(packaged) if packaged.exists() else require_binary("docker")
    _require_root()
    directory = short_tempdir("dockerd-")
    daemon = Dockerd(directory, containerd, session_mirror.host, binary, cli)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
        remove_tree(directory)


@pytest.fixture(scope="session")
def podman(session_mirror: MirrorProcess) -> Iterator[Podman]:
    binary = require_binary("podman")
    _require_root()
    directory = short_tempdir("podman-")
    client = Podman(directory, session_mirror.host, binary)
    try:
        client.start()
        yield client
    finally:
        client.stop()
        remove_tree(directory)
