"""Export and import throughput against the disk's own speed, measured side by side.

    .venv/bin/python -m bench.bundle [--size-mib 1024] [--images 4] [--dir DIR]

It fills a data dir with ``--images`` images of one random layer each (``--size-mib`` in
all), then measures on the same filesystem:

- the disk: writing a file of the same size and fsyncing it; reading it back cold (the page
  cache dropped for it with ``posix_fadvise``); copying it (read, write, fsync), which is the
  least an export or an import has to do;
- ``mirror export`` to a ``.tar`` and to a ``.tar.zst``, with the blobs cold;
- ``mirror import`` of each into an empty data dir (every byte hashed, written, fsynced),
  with the bundle cold.

The commands run as a user runs them (``python -m mirror ...``, default settings). Each
figure is the best of ``--runs``; the ratios are against the disk copy (target: 0.8x).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from mirror.config import Settings
from mirror.domain.manifests import Manifest, TagRecord, parse
from mirror.domain.mediatypes import OCI_MANIFEST
from mirror.domain.reference import Digest
from mirror.engine import open_engine

MIB = 1024 * 1024
CHUNK = MIB
TARGET = 0.8


def drop_cache(path: Path) -> None:
    """Evict a file, or every file under a directory, from the page cache."""
    paths = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    for item in paths:
        fd = os.open(item, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def write_file(path: Path, size: int, chunk: bytes) -> None:
    with path.open("wb", buffering=0) as out:
        for _ in range(size // len(chunk)):
            out.write(chunk)
        os.fsync(out.fileno())


def read_file(path: Path) -> None:
    with path.open("rb", buffering=0) as source:
        while source.read(CHUNK):
            pass


def copy_file(source: Path, target: Path) -> None:
    with source.open("rb", buffering=0) as src, target.open("wb", buffering=0) as out:
        while chunk := src.read(CHUNK):
            out.write(chunk)
        os.fsync(out.fileno())


def best(runs: int, prepare: Callable[[], None], work: Callable[[], None]) -> float:
    times = []
    for _ in range(runs):
        prepare()
        # Every run starts with nothing left to write back: the previous one's dirty pages
        # would otherwise slow whichever step comes next.
        os.sync()
        time.sleep(1)
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


async def fill(data: Path, images: int, size: int) -> int:
    """``images`` tagged images of one random layer each; the bytes of all blobs."""
    settings = Settings(data_dir=data)
    total = 0
    async with open_engine(settings) as engine:
        for number in range(images):
            layer = os.urandom(size // images)
            config = f'{{"architecture":"amd64","os":"linux","n":{number}}}'.encode()
            descriptors = []
            for blob, media_type in (
                (config, "application/vnd.oci.image.config.v1+json"),
                (layer, "application/vnd.oci.image.layer.v1.tar+gzip"),
            ):
                digest = Digest.of(blob)
                partial = engine.blobs.new_partial(digest)
                partial.write(blob)
                partial.commit()
                await engine.store.graph.blob_stored(str(digest), len(blob), time.time())
                descriptors.append(
                    {"mediaType": media_type, "digest": str(digest), "size": len(blob)}
                )
                total += len(blob)
            body = json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": OCI_MANIFEST,
                    "config": descriptors[0],
                    "layers": descriptors[1:],
                }
            ).encode()
            manifest = Manifest(body, OCI_MANIFEST, str(Digest.of(body)))
            repository = f"bench/image{number}"
            await engine.store.put_manifest("docker.io", repository, manifest)
            await engine.store.graph.add_manifest(
                "docker.io", repository, manifest.digest, parse(body, OCI_MANIFEST)
            )
            record = TagRecord(manifest.digest, OCI_MANIFEST, time.time())
            await engine.store.put_tag("docker.io", repository, "latest", record)
    return total


def mirror(*args: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    command = [sys.executable, "-m", "mirror", *args]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"mirror {' '.join(args)} failed:\n{done.stdout}{done.stderr}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="work here (default: a temp dir)")
    args = parser.parse_args()
    size = args.size_mib * MIB
    root = Path(tempfile.mkdtemp(prefix="bench-bundle-", dir=args.dir))
    try:
        run(root, size, args.images, args.runs)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(root: Path, size: int, images: int, runs: int) -> None:
    data = root / "data"
    total = asyncio.run(fill(data, images, size))
    probe, copy = root / "probe", root / "probe-copy"
    chunk = os.urandom(CHUNK)
    rows: list[tuple[str, float]] = []

    write = best(
        runs, lambda: probe.unlink(missing_ok=True), lambda: write_file(probe, size, chunk)
    )
    read = best(runs, lambda: drop_cache(probe), lambda: read_file(probe))

    def fresh_copy() -> None:
        copy.unlink(missing_ok=True)
        drop_cache(probe)

    disk_copy = best(runs, fresh_copy, lambda: copy_file(probe, copy))
    probe.unlink()
    copy.unlink()
    rows += [("disk write + fsync", write), ("disk read, cold", read), ("disk copy", disk_copy)]

    target = root / "imported"
    for suffix in (".tar", ".tar.zst"):
        bundle = root / f"bundle{suffix}"

        def before_export(bundle: Path = bundle) -> None:
            bundle.unlink(missing_ok=True)
            drop_cache(data / "blobs")

        exported = best(
            runs,
            before_export,
            lambda bundle=bundle: mirror("export", "--data-dir", str(data), "-o", str(bundle)),
        )
        def before_import(bundle: Path = bundle, target: Path = target) -> None:
            shutil.rmtree(target, ignore_errors=True)
            drop_cache(bundle)

        imported = best(
            runs,
            before_import,
            lambda bundle=bundle: mirror("import", "--data-dir", str(target), str(bundle)),
        )
        rows += [(f"mirror export {suffix}", exported), (f"mirror import {suffix}", imported)]
        bundle.unlink()

    mib = size / MIB
    print(f"{images} images, {total / MIB:.0f} MiB of blobs; best of {runs}; in {root.parent}")
    print(f"{'':24} {'seconds':>8} {'MiB/s':>8} {'vs disk copy':>13}")
    for name, seconds in rows:
        ratio = disk_copy / seconds
        mark = "" if name.startswith("disk") else ("  met" if ratio >= TARGET else "  MISSED")
        print(f"{name:24} {seconds:8.2f} {mib / seconds:8.0f} {ratio:12.2f}x{mark}")


if __name__ == "__main__":
    main()
