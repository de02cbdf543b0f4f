"""``mirror seed``: images pulled into the data dir ahead of need, as the command runs."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp

from mirror.services.inventory import human_size
from tests.support.fakehub import FakeHub
from tests.support.oci import OCI_MANIFEST, make_image, make_index, make_layer
from tests.support.process import MirrorProcess, run_mirror


def _blob_files(data: Path) -> set[str]:
    return {
        f"sha256:{path.name}" for path in (data / "blobs").rglob("*") if len(path.name) == 64
    }


async def test_seed_fetches_every_platform_pins_and_reports_each_image(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    single = make_image([make_layer(b"one" * 500), make_layer(b"two" * 500)])
    amd64 = make_image([make_layer(b"amd")], arch="amd64")
    arm64 = make_image([make_layer(b"arm")], arch="arm64")
    index = make_index([amd64, arm64])
    fake_hub.add_image("library/app", "1.0", single)
    fake_hub.add_index("acme/multi", "latest", index)
    references = tmp_path / "images.txt"
    references.write_text("# what the site needs\nacme/multi   # both platforms\n\n")
    data = tmp_path / "data"

    done = await asyncio.to_thread(
        run_mirror, "seed", "--data-dir", str(data), "--upstream", fake_hub.url,
        "app:1.0", "--file", str(references),
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(
        line.startswith(f"app:1.0  {single.digest}") and "fetched" in line for line in lines
    ), done.stdout
    assert any(line.startswith(f"acme/multi  {index.digest}") for line in lines), done.stdout
    assert "seeded 2 of 2 images" in done.stdout
    wanted = {b.digest for b in single.blobs} | {b.digest for i in index.images for b in i.blobs}
    assert wanted <= _blob_files(data)

    pins = await asyncio.to_thread(run_mirror, "ls", "--data-dir", str(data), "--json")
    assert pins.returncode == 0, pins.stderr
    assert '"pinned": true' in pins.stdout
    assert '"pinned": false' not in pins.stdout

    unpinned = await asyncio.to_thread(
        run_mirror, "unpin", "--data-dir", str(data), "app:1.0", "app:2.0"
    )
    assert unpinned.returncode == 1
    assert "unpinned docker.io/library/app:1.0" in unpinned.stdout
    assert "docker.io/library/app:2.0 is not pinned" in unpinned.stderr
    listed = await asyncio.to_thread(run_mirror, "ls", "--data-dir", str(data), "app", "--json")
    assert '"pinned": false' in listed.stdout

    fake_hub.clear_log()
    again = await asyncio.to_thread(
        run_mirror, "seed", "--data-dir", str(data), "--upstream", fake_hub.url, "app:1.0"
    )
    assert again.returncode == 0, again.stderr
    assert "fetched 0 B" in again.stdout
    assert fake_hub.count(path_contains="/blobs/") == 0


async def test_seed_narrows_an_index_to_the_platforms_asked_for(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    amd64 = make_image([make_layer(b"amd-only")], arch="amd64")
    arm64 = make_image([make_layer(b"arm-only")], arch="arm64")
    fake_hub.add_index("library/multi", "2", make_index([amd64, arm64]))
    data = tmp_path / "data"
    done = await asyncio.to_thread(
        run_mirror, "seed", "--data-dir", str(data), "--upstream", fake_hub.url,
        "--platform", "linux/arm64", "docker.io/library/multi:2",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    on_disk = _blob_files(data)
    assert {b.digest for b in arm64.blobs} <= on_disk
    assert not {b.digest for b in amd64.blobs} & on_disk

    missing = await asyncio.to_thread(
        run_mirror, "seed", "--data-dir", str(data), "--upstream", fake_hub.url,
        "--platform", "windows/amd64", "multi:2",
    )  # fmt: skip
    assert missing.returncode == 1
    assert "no manifest for windows/amd64 in the index" in missing.stderr
    assert "linux/amd64, linux/arm64" in missing.stderr


async def test_failures_are_listed_with_their_reason_and_the_rest_is_seeded(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    image = make_image([make_layer(b"fine")])
    fake_hub.add_image("library/fine", "1", image)
    data = tmp_path / "data"
    done = await asyncio.to_thread(
        run_mirror, "seed", "--data-dir", str(data), "--upstream", fake_hub.url,
        "fine:1", "fine:nope", "ghcr.io/acme/tool:1", "Bad Name", "--no-pin",
    )  # fmt: skip
    assert done.returncode == 1
    assert "seeded 1 of 4 images" in done.stdout
    assert "failed fine:nope: MANIFEST_UNKNOWN" in done.stderr
    assert "failed ghcr.io/acme/tool:1: registry ghcr.io is not mirrored here" in done.stderr
    assert "failed Bad Name: NAME_INVALID" in done.stderr
    assert {b.digest for b in image.blobs} <= _blob_files(data)
    listed = await asyncio.to_thread(run_mirror, "ls", "--data-dir", str(data), "--json")
    assert '"pinned": false' in listed.stdout  # --no-pin

    usage = await asyncio.to_thread(run_mirror, "seed", "--data-dir", str(data))
    assert usage.returncode == 2
    assert "seed needs image references" in usage.stderr


async def test_seed_beside_a_running_server_fetches_nothing_twice(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    image = make_image([make_layer(b"shared" * 20000)])
    fake_hub.add_image("library/shared", "1", image)
    data = tmp_path / "data"
    with MirrorProcess(data, fake_hub.url) as mirror:
        done = await asyncio.to_thread(
            run_mirror, "seed", "--data-dir", str(data), "--upstream", fake_hub.url, "shared:1"
        )
        assert done.returncode == 0, done.stderr
        fake_hub.clear_log()
        async with aiohttp.ClientSession() as session:
            for path in [
                "/v2/library/shared/manifests/1",
                *(f"/v2/library/shared/blobs/{b.digest}" for b in image.blobs),
            ]:
                async with session.get(
                    mirror.url + path, headers={"Accept": OCI_MANIFEST}
                ) as response:
                    assert response.status == 200
    assert fake_hub.count(path_contains="/blobs/") == 0
    assert fake_hub.count("GET", path_contains="/manifests/") == 0


async def test_seed_and_ls_give_an_image_the_same_size_and_its_platform(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    single = make_image([make_layer(b"one" * 1000), make_layer(b"two" * 1000)], arch="arm64")
    index = make_index([make_image([make_layer(b"amd" * 900)]),
                        make_image([make_layer(b"arm" * 700)], arch="arm64")])  # fmt: skip
    fake_hub.add_image("library/app", "1.0", single)
    fake_hub.add_index("acme/multi", "latest", index)
    data = tmp_path / "data"
    seeded = await asyncio.to_thread(
        run_mirror, "seed", "--data-dir", str(data), "--upstream", fake_hub.url,
        "app:1.0", "acme/multi",
    )  # fmt: skip
    assert seeded.returncode == 0, seeded.stderr
    table = await asyncio.to_thread(run_mirror, "ls", "--data-dir", str(data))
    header, *rows = [re.split(r"\s{2,}", line) for line in table.stdout.splitlines()]
    listed = {row[0]: dict(zip(header, row, strict=False)) for row in rows}

    lines = [line.split("  ") for line in seeded.stdout.splitlines() if "  fetched " in line]
    sizes = {line[0]: line[2] for line in lines}
    app, multi = listed["docker.io/library/app:1.0"], listed["docker.io/acme/multi:latest"]
    assert app["SIZE"] == sizes["app:1.0"] == human_size(sum(b.size for b in single.blobs))
    assert multi["SIZE"] == sizes["acme/multi"]
    assert app["PLATFORMS"] == "linux/arm64"  # from the image's config: there is no index
    assert multi["PLATFORMS"] == "linux/amd64,linux/arm64"
