"""Bundles for air-gapped sites: ``mirror export`` and ``mirror import``.

A bundle is an OCI image layout in a tar (``mirror.services.layout``), so other tools read it too
(``skopeo copy oci-archive:FILE:REF``, ``ctr images import FILE``). Each image's entry in
``index.json`` is named by its full reference in both the annotations those tools read.

- **Export** walks the content graph from each image (tag, or manifest pinned by digest)
  and writes ``oci-layout``, ``index.json``, every manifest, then every blob, streaming.
  With ``since`` (an older bundle) it writes a *delta*: the full index and every manifest,
  but only the blobs the old bundle's images did not already need.
- **Import** reads any layout twice, in order (a zstd tar cannot seek): first the index
  and the manifests (every small member is hashed; the manifests are kept), then the blobs
  that the readable images need and the mirror does not hold, each verified against its
  digest and size while it is copied in and committed atomically, as a fill is. An image
  whose blobs are not all there afterwards (missing, corrupt) is not imported, and is named
  with the digest at fault; the others are. Blobs already held are never copied again, so
  a repeated or interrupted import does no work twice.
- **Referrers** (signatures, SBOMs, attestations) travel as tagged images beside the images
  they refer to, unless ``referrers=False``: the fallback tag ``sha256-<hex>`` (an index of
  them) and cosign's ``.sig``/``.att``/``.sbom`` tags (``mirror.services.referrers``).
  Import keeps a fallback tag as the referrers answer of its digest, for an offline mirror
  to serve.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import shutil
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from mirror.domain.errors import RegistryError
from mirror.domain.manifests import (
    Descriptor,
    Manifest,
    ManifestParseError,
    References,
    TagRecord,
    parse,
)
from mirror.domain.mediatypes import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    KNOWN_MANIFEST_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
)
from mirror.domain.pins import ImageName, Pin, split_image
from mirror.domain.reference import (
    Digest,
    Reference,
    normalize_name,
    validate_registry,
    validate_tag,
)
from mirror.engine import Engine
from mirror.services.closure import closure, closure_of
from mirror.services.fills import writer_lease
from mirror.services.inventory import Image, human_size, image_size, images
from mirror.services.layout import (
    CONTAINERD_NAME,
    DEFAULT_BOUNDS,
    INDEX_FILE,
    LAYOUT_FILE,
    LAYOUT_VERSION,
    REF_NAME,
    Bounds,
    LayoutError,
    Member,
    TarWriter,
    copy_verified,
    hash_matches,
    members,
    read_all,
)
from mirror.services.referrers import (
    Referrers,
    descriptors_of,
    held_referrers,
    index_of,
    is_referrers_tag,
    subject_of_fallback_tag,
)
from mirror.upstream.client import MAX_MANIFEST_SIZE

T = TypeVar("T")

Progress = Callable[[int], None]


@dataclass(slots=True)
class ImageContent:
    """What one image needs: its manifests (top first) and its blobs with their sizes."""

    reference: str
    top: Manifest
    manifests: dict[str, Manifest] = field(default_factory=dict)
    blobs: dict[str, int] = field(default_factory=dict)
    absent_children: list[str] = field(default_factory=list)  # index entries not held


# -- export ---------------------------------------------------------------------------------


@dataclass(slots=True)
class ExportReport:
    exported: list[ImageContent] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)  # (reference, why)
    written: bool = False  # False: images were missing and that was not allowed
    blobs: int = 0
    bytes: int = 0  # blob bytes written
    held_before: int = 0  # blobs left out because the old bundle holds them
    sha256: str = ""
    notes: list[str] = field(default_factory=list)  # referrers that could not go along


async def export(
    engine: Engine,
    output: Path,
    patterns: Sequence[Pin] = (),
    *,
    since: Path | None = None,
    allow_missing: bool = False,
    referrers: bool = True,
    total: Callable[[int], None] = lambda size: None,
    progress: Progress = lambda size: None,
) -> ExportReport:
    """Write the bundle; an image whose blobs are not all on disk is left out, and then
    nothing is written at all unless ``allow_missing``: a bundle silently short of an image
    is found out on the far side of the gap."""
    report = ExportReport()
    chosen: list[Image] = []
    for image in await images(engine, patterns):
        if not referrers and is_referrers_tag(image.tag):
            continue
        content = await _held_content(engine, image)
        if not referrers and _refers(content.top):
            continue  # a referrer that seed pinned by its digest
        chosen.append(image)
        missing = [d for d in content.blobs if engine.content.present(Digest.parse(d)) is None]
        if missing:
            report.missing.append(
                (image.reference, f"blob {missing[0]} is not on disk (evicted?)")
            )
            continue
        report.exported.append(content)
    if (report.missing and not allow_missing) or not report.exported:
        return report
    if referrers:
        await _add_referrers(engine, report, chosen)
    held = await asyncio.to_thread(bundle_digests, since) if since is not None else set()
    manifests: dict[str, bytes] = {}
    blobs: dict[str, int] = {}
    left_out: set[str] = set()
    for content in report.exported:
        manifests.update({d: m.body for d, m in content.manifests.items()})
        # An import grants a repository only the blobs it held already: a blob the old
        # bundle carried for another repository is carried again.
        repository = _repository(content.reference)
        kept = {d for d in content.blobs if (repository, d) in held}
        left_out |= kept
        blobs.update({d: s for d, s in content.blobs.items() if d not in kept})
    report.held_before = len(left_out - set(blobs))
    report.blobs, report.bytes = len(blobs), sum(blobs.values())
    total(report.bytes + sum(len(body) for body in manifests.values()))
    index = _index_document(report.exported)
    report.sha256 = await asyncio.to_thread(
        _write_bundle, engine, output, index, (manifests, blobs), progress
    )
    report.written = True
    return report


async def _held_content(engine: Engine, image: Image) -> ImageContent:
    top = await engine.store.get_manifest(image.registry, image.repository, image.digest)
    assert top is not None, "images() lists only manifests the store holds"

    async def held(digest: str, media_type: str, size: int | None) -> Manifest | None:
        return await engine.store.get_manifest(image.registry, image.repository, digest)

    def size(digest: str) -> int:
        return engine.content.present(Digest.parse(digest)) or 0

    return await _content(image.reference, top, held, size)


def _refers(manifest: Manifest) -> bool:
    """Is a manifest a referrer (it names a ``subject``)?"""
    try:
        document = json.loads(manifest.body)
    except ValueError:
        return False
    return isinstance(document, dict) and isinstance(document.get("subject"), dict)


async def _add_referrers(engine: Engine, report: ExportReport, chosen: list[Image]) -> None:
    """The referrers of the exported images, as tagged images of their own (each whole, or
    left out with a note)."""
    taken = {content.reference for content in report.exported}
    for image in [image for image in chosen if image.reference in taken]:
        registry, repository = image.registry, image.repository
        subject = Digest.parse(image.digest)
        for tag, manifest in await held_referrers(engine.store, registry, repository, subject):
            entry = Image(registry, repository, tag, manifest.digest, manifest.media_type, None)
            if entry.reference in taken:
                continue
            taken.add(entry.reference)
            content = await _held_content(engine, entry)
            missing = [d for d in content.blobs if engine.content.present(Digest.parse(d)) is None]
            if missing or content.absent_children:
                what = f"blob {missing[0]}" if missing else content.absent_children[0]
                report.notes.append(f"{entry.reference}: {what} is not held, left out")
                continue
            report.exported.append(content)


class _Unusable(Exception):
    """Why an image cannot be imported: one line."""


async def _content(
    reference: str,
    top: Manifest,
    lookup: Callable[[str, str, int | None], Awaitable[Manifest | None]],
    blob_size: Callable[[str], int],
) -> ImageContent:
    """Everything an image needs, walked from its top manifest: the child manifests that
    ``lookup`` finds (the others are noted as absent) and every blob with its size."""

    async def find(child: Descriptor) -> Manifest | None:
        return await lookup(child.digest, child.media_type, child.size)

    walked = await closure(top, find)
    content = ImageContent(reference, top, walked.manifests)
    content.absent_children = [child.platform or child.digest for child in walked.absent]
    content.blobs = {
        digest: size if size is not None else blob_size(digest)
        for digest, size in walked.blobs.items()
    }
    return content


def _references(manifest: Manifest) -> References:
    try:
        return parse(manifest.body, manifest.media_type)
    except ManifestParseError:
        return References(manifest.media_type, (), ())


# skopeo (containers/image) finds an image in a layout only under an OCI type, and ignores
# entries of any other; Docker schema2 manifests and lists have the same structure as their
# OCI counterparts, so their entries carry the OCI type. The bytes, and so the digests, stay
# as they are, and import reads the type a manifest declares in itself.
_ENTRY_TYPE = {DOCKER_MANIFEST: OCI_MANIFEST, DOCKER_LIST: OCI_INDEX}


def _index_document(contents: Iterable[ImageContent]) -> bytes:
    entries = []
    for content in contents:
        media_type = content.top.media_type
        entries.append(
            {
                "mediaType": _ENTRY_TYPE.get(media_type, media_type),
                "digest": content.top.digest,
                "size": len(content.top.body),
                "annotations": {REF_NAME: content.reference, CONTAINERD_NAME: content.reference},
            }
        )
    document = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    return json.dumps(document, indent=2).encode() + b"\n"


def _write_bundle(
    engine: Engine,
    output: Path,
    index: bytes,
    content: tuple[dict[str, bytes], dict[str, int]],
    progress: Progress,
) -> str:
    manifests, blobs = content
    writer = TarWriter(output)
    try:
        writer.add_bytes(LAYOUT_FILE, LAYOUT_VERSION)
        writer.add_bytes(INDEX_FILE, index)
        writer.directory("blobs")
        for algorithm in sorted({d.partition(":")[0] for d in [*manifests, *blobs]}):
            writer.directory(f"blobs/{algorithm}")
        # Manifests first: a reader learns what the bundle holds without reading it all.
        for digest, body in manifests.items():
            writer.add_bytes(_member_name(digest), body)
            progress(len(body))
        for digest in blobs:
            parsed = Digest.parse(digest)
            size = engine.content.present(parsed)
            try:
                if size is None:
                    raise FileNotFoundError(digest)
                blob = engine.content.open(parsed)
            except FileNotFoundError:
                raise OSError(f"blob {digest} left the disk during the export") from None
            with blob:
                writer.add_file(_member_name(digest), blob, size, progress)
        digest = writer.close()
    except BaseException:
        writer.abort()
        raise
    output.with_name(output.name + ".sha256").write_text(f"{digest}  {output.name}\n")
    return digest


def _member_name(digest: str) -> str:
    algorithm, _, encoded = digest.partition(":")
    return f"blobs/{algorithm}/{encoded}"


def bundle_digests(path: Path) -> set[tuple[str, str]]:
    """What a site that imported the bundle holds, and for which repository: every
    (``registry/repository``, digest) its named images need, manifests and blobs. Read from
    its index and manifests only."""
    plan = _read_plan(path)
    held: set[tuple[str, str]] = set()
    for entry in plan.entries:
        try:
            repository = _repository(entry.name or "")
        except (ValueError, RegistryError):
            continue
        top = _planned(plan, entry.digest)
        if top is None:
            held.add((repository, entry.digest))
            continue
        walked = closure_of(top, lambda child: _planned(plan, child.digest))
        needed = [*walked.manifests, *walked.blobs, *(child.digest for child in walked.absent)]
        held.update((repository, digest) for digest in needed)
    return held


def _planned(plan: _Plan, digest: str) -> Manifest | None:
    body = plan.manifests.get(digest)
    return None if body is None else Manifest(body, _media_type(body, ""), digest)


def _repository(reference: str) -> str:
    name = _image_name(reference)
    return f"{name.registry}/{name.repository}"


# -- import ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """An image named in a layout's index.json."""

    name: str | None  # the reference the annotations give
    digest: str
    media_type: str
    size: int | None  # the manifest's size, as the index declares it


