
"""Where blob bytes live, behind one small interface: the local filesystem
(:class:`~mirror.content.blobs.BlobStore`) or an S3-compatible bucket
(:class:`~mirror.content.s3.S3Blobs`).

Only the content layer (:class:`~mirror.content.layer.Content`) calls it; nobody else
builds a blob's path, renames a file or opens one by name. Every call blocks (disk or
network): the content layer runs them off the loop, except ``size`` on the hot path,
which is one ``stat`` for the filesystem and a lookup in memory for a bucket, and
``open_landed``/``open_partial``, which never touch the network.

A blob being written is a :class:`BlobWriter`: a local spool file, locked by its writer,
that readers of a fill stream from as it grows (a bucket gets it part by part, and the
object appears on commit).

A :class:`Copy` is one copy of a blob as it was inspected: removing "the copy inspected"
compares it with what is there now (an inode and modification time, an ETag).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Protocol

from mirror.domain.reference import Digest

if TYPE_CHECKING:
    from mirror.content.blobs import MemoryCopy


class StorageError(OSError):
    """Object storage refused or did not answer; the message says which, in one line."""


@dataclass(frozen=True, slots=True)
class Copy:
    size: int
    modified: float  # seconds since the epoch
    identity: Hashable  # equal only for the very same copy

    @classmethod
    def of(cls, stat: os.stat_result) -> Copy:
        identity = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        return cls(stat.st_size, stat.st_mtime, identity)


class BlobWriter(Protocol):
    written: int

    @property
    def fd(self) -> int:
        """The spool file, written at its position."""
        ...

    @property
    def name(self) -> str: ...

    def open_reader(self) -> int: ...

    def write(self, data: bytes | bytearray | memoryview) -> None: ...

    def commit(self) -> bool:
        """Make the verified blob visible; False when the storage refused it (its readers
        still finish from the spool, and nothing is stored)."""
        ...

    async def complete(self) -> bool:
        """:meth:`commit`, awaited on the loop; cancelled, it leaves no half blob behind
        (object storage aborts the upload)."""
        ...

    def discard(self) -> None: ...


class BlobStorage(Protocol):
    # Whether landed blobs are local files (sendfile); else they are read through chunks().
    local: bool

    def size(self, digest: Digest) -> int | None: ...

    def locate(self, digest: Digest) -> int | None: ...

    def stat(self, digest: Digest) -> Copy | None: ...

    def open(self, digest: Digest) -> BinaryIO: ...

    def copy_of(self, file: BinaryIO) -> Copy: ...

    def has_local(self, digest: Digest) -> bool:
        """Whether a landed blob has a local file to send with sendfile (object storage:
        a copy in its hot tier)."""
        ...

    def open_local(self, digest: Digest) -> BinaryIO: ...

    def warm(self, digest: Digest, size: int) -> None:
        """A blob was sent from object storage: copy it into the hot tier, in the
        background, if it has one (called on the loop)."""
        ...

    def chunks(self, digest: Digest, start: int, stop: int) -> AsyncIterator[bytes]: ...

    async def presign(self, digest: Digest) -> str | None: ...

    def open_landed(self, digest: Digest) -> int | None: ...

    def open_partial(self, digest: Digest, name: str) -> int | None: ...

    def read(self, digest: Digest) -> MemoryCopy | None: ...

    def new_partial(self, digest: Digest, spool: BlobWriter | None = None) -> BlobWriter:
        """Somewhere to write a blob before it lands; ``spool``, from :meth:`new_spool`
        and empty, is the local file to write it to."""
        ...

    def new_spool(self, digest: Digest) -> BlobWriter:
        """A local file that never lands: the readers of a fill that another replica makes
        in object storage stream from it while its object is copied in."""
        ...

    def remove(self, digest: Digest, inspected: Copy) -> bool: ...

    def quarantine(self, digest: Digest, opened: Copy | None = None) -> bool: ...

    def on_disk(self) -> dict[str, tuple[int, float]]: ...

    def sweep(self, *, dry_run: bool = False, now: float | None = None) -> int: ...

    def writable(self) -> bool: ...

    async def reachable(self) -> bool: ...
