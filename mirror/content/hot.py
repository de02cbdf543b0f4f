"""The hot tier of object storage: the most pulled blobs also kept in the data dir
(``local_cache_size`` bytes), so they go out with sendfile(2) instead of through the bucket.

The bucket stays the truth: a copy here is only ever a verified blob's bytes (a fill's
spool after its upload completed, or an object read back and hashed), and losing one costs
nothing but a read from the bucket. The least recently sent go first when the tier is full
(a copy's modification time is when it was last sent).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import BinaryIO

import structlog

from mirror.content.blobs import BlobStore, Partial
from mirror.domain.reference import Digest

log = structlog.get_logger(__name__)


class HotTier:
    def __init__(self, root: Path, budget: int) -> None:
        self.budget = budget
        self.files = BlobStore(root)
        root.mkdir(parents=True, exist_ok=True)

    def fits(self, size: int) -> bool:
        return size <= self.budget

    def open(self, digest: Digest) -> BinaryIO:
        """The blob's copy here, marked as just sent; FileNotFoundError when there is none
        (blocking)."""
        file = self.files.open(digest)
        with contextlib.suppress(OSError):
            os.utime(file.fileno())
        return file

    def has(self, digest: Digest) -> bool:
        return self.files.size(digest) is not None

    def take(self, partial: Partial, digest: Digest) -> None:
        """Keep a verified spool file as the blob's copy here, then make room (blocking)."""
        final = self.files.path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(partial.path, final)
        self.trim()

    def new_partial(self, digest: Digest) -> Partial:
        return self.files.new_partial(digest)

    def drop(self, digest: Digest) -> None:
        self.files.path(digest).unlink(missing_ok=True)

    def trim(self) -> None:
        """Remove the least recently sent copies until the tier fits its budget."""
        held = self.files.on_disk()
        used = sum(size for size, _ in held.values())
        for name, (size, _) in sorted(held.items(), key=lambda item: item[1][1]):
            if used <= self.budget:
                break
            self.drop(Digest.parse(name))
            used -= size

    def sweep(self, *, dry_run: bool = False) -> int:
        return self.files.sweep(dry_run=dry_run)
