"""``mirror import`` next to a serving mirror: one writer per blob, and the budget kept."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from mirror.domain.pins import Pin
from mirror.engine import open_engine
from mirror.services import bundle
from tests.support.fakehub import FakeHub
from tests.support.mirror import RunningMirror, metric_value, settings_for
from tests.support.oci import OCI_MANIFEST, Image, make_image, make_random_layer
from tests.support.waiting import eventually

MIB = 1024 * 1024
FILLS = "mirror_blob_fills_in_flight"


async def pull(mirror: RunningMirror, repository: str, image: Image) -> None:
    status, _, body = await mirror.get(f"/v2/{repository}/manifests/latest", accept=[OCI_MANIFEST])
    assert (status, body) == (200, image.manifest)
    for blob in image.blobs:
        status, _, body = await mirror.get(f"/v2/{repository}/blobs/{blob.digest}")
        assert (status, body) == (200, blob.data)


async def exported(fake_hub: FakeHub, tmp_path: Path, images: dict[str, Image], name: str) -> Path:
    """A bundle of ``images``, made by a connected mirror that pulled them."""
    for repository, image in images.items():
        fake_hub.add_image(f"library/{repository}", "latest", image)
    output = tmp_path / f"{name}.tar"
    async with RunningMirror(settings_for(fake_hub.url, tmp_path / f"{name}-site")) as site:
        for repository, image in images.items():
            await pull(site, repository, image)
        patterns = [Pin.parse(f"library/{repository}") for repository in images]
        await bundle.export(site.engine, output, patterns)
    fake_hub.clear_log()
    return output


async def test_a_pull_of_a_blob_being_imported_follows_the_import(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    image = make_image([make_random_layer(4 * MIB, seed=70)])
    path = await exported(fake_hub, tmp_path, {"app": image}, "bundle")
    async with RunningMirror(settings_for(fake_hub.url, tmp_path / "data")) as mirror:
        copying, go_on = threading.Event(), threading.Event()

        def held_mid_copy(size: int) -> None:
            copying.set()
            go_on.wait(30)

        importing = asyncio.create_task(
            bundle.import_layout(mirror.engine, path, progress=held_mid_copy)
        )
        await asyncio.to_thread(copying.wait, 30)
        (partial,) = (mirror.settings.data_dir / "blobs").glob("*/*/.*.partial")
        digest = "sha256:" + partial.name.split(".")[1]
        data = next(blob.data for blob in image.blobs if blob.digest == digest)
        pulling = asyncio.create_task(mirror.get(f"/v2/app/blobs/{digest}"))
        # The pull has reached the blob's fill, the import still copying.
        await eventually(
            lambda: metric_value(mirror.engine.metrics.render().decode(), FILLS) == 1,
            "the pull to reach the blob's fill",
        )
        go_on.set()
        report = await importing
        status, _, body = await pulling
    assert (status, body) == (200, data)
    assert [image.ok for image in report.images] == [True]
    assert fake_hub.count("GET", "cdn") == 0  # read from the import, not fetched again


async def test_an_import_over_the_budget_makes_room(fake_hub: FakeHub, tmp_path: Path) -> None:
    older = {f"old{n}": make_image([make_random_layer(MIB, seed=80 + n)]) for n in range(2)}
    newer = {f"new{n}": make_image([make_random_layer(MIB, seed=90 + n)]) for n in range(2)}
    first = await exported(fake_hub, tmp_path, older, "first")
    second = await exported(fake_hub, tmp_path, newer, "second")
    budget = int(2.5 * MIB)
    settings = settings_for(fake_hub.url, tmp_path / "data", max_cache_size=budget)
    async with open_engine(settings) as engine:  # as `mirror import` opens it
        await bundle.import_layout(engine, first, pin=False)
        await bundle.import_layout(engine, second, pin=False)
        disk = await asyncio.to_thread(engine.blobs.on_disk)
        usage = await engine.store.graph.usage()
    assert sum(size for size, _ in disk.values()) <= budget
    assert usage.bytes == sum(size for size, _ in disk.values())
