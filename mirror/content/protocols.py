"""The store interfaces the resolver is written against.

Manifests are immutable and addressed by digest; a tag record says which digest a tag
pointed to when the upstream last confirmed it. Keys always carry the upstream registry
so that metadata of different upstreams never mixes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from mirror.content.graph import ContentGraph
from mirror.domain.manifests import Manifest, TaggedRecord, TagRecord


class StoreUnavailable(Exception):
    """A shared store (Redis) did not answer, or answered with an error; the caller degrades."""


class NewerSchema(RuntimeError):
    """The store was written by a newer release: this one stops rather than corrupt it."""


# Negative-cache keys for what is not a tag: the repository itself, a manifest digest, a blob.
REPOSITORY_MISSING = "@repository"


def blob_missing(digest: str) -> str:
    return f"blob@{digest}"


# The referrers answer for a digest is kept as a tag record under a name no tag can take
# (a tag has no ``@``); ``list_tags`` leaves such records out.
REFERRERS = "referrers@"


def referrers_key(digest: str) -> str:
    return f"{REFERRERS}{digest}"


def is_tag(name: str) -> bool:
    """Is a tag record's name a tag (not a kept referrers answer)?"""
    return "@" not in name


class MetadataStore(Protocol):
    """Manifests by digest and tags by name, per upstream registry and repository; and the
    content graph over them (``graph``)."""

    @property
    def graph(self) -> ContentGraph: ...

    async def get_manifest(
        self, registry: str, repository: str, digest: str
    ) -> Manifest | None: ...

    async def put_manifest(self, registry: str, repository: str, manifest: Manifest) -> None: ...

    async def get_tag(self, registry: str, repository: str, tag: str) -> TagRecord | None: ...

    async def put_tag(
        self, registry: str, repository: str, tag: str, record: TagRecord
    ) -> None: ...

    async def get_missing(self, registry: str, repository: str, tag: str) -> bool:
        """Did the upstream recently answer "not found" for this (the negative cache)?

        ``tag`` is a tag, or one of the keys of :func:`missing_key` for what is not a
        tag; none of them can collide with a tag, whose grammar has no ``@`` or ``:``.
        """
        ...

    async def put_missing(self, registry: str, repository: str, tag: str, ttl: float) -> None:
        """Remember an upstream "not found" for ``ttl`` seconds."""
        ...

    async def list_tags(
        self, registry: str | None = None, repository: str | None = None
    ) -> list[TaggedRecord]:
        """Every tag the store knows (of one repository, given both names), sorted: for
        ``mirror ls``, pins, export, and tag lists served without an upstream. Records that
        are not tags (:func:`referrers_key`) are left out."""
        ...

    async def pins(self) -> list[str]:
        """The images ``seed`` and ``import`` pinned (the configured pins are settings)."""
        ...

    async def add_pins(self, references: Sequence[str]) -> None: ...

    async def remove_pins(self, references: Sequence[str]) -> int:
        """Unpin; how many of ``references`` were pinned."""
        ...

    async def ping(self) -> bool:
        """Is the store usable right now? (readiness)"""
        ...

    async def close(self) -> None: ...
