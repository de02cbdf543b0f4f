"""What the mirror holds, image by image: ``mirror ls``.

Read through the same engine ``mirror serve`` runs on (stores, blobs on disk), so it works
on a data dir a server is using. One row per tag: its manifest, the platforms of an index,
the unique blobs its images need, how many of them are on disk, and whether a pin keeps it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from mirror.engine import Engine
from mirror.manifests import ManifestParseError, parse
from mirror.pins import Pin, pinned
from mirror.reference import Digest
from mirror.store.protocols import TaggedRecord


@dataclass(frozen=True, slots=True)
class ImageRow:
    registry: str
    repository: str
    tag: str
    digest: str
    media_type: str
    platforms: list[str]
    size: int  # bytes of the unique blobs whose size the manifests declare
    blobs: int
    blobs_present: int
    manifests_missing: int  # an index's children the mirror does not hold
    checked_at: float  # when the upstream last confirmed the tag
    last_pulled: float | None  # when a client last pulled it (None: not since recording began)
    pinned: bool


async def list_images(engine: Engine, pattern: Pin | None = None) -> list[ImageRow]:
    rows = []
    for tagged in await engine.store.list_tags():
        if pattern is None or pattern.matches(tagged.registry, tagged.repository, tagged.tag):
            rows.append(await _row(engine, tagged))
    return rows


async def _row(engine: Engine, tagged: TaggedRecord) -> ImageRow:
    registry, repository, record = tagged.registry, tagged.repository, tagged.record
    blobs: dict[str, int | None] = {}
    platforms: list[str] = []
    missing = 0
    pending = [record.digest]
    while pending:
        digest = pending.pop()
        manifest = await engine.store.get_manifest(registry, repository, digest)
        if manifest is None:
            missing += 1
            continue
        try:
            refs = parse(manifest.body, manifest.media_type)
        except ManifestParseError:
            continue
        for child in refs.children:
            platforms.append(child.platform or "unknown")
            pending.append(child.digest)
        for blob in refs.blobs:
            blobs.setdefault(blob.digest, blob.size)
    present = await asyncio.to_thread(
        lambda: sum(engine.blobs.size(Digest.parse(d)) is not None for d in blobs)
    )
    return ImageRow(
        registry=registry,
        repository=repository,
        tag=tagged.tag,
        digest=record.digest,
        media_type=record.media_type,
        platforms=sorted(platforms),
        size=sum(size for size in blobs.values() if size is not None),
        blobs=len(blobs),
        blobs_present=present,
        manifests_missing=missing,
        checked_at=record.checked_at,
        last_pulled=(
            await engine.store.graph.last_pulls(registry, repository)
        ).get(record.digest),
        pinned=pinned(engine.settings.pins, registry, repository, tagged.tag),
    )


def as_json(rows: Sequence[ImageRow]) -> str:
    return json.dumps([asdict(row) for row in rows], indent=2)


def as_table(rows: Sequence[ImageRow], now: float | None = None) -> str:
    now = time.time() if now is None else now
    header = ("IMAGE", "DIGEST", "PLATFORMS", "SIZE", "BLOBS", "PULLED", "CHECKED", "PINNED")
    lines = [header]
    for row in rows:
        lines.append(
            (
                f"{row.registry}/{row.repository}:{row.tag}",
                row.digest.partition(":")[2][:12],
                ",".join(row.platforms) or "-",
                human_size(row.size),
                f"{row.blobs_present}/{row.blobs}"
                + (f" (+{row.manifests_missing} manifests)" if row.manifests_missing else ""),
                "-" if row.last_pulled is None else f"{human_age(now - row.last_pulled)} ago",
                f"{human_age(now - row.checked_at)} ago",
                "yes" if row.pinned else "",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def human_age(seconds: float) -> str:
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{int(seconds // length)}{unit}"
    return f"{max(int(seconds), 0)}s"
