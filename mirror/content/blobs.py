"""Blobs on disk, addressed by digest: ``<root>/<algorithm>/<2 hex>/<hex>``.

A blob only ever appears at its final path by an atomic rename after its digest was
checked and its bytes fsynced, so anything at a final path is whole and verified. While
it is being written it lives beside its final place as ``.<hex>.<random>.partial``,
locked with flock by the process writing it; a partial file nobody holds a lock on was
left by a crash and is swept.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import structlog

from mirror.content.storage import BlobWriter, Copy
from mirror.domain.reference import Digest

log = structlog.get_logger(__name__)

PARTIAL_SUFFIX = ".partial"
_CHUNK = 1024 * 1024


@dataclass(slots=True)
class Partial:
    """A blob being written: a locked temporary file beside its final path."""

    path: Path
    final: Path
    fd: int
    written: int = 0
    _closed: bool = field(default=False, repr=False)

    @property
    def name(self) -> str:
        """What a follower in another process is told to open (:meth:`BlobStore.open_partial`)."""
        return self.path.name

    def open_reader(self) -> int:
        """A descriptor of a reader's own on the bytes written so far, and those to come."""
        return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        self.written += len(data)

    def commit(self) -> bool:
        """Make the blob visible at its final path, durably."""
        os.fsync(self.fd)
        os.rename(self.path, self.final)
        _fsync_dir(self.final.parent)
        self._close()
        return True

    async def complete(self) -> bool:
        return await asyncio.to_thread(self.commit)

    def discard(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        finally:
            self._close()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)


@dataclass(frozen=True, slots=True)
class MemoryCopy:
    """A blob's bytes read into memory, and which file they were read from."""

    data: bytes
    path: str
    device: int
    inode: int

    def in_place(self) -> bool:
        """Whether the file the bytes were read from is still the blob's file (one stat): a
        copy must not outlive its file, which ``verify --repair``, gc or eviction in any
        process may have taken out of service."""
        try:
            stat = os.stat(self.path)
        except OSError:
            return False
        return stat.st_ino == self.inode and stat.st_dev == self.device


