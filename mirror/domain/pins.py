"""Pins: image patterns whose content eviction never removes.

A pin is written the way users write images, with ``*`` wildcards anywhere:
``[registry/]repository[:tag]``. ``library/postgres:16*`` keeps every ``16…`` tag of
Docker Hub's postgres, ``ghcr.io/acme/*`` everything under ``acme`` on ghcr.io, and
``alpine`` every tag of ``docker.io/library/alpine``. Names are completed as ``docker pull``
completes them (see :func:`split_image`), so a pin matches what the graph records. The
access rules (``repositories:``, :mod:`mirror.domain.rules`) are patterns of the same grammar,
held to :func:`check_pattern` at load. Pure code: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from mirror.domain.errors import DigestInvalid
from mirror.domain.reference import DOCKER_HUB, Digest

_LOOKS_LIKE_HOST = re.compile(r"[^/]*[.:][^/]*|localhost")
# The reference grammar (mirror.domain.reference) with ``*`` added where a pattern may have it.
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*")
_COMPONENT_CHARS = re.compile(r"[a-z0-9._*-]+")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_TAG_CHARS = re.compile(r"[A-Za-z0-9._*-]{1,128}")
_HOST_CHARS = re.compile(r"[a-z0-9.*-]+(?::[0-9*]+)?")
ANY = "*"  # a pattern's registry and repository when it is a bare ``*``: everything


@dataclass(frozen=True, slots=True)
class ImageName:
    """A reference as a user writes it, completed: registry, repository, tag or digest."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def split_image(text: str) -> ImageName:
    """``alpine:3.20`` -> docker.io/library/alpine:3.20, as ``docker pull`` reads it.

    The first component is a registry when it looks like a host (a dot, a port or
    ``localhost``); Docker Hub's one-component names get ``library/``. Nothing is
    validated here beyond the shape: wildcards are allowed for patterns, and two of them
    keep their reach: a bare ``*`` is every repository of every registry, and
    ``docker.io/*`` every repository of Docker Hub (not only ``library/``).
    """
    text = text.strip()
    if not text:
        raise ValueError("empty image reference")
    rest, _, digest = text.partition("@")
    name, tag = rest, None
    slash, colon = rest.rfind("/"), rest.rfind(":")
    if colon > slash:
        name, tag = rest[:colon], rest[colon + 1 :]
    first, sep, remainder = name.partition("/")
    if sep and _LOOKS_LIKE_HOST.fullmatch(first):
        registry, repository = first.lower(), remainder
    else:
        registry, repository = DOCKER_HUB, name
    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = DOCKER_HUB
    if name == ANY:
        registry = ANY
    if registry == DOCKER_HUB and "/" not in repository and repository != ANY:
        repository = f"library/{repository}"
    if not name or tag == "" or (digest == "" and "@" in text):
        raise ValueError(f"malformed image reference {text!r}")
    return ImageName(registry, repository, tag, digest or None)


def check_pattern(pattern: ImageName) -> None:
    """Refuse (ValueError) a pattern that no pull can match: a name outside the reference
    grammar (uppercase, an empty component, a trailing ``/``), a malformed tag or digest, or
    both a tag and a digest (a pull names one)."""
    if not _HOST_CHARS.fullmatch(pattern.registry):
        raise ValueError(f"registry {pattern.registry!r} is not a host name")
    for component in pattern.repository.split("/"):
        if not component:
            raise ValueError("a name has no empty component (nor a leading or trailing /)")
        if component.lower() != component:
            raise ValueError("repository names are lowercase")
        grammar = _COMPONENT_CHARS if ANY in component else _COMPONENT
        if not grammar.fullmatch(component):
            raise ValueError(f"{component!r} is not a name component")
    if pattern.tag is not None:
        grammar = _TAG_CHARS if ANY in pattern.tag else _TAG
        if not grammar.fullmatch(pattern.tag):
            raise ValueError(f"{pattern.tag!r} is not a tag")
    if pattern.digest is not None:
        if pattern.tag is not None:
            raise ValueError("a tag and a digest together: a pull names one or the other")
        try:
            Digest.parse(pattern.digest)
        except DigestInvalid as exc:
            raise ValueError(exc.message) from None


@dataclass(frozen=True, slots=True)
class Pin:
    pattern: ImageName
    text: str

    @classmethod
    def parse(cls, text: str) -> Pin:
        return cls(split_image(text), text.strip())

    def names(self, registry: str, repository: str) -> bool:
        """Does the pattern's name (whatever its tag or digest) match ``repository``?"""
        return fnmatchcase(registry, self.pattern.registry) and fnmatchcase(
            repository, self.pattern.repository
        )

    def matches(
        self, registry: str, repository: str, tag: str | None, digest: str | None = None
    ) -> bool:
        """Does this pin cover ``repository`` on ``registry`` (tagged ``tag``, if any)?

        A pin without a tag covers every manifest of the repository, tagged or not; a pin
        with one covers the tags it matches; a pin with a digest (``seed name@sha256:…``)
        covers that manifest.
        """
        if not self.names(registry, repository):
            return False
        if self.pattern.digest is not None:
            return digest == self.pattern.digest
        if self.pattern.tag is None:
            return True
        return tag is not None and fnmatchcase(tag, self.pattern.tag)


def pinned(
    pins: Sequence[Pin], registry: str, repository: str, tag: str | None, digest: str | None = None
) -> bool:
    return any(pin.matches(registry, repository, tag, digest) for pin in pins)


def with_stored(configured: Sequence[Pin], stored: Sequence[str]) -> tuple[Pin, ...]:
    """The configured pins and those ``seed`` and ``import`` stored (skipping any that no
    longer parse, rather than failing every reader of pins)."""
    pins = list(configured)
    for text in stored:
        try:
            pins.append(Pin.parse(text))
        except ValueError:
            continue
    return tuple(pins)