@dataclass(slots=True)
class _Plan:
    entries: list[Entry] = field(default_factory=list)
    manifests: dict[str, bytes] = field(default_factory=dict)  # verified manifest bodies
    corrupt: set[str] = field(default_factory=set)  # members whose bytes miss their name
    members: dict[str, int] = field(default_factory=dict)  # every blob member: its size
    kept: int = 0  # bytes of the manifest bodies kept


class ImportRefused(LayoutError):
    """The bundle as a whole is refused (a bound passed, no room): one line."""


@dataclass(slots=True)
class Imported:
    reference: str
    digest: str | None = None
    blobs: int = 0
    size: int = 0
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(slots=True)
class ImportReport:
    images: list[Imported] = field(default_factory=list)
    written: int = 0  # blobs copied in
    bytes: int = 0
    present: int = 0  # blobs needed and already held


def _read_plan(path: Path, bounds: Bounds = DEFAULT_BOUNDS) -> _Plan:
    """First pass: the index, and the manifests its images reach (every small member is
    hashed on the way). It ends as soon as it has them all: for a bundle this mirror wrote,
    whose manifests come first, that is at the first layer."""
    plan = _Plan()
    index: bytes | None = None
    wanted: set[str] = set()  # manifests reachable from the index, not yet found
    for member in members(path, bounds):
        if member.name == INDEX_FILE:
            index = read_all(member, MAX_MANIFEST_SIZE)
            if index is None:
                raise LayoutError(f"{path}: index.json is larger than 4 MiB")
            plan.entries = _entries(index, path)
            wanted = {e.digest for e in plan.entries} - set(plan.manifests)
            for body in list(plan.manifests.values()):
                wanted |= _children(body) - set(plan.manifests)
        else:
            _plan_member(plan, member, path, bounds)
            digest = str(member.digest)
            if digest in plan.manifests:
                wanted.discard(digest)
                wanted |= _children(plan.manifests[digest]) - set(plan.manifests)
        if index is not None and not wanted:
            break
    if index is None:
        raise LayoutError(f"{path}: no index.json: not an OCI image layout")
    return plan


