"""What an image needs: its manifests and blobs, through an index's children. The one walk
of an image, for ``ls``, ``seed``, ``export``, ``import``, pins (eviction), pull times and
the blobs an access rule covers.

The walk itself does no I/O: it asks for each child manifest it reaches and is handed the
manifest (or None: not held, not in the bundle). :func:`closure` asks with an awaitable
lookup (a store, the resolver), :func:`closure_of` with a plain function (a bundle's index
read into memory).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field

from mirror.content.protocols import MetadataStore
from mirror.domain.manifests import Descriptor, Manifest, ManifestParseError, References, parse
from mirror.domain.pins import Pin

Lookup = Callable[[Descriptor], Awaitable[Manifest | None]]


@dataclass(slots=True)
class Closure:
    top: Manifest
    manifests: dict[str, Manifest] = field(default_factory=dict)  # walked, the top first
    references: dict[str, References] = field(default_factory=dict)  # of each walked
    blobs: dict[str, int | None] = field(default_factory=dict)  # -> the size declared
    platforms: list[str] = field(default_factory=list)  # of the children walked
    absent: list[Descriptor] = field(default_factory=list)  # children the lookup lacked
    # Manifests whose bytes are no manifest the mirror reads: walked as referencing nothing.
    unreadable: dict[str, ManifestParseError] = field(default_factory=dict)


def _everything(child: Descriptor) -> bool:
    return True


async def closure(
    top: Manifest, lookup: Lookup, select: Callable[[Descriptor], bool] = _everything
) -> Closure:
    """Everything ``top`` needs, the children of an index only where ``select`` says."""
    walk = _walk(top, select)
    try:
        child = next(walk)
        while True:
            child = walk.send(await lookup(child))
    except StopIteration as done:
        result: Closure = done.value
        return result


def closure_of(
    top: Manifest,
    lookup: Callable[[Descriptor], Manifest | None],
    select: Callable[[Descriptor], bool] = _everything,
) -> Closure:
    """:func:`closure` with a lookup that does not wait."""
    walk = _walk(top, select)
    try:
        child = next(walk)
        while True:
            child = walk.send(lookup(child))
    except StopIteration as done:
        result: Closure = done.value
        return result


def _walk(
    top: Manifest, select: Callable[[Descriptor], bool]
) -> Generator[Descriptor, Manifest | None, Closure]:
    walked = Closure(top)
    pending = [top]
    while pending:
        manifest = pending.pop()
        walked.manifests[manifest.digest] = manifest
        refs = walked.references[manifest.digest] = _references(manifest, walked)
        for child in refs.children:
            if not select(child):
                continue
            walked.platforms.append(child.platform or "unknown")
            found = yield child
            if found is None:
                walked.absent.append(child)
            elif found.digest not in walked.manifests:
                pending.append(found)
        for blob in refs.blobs:
            walked.blobs.setdefault(blob.digest, blob.size)
    return walked


def _references(manifest: Manifest, walked: Closure) -> References:
    try:
        return parse(manifest.body, manifest.media_type)
    except ManifestParseError as exc:
        walked.unreadable[manifest.digest] = exc
        return References(manifest.media_type)


async def blobs_needed(
    store: MetadataStore, registry: str, repository: str, digest: str
) -> dict[str, int]:
    """Every blob a manifest the store holds needs, through an index's children: digest ->
    the size declared (0 where none is). For pins, pull times and the blobs a rule covers."""
    top = await store.get_manifest(registry, repository, digest)
    if top is None:
        return {}

    async def held(child: Descriptor) -> Manifest | None:
        return await store.get_manifest(registry, repository, child.digest)

    walked = await closure(top, held)
    return {blob: size or 0 for blob, size in walked.blobs.items()}


async def reached_by(
    store: MetadataStore, registry: str, repository: str, rules: tuple[Pin, ...], blobs: bool
) -> set[str]:
    """What the rules' tags and digests cover in the repository, as far as the store knows:
    the manifests (an index's platforms with it), or the blobs they hold. For access rules."""
    roots = {pin.pattern.digest for pin in rules if pin.pattern.digest is not None}
    if any(pin.pattern.tag is not None for pin in rules):
        for tagged in await store.list_tags(registry, repository):
            if any(pin.matches(registry, repository, tagged.tag) for pin in rules):
                roots.add(tagged.record.digest)
    found: set[str] = set()
    for root in roots:
        if blobs:
            found.update(await blobs_needed(store, registry, repository, root))
            continue
        found.add(root)
        manifest = await store.get_manifest(registry, repository, root)
        if manifest is None:
            continue
        try:
            children = parse(manifest.body, manifest.media_type).children
        except ManifestParseError:
            continue
        found.update(child.digest for child in children)
    return found
