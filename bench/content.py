"""Benchmark images, built with the standard library and pushed to the upstream with skopeo.

One OCI image layout holds three tags: ``big`` (one layer of the large blob), ``small`` (a
few KiB, for the manifest figures) and ``layers`` (30 layers of 4 KiB to 2 MiB, for a whole
pull by containerd). The large layer is a real gzip'd tar written straight to
disk in pieces, so a 1 GiB blob never sits in memory. Deflate level 0 (stored blocks) is still
valid gzip and costs little; nothing on the pull path compresses, so the payload only has to be
unique per piece, not random throughout.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import subprocess
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
PIECE = 16 * 1024 * 1024
PUSH_TIMEOUT = 900.0
_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    path: Path

    @property
    def hex(self) -> str:
        return self.digest.removeprefix("sha256:")


@dataclass(frozen=True)
class Image:
    repository: str
    tag: str
    manifest_digest: str
    layer: Blob


class Layout:
    """An OCI image layout (``oci-layout``, ``index.json``, ``blobs/sha256/``) being written."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.blobs.mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
        self._refs: list[dict[str, Any]] = []

    def add_bytes(self, data: bytes) -> Blob:
        digest = hashlib.sha256(data).hexdigest()
        path = self.blobs / digest
        path.write_bytes(data)
        return Blob(f"sha256:{digest}", len(data), path)

    def add_image(self, tag: str, layers: list[tuple[Blob, str]]) -> str:
        """Write the config and manifest of an image of ``layers`` (each a layer and its
        diff_id), tag it; returns its digest."""
        config = self.add_bytes(_json(_config([diff_id for _, diff_id in layers])))
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": _descriptor(OCI_CONFIG, config),
            "layers": [_descriptor(OCI_LAYER, layer) for layer, _ in layers],
        }
        blob = self.add_bytes(_json(manifest))
        ref = {**_descriptor(OCI_MANIFEST, blob)}
        ref["annotations"] = {"org.opencontainers.image.ref.name": tag}
        self._refs.append(ref)
        index = {"schemaVersion": 2, "manifests": self._refs}
        (self.root / "index.json").write_text(json.dumps(index, indent=2))
        return blob.digest


def _json(document: dict[str, Any]) -> bytes:
    return json.dumps(document, indent=2).encode()


def _descriptor(media_type: str, blob: Blob) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": blob.digest, "size": blob.size}


def _config(diff_ids: list[str]) -> dict[str, Any]:
    return {
        "created": "1970-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }


def _tar_pieces(name: str, size: int) -> Iterator[bytes]:
    """A tar holding one file of ``size`` bytes, in pieces of at most PIECE bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    yield info.tobuf(tarfile.PAX_FORMAT, "utf-8", "strict")
    block = bytearray(os.urandom(PIECE))
    for index, offset in enumerate(range(0, size, PIECE)):
        block[:8] = index.to_bytes(8, "big")  # every piece differs from every other
        yield bytes(block[: min(PIECE, size - offset)])
    length = _TAR_BLOCK + size + (-size % _TAR_BLOCK) + 2 * _TAR_BLOCK
    yield b"\0" * ((-size % _TAR_BLOCK) + 2 * _TAR_BLOCK + (-length % _TAR_RECORD))


def write_large_layer(layout: Layout, size: int) -> tuple[Blob, str]:
    """A gzip'd tar layer of about ``size`` bytes written to the layout; (blob, diff_id)."""
    compressor = zlib.compressobj(0, zlib.DEFLATED, 31)  # level 0, gzip framing
    blob_hash, tar_hash = hashlib.sha256(), hashlib.sha256()
    partial = layout.blobs / "large.partial"
    with partial.open("wb") as out:
        for piece in _tar_pieces("payload.bin", size):
            tar_hash.update(piece)
            chunk = compressor.compress(piece)
            blob_hash.update(chunk)
            out.write(chunk)
        tail = compressor.flush()
        blob_hash.update(tail)
        out.write(tail)
    final = layout.blobs / blob_hash.hexdigest()
    partial.rename(final)
    blob = Blob(f"sha256:{blob_hash.hexdigest()}", final.stat().st_size, final)
    return blob, f"sha256:{tar_hash.hexdigest()}"


SMALL_PAYLOAD = 3970  # bytes of file: with tar and gzip framing, a blob of about 4 KiB


def write_small_layer(
    layout: Layout, payload: int = SMALL_PAYLOAD, seed: int = 4
) -> tuple[Blob, str]:
    """A gzip'd tar of one file of ``payload`` random bytes (incompressible, so the layer is
    about that size): a config or a small layer, what most of a pull's requests are for."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        data = random.Random(seed).randbytes(payload)
        info = tarfile.TarInfo(f"etc/bench-{seed}.txt")
        info.size, info.mtime = len(data), 0
        tar.addfile(info, io.BytesIO(data))
    tar_bytes = buffer.getvalue()
    diff_id = "sha256:" + hashlib.sha256(tar_bytes).hexdigest()
    return layout.add_bytes(_gzip(tar_bytes)), diff_id


def _gzip(data: bytes) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    return compressor.compress(data) + compressor.flush()


# The many-layer image of the whole-pull figure: layers of 4 KiB to 2 MiB, doubling and
# starting over, as a real image's run from tiny metadata layers to a few large ones.
MANY_LAYERS = 30
MANY_SMALLEST = 4 * 1024
MANY_STEPS = 10


def many_layer_sizes(count: int = MANY_LAYERS) -> list[int]:
    return [MANY_SMALLEST << (index % MANY_STEPS) for index in range(count)]


def build(root: Path, large_size: int) -> tuple[Layout, dict[str, tuple[Blob, str]]]:
    """The layout with tags ``big``, ``small`` and ``layers`` (MANY_LAYERS layers); for each
    tag its first layer and manifest digest."""
    layout = Layout(root)
    images: dict[str, tuple[Blob, str]] = {}
    many = [
        write_small_layer(layout, size, seed=100 + index)
        for index, size in enumerate(many_layer_sizes())
    ]
    for tag, layers in (
        ("big", [write_large_layer(layout, large_size)]),
        ("small", [write_small_layer(layout)]),
        ("layers", many),
    ):
        images[tag] = (layers[0][0], layout.add_image(tag, layers))
    return layout, images


def push(layout: Layout, tag: str, registry_host: str, repository: str) -> None:
    """``skopeo copy oci:LAYOUT:TAG docker://HOST/REPOSITORY:TAG`` (plain HTTP)."""
    command = ["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false"]
    command += [f"oci:{layout.root}:{tag}", f"docker://{registry_host}/{repository}:{tag}"]
    result = subprocess.run(command, capture_output=True, timeout=PUSH_TIMEOUT, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"skopeo copy failed: {result.stderr.decode(errors='replace')}")


def build_and_push(root: Path, large_size: int, registry_host: str) -> dict[str, Image]:
    """Build the images and push them as ``library/TAG:TAG`` (big, small, layers)."""
    layout, built = build(root, large_size)
    images: dict[str, Image] = {}
    for tag, (layer, manifest_digest) in built.items():
        repository = f"library/{tag}"
        push(layout, tag, registry_host, repository)
        images[tag] = Image(repository, tag, manifest_digest, layer)
    return images