def _plan_member(plan: _Plan, member: Member, path: Path, bounds: Bounds) -> None:
    digest = member.digest
    if digest is None:
        return
    plan.members[str(digest)] = member.size
    body = read_all(member, MAX_MANIFEST_SIZE)
    if body is None:
        return
    if Digest.of(body, digest.algorithm) != digest:
        plan.corrupt.add(str(digest))
    elif str(digest) not in plan.manifests and _looks_like_manifest(body):
        plan.kept += len(body)
        if plan.kept > bounds.manifest_bytes:
            raise ImportRefused(
                f"{path}: manifests of more than {human_size(bounds.manifest_bytes)} in all:"
                " not a bundle this mirror reads"
            )
        plan.manifests[str(digest)] = body


def _children(body: bytes) -> set[str]:
    refs = _references(Manifest(body, _media_type(body, ""), ""))
    return {child.digest for child in refs.children}


def _entries(index: bytes, path: Path) -> list[Entry]:
    try:
        document = json.loads(index)
        descriptors = document["manifests"]
        if not isinstance(descriptors, list):
            raise TypeError("manifests is not a list")
        entries = [_entry(item) for item in descriptors]
    except (ValueError, KeyError, TypeError, AttributeError, RegistryError) as exc:
        raise LayoutError(f"{path}: index.json is not an image index: {exc}") from None
    except RecursionError:
        raise LayoutError(f"{path}: index.json is not an image index: nested too deep") from None
    return entries


