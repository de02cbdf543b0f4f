"""The engine's clock reaches what measures time: a test moves it instead of sleeping."""

from __future__ import annotations

from pathlib import Path

from mirror.content.cached import CachedStore
from mirror.content.embedded import EmbeddedStore
from mirror.domain.manifests import TagRecord
from tests.support.mirror import MovingClock

HUB = "docker.io"
OCI = "application/vnd.oci.image.manifest.v1+json"
OLD, NEW = "sha256:" + "1" * 64, "sha256:" + "2" * 64


async def test_a_remembered_tag_is_read_again_once_the_clock_leaves_its_window(
    tmp_path: Path,
) -> None:
    clock = MovingClock()
    inner = await EmbeddedStore.open(tmp_path)
    store = CachedStore(inner, max_entries=10, tag_ttl=300, clock=clock)
    try:
        await store.put_tag(HUB, "library/app", "latest", TagRecord(OLD, OCI, clock.time()))
        # Another replica confirms a new digest in the shared store.
        await inner.put_tag(HUB, "library/app", "latest", TagRecord(NEW, OCI, clock.time()))
        remembered = await store.get_tag(HUB, "library/app", "latest")
        assert remembered is not None
        assert remembered.digest == OLD
        clock.advance(301)
        current = await store.get_tag(HUB, "library/app", "latest")
        assert current is not None
        assert current.digest == NEW
    finally:
        await store.close()
