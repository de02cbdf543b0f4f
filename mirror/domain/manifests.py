"""What a manifest references, read from its bytes: pure code, no I/O.

    index (OCI image index, Docker manifest list)
        └── child manifests, each with its platform
    image manifest (OCI, Docker schema 2)
        ├── config blob
        └── layer blobs
    Docker schema 1
        └── layer blobs (sizes unknown)

Sizes are what the descriptors declare; digests are validated with
:class:`mirror.domain.reference.Digest`, so nothing unparseable reaches a path or a query.
Anything that is not a manifest the mirror can read raises :class:`ManifestParseError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mirror.domain.errors import RegistryError
from mirror.domain.mediatypes import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    DOCKER_SCHEMA1,
    DOCKER_SCHEMA1_SIGNED,
    OCI_INDEX,
    OCI_MANIFEST,
)
from mirror.domain.reference import Digest

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})


class ManifestParseError(ValueError):
    """The bytes are not a manifest of a kind the mirror reads."""


@dataclass(frozen=True, slots=True)
class Descriptor:
    digest: str
    size: int | None
    media_type: str
    platform: str | None = None  # os/arch[/variant], for an index's children


@dataclass(frozen=True, slots=True)
class References:
    media_type: str
    children: tuple[Descriptor, ...] = ()  # the manifests an index points to
    blobs: tuple[Descriptor, ...] = ()  # the config and layers of an image manifest

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES


def parse(body: bytes, media_type: str) -> References:
    """The references of a manifest served with ``media_type`` (or naming its own)."""
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise ManifestParseError(f"not JSON: {exc}") from None
    except RecursionError:  # json gives up on deep nesting this way
        raise ManifestParseError("not JSON: nested too deep") from None
    if not isinstance(document, dict):
        raise ManifestParseError("not a JSON object")
    kind = _kind(document, media_type)
    if kind in INDEX_TYPES:
        children = tuple(_descriptor(item, platform=True) for item in _list(document, "manifests"))
        return References(kind, children=children)
    if kind in (DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED):
        layers = _list(document, "fsLayers")
        digests = dict.fromkeys(_digest(item.get("blobSum")) for item in layers)  # unique
        return References(kind, blobs=tuple(Descriptor(d, None, "") for d in digests))
    config = document.get("config")
    blobs = [_descriptor(config)] if isinstance(config, dict) else []
    blobs += [_descriptor(item) for item in _list(document, "layers")]
    return References(kind, blobs=tuple(blobs))


def _kind(document: dict[str, Any], media_type: str) -> str:
    declared = document.get("mediaType")
    if isinstance(declared, str) and declared:
        kind = declared
    elif media_type:
        kind = media_type
    elif "manifests" in document:
        kind = OCI_INDEX  # the OCI index may leave its mediaType out
    else:
        kind = OCI_MANIFEST
    if document.get("schemaVersion") == 1:
        kind = DOCKER_SCHEMA1
    known = {*INDEX_TYPES, OCI_MANIFEST, DOCKER_MANIFEST, DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED}
    if kind not in known:
        raise ManifestParseError(f"unknown manifest type {kind[:100]!r}")
    return kind


def _list(document: dict[str, Any], key: str) -> list[dict[str, Any]]:
    items = document.get(key, [])
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise ManifestParseError(f"{key} is not a list of objects")
    return items


def _descriptor(item: dict[str, Any], *, platform: bool = False) -> Descriptor:
    size = item.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise ManifestParseError("a descriptor has a bad size")
    media_type = item.get("mediaType")
    return Descriptor(
        _digest(item.get("digest")),
        size,
        media_type if isinstance(media_type, str) else "",
        _platform(item.get("platform")) if platform else None,
    )


def _digest(value: object) -> str:
    try:
        return str(Digest.parse(value if isinstance(value, str) else ""))
    except RegistryError:
        raise ManifestParseError(f"bad digest {str(value)[:100]!r}") from None


def config_platform(body: bytes) -> str | None:
    """An image's platform (os/arch[/variant]) from its config blob, which names it with
    the keys an index's platform has."""
    try:
        return _platform(json.loads(body))
    except (ValueError, RecursionError):
        return None


def _platform(value: object) -> str | None:
    if not isinstance(value, dict):
        return None
    parts = [value.get("os"), value.get("architecture"), value.get("variant")]
    return "/".join(str(part) for part in parts if part) or None


@dataclass(frozen=True, slots=True)
class Manifest:
    body: bytes
    media_type: str
    digest: str


@dataclass(frozen=True, slots=True)
class TagRecord:
    digest: str
    media_type: str
    # Wall-clock seconds when the upstream last confirmed the mapping; the freshness
    # window is measured from here, across restarts and replicas.
    checked_at: float


@dataclass(frozen=True, slots=True)
class TaggedRecord:
    registry: str
    repository: str
    tag: str
    record: TagRecord
