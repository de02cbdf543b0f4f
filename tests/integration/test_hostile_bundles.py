"""``mirror import`` of bundles built to hurt: each gets one line and a non-zero exit, in
bounded memory and output, and grants no repository a blob it could not read before.

The bundles come from ``tests.support.bundles`` (``scripts/fuzz --bundles N`` draws from the
same kinds); each is a few KiB to a few MiB on disk, whatever it claims.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from tests.support.bundles import (
    BAD_ENTRIES,
    HOSTILE_NAMES,
    KINDS,
    MiB,
    RawTar,
    bad_index,
    big_header,
    entry,
    image_bundle,
    index_json,
    manifests_first,
    wide_index,
    write_image,
    zero_bomb,
)
from tests.support.fakehub import FakeHub
from tests.support.fuzz_bundles import Imported, import_measured, run_bundles
from tests.support.oci import make_image, make_layer, make_random_layer, sha256_digest
from tests.support.process import MirrorProcess, run_mirror


async def load(data: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run_mirror, "import", "--data-dir", str(data), *map(str, args))


def one_line_refusal(done: subprocess.CompletedProcess[str] | Imported, message: str) -> None:
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert message in done.stderr, done.stderr


# -- item 9: memory ------------------------------------------------------------------------


async def test_a_huge_tar_header_is_refused_before_it_is_read(tmp_path: Path) -> None:
    small = RawTar(tmp_path / "small.tar.zst")
    small.add("index.json", b"{}")
    small.close()
    baseline = await asyncio.to_thread(import_measured, tmp_path / "d", small.path)
    assert "not an image index" in baseline.stderr

    tar = RawTar(tmp_path / "header.tar.zst")
    tar.header("././@PaxHeader", 64 * MiB, b"x")  # a pax header claiming 64 MiB
    tar.data((bytes(MiB) for _ in range(64)), 64 * MiB)
    tar.add("index.json", b"{}")
    tar.close()
    assert tar.path.stat().st_size < 64 * 1024

    done = await asyncio.to_thread(import_measured, tmp_path / "d", tar.path)
    one_line_refusal(done, f"a tar header of {64 * MiB} bytes (more than 65536)")
    grew = done.peak_kib - baseline.peak_kib
    assert grew < 32 * 1024, (done.peak_kib, baseline.peak_kib)  # KiB: the header never held


async def test_long_name_headers_and_global_headers_are_bounded_too(tmp_path: Path) -> None:
    for seed in range(6):
        path, message = big_header(tmp_path / f"h{seed}.tar.zst", random.Random(seed))
        one_line_refusal(await load(tmp_path / "d", path), message)


async def test_the_manifests_kept_in_memory_are_bounded(tmp_path: Path) -> None:
    # 40 manifest-like members of 4 MiB before index.json: each had to be kept.
    path, _ = manifests_first(tmp_path / "m.tar.zst", random.Random(1))
    # They compress well: with the expansion bound lifted, the memory bound answers.
    done = await load(tmp_path / "d", path, "--max-expansion", "0")
    one_line_refusal(done, "manifests of more than 128.0 MiB in all")


# -- item 10: work and output that grow as entries x children -----------------------------


async def test_an_index_of_thousands_of_absent_children_is_walked_once(tmp_path: Path) -> None:
    path, _ = wide_index(tmp_path / "wide.tar.zst", random.Random(3), children=5000)
    done = await load(tmp_path / "d", path)
    assert "Traceback" not in done.stderr, done.stderr
    notes = [line for line in done.stdout.splitlines() if line.startswith("note ")]
    assert len(notes) == 20, done.stdout[:2000]
    assert all(line.endswith(" and 4995 more") for line in notes), notes[0]
    assert len(done.stdout) < 20_000, len(done.stdout)


# -- item 11: one line, and names validated ----------------------------------------------


async def test_an_index_of_the_wrong_types_gets_one_line(tmp_path: Path) -> None:
    paths = [
        bad_index(tmp_path / f"b{variant}.tar.zst", random.Random(0), variant)[0]
        for variant in range(len(BAD_ENTRIES) + 1)
    ]
    done = await load(tmp_path / "d", *paths)  # one process, one line for each
    assert done.returncode == 1, done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == len(paths), done.stderr
    for path, line in zip(paths, lines, strict=True):
        assert line.startswith(f"mirror: error: {path}: index.json is not an image index: ")


async def test_names_are_validated_as_a_pull_would_and_never_printed_raw(tmp_path: Path) -> None:
    image = make_image([make_layer(b"names")])
    data = tmp_path / "d"
    paths = [
        image_bundle(tmp_path / f"n{number}.tar", name, image)
        for number, name in enumerate(HOSTILE_NAMES)
    ]
    done = await load(data, *paths)
    assert done.returncode == 1, done.stdout
    printed = done.stdout + done.stderr
    assert "Traceback" not in printed
    assert "\x1b" not in printed
    assert "<script>" not in printed
    assert all(len(line) < 600 for line in printed.splitlines())
    failed = done.stderr.splitlines()
    assert len(failed) == len(HOSTILE_NAMES), done.stderr
    assert all(": not an image reference: " in line for line in failed), done.stderr
    assert done.stdout.count("imported 0 of 1 images") == len(HOSTILE_NAMES)
    listed = await asyncio.to_thread(run_mirror, "ls", "--data-dir", str(data), "--json")
    assert json.loads(listed.stdout or "[]") == []


async def test_a_manifest_nested_too_deep_gets_one_line(tmp_path: Path) -> None:
    body = b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",'
    body += b' "layers": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    tar = RawTar(tmp_path / "deep.tar")
    tar.add("index.json", index_json([entry("deep:1", sha256_digest(body), len(body))]))
    tar.blob(body)
    tar.close()
    done = await load(tmp_path / "d", tar.path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("failed docker.io/library/deep:1: "), done.stderr


# -- item 13: sizes, the disk budget, expansion -------------------------------------------


async def test_a_zstd_bomb_is_refused_unless_the_operator_lifts_the_bound(tmp_path: Path) -> None:
    path, message = zero_bomb(tmp_path / "bomb.tar.zst", random.Random(0))  # 80 MiB of zeros
    assert path.stat().st_size < 64 * 1024
    data = tmp_path / "d"
    one_line_refusal(await load(data, path), message)
    assert not [p for p in (data / "blobs").rglob("*") if p.is_file()]

    lifted = await load(data, path, "--max-expansion", "0")
    assert lifted.returncode == 0, lifted.stderr
    assert "imported docker.io/library/bomb:1" in lifted.stdout


async def test_declared_sizes_are_checked_against_the_bytes(tmp_path: Path) -> None:
    data = tmp_path / "d"
    layer = make_layer(b"sized " * 100)
    honest = make_image([layer])
    assert (await load(data, image_bundle(tmp_path / "a.tar", "app:1", honest))).returncode == 0

    for claimed in (2**62, layer.size + 1):
        descriptor = {**layer.descriptor(), "size": claimed}
        lying = make_image([layer])
        body = json.loads(lying.manifest)
        body["layers"] = [descriptor]
        manifest = json.dumps(body).encode()
        # Carried into an empty mirror, and not carried (the mirror holds it for app).
        for carry in (True, False):
            tar = RawTar(tmp_path / f"lie-{claimed}-{carry}.tar")
            digest = sha256_digest(manifest)
            tar.add("index.json", index_json([entry("app:2", digest, len(manifest))]))
            tar.blob(manifest)
            tar.blob(lying.config.data)
            if carry:
                tar.blob(layer.data)
            tar.close()
            done = await load(tmp_path / "empty" if carry else data, tar.path)
            assert done.returncode == 1, done.stdout
            if not carry:
                expected = f"{claimed} bytes declared, {layer.size} held"
            elif claimed == 2**62:  # what it declares cannot fit: refused before it is read
                expected = "4194304.0 TiB to write"
            else:
                expected = f"{layer.size} bytes in the bundle, {claimed} expected"
            assert expected in done.stderr, done.stderr
            assert done.stderr.count("\n") == 1, done.stderr
    listed = await asyncio.to_thread(run_mirror, "ls", "--data-dir", str(data), "--json")
    assert [row["tag"] for row in json.loads(listed.stdout)] == ["1"]


async def test_an_import_that_cannot_fit_beside_the_pins_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "mirror.yaml"
    config.write_text("max_cache_size: 1MiB\n")
    image = make_image([make_random_layer(2 * MiB, seed=5)])
    path = image_bundle(tmp_path / "big.tar", "big:1", image)
    data = tmp_path / "d"
    refused = await load(data, path, "--config", str(config))
    one_line_refusal(refused, "pinned images would take 2.0 MiB, more than max_cache_size")
    assert not [p for p in (data / "blobs").rglob("*") if p.is_file()]

    unpinned = await load(data, path, "--config", str(config), "--no-pin")
    assert unpinned.returncode == 0, unpinned.stderr


async def test_an_import_that_cannot_fit_on_the_disk_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "mirror.yaml"
    config.write_text("min_free_space: 100%\n")  # no room at all
    image = make_image([make_random_layer(1 * MiB, seed=6)])
    path = image_bundle(tmp_path / "big.tar", "big:1", image)
    refused = await load(tmp_path / "d", path, "--config", str(config), "--no-pin")
    one_line_refusal(refused, "1.0 MiB to write, 0 B free on the data dir above min_free_space")
    # What writes nothing is never refused for room.
    assert (await load(tmp_path / "d", path)).returncode == 0
    again = await load(tmp_path / "d", path, "--config", str(config))
    assert again.returncode == 0, again.stderr
    assert "0 blobs copied in" in again.stdout


# -- item 12: blobs follow their repository, imports included ----------------------------


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


async def test_an_import_cannot_grant_a_repository_a_blob_held_for_another(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    secret = make_random_layer(2 * MiB, seed=21)
    private = make_image([secret])
    fake_hub.add_image("acme/private", "1", private)
    data = tmp_path / "d"
    seeded = await asyncio.to_thread(
        run_mirror, "seed", "--data-dir", str(data), "--upstream", fake_hub.url, "acme/private:1"
    )
    assert seeded.returncode == 0, seeded.stderr

    # library/evil names the private layer; the bundle carries its manifest and config only,
    # or a member under the layer's name that holds other bytes.
    evil = make_image([secret])
    for carried in (None, b"not the layer"):
        tar = RawTar(tmp_path / f"evil-{carried is None}.tar.zst")
        tar.add("index.json", index_json([entry("evil:1", evil.digest, evil.size)]))
        write_image(tar, evil, blobs=False)
        tar.blob(evil.config.data)
        if carried is not None:
            tar.header(f"blobs/sha256/{secret.digest[7:]}", len(carried))
            tar.data([carried], len(carried))
        tar.close()
        done = await load(data, tar.path)
        assert done.returncode == 1, done.stdout
        why = "held only for other repositories" if carried is None else "corrupt"
        assert f"failed docker.io/library/evil:1: blob {secret.digest}: " in done.stderr
        assert why in done.stderr, done.stderr

    with MirrorProcess(data, fake_hub.url, "--offline") as served:
        status, body = await asyncio.to_thread(
            _get, f"{served.url}/v2/library/evil/blobs/{secret.digest}"
        )
        assert status == 404
        assert secret.data not in body
        status, body = await asyncio.to_thread(
            _get, f"{served.url}/v2/acme/private/blobs/{secret.digest}"
        )
        assert status == 200
        assert body == secret.data

    # The operator can say the bundle is to be trusted.
    trusted = await load(data, tmp_path / "evil-True.tar.zst", "--trust-held-blobs")
    assert trusted.returncode == 0, trusted.stderr


async def test_a_delta_still_imports_on_top_across_repositories(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    shared = make_layer(b"a layer two repositories share " * 50)
    first = make_image([shared])
    fake_hub.add_image("library/single", "1.0", first)
    connected, offline = tmp_path / "connected", tmp_path / "offline"

    async def mirror(*args: str) -> subprocess.CompletedProcess[str]:
        done = await asyncio.to_thread(run_mirror, *args, "--data-dir", str(connected))
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    await mirror("seed", "--upstream", fake_hub.url, "single:1.0")
    await mirror("export", "--output", str(tmp_path / "full.tar"))
    second = make_image([shared, make_layer(b"its own")])
    fake_hub.add_image("someorg/other", "1.0", second)
    fake_hub.add_image("library/single", "2.0", make_image([shared, make_layer(b"v2")]))
    await mirror("seed", "--upstream", fake_hub.url, "someorg/other:1.0", "single:2.0")
    await mirror("export", "-o", str(tmp_path / "delta.tar"), "--since", str(tmp_path / "full.tar"))

    assert (await load(offline, tmp_path / "full.tar")).returncode == 0
    delta = await load(offline, tmp_path / "delta.tar")
    assert delta.returncode == 0, delta.stderr
    assert delta.stdout.count("imported docker.io/") == 3
    assert "already held" in delta.stdout


# -- the fuzz run's bundle mode, one bundle of each kind ----------------------------------


def test_one_hostile_bundle_of_each_kind_gets_its_line_in_bounded_memory(tmp_path: Path) -> None:
    report = run_bundles(len(KINDS), seed=4, work_dir=tmp_path, kinds=sorted(KINDS))
    assert report.imported == len(KINDS), report.render()
    assert report.violations == [], report.render()