def _entry(item: dict[str, Any]) -> Entry:
    annotations = item.get("annotations") or {}
    name = annotations.get(CONTAINERD_NAME) or annotations.get(REF_NAME)
    if name is not None and not isinstance(name, str):
        raise TypeError("an image name is not a string")
    media_type, size = item.get("mediaType", ""), item.get("size")
    if not isinstance(media_type, str):
        raise TypeError("a mediaType is not a string")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool)):
        raise TypeError("a size is not a number")
    return Entry(name, str(Digest.parse(item["digest"])), media_type, size)


def _looks_like_manifest(body: bytes) -> bool:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return False
    return isinstance(document, dict) and "schemaVersion" in document


def _media_type(body: bytes, fallback: str) -> str:
    """A manifest's type: the one it declares, else the descriptor's, else by its shape."""
    try:
        declared = json.loads(body).get("mediaType")
    except (ValueError, AttributeError, RecursionError):
        declared = None
    if isinstance(declared, str) and declared in KNOWN_MANIFEST_TYPES:
        return declared
    if fallback in KNOWN_MANIFEST_TYPES:
        return fallback
    return OCI_INDEX if b'"manifests"' in body else OCI_MANIFEST


@dataclass(slots=True)
class _Candidate:
    result: Imported
    name: ImageName | None = None
    content: ImageContent | None = None
    unproven: set[str] = field(default_factory=set)  # held, not for this repository


