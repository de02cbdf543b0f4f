"""``mirror seed``: pull a list of images into the data dir ahead of need.

Each image goes through the resolver exactly as a client's pull would: the same store, the
same single-flight and leases, so seeding while ``serve`` runs on the data dir fetches
nothing twice. A reference is completed as ``docker pull`` completes it
(:func:`mirror.domain.pins.split_image`); an index brings every platform unless ``platforms``
narrows it. Blobs of all images share ``jobs`` parallel transfers. Unless told
``referrers=False``, an image brings what refers to it (signatures, SBOMs, attestations:
its referrers, and cosign's ``.sig``/``.att``/``.sbom`` tags), whole, and pinned with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from mirror.domain.errors import ManifestUnknown, RegistryError
from mirror.domain.manifests import Descriptor, Manifest
from mirror.domain.mediatypes import MANIFEST_TYPES
from mirror.domain.pins import ImageName, split_image
from mirror.domain.reference import Digest, Reference, normalize_name
from mirror.engine import Engine
from mirror.services.closure import closure
from mirror.services.fills import Fill, FillState
from mirror.services.inventory import image_size
from mirror.services.referrers import COSIGN_SUFFIXES, Referrers, descriptors_of, fallback_tag

DEFAULT_JOBS = 4


class SeedError(Exception):
    """Why one image could not be seeded: one line for the user."""


@dataclass(slots=True)
class Seeded:
    reference: str  # as the user wrote it
    name: ImageName | None = None  # completed, with the digest it resolved to
    digest: str | None = None
    size: int = 0  # inventory.image_size: bytes of the blobs it needs, as ls counts them
    fetched: int = 0  # of which newly fetched from upstream
    blobs: int = 0
    error: str | None = None
    platforms: list[str] = field(default_factory=list)
    referrers: int = 0  # signatures, SBOMs, attestations brought with it
    pins: list[str] = field(default_factory=list)  # the referrers, pinned with the image

    @property
    def ok(self) -> bool:
        return self.error is None


class Progress(Protocol):
    """What a display needs to follow a seed: sizes become known as manifests arrive."""

    def image_started(self, seeded: Seeded) -> None: ...

    def bytes_known(self, seeded: Seeded, size: int) -> None: ...

    def bytes_done(self, seeded: Seeded, size: int) -> None: ...

    def image_done(self, seeded: Seeded) -> None: ...


def read_list(path: Path) -> list[str]:
    """References from a text file: one per line, ``#`` starts a comment."""
    references = []
    for line in path.read_text().splitlines():
        text = line.split("#", 1)[0].strip()
        if text:
            references.append(text)
    return references


async def seed(
    engine: Engine,
    references: Sequence[str],
    *,
    platforms: Sequence[str] = (),
    jobs: int = DEFAULT_JOBS,
    pin: bool = True,
    referrers: bool = True,
    progress: Progress,
) -> list[Seeded]:
    transfers = asyncio.Semaphore(jobs)
    images = asyncio.Semaphore(jobs)
    brought = Referrers(engine.resolver) if referrers else None
    seeder = _Seeder(engine, tuple(platforms), transfers, progress, brought)

    async def one(reference: str) -> Seeded:
        async with images:
            seeded = await seeder.image(reference)
        if seeded.ok and pin and seeded.name is not None:
            await engine.store.add_pins([str(seeded.name), *seeded.pins])
        progress.image_done(seeded)
        return seeded

    return list(await asyncio.gather(*(one(reference) for reference in references)))


