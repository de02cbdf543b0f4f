"""Hostile bundles for ``mirror import``, written by hand so nothing tidies them up.

:class:`RawTar` writes a tar (zstd-compressed for a ``.zst`` name) header by header, with
whatever type and size a header claims, streaming: a 64 MiB pax header costs a few KiB of
file and no memory here. :func:`hostile` builds one bundle of a kind by name, for the tests
and for ``scripts/fuzz --bundles N``; each kind comes with a piece of the one line
``mirror import`` must answer it with.
"""

from __future__ import annotations

import hashlib
import json
import random
import tarfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from tests.support.oci import (
    OCI_INDEX,
    OCI_MANIFEST,
    Image,
    make_image,
    make_layer,
    sha256_digest,
)

MiB = 1024 * 1024
REF_NAME = "org.opencontainers.image.ref.name"
_ZEROS = bytes(MiB)


class RawTar:
    """A tar written a header at a time; ``close`` ends it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO = path.open("wb")
        self._out: Any = self._file
        if path.name.endswith(".zst"):
            self._out = zstandard.ZstdCompressor(level=3).stream_writer(self._file)

    def header(self, name: str, size: int, kind: bytes = tarfile.REGTYPE) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.type, info.mode = size, kind, 0o644
        self._out.write(info.tobuf(format=tarfile.GNU_FORMAT))

    def data(self, chunks: Iterable[bytes], size: int) -> None:
        written = 0
        for chunk in chunks:
            self._out.write(chunk)
            written += len(chunk)
        assert written == size, (written, size)
        self._pad(size)

    def add(self, name: str, body: bytes) -> None:
        self.header(name, len(body))
        self.data([body], len(body))

    def blob(self, body: bytes) -> str:
        digest = sha256_digest(body)
        self.add(f"blobs/sha256/{digest[7:]}", body)
        return digest

    def close(self) -> Path:
        self._out.write(bytes(2 * tarfile.BLOCKSIZE))
        self._out.close()
        if not self._file.closed:
            self._file.close()
        return self.path

    def _pad(self, size: int) -> None:
        tail = size % tarfile.BLOCKSIZE
        if tail:
            self._out.write(bytes(tarfile.BLOCKSIZE - tail))


def zeros(size: int) -> Iterable[bytes]:
    while size > 0:
        yield _ZEROS[: min(size, MiB)]
        size -= MiB


def index_json(entries: list[dict[str, Any]]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()


def entry(name: Any, digest: str, size: int, media_type: Any = OCI_MANIFEST) -> dict[str, Any]:
    return {
        "mediaType": media_type,
        "digest": digest,
        "size": size,
        "annotations": {REF_NAME: name},
    }


def write_image(tar: RawTar, image: Image, *, blobs: bool = True) -> None:
    tar.blob(image.manifest)
    if blobs:
        for blob in image.blobs:
            tar.blob(blob.data)


def image_bundle(path: Path, name: Any, image: Image, **fields: Any) -> Path:
    """One image under ``name``, its index entry's fields replaced by ``fields``."""
    tar = RawTar(path)
    tar.add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
    tar.add("index.json", index_json([{**entry(name, image.digest, image.size), **fields}]))
    write_image(tar, image)
    return tar.close()


# -- the kinds ------------------------------------------------------------------------------

Builder = Callable[[Path, random.Random], tuple[Path, str]]


def big_header(path: Path, rng: random.Random) -> tuple[Path, str]:
    """A pax or GNU long-name header of tens of MiB (tarfile reads it whole)."""
    size = rng.choice([2, 16, 64]) * MiB
    kind = rng.choice([tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.XGLTYPE])
    tar = RawTar(path)
    tar.header("././@LongLink", size, kind)
    tar.data(zeros(size), size)
    tar.add("index.json", b"{}")
    return tar.close(), "a tar header of"


def manifests_first(path: Path, rng: random.Random) -> tuple[Path, str]:
    """Manifest-like members of 4 MiB, all before index.json (each must be kept)."""
    tar = RawTar(path)
    filler = "x" * (4 * MiB - 64)
    for number in range(40):
        tar.blob(json.dumps({"schemaVersion": 2, "n": number, "f": filler}).encode())
    tar.add("index.json", index_json([]))
    # Refused for the memory it would keep, or first for how far it expands.
    return tar.close(), "mirror: error: "


def many_members(path: Path, rng: random.Random, count: int = 200_001) -> tuple[Path, str]:
    tar = RawTar(path)
    for number in range(count):
        tar.header(f"e{number}", 0)
    # Headers alone compress two-hundredfold: the expansion bound may answer first.
    return tar.close(), "tar entries|expand to more than"


def zero_bomb(path: Path, rng: random.Random) -> tuple[Path, str]:
    """A blob of zeros that an index entry needs: zstd shrinks it ten-thousandfold."""
    size = rng.choice([80, 160]) * MiB
    layer_digest = _zeros_digest(size)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "x", "digest": layer_digest, "size": size},
            "layers": [],
        }
    ).encode()
    tar = RawTar(path)
    tar.add("index.json", index_json([entry("bomb:1", sha256_digest(manifest), len(manifest))]))
    tar.blob(manifest)
    tar.header(f"blobs/sha256/{layer_digest[7:]}", size)
    tar.data(zeros(size), size)
    return tar.close(), "compressed bytes expand to more than"


def _zeros_digest(size: int) -> str:
    hasher = hashlib.sha256()
    for chunk in zeros(size):
        hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()


BAD_ENTRIES: list[dict[str, Any]] = [
    {"annotations": {REF_NAME: 12345}},
    {"annotations": {REF_NAME: ["a", "b"]}},
    {"mediaType": [OCI_MANIFEST]},
    {"mediaType": {"x": 1}},
    {"size": "12"},
    {"annotations": "not an object"},
    {"digest": ["sha256:" + "0" * 64]},
]


