"""The content graph at a large site's size: how long ``mirror ls``, one eviction pass and
``gc --dry-run`` take over a synthetic data dir, and the memory it costs.

    .venv/bin/python -m bench.graph_scale [--images 10000] [--blobs 100000]

It writes an embedded store with ``--images`` tagged images (a config and ten layers each,
layers shared between images) over ``--blobs`` blob files, then times the three operations
through the same engine ``mirror serve`` opens, and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import sqlite3
import tempfile
import time
from pathlib import Path

from mirror.config import Settings
from mirror.content.embedded import EmbeddedStore
from mirror.content.schema import edge_rows
from mirror.domain.manifests import parse
from mirror.domain.mediatypes import OCI_MANIFEST
from mirror.engine import Overrides, open_engine
from mirror.services import inventory, maintenance
from mirror.services.eviction import LOW_WATER, Budget, Evictor

LAYERS = 10
MIB = 1024 * 1024


def digest_of(kind: str, number: int) -> str:
    return "sha256:" + hashlib.sha256(f"{kind}-{number}".encode()).hexdigest()


def manifest_for(image: int, layer_pool: int) -> bytes:
    layers = [
        {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "size": MIB,
         "digest": digest_of("layer", (image * 7 + k * 13) % layer_pool)}
        for k in range(LAYERS)
    ]  # fmt: skip
    config = {"mediaType": "application/vnd.oci.image.config.v1+json", "size": 1024,
              "digest": digest_of("config", image)}  # fmt: skip
    document = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": layers}
    return json.dumps(document).encode()


def build(data: Path, images: int, blobs: int) -> None:
    EmbeddedStore(data / "metadata.sqlite3")._db.close()  # the schema, at its version
    layer_pool = blobs - images
    db = sqlite3.connect(data / "metadata.sqlite3")
    now = time.time()
    with db:
        for image in range(images):
            body = manifest_for(image, layer_pool)
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            name = f"team{image % 100}/app{image}"
            db.execute(
                "INSERT INTO manifests VALUES (?, ?, ?, ?, ?)",
                ("docker.io", name, digest, OCI_MANIFEST, body),
            )
            db.execute(
                "INSERT INTO tags VALUES (?, ?, ?, ?, ?, ?)",
                ("docker.io", name, "latest", digest, OCI_MANIFEST, now),
            )
            db.executemany(
                "INSERT OR IGNORE INTO edges VALUES (?, ?, ?, ?, ?, ?, ?)",
                edge_rows("docker.io", name, digest, parse(body, OCI_MANIFEST)),
            )
        rows = [(digest_of("layer", n), MIB, 1, now - n) for n in range(layer_pool)]
        rows += [(digest_of("config", n), 1024, 1, now - n) for n in range(images)]
        db.executemany("INSERT INTO blobs VALUES (?, ?, ?, ?)", rows)
    db.close()
    root = data / "blobs" / "sha256"
    past = now - 7200  # older than gc's grace period
    for digest, size, *_ in rows:
        hex_digest = digest.removeprefix("sha256:")
        path = root / hex_digest[:2] / hex_digest
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as file:
            file.truncate(size)  # sparse: the declared size, no disk spent
        os.utime(path, (past, past))


async def measure(data: Path) -> list[tuple[str, str]]:
    settings = Settings(data_dir=data)
    rows: list[tuple[str, str]] = []
    async with open_engine(settings, overrides=Overrides()) as engine:
        started = time.perf_counter()
        listed = await inventory.list_images(engine)
        elapsed = time.perf_counter() - started
        rows.append((f"mirror ls: {len(listed):,} images", f"{elapsed:.2f} s"))

        started = time.perf_counter()
        on_disk = await asyncio.to_thread(engine.blobs.on_disk)
        await engine.store.graph.reconcile(on_disk)
        elapsed = time.perf_counter() - started
        rows.append((f"reconcile with the disk (once per start): {len(on_disk):,} files",
                     f"{elapsed:.2f} s"))  # fmt: skip

        usage = await engine.store.graph.usage()
        budget = usage.bytes - 1  # just over: the pass frees down to LOW_WATER of it
        evictor = Evictor(
            store=engine.store,
            content=engine.content,
            coordinator=engine.coordinator,
            budget=Budget(max_bytes=budget),
            metrics=engine.metrics,
            data_dir=data,
            reconciled=True,
        )
        started = time.perf_counter()
        result = await evictor.run_once()
        rows.append(
            (
                f"one eviction pass: {result.removed:,} of {usage.blobs:,} blobs"
                f" ({1 - LOW_WATER:.0%} of the bytes)",
                f"{time.perf_counter() - started:.2f} s",
            )
        )
        started = time.perf_counter()
        report = await maintenance.gc(engine, dry_run=True)
        rows.append(
            (
                f"gc --dry-run: {len(report.blobs):,} unreferenced",
                f"{time.perf_counter() - started:.2f} s",
            )
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows.append(("peak RSS of this process (engine, listing, passes)", f"{peak:.0f} MiB"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--blobs", type=int, default=100_000)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mirror-graph-scale-") as directory:
        data = Path(directory)
        started = time.perf_counter()
        build(data, arguments.images, arguments.blobs)
        print(f"built {arguments.images:,} images over {arguments.blobs:,} blobs"
              f" in {time.perf_counter() - started:.1f} s")  # fmt: skip
        for figure, value in asyncio.run(measure(data)):
            print(f"{figure:<60} {value:>10}")


if __name__ == "__main__":
    main()