class _Seeder:
    def __init__(
        self,
        engine: Engine,
        platforms: tuple[str, ...],
        transfers: asyncio.Semaphore,
        progress: Progress,
        referrers: Referrers | None,
    ) -> None:
        self._engine = engine
        self._resolver = engine.resolver
        self._platforms = platforms
        self._transfers = transfers
        self._progress = progress
        self._referrers = referrers  # None: images only

    async def image(self, reference: str) -> Seeded:
        seeded = Seeded(reference)
        self._progress.image_started(seeded)
        try:
            await self._seed(seeded)
        except SeedError as exc:
            seeded.error = str(exc)
        except RegistryError as exc:
            seeded.error = f"{exc.code}: {exc.message}"
        return seeded

    async def _seed(self, seeded: Seeded) -> None:
        name = _complete(seeded.reference)
        if name.registry not in self._engine.upstreams:
            raise SeedError(
                f"registry {name.registry} is not mirrored here"
                f" (add --upstream {name.registry}=https://{name.registry})"
            )
        top = await self._manifest(name, name.digest or name.tag or "latest")
        seeded.digest = top.digest
        seeded.name = ImageName(name.registry, name.repository, name.tag, name.digest)
        manifests, blobs = await self._walk(name, top, seeded)
        seeded.size = image_size(blobs)
        seeded.blobs = len(blobs)
        if self._referrers is not None:
            extra, extra_blobs = await self._referrers_of(self._referrers, name, top, seeded)
            manifests += extra
            blobs = {**extra_blobs, **blobs}
        # Progress counts the manifests too: they were transferred.
        manifest_bytes = sum(len(m.body) for m in manifests)
        self._progress.bytes_known(seeded, manifest_bytes + image_size(blobs))
        self._progress.bytes_done(seeded, manifest_bytes)
        await asyncio.gather(
            *(self._blob(name, digest, size, seeded) for digest, size in blobs.items())
        )

    async def _referrers_of(
        self, referrers: Referrers, name: ImageName, top: Manifest, seeded: Seeded
    ) -> tuple[list[Manifest], dict[str, int]]:
        """What refers to the image, whole: its referrers and cosign's tags beside it."""
        digest = Digest.parse(top.digest)
        try:
            answer, _ = await referrers.answer(name.registry, name.repository, digest)
            wanted = [str(entry.get("digest")) for entry in descriptors_of(answer.body)]
            wanted += [fallback_tag(digest) + suffix for suffix in COSIGN_SUFFIXES]
            manifests: list[Manifest] = []
            blobs: dict[str, int] = {}
            for reference in wanted:
                try:
                    found = await self._manifest(name, reference)
                except ManifestUnknown:
                    continue  # cosign's tags are there only for images cosign touched
                manifests += await self._whole(name, found, blobs)
                seeded.referrers += 1
                tag, at = (None, reference) if ":" in reference else (reference, None)
                seeded.pins.append(str(ImageName(name.registry, name.repository, tag, at)))
        except RegistryError as exc:
            raise SeedError(
                f"its referrers: {exc.code}: {exc.message} (--no-referrers to seed without them)"
            ) from None
        return manifests, blobs

    async def _whole(
        self, name: ImageName, manifest: Manifest, blobs: dict[str, int]
    ) -> list[Manifest]:
        """A manifest and every manifest under it, all platforms; their blobs into ``blobs``."""
        async def fetch(child: Descriptor) -> Manifest:
            return await self._manifest(name, child.digest)

        walked = await closure(manifest, fetch)
        if walked.unreadable:
            digest, exc = next(iter(walked.unreadable.items()))
            raise SeedError(f"cannot read the manifest {digest}: {exc}")
        for blob, size in walked.blobs.items():
            blobs[blob] = size or 0
        return list(walked.manifests.values())

    async def _walk(
        self, name: ImageName, top: Manifest, seeded: Seeded
    ) -> tuple[list[Manifest], dict[str, int]]:
        """The manifests and the blobs (digest -> size) the image needs."""

        def wanted(child: Descriptor) -> bool:
            return not self._platforms or child.platform in self._platforms

        async def fetch(child: Descriptor) -> Manifest:
            return await self._manifest(name, child.digest)

        walked = await closure(top, fetch, wanted)
        if walked.unreadable:
            digest, exc = next(iter(walked.unreadable.items()))
            raise SeedError(f"cannot read the manifest {digest}: {exc}")
        for refs in walked.references.values():
            if refs.is_index and not any(wanted(child) for child in refs.children):
                offered = ", ".join(sorted({c.platform or "unknown" for c in refs.children}))
                asked = ", ".join(self._platforms)
                raise SeedError(f"no manifest for {asked} in the index (it has {offered})")
        seeded.platforms += walked.platforms
        blobs = {digest: size or 0 for digest, size in walked.blobs.items()}
        return list(walked.manifests.values()), blobs

    async def _manifest(self, name: ImageName, reference: str) -> Manifest:
        manifest, _ = await self._resolver.manifest(
            name.registry, name.repository, Reference.parse(reference), MANIFEST_TYPES
        )
        return manifest

    async def _blob(self, name: ImageName, digest: str, size: int, seeded: Seeded) -> None:
        parsed = Digest.parse(digest)
        async with self._transfers:
            if self._engine.content.present(parsed) is not None:
                self._progress.bytes_done(seeded, size)
                return
            got = await self._resolver.blob(name.registry, name.repository, parsed)
            if not isinstance(got, Fill):  # it landed meanwhile
                self._progress.bytes_done(seeded, size)
                return
            try:
                await _until_done(got, lambda n: self._progress.bytes_done(seeded, n))
            finally:
                got.detach()
            seeded.fetched += got.written


async def _until_done(fill: Fill, advanced: Callable[[int], None]) -> None:
    reported = 0
    while fill.state is FillState.RUNNING or fill.landing:  # seeded: in the storage
        await fill.changed()
        if fill.written > reported:
            advanced(fill.written - reported)
            reported = fill.written
    if fill.state is FillState.FAILED:
        assert fill.error is not None
        raise fill.error


def _complete(reference: str) -> ImageName:
    """A reference as ``docker pull`` reads it, checked against the registry's grammar."""
    try:
        name = split_image(reference)
    except ValueError as exc:
        raise SeedError(str(exc)) from None
    if any(c in reference for c in "*?["):
        raise SeedError(f"{reference!r} is a pattern; seed takes image references")
    repository = normalize_name(name.repository, name.registry)
    tag = name.tag if name.digest is not None or name.tag is not None else "latest"
    if tag is not None:
        Reference.parse(tag)
    if name.digest is not None:
        Reference.parse(name.digest)
        tag = None  # a digest names the bytes; the tag beside it is only a label (as docker)
    return ImageName(name.registry, repository, tag, name.digest)


def summary(results: Iterable[Seeded]) -> tuple[int, int, int]:
    """(images seeded, images failed, bytes newly fetched)."""
    done = list(results)
    return (
        sum(r.ok for r in done),
        sum(not r.ok for r in done),
        sum(r.fetched for r in done),
    )
