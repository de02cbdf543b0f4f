"""``mirror gc`` and ``mirror verify`` on the data dir of a running mirror."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from unittest.mock import patch

import aiohttp
import pytest

from mirror.content.blobs import BlobStore
from mirror.content.graph import Usage
from mirror.content.layer import Content
from mirror.content.storage import Copy
from mirror.domain.reference import Digest
from mirror.services import maintenance
from tests.support.fakehub import FakeHub
from tests.support.mirror import RunningMirror, settings_for
from tests.support.oci import OCI_MANIFEST, Image, make_image, make_random_layer
from tests.support.process import MirrorProcess, run_mirror


async def run(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run_mirror, *args)


async def pull(url: str, name: str, image: Image) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(
            f"{url}/v2/{name}/manifests/latest", headers={"Accept": OCI_MANIFEST}
        ) as response:
            assert await response.read() == image.manifest
        for blob in image.blobs:
            async with session.get(f"{url}/v2/{name}/blobs/{blob.digest}") as response:
                body = await response.read()
                assert "sha256:" + hashlib.sha256(body).hexdigest() == blob.digest


def blob_path(data: Path, digest: str) -> Path:
    hex_digest = digest.removeprefix("sha256:")
    return data / "blobs" / "sha256" / hex_digest[:2] / hex_digest


async def test_verify_finds_a_flipped_byte_and_repair_brings_the_right_bytes_back(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    image = make_image([make_random_layer(2 * 1024 * 1024, seed=41)])
    fake_hub.add_image("library/app", "latest", image)
    layer = image.blobs[-1]
    data = tmp_path / "data"
    with MirrorProcess(data, fake_hub.url) as mirror:
        await pull(mirror.url, "app", image)
        sound = await run("verify", "--data-dir", str(data))
        assert sound.returncode == 0, sound.stdout + sound.stderr
        assert "0 corrupt" in sound.stdout

        path = blob_path(data, layer.digest)
        content = bytearray(path.read_bytes())
        content[1000] ^= 0xFF
        path.write_bytes(bytes(content))

        found = await run("verify", "--data-dir", str(data))
        assert found.returncode == 1
        assert f"corrupt {layer.digest}: needed by docker.io/library/app" in found.stdout
        assert path.exists()  # reported, not touched

        repaired = await run("verify", "--repair", "--data-dir", str(data))
        assert repaired.returncode == 1
        assert "1 taken out of service" in repaired.stdout
        assert not path.exists()

        cdn_before = fake_hub.count("GET", "cdn")
        await pull(mirror.url, "app", image)  # checks every digest
        assert fake_hub.count("GET", "cdn") == cdn_before + 1
        again = await run("verify", "--data-dir", str(data))
        assert again.returncode == 0


async def test_gc_and_verify_while_pulls_go_on(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    images = [make_image([make_random_layer(512 * 1024, seed=s)]) for s in range(50, 54)]
    for number, image in enumerate(images):
        fake_hub.add_image(f"library/app{number}", "latest", image)
    data = tmp_path / "data"
    with MirrorProcess(data, fake_hub.url) as mirror:
        await pull(mirror.url, "app0", images[0])
        stray = b"a blob no manifest mentions"
        stray_digest = "sha256:" + hashlib.sha256(stray).hexdigest()
        stray_path = blob_path(data, stray_digest)
        stray_path.parent.mkdir(parents=True, exist_ok=True)
        stray_path.write_bytes(stray)
        old = time.time() - 2 * 3600
        os.utime(stray_path, (old, old))
        partial = stray_path.with_name(f".{stray_path.name}.abc123.partial")
        partial.write_bytes(b"half a download")

        dry = await run("gc", "--dry-run", "--data-dir", str(data))
        assert dry.returncode == 0, dry.stderr
        assert f"would remove {stray_digest}" in dry.stdout
        assert "1 partial files" in dry.stdout
        assert stray_path.exists()
        assert partial.exists()

        pulls = asyncio.gather(
            *(pull(mirror.url, f"app{n}", image) for n, image in enumerate(images))
        )
        collected, verified, _ = await asyncio.gather(
            run("gc", "--data-dir", str(data)), run("verify", "--data-dir", str(data)), pulls
        )
        assert collected.returncode == 0, collected.stderr
        assert verified.returncode == 0, verified.stdout + verified.stderr  # nothing corrupt
        assert f"removed {stray_digest}" in collected.stdout
        assert not stray_path.exists()
        assert not partial.exists()
        for image in images:
            for blob in image.blobs:
                assert blob_path(data, blob.digest).exists()
        cdn_before = fake_hub.count("GET", "cdn")
        for number, image in enumerate(images):
            await pull(mirror.url, f"app{number}", image)
        assert fake_hub.count("GET", "cdn") == cdn_before


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_repair_takes_a_small_blob_out_of_every_servers_memory(
    fake_hub: FakeHub, tmp_path: Path, workers: str
) -> None:
    # Blobs up to 64 KiB are kept in memory once read: a repaired one must not stay there.
    image = make_image([make_random_layer(8 * 1024, seed=43)])
    fake_hub.add_image("library/small", "latest", image)
    layer = image.blobs[-1]
    data = tmp_path / "data"
    with MirrorProcess(data, fake_hub.url, "--workers", workers) as mirror:
        for _ in range(6):  # fetched, then read from disk into each process's memory
            await pull(mirror.url, "small", image)
        path = blob_path(data, layer.digest)
        content = bytearray(path.read_bytes())
        content[100] ^= 0xFF
        path.write_bytes(bytes(content))
        repaired = await run("verify", "--repair", "--data-dir", str(data))
        assert "1 taken out of service" in repaired.stdout, repaired.stdout + repaired.stderr

        cdn_before = fake_hub.count("GET", "cdn")
        for _ in range(4):
            await pull(mirror.url, "small", image)  # checks every digest
        assert fake_hub.count("GET", "cdn") == cdn_before + 1
        assert blob_path(data, layer.digest).read_bytes() == layer.data


async def test_verify_repair_keeps_a_blob_that_lands_while_it_hashes(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    first, later = (make_image([make_random_layer(256 * 1024, seed=s)]) for s in (60, 61))
    fake_hub.add_image("library/first", "latest", first)
    fake_hub.add_image("library/later", "latest", later)
    async with RunningMirror(settings_for(fake_hub.url, tmp_path / "data")) as mirror:
        await pull(mirror.url, "first", first)
        loop = asyncio.get_running_loop()
        hashes_to = maintenance._hashes_to

        def pulled_meanwhile(content: Content, digest: Digest) -> tuple[bool, Copy] | None:
            if not on_disk(mirror, later):  # a client pulls while verify reads the disk
                asyncio.run_coroutine_threadsafe(pull(mirror.url, "later", later), loop).result()
            return hashes_to(content, digest)

        with patch.object(maintenance, "_hashes_to", pulled_meanwhile):
            report = await maintenance.verify(mirror.engine, repair=True)
        assert on_disk(mirror, later)
        assert report.missing == []
        disk = await asyncio.to_thread(mirror.engine.blobs.on_disk)
        usage = await mirror.engine.store.graph.usage()
        assert (usage.blobs, usage.bytes) == (len(disk), sum(size for size, _ in disk.values()))


async def test_gc_leaves_a_blob_recorded_that_lands_again_as_it_removes_it(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    async with RunningMirror(settings_for(fake_hub.url, tmp_path / "data")) as mirror:
        engine = mirror.engine
        blobs = engine.blobs
        assert isinstance(blobs, BlobStore)  # a data dir on the local disk
        content = Content(blobs, engine.store.graph)
        stray = b"a blob no manifest mentions"
        digest = Digest.parse("sha256:" + hashlib.sha256(stray).hexdigest())

        def land() -> None:
            partial = blobs.new_partial(digest)
            partial.write(stray)
            partial.commit()

        await asyncio.to_thread(land)
        await content.landed(digest, len(stray))
        old = time.time() - 2 * 3600
        os.utime(blobs.path(digest), (old, old))
        graph = engine.store.inner.graph
        record_removal = graph.blobs_removed

        async def landed_meanwhile(digests: Sequence[str]) -> None:
            if not blobs.path(digest).exists():  # an import brings it back
                await asyncio.to_thread(land)
                await content.landed(digest, len(stray))
            await record_removal(digests)

        with patch.object(graph, "blobs_removed", landed_meanwhile):
            report = await maintenance.gc(engine, dry_run=False)
        assert report.blobs == [(str(digest), len(stray))]
        assert blobs.path(digest).read_bytes() == stray
        assert await engine.store.graph.usage() == Usage(1, len(stray))


def on_disk(mirror: RunningMirror, image: Image) -> bool:
    return all(blob_path(mirror.settings.data_dir, blob.digest).exists() for blob in image.blobs)