@dataclass(slots=True)
class _Walk:
    """What one import has looked up, shared by its images: a manifest is fetched and an
    image walked once, however many index entries name it; and the lookups, all together,
    have a bound (an index may name tens of thousands of children)."""

    engine: Engine
    plan: _Plan
    path: Path
    bounds: Bounds
    manifests: dict[tuple[str, str, str], Manifest | None] = field(default_factory=dict)
    images: dict[tuple[str, str, str], ImageContent] = field(default_factory=dict)

    async def manifest(self, name: ImageName, digest: str, media_type: str) -> Manifest | None:
        """A manifest from the bundle, or one the mirror already holds for ``name``."""
        key = (name.registry, name.repository, digest)
        if key not in self.manifests:
            if len(self.manifests) >= self.bounds.manifests:
                raise ImportRefused(
                    f"{self.path}: its images reach more than {self.bounds.manifests}"
                    " manifests: not a bundle this mirror reads"
                )
            self.manifests[key] = await _manifest(
                self.engine, self.plan, name, digest, media_type
            )
        return self.manifests[key]


async def import_layout(
    engine: Engine,
    path: Path,
    *,
    pin: bool = True,
    repository: str | None = None,
    trust_held_blobs: bool = False,
    bounds: Bounds = DEFAULT_BOUNDS,
    total: Callable[[int], None] = lambda size: None,
    progress: Progress = lambda size: None,
) -> ImportReport:
    """Import every image of the layout at ``path``; ``repository`` names the images whose
    entry gives a tag alone (see ``repository_for_tags``)."""
    plan = await asyncio.to_thread(_read_plan, path, bounds)
    report = ImportReport()
    walk = _Walk(engine, plan, path, bounds)
    candidates = [await _candidate(walk, entry, repository) for entry in plan.entries]
    needed: dict[str, int] = {}
    for candidate in candidates:
        if candidate.content is not None:
            needed.update(candidate.content.blobs)
    wanted = {
        d: s for d, s in needed.items() if engine.content.present(Digest.parse(d)) is None
    }
    report.present = len(needed) - len(wanted)
    verify = await _held_elsewhere(engine, candidates, trust_held_blobs)
    await _room(engine, path, plan, needed, wanted, pin=pin)
    total(sum(plan.members.get(d, needed[d]) for d in (*wanted, *verify)))
    failed: dict[str, str] = dict.fromkeys(plan.corrupt, "corrupt in the bundle")
    if wanted or verify:
        loop = asyncio.get_running_loop()
        written, bad = await asyncio.to_thread(
            _copy_blobs,
            engine,
            path,
            (wanted, verify),
            progress=progress,
            bounds=bounds,
            loop=loop,
        )
        report.written, report.bytes = len(written), sum(written.values())
        failed.update(bad)
    report.images = await _commit_usable(engine, candidates, failed, pin=pin)
    if report.written:  # the budget is kept now, not at the evictor's next interval
        await engine.evictor.make_room()
    return report


async def _commit_usable(
    engine: Engine, candidates: list[_Candidate], failed: dict[str, str], *, pin: bool
) -> list[Imported]:
    """Commit (and pin) the images whose blobs are all there, of the sizes declared."""
    now = engine.clock.time()
    for candidate in candidates:
        if candidate.content is None or candidate.name is None:
            continue
        content = candidate.content
        error = _blobs_unusable(engine, content, failed, candidate.unproven)
        if error is not None:
            candidate.result.error = error
            continue
        await _commit(engine, candidate.name, content, now)
        await _keep_referrers(engine, candidate.name, content.top)
        if pin:
            await engine.store.add_pins([content.reference])
        candidate.result.blobs = len(content.blobs)
        candidate.result.size = image_size(content.blobs)
        if candidate.name.registry not in engine.upstreams:
            candidate.result.notes.append(
                f"{candidate.name.registry} is not an upstream here: serve needs"
                f" --upstream {candidate.name.registry}=URL to offer it"
            )
    return [candidate.result for candidate in candidates]


