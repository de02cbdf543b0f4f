"""Where blob bytes live, behind one small interface: the local filesystem today
(:class:`~mirror.content.blobs.BlobStore`), object storage next.

Only the content layer (:class:`~mirror.content.layer.Content`) calls it; nobody else
builds a blob's path, renames a file or opens one by name. Every call blocks (disk or
network): the content layer runs them off the loop, except ``size`` on the hot path,
which is one ``stat`` for the filesystem.

A blob being written is a :class:`BlobWriter`: a local spool file, locked by its writer,
that readers of a fill stream from as it grows (an object store uploads it on commit).
"""

from __future__ import annotations

import os
from typing import BinaryIO, Protocol

from mirror.content.blobs import MemoryCopy
from mirror.domain.reference import Digest


class BlobWriter(Protocol):
    fd: int  # the spool file, written at its position
    written: int

    @property
    def name(self) -> str: ...

    def open_reader(self) -> int: ...

    def write(self, data: bytes | bytearray | memoryview) -> None: ...

    def commit(self) -> None: ...

    def discard(self) -> None: ...


class BlobStorage(Protocol):
    def size(self, digest: Digest) -> int | None: ...

    def stat(self, digest: Digest) -> os.stat_result | None: ...

    def open(self, digest: Digest) -> BinaryIO: ...

    def open_landed(self, digest: Digest) -> int | None: ...

    def open_partial(self, digest: Digest, name: str) -> int | None: ...

    def read(self, digest: Digest) -> MemoryCopy | None: ...

    def new_partial(self, digest: Digest) -> BlobWriter: ...

    def remove(self, digest: Digest, inspected: os.stat_result) -> bool: ...

    def quarantine(self, digest: Digest, opened: os.stat_result | None = None) -> bool: ...

    def on_disk(self) -> dict[str, tuple[int, float]]: ...

    def sweep(self, *, dry_run: bool = False) -> int: ...

    def writable(self) -> bool: ...
