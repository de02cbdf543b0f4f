"""Test images built with the standard library: layers, OCI and Docker manifests, indexes.

Everything is deterministic (tar and gzip timestamps are zero), so the same inputs always give
the same digests across runs and machines.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import random
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"

IMAGE_MEDIA_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_MEDIA_TYPES = (OCI_INDEX, DOCKER_LIST)
ALL_MANIFEST_TYPES = (OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST)
EPOCH = "1970-01-01T00:00:00Z"

_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Blob:
    data: bytes
    media_type: str
    # For layers: the digest of the uncompressed tar, which the config's rootfs lists.
    diff_id: str | None = field(default=None, compare=False)

    @functools.cached_property
    def digest(self) -> str:
        return sha256_digest(self.data)

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class Image:
    manifest: bytes
    media_type: str
    config: Blob
    layers: list[Blob]

    @functools.cached_property
    def digest(self) -> str:
        return sha256_digest(self.manifest)

    @property
    def size(self) -> int:
        return len(self.manifest)

    @property
    def blobs(self) -> list[Blob]:
        return [self.config, *self.layers]

    @property
    def platform(self) -> dict[str, str]:
        config = json.loads(self.config.data)
        platform = {"architecture": config["architecture"], "os": config["os"]}
        if "variant" in config:
            platform["variant"] = config["variant"]
        return platform


@dataclass(frozen=True)
class Index:
    index: bytes
    media_type: str
    manifests: list[tuple[dict[str, str], Image]]

    @functools.cached_property
    def digest(self) -> str:
        return sha256_digest(self.index)

    @property
    def size(self) -> int:
        return len(self.index)

    @property
    def images(self) -> list[Image]:
        return [image for _, image in self.manifests]

    def image_for(self, architecture: str, os: str = "linux") -> Image:
        for platform, image in self.manifests:
            if platform["architecture"] == architecture and platform["os"] == os:
                return image
        raise KeyError(f"{os}/{architecture}")


def _tar_info(name: str, size: int, *, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 0 if directory else size
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else 0o644
    info.mtime = 0
    info.uname = info.gname = "root"
    return info


def _parent_dirs(names: list[str]) -> list[str]:
    parents = {str(p) for name in names for p in Path(name).parents if str(p) != "."}
    return sorted(parents)


def _build_tar(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        # Real layers carry their directories; some extractors are stricter without them.
        for directory in _parent_dirs(list(files)):
            tar.addfile(_tar_info(directory, 0, directory=True))
        for name in sorted(files):
            tar.addfile(_tar_info(name, len(files[name])), io.BytesIO(files[name]))
    return buffer.getvalue()


def make_layer(content: dict[str, bytes] | bytes | int, media_type: str = OCI_LAYER) -> Blob:
    """A gzip-compressed tar layer.

    `content` is a mapping of path -> file bytes, raw bytes for a single file `data`, or a size
    for a single file of that many deterministic (compressible) bytes.
    """
    if isinstance(content, int):
        content = {"data": (bytes(range(251)) * (content // 251 + 1))[:content]}
    elif isinstance(content, bytes):
        content = {"data": content}
    tar = _build_tar(content)
    return Blob(gzip.compress(tar, mtime=0), media_type, diff_id=sha256_digest(tar))


@functools.lru_cache(maxsize=2)  # big layers are slow to build; tests reuse a few
def make_random_layer(size: int, seed: int, media_type: str = OCI_LAYER) -> Blob:
    """A layer holding one file of `size` incompressible bytes, for large-transfer tests.

    Built by streaming pieces through one compressor instead of tarfile+gzip, so a 200 MiB layer
    takes about two seconds and one copy of the data. Level 0 (stored deflate blocks) is still a
    valid gzip stream and is ~7x faster than level 1 on random data, which would not shrink anyway.
    """
    payload = random.Random(seed).randbytes(size)
    header = _tar_info(f"random-{seed}.bin", size).tobuf(tarfile.PAX_FORMAT, "utf-8", "strict")
    padding = b"\0" * (-size % _TAR_BLOCK)
    length = len(header) + size + len(padding) + 2 * _TAR_BLOCK
    trailer = b"\0" * (2 * _TAR_BLOCK + (-length % _TAR_RECORD))
    compressor = zlib.compressobj(0, zlib.DEFLATED, 31)  # wbits 31: gzip framing, mtime 0
    hasher = hashlib.sha256()
    out = []
    for piece in (header, payload, padding, trailer):
        hasher.update(piece)
        out.append(compressor.compress(piece))
    out.append(compressor.flush())
    return Blob(b"".join(out), media_type, diff_id="sha256:" + hasher.hexdigest())


def _config(layers: list[Blob], arch: str, os: str, variant: str | None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "created": EPOCH,
        "architecture": arch,
        "os": os,
        "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [_diff_id(layer) for layer in layers]},
        "history": [{"created": EPOCH, "created_by": "tests.support.oci"} for _ in layers],
    }
    if variant is not None:
        config["variant"] = variant
    return config


def _diff_id(layer: Blob) -> str:
    if layer.diff_id is not None:
        return layer.diff_id
    # A layer built elsewhere: recover the uncompressed digest the slow way.
    return sha256_digest(gzip.decompress(layer.data))


def _dump(document: dict[str, Any]) -> bytes:
    return json.dumps(document, indent=2).encode()


def make_image(
    layers: list[Blob],
    *,
    arch: str = "amd64",
    os: str = "linux",
    variant: str | None = None,
    docker: bool = False,
) -> Image:
    """An OCI image manifest, or with docker=True a Docker schema2 manifest."""
    manifest_type, config_type, layer_type = (
        (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER)
        if docker
        else (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER)
    )
    typed = [Blob(layer.data, layer_type, diff_id=_diff_id(layer)) for layer in layers]
    config = Blob(_dump(_config(typed, arch, os, variant)), config_type)
    manifest = {
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": config.descriptor(),
        "layers": [layer.descriptor() for layer in typed],
    }
    return Image(_dump(manifest), manifest_type, config, typed)


def make_index(images: list[Image], *, docker: bool = False) -> Index:
    """An OCI image index, or with docker=True a Docker manifest list, one entry per image."""
    media_type = DOCKER_LIST if docker else OCI_INDEX
    child_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
    if any(image.media_type != child_type for image in images):
        # Mixed flavours are legal but almost always a test-writing slip.
        raise ValueError(f"every image of a {media_type} must be a {child_type}")
    entries = [(image.platform, image) for image in images]
    document = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [
            {
                "mediaType": image.media_type,
                "digest": image.digest,
                "size": image.size,
                "platform": platform,
            }
            for platform, image in entries
        ],
    }
    return Index(_dump(document), media_type, entries)


def _write_blob(directory: Path, digest: str, data: bytes) -> None:
    path = directory / "blobs" / "sha256" / digest.removeprefix("sha256:")
    if not path.exists():
        path.write_bytes(data)


def write_oci_layout(directory: str | Path, tag: str, image_or_index: Image | Index) -> Path:
    """Write (or add a tag to) an OCI image layout that `skopeo copy oci:DIR:TAG` can read.

    skopeo's oci: transport refuses Docker media types, so Docker-typed images are rejected
    here; write the OCI twin instead and push it with `--format v2s2`.
    """
    if image_or_index.media_type not in (OCI_MANIFEST, OCI_INDEX):
        raise ValueError("skopeo's oci: transport needs OCI media types; push with --format v2s2")
    root = Path(directory)
    (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    if isinstance(image_or_index, Index):
        _write_index_blobs(root, image_or_index)
        top = (image_or_index.digest, image_or_index.index, image_or_index.media_type)
    else:
        _write_image_blobs(root, image_or_index)
        top = (image_or_index.digest, image_or_index.manifest, image_or_index.media_type)
    _write_blob(root, top[0], top[1])
    _add_ref(root, tag, {"mediaType": top[2], "digest": top[0], "size": len(top[1])})
    return root


def _write_image_blobs(root: Path, image: Image) -> None:
    for blob in image.blobs:
        _write_blob(root, blob.digest, blob.data)


def _write_index_blobs(root: Path, index: Index) -> None:
    for image in index.images:
        _write_image_blobs(root, image)
        _write_blob(root, image.digest, image.manifest)


def _add_ref(root: Path, tag: str, descriptor: dict[str, Any]) -> None:
    ref_key = "org.opencontainers.image.ref.name"
    path = root / "index.json"
    index: dict[str, Any] = (
        json.loads(path.read_text()) if path.exists() else {"schemaVersion": 2, "manifests": []}
    )
    # One layout can hold several tags; re-writing a tag replaces its entry.
    kept = [m for m in index["manifests"] if m.get("annotations", {}).get(ref_key) != tag]
    index["manifests"] = [*kept, {**descriptor, "annotations": {ref_key: tag}}]
    path.write_text(json.dumps(index, indent=2))
