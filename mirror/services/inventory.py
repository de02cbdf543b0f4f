"""What the mirror holds, image by image: ``mirror ls``.

Read through the same engine ``mirror serve`` runs on (stores, blobs on disk), so it works
on a data dir a server is using. One row per tag: its manifest, the platforms of an index,
the unique blobs its images need, how many of them are on disk, how many referrers
(signatures, SBOMs, attestations) it has, and whether a pin keeps it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from mirror.domain.manifests import Descriptor, Manifest, config_platform
from mirror.domain.pins import Pin, pinned, with_stored
from mirror.domain.reference import Digest
from mirror.engine import Engine
from mirror.services.closure import closure
from mirror.services.referrers import count_held

# An image config is a few KiB; more is not read for its platform.
MAX_CONFIG_READ = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Image:
    """An image the mirror holds: a tag, or a manifest a pin names by digest."""

    registry: str
    repository: str
    tag: str | None
    digest: str
    media_type: str
    checked_at: float | None  # when the upstream last confirmed the tag

    @property
    def reference(self) -> str:
        """The full reference: docker.io/library/alpine:3.20, or name@sha256:…"""
        suffix = f":{self.tag}" if self.tag is not None else f"@{self.digest}"
        return f"{self.registry}/{self.repository}{suffix}"


@dataclass(frozen=True, slots=True)
class ImageRow:
    registry: str
    repository: str
    tag: str | None  # None: an image pinned by digest
    digest: str
    media_type: str
    platforms: list[str]
    size: int  # image_size: bytes of the unique blobs whose size the manifests declare
    blobs: int
    blobs_present: int
    manifests_missing: int  # an index's children the mirror does not hold
    checked_at: float | None  # when the upstream last confirmed the tag
    last_pulled: float | None  # when a client last pulled it (None: not since recording began)
    pinned: bool
    referrers: int = 0  # signatures, SBOMs, attestations known to refer to it


async def images(engine: Engine, patterns: Sequence[Pin] = ()) -> list[Image]:
    """The tagged images, and the manifests pinned by digest, matching any of ``patterns``
    (all of them without one)."""
    found = [
        Image(t.registry, t.repository, t.tag, t.record.digest, t.record.media_type,
              t.record.checked_at)
        for t in await engine.store.list_tags()
    ]
    for pin in await current_pins(engine):
        name = pin.pattern
        if name.digest is None or "*" in name.registry + name.repository:
            continue
        manifest = await engine.store.get_manifest(name.registry, name.repository, name.digest)
        if manifest is not None:
            found.append(
                Image(name.registry, name.repository, None, name.digest, manifest.media_type, None)
            )
    return [
        image
        for image in found
        if not patterns
        or any(p.matches(image.registry, image.repository, image.tag, image.digest)
               for p in patterns)
    ]


async def current_pins(engine: Engine) -> tuple[Pin, ...]:
    """The configured pins and those ``seed`` and ``import`` stored."""
    return with_stored(engine.settings.pins, await engine.store.pins())


async def list_images(engine: Engine, pattern: Pin | None = None) -> list[ImageRow]:
    pins = await current_pins(engine)
    return [
        await _row(engine, image, pins)
        for image in await images(engine, () if pattern is None else (pattern,))
    ]


async def _row(engine: Engine, image: Image, pins: Sequence[Pin]) -> ImageRow:
    registry, repository = image.registry, image.repository
    blobs: dict[str, int | None] = {}
    platforms: list[str] = []
    missing = 0
    config: str | None = None  # of an image that is not an index: it names the platform
    top = await engine.store.get_manifest(registry, repository, image.digest)
    if top is None:
        missing += 1
    else:

        async def held(child: Descriptor) -> Manifest | None:
            return await engine.store.get_manifest(registry, repository, child.digest)

        walked = await closure(top, held)
        blobs, platforms, missing = walked.blobs, walked.platforms, len(walked.absent)
        refs = walked.references[top.digest]
        if refs.blobs and refs.blobs[0].media_type.endswith("json"):
            config = refs.blobs[0].digest  # an image config (schema 1 has none)
    present = await asyncio.to_thread(
        lambda: sum(engine.content.present(Digest.parse(d)) is not None for d in blobs)
    )
    if config is not None:
        platform = await asyncio.to_thread(_platform_of, engine, config)
        platforms += [platform] if platform is not None else []
    return ImageRow(
        registry=registry,
        repository=repository,
        tag=image.tag,
        digest=image.digest,
        media_type=image.media_type,
        platforms=sorted(platforms),
        size=image_size(blobs),
        blobs=len(blobs),
        blobs_present=present,
        manifests_missing=missing,
        checked_at=image.checked_at,
        last_pulled=(await engine.store.graph.last_pulls(registry, repository)).get(image.digest),
        pinned=pinned(pins, registry, repository, image.tag, image.digest),
        referrers=await count_held(engine.store, registry, repository, Digest.parse(image.digest)),
    )


def image_size(blobs: Mapping[str, int | None]) -> int:
    """An image's size as ls, seed, export and import give it: the bytes of the unique blobs
    (configs and layers of every platform held) as the manifests declare them; the
    manifests themselves are not counted."""
    return sum(size for size in blobs.values() if size is not None)


def _platform_of(engine: Engine, config: str) -> str | None:
    """The platform an image's config names, when the config is on disk."""
    try:
        with engine.content.open(Digest.parse(config)) as file:
            body = file.read(MAX_CONFIG_READ + 1)
    except OSError:
        return None
    return config_platform(body) if len(body) <= MAX_CONFIG_READ else None


def as_json(rows: Sequence[ImageRow]) -> str:
    return json.dumps([asdict(row) for row in rows], indent=2)


def as_table(rows: Sequence[ImageRow], now: float | None = None) -> str:
    now = time.time() if now is None else now
    header = (
        "IMAGE", "DIGEST", "PLATFORMS", "SIZE", "BLOBS", "REFERRERS", "PULLED", "CHECKED", "PINNED"
    )  # fmt: skip
    lines = [header]
    for row in rows:
        lines.append(
            (
                f"{row.registry}/{row.repository}"
                + (f":{row.tag}" if row.tag is not None else f"@{row.digest[:19]}"),
                row.digest.partition(":")[2][:12],
                ",".join(row.platforms) or "-",
                human_size(row.size),
                f"{row.blobs_present}/{row.blobs}"
                + (f" (+{row.manifests_missing} manifests)" if row.manifests_missing else ""),
                str(row.referrers) if row.referrers else "-",
                "-" if row.last_pulled is None else f"{human_age(now - row.last_pulled)} ago",
                "-" if row.checked_at is None else f"{human_age(now - row.checked_at)} ago",
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
