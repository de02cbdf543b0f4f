"""Manifest media types and Accept negotiation."""

from __future__ import annotations

import functools
from collections.abc import Sequence

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"

# What the mirror asks upstream for when it resolves a tag for every client at once:
# the multi-platform forms first, so the cached answer serves every platform.
MANIFEST_TYPES = (OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST)
BLOB_TYPE = "application/octet-stream"
# Every type a manifest is served as; anything else an upstream claimed is served as
# GENERIC_TYPE (a text/html "manifest" must not become a page of the mirror's origin).
KNOWN_MANIFEST_TYPES = frozenset((*MANIFEST_TYPES, DOCKER_SCHEMA1_SIGNED, DOCKER_SCHEMA1))
GENERIC_TYPE = "application/octet-stream"
# What the distribution registry and Docker Hub answer, with a 404, a client that pulls a tag
# held as an OCI index or manifest its Accept leaves out: never a conversion, so the mirror
# gives the same answer from what it holds without asking.
UNACCEPTED_OCI = {
    OCI_INDEX: "OCI index found, but accept header does not support OCI indexes",
    OCI_MANIFEST: "OCI manifest found, but accept header does not support OCI manifests",
}


def served_manifest_type(media_type: str) -> str:
    """The Content-Type to serve a manifest stored as ``media_type`` with."""
    return media_type if media_type in KNOWN_MANIFEST_TYPES else GENERIC_TYPE


@functools.lru_cache(maxsize=1024)
def parse_accept(lines: tuple[str, ...]) -> tuple[str, ...]:
    """Merge Accept header lines (several lines or one comma-joined line) into media types."""
    types: list[str] = []
    for line in lines:
        for item in line.split(","):
            media_type = item.split(";", 1)[0].strip().lower()
            if media_type and media_type not in types:
                types.append(media_type)
    return tuple(types)


@functools.lru_cache(maxsize=1024)
def accepts(accept: tuple[str, ...], media_type: str) -> bool:
    """Does a client that sent ``accept`` take ``media_type``? No Accept at all takes anything."""
    if not accept:
        return True
    major = media_type.split("/", 1)[0]
    return any(item in (media_type, "*/*", f"{major}/*") for item in accept)


def upstream_accept(accept: Sequence[str]) -> tuple[str, ...]:
    """The Accept to send upstream on behalf of a client that cannot take what is cached."""
    return tuple(item for item in accept if item not in ("*/*", "application/*")) or MANIFEST_TYPES
