"""Keeping the cache sound: ``mirror gc`` and ``mirror verify``, safe while ``serve`` runs.

- gc (mark and sweep, like bandersnatch's verify): blob files that no manifest the mirror
  holds references, and partial files of crashed writes, are removed. A blob younger than
  ``GRACE`` is left alone: it may belong to a pull under way.
- verify re-hashes every blob on disk, reports each corrupt one (and the repositories whose
  images need it) and each blob the graph believes present but the disk lacks; ``repair``
  takes corrupt blobs out of service so the next pull fetches them again.

Removing a file never breaks a transfer: a reader holds it open.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mirror.content.graph import BlobEntry
from mirror.content.layer import Content
from mirror.content.storage import Copy
from mirror.domain.reference import Digest
from mirror.engine import Engine

GRACE = 3600.0
_READ = 1024 * 1024


@dataclass(slots=True)
class GcReport:
    blobs: list[tuple[str, int]] = field(default_factory=list)  # (digest, size) removed
    partials: int = 0

    @property
    def freed(self) -> int:
        return sum(size for _, size in self.blobs)


async def gc(engine: Engine, *, dry_run: bool, now: float | None = None) -> GcReport:
    # Real time, not the engine's clock: it is compared with the files' mtimes.
    now = time.time() if now is None else now
    report = GcReport()
    report.partials = await engine.content.sweep(dry_run=dry_run, now=now)
    on_disk = await engine.content.on_disk()
    settled = [digest for digest, (_, mtime) in on_disk.items() if now - mtime > GRACE]
    content = engine.content
    for name in sorted(await engine.store.graph.unreferenced(settled)):
        digest = Digest.parse(name)
        # Looked at again just before it goes: a copy landed since the listing is young.
        found = await content.inspect(digest)
        if found is None or now - found.modified <= GRACE:
            continue
        if dry_run or await content.remove(digest, found):
            report.blobs.append((name, found.size))
    return report


@dataclass(slots=True)
class VerifyReport:
    checked: int = 0
    bytes: int = 0
    corrupt: dict[str, set[tuple[str, str]]] = field(default_factory=dict)  # -> holders
    missing: list[str] = field(default_factory=list)
    repaired: int = 0


async def verify(
    engine: Engine,
    *,
    repair: bool,
    progress: Callable[[int, int, int], None] = lambda done, total, size: None,
) -> VerifyReport:
    report = VerifyReport()
    graph = engine.store.graph
    # The records first, the disk after: a blob landing meanwhile is then either on the
    # disk listed or not among the records read, never reported missing.
    recorded = {entry.digest for entry in await _all_present(engine)}
    on_disk = await engine.content.on_disk()
    corrupt_copies: dict[str, Copy] = {}
    for done, (name, (size, _)) in enumerate(sorted(on_disk.items()), start=1):
        digest = Digest.parse(name)
        hashed = await asyncio.to_thread(_hashes_to, engine.content, digest)
        if hashed is not None:
            sound, copy = hashed
            report.checked += 1
            report.bytes += size
            if not sound:
                report.corrupt[name] = await graph.holders(name)
                corrupt_copies[name] = copy
        progress(done, len(on_disk), report.bytes)
    report.missing = sorted(recorded - on_disk.keys())
    if repair:
        content = engine.content
        for name in report.corrupt:
            digest = Digest.parse(name)
            found = corrupt_copies.get(name)
            if found is not None and await content.remove(digest, found):
                report.repaired += 1
        for name in report.missing:
            await content.gone(Digest.parse(name))  # recorded absent unless it is back
    return report


async def _all_present(engine: Engine) -> list[BlobEntry]:
    entries: list[BlobEntry] = []
    after: tuple[float, str] | None = None
    while page := await engine.store.graph.oldest_blobs(1000, after):
        entries.extend(page)
        after = (page[-1].last_pulled, page[-1].digest)
    return entries


def _hashes_to(content: Content, digest: Digest) -> tuple[bool, Copy] | None:
    """Whether the file's content has ``digest``, and the copy that was read (the one a
    repair may remove); None when it is gone (evicted meanwhile)."""
    hasher = hashlib.new(digest.algorithm)
    try:
        with content.open(digest) as file:
            copy = content.copy_of(file)
            while chunk := file.read(_READ):
                hasher.update(chunk)
    except FileNotFoundError:
        return None
    return hasher.hexdigest() == digest.hex, copy
