"""Access rules (``repositories: {allow: [...], deny: [...]}``): which pulls are served.

A rule is an image pattern of the pins' grammar (:mod:`mirror.domain.pins`),
``[registry/]repository[:tag|@digest]``, where ``*`` spans any characters, ``/`` included:

- ``*`` is every repository of every upstream; ``docker.io/*`` every repository of Docker
  Hub; ``ghcr.io/acme/*`` everything under ``acme`` on ghcr.io (its sub-paths too).
- Without a registry a pattern means Docker Hub, and a one-word name gets ``library/``:
  ``busybox`` is ``docker.io/library/busybox``.
- A rule without a tag or digest covers the whole repository: its manifests, blobs and tag
  list. A rule with a tag covers the manifests pulled by a tag it matches; one with a digest,
  the manifest pulled by that digest. Either also covers what those manifests hold: an
  index's platform manifests and every blob, as far as the mirror knows the manifest.
- Deny wins. With an allow list, a repository no allow rule names is refused whole; in one
  only tagged or digest rules name, just what they cover is served (its tag list too).
- A deny rule with a digest also refuses a pull by a tag that resolves to that digest.

Every pattern is checked at load (:func:`mirror.domain.pins.check_pattern`): one that no pull could
match stops the start with one line naming it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from cachetools import LRUCache

from mirror.domain.pins import ANY, Pin, check_pattern

SCOPES_KEPT = 4096


@dataclass(frozen=True, slots=True)
class Scope:
    """The rules that still apply to one repository once it is not refused whole: those
    with a tag or a digest. A pull in it is decided by what it names
    (:mod:`mirror.web.routes.access`)."""

    deny: tuple[Pin, ...] = ()
    allow: tuple[Pin, ...] = ()
    allow_all: bool = True  # no allow list, or a rule allowing the whole repository

    @property
    def open(self) -> bool:
        return self.allow_all and not self.deny

    def denies_tag(self, registry: str, repository: str, tag: str) -> bool:
        return any(pin.matches(registry, repository, tag) for pin in self.deny)

    def allows_tag(self, registry: str, repository: str, tag: str) -> bool:
        return self.allow_all or any(pin.matches(registry, repository, tag) for pin in self.allow)

    def denied_digest(self, digest: str) -> bool:
        return any(pin.pattern.digest == digest for pin in self.deny)


OPEN = Scope()


@dataclass(frozen=True, slots=True)
class AccessRules:
    """``allow`` empty: every repository not denied."""

    allow: tuple[Pin, ...] = ()
    deny: tuple[Pin, ...] = ()
    # Scopes by (registry, repository): clients ask for the same few over and over.
    _scopes: LRUCache[tuple[str, str], Scope | None] = field(
        default_factory=lambda: LRUCache(SCOPES_KEPT), compare=False, repr=False
    )

    @classmethod
    def parse(cls, allow: Iterable[str], deny: Iterable[str]) -> AccessRules:
        return cls(_patterns(allow), _patterns(deny))

    def scope(self, registry: str, repository: str) -> Scope | None:
        """None when the repository is refused whole; otherwise the rules left to apply."""
        if not self.allow and not self.deny:
            return OPEN
        key = (registry, repository)
        try:
            return self._scopes[key]
        except KeyError:
            scope = self._scopes[key] = self._decide(registry, repository)
            return scope

    def permits(self, registry: str, repository: str) -> bool:
        """May anything of the repository be served?"""
        return self.scope(registry, repository) is not None

    def _decide(self, registry: str, repository: str) -> Scope | None:
        deny, allow, allow_all = [], [], not self.allow
        for pin in self.deny:
            if pin.matches(registry, repository, None):
                return None  # a whole-repository rule: the tag-less match
            if pin.names(registry, repository):
                deny.append(pin)
        for pin in self.allow:
            if pin.matches(registry, repository, None):
                allow_all = True
            elif pin.names(registry, repository):
                allow.append(pin)
        if not allow_all and not allow:
            return None
        if allow_all and not deny:
            return OPEN
        return Scope(tuple(deny), tuple(allow), allow_all)

    def unknown_registries(self, upstreams: Sequence[str]) -> list[str]:
        """The patterns naming a registry that is no upstream: they could never match."""
        return [
            pin.text
            for pin in (*self.allow, *self.deny)
            if ANY not in pin.pattern.registry and pin.pattern.registry not in upstreams
        ]


def _patterns(items: Iterable[str]) -> tuple[Pin, ...]:
    pins = []
    for text in items:
        try:
            pin = Pin.parse(text)
            check_pattern(pin.pattern)
        except ValueError as exc:
            raise ValueError(f"pattern {text!r} cannot match: {exc}") from None
        pins.append(pin)
    return tuple(pins)