def bad_index(path: Path, rng: random.Random, variant: int | None = None) -> tuple[Path, str]:
    """An index whose entry has fields of the wrong types (``BAD_ENTRIES[variant]``), or,
    past the last variant, JSON nested deeper than any parser goes."""
    if variant is None:
        variant = rng.randrange(len(BAD_ENTRIES) + 1)
    if variant == len(BAD_ENTRIES):
        tar = RawTar(path)
        tar.add("index.json", b'{"manifests": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
        return tar.close(), "index.json is not an image index"
    image = make_image([make_layer(b"bad index")])
    return image_bundle(path, "bad:1", image, **BAD_ENTRIES[variant]), "is not an image index"


HOSTILE_NAMES = [
    "evil\x1b[31m.example/app:1",
    "ghcr.io/app:1\nimported docker.io/library/alpine:3.20",
    "<script>alert(1)</script>.io/app:1",
    "a" * 5000 + ".example/app:1",
    "example.com/app:" + "t" * 200,
    "EXAMPLE/App:1",
    "example.com/app:1 ",
    "docker.io/" + "x/" * 200 + "app:1",
]


def bad_name(path: Path, rng: random.Random) -> tuple[Path, str]:
    image = make_image([make_layer(b"bad name")])
    return image_bundle(path, rng.choice(HOSTILE_NAMES), image), "not an image reference"


def deep_manifest(path: Path, rng: random.Random) -> tuple[Path, str]:
    """A manifest nested deeper than the JSON parser goes."""
    body = b'{"schemaVersion": 2, "layers": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    tar = RawTar(path)
    tar.add("index.json", index_json([entry("deep:1", sha256_digest(body), len(body))]))
    tar.blob(body)
    return tar.close(), "deep:1"


def wrong_sizes(path: Path, rng: random.Random) -> tuple[Path, str]:
    """Descriptors whose sizes are not those of the bytes: 2^62, or one off."""
    layer = make_layer(b"sizes")
    claimed = rng.choice([2**62, layer.size + 1, layer.size - 1])
    config = {"mediaType": "application/vnd.oci.image.config.v1+json"}
    config_body = b"{}"
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {**config, "digest": sha256_digest(config_body), "size": 2},
            "layers": [{"mediaType": layer.media_type, "digest": layer.digest, "size": claimed}],
        }
    ).encode()
    tar = RawTar(path)
    tar.add("index.json", index_json([entry("sizes:1", sha256_digest(manifest), len(manifest))]))
    tar.blob(manifest)
    tar.blob(config_body)
    tar.blob(layer.data)
    # 2^62 bytes cannot fit on the disk: refused before anything is read.
    return tar.close(), "expected|to write"


def wide_index(path: Path, rng: random.Random, children: int = 5000) -> tuple[Path, str]:
    """Twenty entries naming one index of thousands of children the bundle leaves out (and
    one naming a manifest that is not there, so that the import fails)."""
    body = _wide_index_body(rng, children)
    digest = sha256_digest(body)
    tar = RawTar(path)
    entries = [entry(f"wide{n % 4}:{n}", digest, len(body), OCI_INDEX) for n in range(20)]
    entries.append(entry("wide:absent", "sha256:" + "0" * 64, 100))
    tar.add("index.json", index_json(entries))
    tar.blob(body)
    return tar.close(), "wide:absent"


def _wide_index_body(rng: random.Random, children: int) -> bytes:
    manifests = [
        {
            "mediaType": OCI_MANIFEST,
            "digest": "sha256:" + rng.randbytes(32).hex(),
            "size": 500,
            "platform": {"os": "linux", "architecture": f"a{n}"},
        }
        for n in range(children)
    ]
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}).encode()


def absent_blob(path: Path, rng: random.Random) -> tuple[Path, str]:
    """An image naming a blob it does not carry (one the mirror may hold elsewhere)."""
    image = make_image([make_layer(rng.randbytes(64))])
    tar = RawTar(path)
    tar.add("index.json", index_json([entry("absent:1", image.digest, image.size)]))
    write_image(tar, image, blobs=False)
    return tar.close(), "not in the bundle"


# An image a fuzzed mirror holds (imported first), whose layer other bundles name.
HELD = make_image([make_layer(b"held by the mirror under library/held")])


def foreign_blob(path: Path, rng: random.Random) -> tuple[Path, str]:
    """HELD's layer named under another repository, not carried (or carried wrong)."""
    layer = HELD.layers[0]
    image = make_image([layer])
    tar = RawTar(path)
    tar.add("index.json", index_json([entry("foreign:1", image.digest, image.size)]))
    write_image(tar, image, blobs=False)
    tar.blob(image.config.data)
    if rng.random() < 0.5:
        tar.add(f"blobs/sha256/{layer.digest[7:]}", b"other bytes")
        return tar.close(), "corrupt"
    return tar.close(), "held only for other repositories"


KINDS: dict[str, Builder] = {
    "foreign_blob": foreign_blob,
    "many_members": many_members,
    "big_header": big_header,
    "manifests_first": manifests_first,
    "zero_bomb": zero_bomb,
    "bad_index": bad_index,
    "bad_name": bad_name,
    "deep_manifest": deep_manifest,
    "wrong_sizes": wrong_sizes,
    "wide_index": wide_index,
    "absent_blob": absent_blob,
}


def hostile(kind: str, directory: Path, rng: random.Random) -> tuple[Path, str]:
    """A hostile bundle of ``kind`` in ``directory``: (its path, a piece of the one line;
    ``|`` between pieces that may each be the answer)."""
    return KINDS[kind](directory / f"{kind}.tar.zst", rng)
