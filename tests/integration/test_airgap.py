"""Air-gapped sites, end to end with real software.

A connected mirror in front of the fake Docker Hub seeds images and exports a bundle; an
offline mirror with an empty data dir imports it and serves it to skopeo and containerd
with the upstream's digests and no upstream request at all. Other tools read the bundle
directly; deltas, damaged bundles, interrupted imports and layouts skopeo wrote are covered.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.binaries import require_binary
from tests.support.clients import Containerd, write_hosts_toml
from tests.support.fakehub import FakeHub
from tests.support.oci import (
    DOCKER_LIST,
    Image,
    Index,
    make_image,
    make_index,
    make_layer,
    make_random_layer,
)
from tests.support.process import (
    MirrorProcess,
    dir_blobs_verified,
    dir_manifest_digest,
    run_mirror,
    skopeo_copy,
)

MiB = 1024 * 1024


@dataclass
class Site:
    """The connected side: a data dir seeded from the fake Docker Hub."""

    hub: FakeHub
    data: Path

    async def mirror(self, *args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(run_mirror, *args, "--data-dir", str(self.data))

    async def seed(self, *references: str) -> None:
        done = await self.mirror("seed", "--upstream", self.hub.url, *references)
        assert done.returncode == 0, done.stdout + done.stderr

    async def export(self, output: Path, *args: str) -> subprocess.CompletedProcess[str]:
        done = await self.mirror("export", "--output", str(output), *args)
        assert done.returncode == 0, done.stdout + done.stderr
        return done


async def load(data: Path, *bundles: Path) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        run_mirror, "import", "--data-dir", str(data), *map(str, bundles)
    )


def bundle_blobs(bundle: Path) -> set[str]:
    with tarfile.open(bundle) as tar:
        return {
            "sha256:" + name.rsplit("/", 1)[1]
            for name in tar.getnames()
            if name.startswith("blobs/sha256/") and len(name) > len("blobs/sha256/")
        }


async def skopeo(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "skopeo", "--insecure-policy", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout=300)
    assert process.returncode == 0, f"skopeo {' '.join(args)}: {err.decode(errors='replace')}"
    return out.decode()


def three_images(hub: FakeHub, big: int = 64 * MiB) -> dict[str, Image | Index]:
    images: dict[str, Image | Index] = {
        "library/single:1.0": make_image([make_layer(b"single-arch " * 200)], docker=True),
        "library/multi:1.0": make_index(
            [
                make_image([make_layer(b"amd64 layer")], arch="amd64"),
                make_image([make_layer(b"arm64 layer")], arch="arm64"),
            ]
        ),
        "someorg/big:1.0": make_image([make_random_layer(big, seed=12)]),
        "library/dlist:1.0": make_index(
            [
                make_image([make_layer(b"docker amd64")], arch="amd64", docker=True),
                make_image([make_layer(b"docker arm64")], arch="arm64", docker=True),
            ],
            docker=True,
        ),
    }
    for reference, content in images.items():
        repository, _, tag = reference.partition(":")
        if isinstance(content, Index):
            hub.add_index(repository, tag, content)
        else:
            hub.add_image(repository, tag, content)
    return images


def every_blob(content: Image | Index) -> set[str]:
    if isinstance(content, Index):
        return {blob.digest for image in content.images for blob in image.blobs}
    return {blob.digest for blob in content.blobs}


@pytest.fixture
def skopeo_binary() -> None:
    require_binary("skopeo")


@pytest.mark.usefixtures("skopeo_binary")
async def test_round_trip_then_a_delta_brings_the_offline_side_up_to_date(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    site = Site(fake_hub, tmp_path / "connected")
    images = three_images(fake_hub)
    await site.seed(*images)
    bundle = tmp_path / "bundle.tar.zst"
    exported = await site.export(bundle)
    assert exported.stdout.count("exported docker.io/") == 4
    sidecar = bundle.with_name(bundle.name + ".sha256").read_text().split()
    assert sidecar == [hashlib.sha256(bundle.read_bytes()).hexdigest(), bundle.name]

    fake_hub.clear_log()
    offline = tmp_path / "offline"
    loaded = await load(offline, bundle)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.count("imported docker.io/") == 4

    with MirrorProcess(offline, fake_hub.url, "--offline") as served:
        for reference, content in images.items():
            name = reference.removeprefix("library/")
            destination = tmp_path / "pulled" / name.replace("/", "_")
            await skopeo_copy(f"{served.host}/{name}", destination)
            assert dir_manifest_digest(destination) == content.digest
            assert dir_blobs_verified(destination) >= 2

        # A new tag upstream: seeded on the connected side, carried over as a delta.
        single = images["library/single:1.0"]
        assert isinstance(single, Image)
        newer = make_image([single.layers[0], make_layer(b"the second release")], docker=True)
        fake_hub.add_image("library/single", "2.0", newer)
        await site.seed("single:2.0")
        delta = tmp_path / "delta.tar"
        made = await site.export(delta, "--since", str(bundle))
        new_blobs = {newer.config.digest, newer.layers[1].digest}
        manifests = {newer.digest} | {c.digest for c in images.values()}
        for content in images.values():
            if isinstance(content, Index):
                manifests |= {image.digest for image in content.images}
        assert bundle_blobs(delta) == new_blobs | manifests
        assert "5 images" in made.stdout

        fake_hub.clear_log()
        updated = await load(offline, delta)
        assert updated.returncode == 0, updated.stderr
        assert "2 blobs copied in" in updated.stdout
        destination = tmp_path / "pulled" / "single-2.0"
        await skopeo_copy(f"{served.host}/single:2.0", destination)
        assert dir_manifest_digest(destination) == newer.digest
    assert fake_hub.log == []


@pytest.mark.usefixtures("skopeo_binary")
async def test_other_tools_read_the_bundle_and_a_layout_skopeo_wrote_imports(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    site = Site(fake_hub, tmp_path / "connected")
    images = three_images(fake_hub, big=2 * MiB)
    await site.seed(*images)
    bundle = tmp_path / "bundle.tar"
    await site.export(bundle)

    for reference, content in images.items():
        destination = tmp_path / "read" / reference.replace("/", "_").replace(":", "-")
        destination.parent.mkdir(exist_ok=True)
        await skopeo(
            "copy", "--quiet", "--all", f"oci-archive:{bundle}:docker.io/{reference}",
            f"dir:{destination}",
        )  # fmt: skip
        if isinstance(content, Index) and content.media_type == DOCKER_LIST:
            # skopeo 1.9 writes a Docker list read from a layout as an OCI index: the
            # platforms' manifests and the blobs stay byte for byte, the list does not.
            for image in content.images:
                found = destination / f"{image.digest.partition(':')[2]}.manifest.json"
                assert found.read_bytes() == image.manifest
        else:
            assert dir_manifest_digest(destination) == content.digest
        assert dir_blobs_verified(destination) >= 2

    # skopeo writes an OCI archive and an OCI directory of an image it pulled itself.
    with MirrorProcess(site.data, fake_hub.url) as connected:
        multi = images["library/multi:1.0"]
        archive = tmp_path / "skopeo.tar"
        directory = tmp_path / "skopeo-dir"
        source = f"docker://{connected.host}/library/multi:1.0"
        await skopeo(
            "copy", "--quiet", "--all", "--src-tls-verify=false", source,
            f"oci-archive:{archive}:acme/multi:from-skopeo",
        )  # fmt: skip
        await skopeo(
            "copy", "--quiet", "--all", "--src-tls-verify=false", source,
            f"oci:{directory}:ghcr.io/acme/multi:dir",
        )  # fmt: skip
    offline = tmp_path / "offline"
    loaded = await load(offline, archive, directory)
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    assert f"imported docker.io/acme/multi:from-skopeo  {multi.digest}" in loaded.stdout
    assert f"imported ghcr.io/acme/multi:dir  {multi.digest}" in loaded.stdout
    assert "ghcr.io is not an upstream here" in loaded.stdout
    with MirrorProcess(offline, fake_hub.url, "--offline") as served:
        destination = tmp_path / "pulled"
        await skopeo_copy(f"{served.host}/acme/multi:from-skopeo", destination)
        assert dir_manifest_digest(destination) == multi.digest


async def test_a_flipped_byte_refuses_only_the_image_it_breaks(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    site = Site(fake_hub, tmp_path / "connected")
    images = three_images(fake_hub, big=1 * MiB)
    await site.seed(*images)
    bundle = tmp_path / "bundle.tar"
    await site.export(bundle)
    single = images["library/single:1.0"]
    assert isinstance(single, Image)
    victim = single.layers[0].digest
    with tarfile.open(bundle) as tar:
        offset = tar.getmember(f"blobs/sha256/{victim.partition(':')[2]}").offset_data
    with bundle.open("r+b") as file:
        file.seek(offset + 10)
        byte = file.read(1)
        file.seek(offset + 10)
        file.write(bytes([byte[0] ^ 0xFF]))

    loaded = await load(tmp_path / "offline", bundle)
    assert loaded.returncode == 1
    assert f"failed docker.io/library/single:1.0: blob {victim}: corrupt" in loaded.stderr
    assert "imported docker.io/library/multi:1.0" in loaded.stdout
    assert "imported docker.io/someorg/big:1.0" in loaded.stdout
    assert not (tmp_path / "offline" / "blobs" / "sha256" / victim[7:9] / victim[7:]).exists()
    listed = await asyncio.to_thread(
        run_mirror, "ls", "--data-dir", str(tmp_path / "offline"), "--json"
    )
    assert '"library/single"' not in listed.stdout
    assert '"someorg/big"' in listed.stdout


async def test_an_import_killed_halfway_completes_when_run_again(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    site = Site(fake_hub, tmp_path / "connected")
    images = three_images(fake_hub, big=200 * MiB)
    await site.seed(*images)
    bundle = tmp_path / "bundle.tar"
    await site.export(bundle)

    offline = tmp_path / "offline"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    process = subprocess.Popen(  # noqa: ASYNC220 (killed by the test, mid-run)
        [sys.executable, "-m", "mirror", "import", "--data-dir", str(offline), str(bundle)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    caught = False
    while not caught and time.monotonic() < deadline:
        assert process.poll() is None, "the import ended before it could be interrupted"
        caught = any((offline / "blobs").rglob("*.partial"))
        await asyncio.sleep(0 if caught else 0.002)
    assert caught, "no blob copy was caught under way"
    process.send_signal(signal.SIGKILL)
    process.wait()

    again = await load(offline, bundle)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("imported docker.io/") == 4
    assert "already held" in again.stdout
    wanted = set().union(*(every_blob(content) for content in images.values()))
    on_disk = {f"sha256:{p.name}" for p in (offline / "blobs").rglob("*") if len(p.name) == 64}
    assert wanted <= on_disk
    gc = await asyncio.to_thread(run_mirror, "gc", "--data-dir", str(offline), "--dry-run")
    assert "would remove 0 unreferenced blobs" in gc.stdout

    repeated = await load(offline, bundle)
    assert "0 blobs copied in" in repeated.stdout


async def test_ctr_imports_the_bundle_and_pulls_through_the_offline_mirror(
    fake_hub: FakeHub, tmp_path: Path, containerd: Containerd
) -> None:
    site = Site(fake_hub, tmp_path / "connected")
    images = three_images(fake_hub, big=4 * MiB)
    tag = os.urandom(4).hex()  # ctr's image store outlives the test: names of its own
    for reference in list(images):
        repository, _, _ = reference.partition(":")
        content = images.pop(reference)
        images[f"{repository}:{tag}"] = content
        if isinstance(content, Index):
            fake_hub.add_index(repository, tag, content)
        else:
            fake_hub.add_image(repository, tag, content)
    await site.seed(*images)
    bundle = tmp_path / "bundle.tar"
    await site.export(bundle, f"*/*:{tag}")

    offline = tmp_path / "offline"
    loaded = await load(offline, bundle)
    assert loaded.returncode == 0, loaded.stderr
    hosts = write_hosts_toml(tmp_path / "hosts", "http://placeholder", fallback=False)
    with MirrorProcess(offline, fake_hub.url, "--offline") as served:
        write_hosts_toml(hosts, served.url, fallback=False)
        for reference, content in images.items():
            name = f"docker.io/{reference}"
            digest = await asyncio.to_thread(containerd.pull, name, hosts)
            assert digest == content.digest
            await asyncio.to_thread(containerd.remove_image, name)

    # ctr reads the bundle itself, by the names in its index.
    await asyncio.to_thread(containerd.ctr, "images", "import", "--all-platforms", str(bundle))
    try:
        for reference, content in images.items():
            name = f"docker.io/{reference}"
            assert await asyncio.to_thread(containerd.image_digest, name) == content.digest
    finally:
        for reference in images:
            await asyncio.to_thread(containerd.remove_image, f"docker.io/{reference}")
    shutil.rmtree(offline, ignore_errors=True)


async def test_what_is_not_a_layout_gets_one_clear_line(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(os.urandom(5000))
    no_index = tmp_path / "no-index"
    (no_index / "blobs" / "sha256").mkdir(parents=True)
    bad_index = tmp_path / "bad-index"
    bad_index.mkdir()
    (bad_index / "index.json").write_text('{"manifests": "nope"}')
    unnamed = tmp_path / "unnamed"
    unnamed.mkdir()
    (unnamed / "index.json").write_text(
        '{"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest'
        '.v1+json", "digest": "sha256:' + "a" * 64 + '", "size": 10}]}'
    )
    data = tmp_path / "data"
    for layout, message in (
        (garbage, "not a readable tar"),
        (no_index, "no index.json: not an OCI image layout"),
        (bad_index, "index.json is not an image index"),
        (unnamed, "no image name: annotate the index entry"),
        (tmp_path / "absent.tar", "no such file or directory"),
    ):
        done = await load(data, layout)
        assert done.returncode in (1, 2), layout
        assert message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


async def test_an_export_missing_an_image_fails_unless_allowed_and_names_it(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    site = Site(fake_hub, tmp_path / "connected")
    images = three_images(fake_hub, big=1 * MiB)
    await site.seed(*images)
    single = images["library/single:1.0"]
    assert isinstance(single, Image)
    evicted = single.layers[0].digest
    (site.data / "blobs" / "sha256" / evicted[7:9] / evicted[7:]).unlink()

    bundle = tmp_path / "bundle.tar"
    refused = await site.mirror("export", "--output", str(bundle))
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert not bundle.exists()
    assert not bundle.with_name(bundle.name + ".sha256").exists()
    lines = refused.stderr.splitlines()
    assert f"missing docker.io/library/single:1.0: blob {evicted} is not on disk" in lines[-2]
    assert "nothing written" in lines[-1]
    assert "--allow-missing" in lines[-1]

    allowed = await site.export(bundle, "--allow-missing")
    assert allowed.stdout.count("exported docker.io/") == 3
    assert "wrote " in allowed.stdout
    last = allowed.stderr.splitlines()[-1]
    assert f"missing docker.io/library/single:1.0: blob {evicted}" in last
    assert evicted not in bundle_blobs(bundle)

    only = await site.mirror("export", "-o", str(tmp_path / "x.tar"), "--allow-missing", "single")
    assert only.returncode == 1
    assert "no image has all its blobs on disk, nothing written" in only.stderr
    assert not (tmp_path / "x.tar").exists()


@pytest.mark.usefixtures("skopeo_binary")
async def test_a_layout_naming_an_image_by_its_tag_alone_needs_the_repository(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    site = Site(fake_hub, tmp_path / "connected")
    image = make_image([make_layer(b"nginx, say")])
    fake_hub.add_image("library/nginx", "1.27", image)
    await site.seed("nginx:1.27")
    archive = tmp_path / "n.tar"
    with MirrorProcess(site.data, fake_hub.url) as connected:
        # The common OCI convention: the layout's ref name is the tag alone.
        await skopeo(
            "copy", "--quiet", "--src-tls-verify=false",
            f"docker://{connected.host}/library/nginx:1.27", f"oci-archive:{archive}:1.27",
        )  # fmt: skip

    offline = tmp_path / "offline"
    refused = await load(offline, archive)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    (line,) = [line for line in refused.stderr.splitlines() if line.startswith("failed")]
    assert line.startswith("failed 1.27: ")
    assert "mirror import --repository NAME" in line
    assert "library/1.27" not in refused.stdout + refused.stderr

    named = await asyncio.to_thread(
        run_mirror, "import", "--data-dir", str(offline), "--repository", "nginx", str(archive)
    )
    assert named.returncode == 0, named.stdout + named.stderr
    assert f"imported docker.io/library/nginx:1.27  {image.digest}" in named.stdout
    listed = await asyncio.to_thread(run_mirror, "ls", "--data-dir", str(offline))
    assert "docker.io/library/nginx:1.27" in listed.stdout
    assert "1.27:latest" not in listed.stdout

    for bad in ("nginx:1.27", "nginx@sha256:" + "a" * 64, "Nginx"):
        wrong = await asyncio.to_thread(
            run_mirror, "import", "--data-dir", str(offline), "--repository", bad, str(archive)
        )
        assert wrong.returncode == 2, (bad, wrong.stderr)
        assert wrong.stderr.startswith("mirror: error: --repository"), wrong.stderr
        assert len(wrong.stderr.splitlines()) == 1