def _blobs_unusable(
    engine: Engine, content: ImageContent, failed: dict[str, str], unproven: set[str]
) -> str | None:
    """Why an image cannot be committed: a blob missing, held for other repositories only
    and not carried, or not of the size declared."""
    for digest, declared in content.blobs.items():
        size = engine.content.present(Digest.parse(digest))
        if size is None:
            why = failed.get(digest, "not in the bundle and not held by the mirror")
            return f"blob {digest}: {why}"
        if digest in unproven and digest in failed:
            return f"blob {digest}: {failed[digest]}"
        if size != declared:
            return f"blob {digest}: {declared} bytes declared, {size} held"
    return None


async def _held_elsewhere(
    engine: Engine, candidates: list[_Candidate], trusted: bool
) -> set[str]:
    """Blobs the mirror holds, but not for the repository an image names (noted on the
    image). An image may have them only when the bundle carries their bytes: they are read
    and hashed. Naming a digest must not read another repository's layer."""
    if trusted:
        return set()
    holders: dict[str, set[tuple[str, str]]] = {}
    for candidate in candidates:
        content, name = candidate.content, candidate.name
        if content is None or name is None:
            continue
        for digest in content.blobs:
            if engine.content.present(Digest.parse(digest)) is None:
                continue  # not held: the bundle carries it, or the image fails
            if digest not in holders:
                holders[digest] = await engine.store.graph.holders(digest)
            if (name.registry, name.repository) not in holders[digest]:
                candidate.unproven.add(digest)
    return {d for c in candidates for d in c.unproven}


async def _room(
    engine: Engine,
    path: Path,
    plan: _Plan,
    needed: dict[str, int],
    wanted: dict[str, int],
    *,
    pin: bool,
) -> None:
    """Refuse an import that cannot fit: on the disk above ``min_free_space``, or, pinned,
    in ``max_cache_size`` beside what pins keep already (eviction could free none of it)."""
    settings = engine.settings
    # The first pass may have stopped before the layers: their sizes are those declared,
    # which the copy holds the bytes to.
    writing = sum(plan.members.get(d, s) for d, s in wanted.items())
    disk = await asyncio.to_thread(shutil.disk_usage, settings.data_dir)
    room = disk.free - settings.min_free_space.of(disk.total)
    if writing > 0 and writing > room:
        raise ImportRefused(
            f"{path}: {human_size(writing)} to write, {human_size(max(room, 0))} free on"
            " the data dir above min_free_space"
        )
    if not pin or settings.max_cache_size is None:
        return
    pinned = await engine.evictor.pinned()
    present = engine.content.present
    held = {d: s for d, s in pinned.items() if present(Digest.parse(d)) is not None}
    sizes = {d: present(Digest.parse(d)) or plan.members.get(d, s) for d, s in needed.items()}
    added = sum(s for d, s in sizes.items() if d not in held)
    after = sum(held.values()) + added
    # Pins over the budget already (the log says so) do not stop an import that adds none.
    if added > 0 and after > settings.max_cache_size:
        raise ImportRefused(
            f"{path}: pinned images would take {human_size(after)}, more than max_cache_size"
            f" ({human_size(settings.max_cache_size)}); import with --no-pin, or unpin some"
        )