class BlobStore:
    local = True  # landed blobs are files, sent with sendfile(2)

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, digest: Digest) -> Path:
        return self.root / digest.algorithm / digest.hex[:2] / digest.hex

    def size(self, digest: Digest) -> int | None:
        """The size of a cached blob, or None when it is not on disk."""
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def locate(self, digest: Digest) -> int | None:
        return self.size(digest)

    def open(self, digest: Digest) -> BinaryIO:
        """The blob's file, for serving (blocking); FileNotFoundError when it is not on disk."""
        return open(self.path(digest), "rb", buffering=0)

    def has_local(self, digest: Digest) -> bool:
        return self.size(digest) is not None

    def open_local(self, digest: Digest) -> BinaryIO:
        return self.open(digest)

    def warm(self, digest: Digest, size: int) -> None:
        pass  # every blob here is local

    def copy_of(self, file: BinaryIO) -> Copy:
        """Which copy an opened blob file is (for removing that one only)."""
        return Copy.of(os.fstat(file.fileno()))

    async def chunks(self, digest: Digest, start: int, stop: int) -> AsyncIterator[bytes]:
        """Bytes ``start``..``stop`` of the blob, read off the loop (where no sendfile goes)."""
        with await asyncio.to_thread(self.open, digest) as file:
            while start < stop:
                count = min(stop - start, _CHUNK)
                data = await asyncio.to_thread(os.pread, file.fileno(), count, start)
                if not data:
                    raise EOFError("the blob file ended early")
                start += len(data)
                yield data

    async def presign(self, digest: Digest) -> str | None:
        return None  # a file has no URL of its own

    async def reachable(self) -> bool:
        return True

    def open_landed(self, digest: Digest) -> int | None:
        """A descriptor on the blob's file, or None when it has not landed (yet)."""
        try:
            return os.open(self.path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None

    def open_partial(self, digest: Digest, name: str) -> int | None:
        """A descriptor on another writer's partial file (:attr:`Partial.name`), or None
        when it is gone (landed, or discarded)."""
        try:
            return os.open(self.path(digest).with_name(name), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None

    def writable(self) -> bool:
        """Whether blobs can be written (blocking)."""
        return os.access(self.root, os.W_OK)

    def read(self, digest: Digest) -> MemoryCopy | None:
        """A blob's whole content (blocking: for small blobs, off the loop); None when it
        is not on disk."""
        path = str(self.path(digest))
        try:
            with open(path, "rb") as file:
                data, stat = file.read(), os.fstat(file.fileno())
        except OSError:
            return None
        return MemoryCopy(data, path, stat.st_dev, stat.st_ino)

    def quarantine(self, digest: Digest, opened: Copy | None = None) -> bool:
        """Take a damaged blob out of service, so the next pull fetches it again; returns
        whether a file was removed. With ``opened`` (the fstat of the file found damaged),
        only that very file goes: one fetched again since then is left alone."""
        path = self.path(digest)
        try:
            if opened is not None and Copy.of(path.stat()).identity != opened.identity:
                return False
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    def stat(self, digest: Digest) -> Copy | None:
        """The blob's file as it is now, or None: what :meth:`remove` is told it inspected."""
        try:
            return Copy.of(self.path(digest).stat())
        except FileNotFoundError:
            return None

    def remove(self, digest: Digest, inspected: Copy) -> bool:
        """Remove the copy of a blob that was inspected (``inspected`` is its stat); a copy
        landed since (a fill, an import) stays. Whether the inspected copy went.

        The file is first renamed aside, atomically, and only then compared: a copy that
        lands between the comparison and the removal cannot be the one removed. A copy
        that was not the one inspected is linked back, unless yet another landed meanwhile.
        The name aside is a partial file's, so a crash leaves it to the sweep."""
        path = self.path(digest)
        aside = path.with_name(f".{digest.hex}.{secrets.token_hex(6)}{PARTIAL_SUFFIX}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        try:
            if Copy.of(os.stat(aside)).identity == inspected.identity:
                return True
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)
            return False
        except FileNotFoundError:
            return False  # swept meanwhile: unlocked, it looked like a crashed write's
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(aside)

    def on_disk(self) -> dict[str, tuple[int, float]]:
        """Every blob file: digest -> (size, modification time). Partial files are not
        blobs. A walk of the whole directory: for reconciliation and gc, never per request."""
        found: dict[str, tuple[int, float]] = {}
        if not self.root.exists():
            return found
        for algorithm in self.root.iterdir():
            for path in algorithm.glob("*/*"):
                if path.name.startswith("."):
                    continue
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue  # removed meanwhile
                found[f"{algorithm.name}:{path.name}"] = (stat.st_size, stat.st_mtime)
        return found

    def new_partial(self, digest: Digest, spool: BlobWriter | None = None) -> Partial:
        if spool is not None:
            assert isinstance(spool, Partial), "a spool of this storage's own"
            return spool
        final = self.path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        path = final.with_name(f".{digest.hex}.{secrets.token_hex(6)}{PARTIAL_SUFFIX}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return Partial(path=path, final=final, fd=fd)

    def new_spool(self, digest: Digest) -> Partial:
        return self.new_partial(digest)  # discarded by its writer, never committed

    def sweep(self, *, dry_run: bool = False, now: float | None = None) -> int:
        """Remove partial files left by a crashed writer (or only count them); how many.
        (A lock, not an age, tells a crashed writer's: ``now`` does not matter here.)"""
        removed = 0
        if not self.root.exists():
            return 0
        for path in self.root.glob(f"*/*/.*{PARTIAL_SUFFIX}"):
            if _orphaned(path):
                if not dry_run:
                    path.unlink(missing_ok=True)
                removed += 1
        if removed and not dry_run:
            log.info("partial_blobs_swept", count=removed)
        return removed


def _orphaned(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # a live writer holds it
    else:
        return True
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
