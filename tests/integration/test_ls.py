"""``mirror ls``: what the mirror holds, read while ``mirror serve`` runs on the data dir."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp

from tests.support.fakehub import FakeHub
from tests.support.oci import OCI_INDEX, OCI_MANIFEST, make_image, make_index, make_layer
from tests.support.process import MirrorProcess, run_mirror


async def pull(url: str, path: str, accept: str) -> bytes:
    async with aiohttp.ClientSession() as session, session.get(
        url + path, headers={"Accept": accept}
    ) as response:
        assert response.status == 200
        return await response.read()


async def test_ls_lists_tags_platforms_sizes_and_blobs_on_disk(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    single = make_image([make_layer(b"one" * 1000), make_layer(b"two" * 1000)])
    amd64 = make_image([make_layer(b"amd")], arch="amd64")
    arm64 = make_image([make_layer(b"arm")], arch="arm64")
    index = make_index([amd64, arm64])
    fake_hub.add_image("library/app", "1.0", single)
    fake_hub.add_index("library/multi", "latest", index)
    data = tmp_path / "data"
    with MirrorProcess(data, fake_hub.url, "--upstream", f"ghcr.io={fake_hub.url}") as mirror:
        await pull(mirror.url, "/v2/app/manifests/1.0", OCI_MANIFEST)
        for blob in single.blobs:
            await pull(mirror.url, f"/v2/app/blobs/{blob.digest}", "*/*")
        await pull(mirror.url, "/v2/multi/manifests/latest", OCI_INDEX)
        await pull(mirror.url, f"/v2/multi/manifests/{amd64.digest}", OCI_MANIFEST)

        ls = ("ls", "--data-dir", str(data))
        listing = await asyncio.to_thread(run_mirror, *ls, "--json")
        table = await asyncio.to_thread(run_mirror, *ls)
        only_app = await asyncio.to_thread(run_mirror, *ls, "app:*", "--json")

    assert listing.returncode == 0, listing.stderr
    rows = {f"{r['repository']}:{r['tag']}": r for r in json.loads(listing.stdout)}
    app, multi = rows["library/app:1.0"], rows["library/multi:latest"]
    assert (app["registry"], app["digest"]) == ("docker.io", single.digest)
    assert (app["blobs"], app["blobs_present"]) == (3, 3)  # config and two layers
    assert "last_pulled" in app  # written in batches: set within ten seconds of a pull
    assert app["size"] == sum(blob.size for blob in single.blobs)
    assert multi["digest"] == index.digest
    assert multi["platforms"] == ["linux/amd64", "linux/arm64"]
    assert multi["manifests_missing"] == 1  # arm64's manifest was never pulled
    assert multi["blobs_present"] == 0
    assert table.returncode == 0
    assert "docker.io/library/app:1.0" in table.stdout
    assert single.digest.partition(":")[2][:12] in table.stdout
    assert [r["repository"] for r in json.loads(only_app.stdout)] == ["library/app"]


def test_ls_on_a_data_dir_that_is_not_there_says_so(tmp_path: Path) -> None:
    result = run_mirror("ls", "--data-dir", str(tmp_path / "nothing"))
    assert result.returncode == 1
    assert "no mirror data" in result.stderr
    assert not (tmp_path / "nothing").exists()