async def _candidate(walk: _Walk, entry: Entry, repository: str | None) -> _Candidate:
    """An index entry checked as far as manifests go: its name and what it needs."""
    candidate = _Candidate(Imported(_shown(entry.name or entry.digest), entry.digest))
    if entry.name is None:
        candidate.result.error = (
            f"no image name: annotate the index entry with {REF_NAME} or {CONTAINERD_NAME}"
        )
        return candidate
    text = entry.name
    if _tag_alone(text):
        if repository is None:
            shown = _shown(text)
            candidate.result.error = (
                f"the index names it by the tag alone: say whose tag it is with"
                f" mirror import --repository NAME (the image is then NAME:{shown}),"
                f" or name it REPOSITORY:{shown} when writing the layout"
            )
            return candidate
        text = f"{repository}:{text}"
    try:
        name = _image_name(text)
    except (ValueError, RegistryError) as exc:
        why = exc.message if isinstance(exc, RegistryError) else "malformed"
        candidate.result.error = f"not an image reference: {why}"
        return candidate
    reference = str(name) if name.digest is None else str(
        ImageName(name.registry, name.repository, None, entry.digest)
    )
    candidate.result.reference = reference
    key = (name.registry, name.repository, entry.digest)
    try:
        content = walk.images.get(key)
        if content is None:
            content = await _walk_image(walk, name, entry)
            walk.images[key] = content
    except _Unusable as exc:
        candidate.result.error = str(exc)
        return candidate
    if content.absent_children:
        candidate.result.notes.append(
            "not in the bundle, not imported: " + _some(content.absent_children)
        )
    candidate.name = name
    candidate.content = dataclasses.replace(content, reference=reference)
    return candidate


async def _walk_image(walk: _Walk, name: ImageName, entry: Entry) -> ImageContent:
    async def find(digest: str, media_type: str, size: int | None) -> Manifest | None:
        found = await walk.manifest(name, digest, media_type)
        if found is None and digest in walk.plan.corrupt:
            raise _Unusable(f"manifest {digest}: corrupt in the bundle")
        if found is not None and size is not None and size != len(found.body):
            raise _Unusable(
                f"manifest {digest}: {size} bytes declared, {len(found.body)} held"
            )
        return found

    top = await find(entry.digest, entry.media_type, entry.size)
    if top is None:
        raise _Unusable(f"manifest {entry.digest}: not in the bundle and not held by the mirror")

    def size(digest: str) -> int:
        held = walk.engine.content.present(Digest.parse(digest))
        return walk.plan.members.get(digest, held or 0)

    return await _content(str(name), top, find, size)


def _some(items: list[str], shown: int = 5) -> str:
    """A list in one line of bounded length: the first few, and how many more."""
    text = ", ".join(_shown(item) for item in items[:shown])
    return text + (f" and {len(items) - shown} more" if len(items) > shown else "")


def _shown(text: str) -> str:
    """A name from a bundle, safe to print: as is when it is plain, else quoted with control
    characters and markup escaped, and cut short."""
    if len(text) <= 300 and _PLAIN.fullmatch(text):
        return text
    quoted = json.dumps(text[:100]) + ("..." if len(text) > 100 else "")
    return quoted.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


_PLAIN = re.compile(r"[A-Za-z0-9._:/@+-]+")


async def _manifest(
    engine: Engine, plan: _Plan, name: ImageName, digest: str, media_type: str
) -> Manifest | None:
    """A manifest from the bundle, or one the mirror already holds."""
    body = plan.manifests.get(digest)
    if body is not None:
        return Manifest(body, _media_type(body, media_type), digest)
    return await engine.store.get_manifest(name.registry, name.repository, digest)


async def _keep_referrers(engine: Engine, name: ImageName, top: Manifest) -> None:
    """A fallback tag ``sha256-<hex>`` imported: the referrers answer for that digest."""
    subject = None if name.tag is None else subject_of_fallback_tag(name.tag)
    if subject is None:
        return
    try:
        body = index_of(descriptors_of(top.body))
    except ValueError:
        return  # not an index: not a referrers list
    answer = Manifest(body, OCI_INDEX, str(Digest.of(body)))
    await Referrers(engine.resolver).remember(name.registry, name.repository, subject, answer)


def _tag_alone(name: str) -> bool:
    """Whether a ref name is just a tag, as OCI layouts name images (``skopeo copy …
    oci-archive:FILE:1.27``): one component, no registry, repository or digest."""
    return not any(mark in name for mark in "/:@")


