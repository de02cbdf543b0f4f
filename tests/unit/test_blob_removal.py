"""Removing a blob removes the copy that was looked at, never one that landed since."""

from __future__ import annotations

import hashlib
from pathlib import Path

from mirror.content.blobs import BlobStore
from mirror.domain.reference import Digest


def land(blobs: BlobStore, data: bytes) -> Digest:
    digest = Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())
    partial = blobs.new_partial(digest)
    partial.write(data)
    partial.commit()
    return digest


def test_a_copy_landed_after_the_inspection_stays(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    digest = land(blobs, b"layer")
    inspected = blobs.stat(digest)
    assert inspected is not None
    land(blobs, b"layer")  # fetched again: a new file at the same path
    assert not blobs.remove(digest, inspected)
    assert blobs.path(digest).read_bytes() == b"layer"
    assert [path.name for path in blobs.path(digest).parent.iterdir()] == [digest.hex]


def test_the_copy_inspected_goes(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    digest = land(blobs, b"layer")
    inspected = blobs.stat(digest)
    assert inspected is not None
    assert blobs.remove(digest, inspected)
    assert blobs.stat(digest) is None
    assert list(blobs.path(digest).parent.iterdir()) == []
    assert not blobs.remove(digest, inspected)  # already gone