def repository_for_tags(text: str) -> str:
    """The ``--repository`` of import, checked: a repository, with no tag or digest."""
    try:
        name = split_image(text)
        usable = name.tag is None and name.digest is None and "*" not in text
        if usable:
            _image_name(f"{text}:latest")
    except (ValueError, RegistryError):
        usable = False
    if not usable:
        raise ValueError(
            f"--repository {text}: expected a repository such as nginx or ghcr.io/acme/tool,"
            " without a tag or digest"
        )
    return text


def _image_name(text: str) -> ImageName:
    """A reference from a bundle, validated as a pull validates one."""
    if text != text.strip():
        raise ValueError("white space around the name")
    name = split_image(text)
    repository = normalize_name(name.repository, name.registry)
    validate_registry(name.registry, repository)
    tag = name.tag
    if name.digest is not None:
        Reference.parse(name.digest)
        tag = None
    elif tag is None:
        tag = "latest"
    if tag is not None:
        validate_tag(tag)
    return ImageName(name.registry, repository, tag, name.digest)


def _copy_blobs(
    engine: Engine,
    path: Path,
    blobs: tuple[dict[str, int], set[str]],
    *,
    progress: Progress,
    bounds: Bounds,
    loop: asyncio.AbstractEventLoop,
) -> tuple[dict[str, int], dict[str, str]]:
    """Second pass: the wanted blobs copied in, verified, each under the blob's writer
    lease as a fill writes it (``loop`` runs the lease calls), and the blobs to verify only
    hashed; (written, failed with why)."""

    def run(call: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(call, loop).result()

    wanted, verify = blobs
    written: dict[str, int] = {}
    failed: dict[str, str] = {}
    left = set(wanted) | verify
    for member in members(path, bounds):
        if not left:
            break  # everything wanted is done: the rest of the file is not read
        digest = member.digest
        if digest is None or str(digest) not in left:
            continue
        left.discard(str(digest))
        if str(digest) in verify:
            if not hash_matches(member, digest, progress):
                failed[str(digest)] = "corrupt in the bundle (its bytes do not match it)"
            continue
        if engine.content.present(digest) is not None:
            continue  # another writer (a fill, a parallel import) brought it meanwhile
        expected = wanted[str(digest)]
        if expected and member.size != expected:
            failed[str(digest)] = f"{member.size} bytes in the bundle, {expected} expected"
            continue
        landed = _land(engine, member, digest, progress, run)
        if landed:
            written[str(digest)] = member.size
        elif landed is not None:
            failed[str(digest)] = "corrupt in the bundle (its bytes do not match it)"
    for lost in left & verify:
        failed[lost] = (
            "not in the bundle, and held only for other repositories"
            " (--trust-held-blobs lets an import use it)"
        )
    return written, failed


def _land(
    engine: Engine,
    member: Member,
    digest: Digest,
    progress: Progress,
    run: Callable[[Coroutine[Any, Any, Any]], Any],
) -> bool | None:
    """One blob copied in under its writer lease: whether it matched its digest, or None
    when a fill brought it while the lease was awaited."""
    lease = run(writer_lease(engine.coordinator, engine.content, digest))
    if lease is None:
        return None
    try:
        partial = engine.content.new_partial(digest)
        run(lease.publish({"partial": partial.name, "size": member.size}))
        try:
            if not copy_verified(member, digest, partial.fd, progress):
                partial.discard()
                return False
            partial.written = member.size
            if not run(engine.content.land(partial, digest)):
                raise OSError(f"object storage did not take blob {digest}")
            return True
        except BaseException:
            partial.discard()
            raise
    finally:
        run(lease.release())


async def _commit(engine: Engine, name: ImageName, content: ImageContent, now: float) -> None:
    """Make an image whose blobs are all on disk known: manifests, tag, graph."""
    store, graph = engine.store, engine.store.graph
    for digest in content.blobs:
        size = engine.content.present(Digest.parse(digest))
        if size is not None:
            await engine.content.landed(Digest.parse(digest), size, now)
    for manifest in content.manifests.values():
        await store.put_manifest(name.registry, name.repository, manifest)
        await graph.add_manifest(
            name.registry, name.repository, manifest.digest, _references(manifest)
        )
    if name.tag is not None:
        record = TagRecord(content.top.digest, content.top.media_type, now)
        await store.put_tag(name.registry, name.repository, name.tag, record)
