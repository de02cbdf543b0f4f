"""Bundles for air-gapped sites: ``mirror export`` and ``mirror import``.

A bundle is an OCI image layout in a tar (``mirror.layout``), so other tools read it too
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
  them) and cosign's ``.sig``/``.att``/``.sbom`` tags (``mirror.referrers``). Import keeps a
  fallback tag as the referrers answer of its digest, for an offline mirror to serve.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mirror.engine import Engine
from mirror.errors import RegistryError
from mirror.inventory import Image, image_size, images
from mirror.layout import (
    CONTAINERD_NAME,
    INDEX_FILE,
    LAYOUT_FILE,
    LAYOUT_VERSION,
    REF_NAME,
    LayoutError,
    Member,
    TarWriter,
    copy_verified,
    members,
    read_all,
)
from mirror.manifests import ManifestParseError, References, parse
from mirror.mediatypes import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    KNOWN_MANIFEST_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
)
from mirror.pins import ImageName, Pin, split_image
from mirror.reference import Digest, Reference, normalize_name
from mirror.referrers import (
    Referrers,
    descriptors_of,
    held_referrers,
    index_of,
    is_referrers_tag,
    subject_of_fallback_tag,
)
from mirror.store.protocols import Manifest, TagRecord
from mirror.upstream.client import MAX_MANIFEST_SIZE

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
        missing = [d for d in content.blobs if engine.blobs.size(Digest.parse(d)) is None]
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
    for content in report.exported:
        manifests.update({d: m.body for d, m in content.manifests.items()})
        blobs.update({d: s for d, s in content.blobs.items() if d not in held})
    report.held_before = len({d for c in report.exported for d in c.blobs} & held)
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

    async def held(digest: str, media_type: str) -> Manifest | None:
        return await engine.store.get_manifest(image.registry, image.repository, digest)

    def size(digest: str) -> int:
        return engine.blobs.size(Digest.parse(digest)) or 0

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
            missing = [d for d in content.blobs if engine.blobs.size(Digest.parse(d)) is None]
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
    lookup: Callable[[str, str], Awaitable[Manifest | None]],
    blob_size: Callable[[str], int],
) -> ImageContent:
    """Everything an image needs, walked from its top manifest: the child manifests that
    ``lookup`` finds (the others are noted as absent) and every blob with its size."""
    content = ImageContent(reference, top)
    pending = [top]
    while pending:
        manifest = pending.pop()
        content.manifests[manifest.digest] = manifest
        refs = _references(manifest)
        for child in refs.children:
            found = await lookup(child.digest, child.media_type)
            if found is None:
                content.absent_children.append(child.platform or child.digest)
            elif found.digest not in content.manifests:
                pending.append(found)
        for blob in refs.blobs:
            content.blobs[blob.digest] = blob.size if blob.size is not None else blob_size(
                blob.digest
            )
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
            size = engine.blobs.size(parsed)
            if size is None:
                raise OSError(f"blob {digest} left the disk during the export")
            writer.add_file(_member_name(digest), engine.blobs.path(parsed), size, progress)
        digest = writer.close()
    except BaseException:
        writer.abort()
        raise
    output.with_name(output.name + ".sha256").write_text(f"{digest}  {output.name}\n")
    return digest


def _member_name(digest: str) -> str:
    algorithm, _, encoded = digest.partition(":")
    return f"blobs/{algorithm}/{encoded}"


def bundle_digests(path: Path) -> set[str]:
    """Every digest the images of a bundle need (manifests and blobs): what a site that
    imported it holds. Read from its index and manifests only."""
    plan = _read_plan(path)
    held: set[str] = set()
    for entry in plan.entries:
        pending = [entry.digest]
        while pending:
            digest = pending.pop()
            held.add(digest)
            body = plan.manifests.get(digest)
            if body is None:
                continue
            refs = _references(Manifest(body, _media_type(body, ""), digest))
            pending += [c.digest for c in refs.children if c.digest not in held]
            held.update(b.digest for b in refs.blobs)
    return held


# -- import ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """An image named in a layout's index.json."""

    name: str | None  # the reference the annotations give
    digest: str
    media_type: str


@dataclass(slots=True)
class _Plan:
    entries: list[Entry] = field(default_factory=list)
    manifests: dict[str, bytes] = field(default_factory=dict)  # verified manifest bodies
    corrupt: set[str] = field(default_factory=set)  # members whose bytes miss their name
    members: dict[str, int] = field(default_factory=dict)  # every blob member: its size


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


def _read_plan(path: Path) -> _Plan:
    """First pass: the index, and the manifests its images reach (every small member is
    hashed on the way). It ends as soon as it has them all: for a bundle this mirror wrote,
    whose manifests come first, that is at the first layer."""
    plan = _Plan()
    index: bytes | None = None
    wanted: set[str] = set()  # manifests reachable from the index, not yet found
    for member in members(path):
        if member.name == INDEX_FILE:
            index = read_all(member, MAX_MANIFEST_SIZE)
            if index is None:
                raise LayoutError(f"{path}: index.json is larger than 4 MiB")
            plan.entries = _entries(index, path)
            wanted = {e.digest for e in plan.entries} - set(plan.manifests)
            for body in list(plan.manifests.values()):
                wanted |= _children(body) - set(plan.manifests)
        else:
            _plan_member(plan, member)
            digest = str(member.digest)
            if digest in plan.manifests:
                wanted.discard(digest)
                wanted |= _children(plan.manifests[digest]) - set(plan.manifests)
        if index is not None and not wanted:
            break
    if index is None:
        raise LayoutError(f"{path}: no index.json: not an OCI image layout")
    return plan


def _plan_member(plan: _Plan, member: Member) -> None:
    digest = member.digest
    if digest is None:
        return
    plan.members[str(digest)] = member.size
    body = read_all(member, MAX_MANIFEST_SIZE)
    if body is None:
        return
    if Digest.of(body, digest.algorithm) != digest:
        plan.corrupt.add(str(digest))
    elif _looks_like_manifest(body):
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
        entries = []
        for item in descriptors:
            annotations = item.get("annotations") or {}
            name = annotations.get(CONTAINERD_NAME) or annotations.get(REF_NAME)
            digest = str(Digest.parse(item["digest"]))
            entries.append(Entry(name, digest, item.get("mediaType", "")))
    except (ValueError, KeyError, TypeError, AttributeError, RegistryError) as exc:
        raise LayoutError(f"{path}: index.json is not an image index: {exc}") from None
    return entries


def _looks_like_manifest(body: bytes) -> bool:
    try:
        document = json.loads(body)
    except ValueError:
        return False
    return isinstance(document, dict) and "schemaVersion" in document


def _media_type(body: bytes, fallback: str) -> str:
    """A manifest's type: the one it declares, else the descriptor's, else by its shape."""
    try:
        declared = json.loads(body).get("mediaType")
    except (ValueError, AttributeError):
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


async def import_layout(
    engine: Engine,
    path: Path,
    *,
    pin: bool = True,
    repository: str | None = None,
    total: Callable[[int], None] = lambda size: None,
    progress: Progress = lambda size: None,
) -> ImportReport:
    """Import every image of the layout at ``path``; ``repository`` names the images whose
    entry gives a tag alone (see ``repository_for_tags``)."""
    plan = await asyncio.to_thread(_read_plan, path)
    report = ImportReport()
    candidates = [await _candidate(engine, plan, entry, repository) for entry in plan.entries]
    needed: dict[str, int] = {}
    for candidate in candidates:
        if candidate.content is not None:
            needed.update(candidate.content.blobs)
    wanted = {
        d: s for d, s in needed.items() if engine.blobs.size(Digest.parse(d)) is None
    }
    report.present = len(needed) - len(wanted)
    total(sum(plan.members.get(d, 0) for d in wanted))
    failed: dict[str, str] = dict.fromkeys(plan.corrupt, "corrupt in the bundle")
    if wanted:
        written, bad = await asyncio.to_thread(_copy_blobs, engine, path, wanted, progress)
        report.written, report.bytes = len(written), sum(written.values())
        failed.update(bad)
    now = time.time()
    for candidate in candidates:
        report.images.append(candidate.result)
        if candidate.content is None or candidate.name is None:
            continue
        content = candidate.content
        missing = [d for d in content.blobs if engine.blobs.size(Digest.parse(d)) is None]
        if missing:
            why = failed.get(missing[0], "not in the bundle and not held by the mirror")
            candidate.result.error = f"blob {missing[0]}: {why}"
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
    return report


async def _candidate(
    engine: Engine, plan: _Plan, entry: Entry, repository: str | None
) -> _Candidate:
    """An index entry checked as far as manifests go: its name and what it needs."""
    candidate = _Candidate(Imported(entry.name or entry.digest, entry.digest))
    if entry.name is None:
        candidate.result.error = (
            f"no image name: annotate the index entry with {REF_NAME} or {CONTAINERD_NAME}"
        )
        return candidate
    text = entry.name
    if _tag_alone(text):
        if repository is None:
            candidate.result.error = (
                f"the index names it by the tag alone: say whose tag it is with"
                f" mirror import --repository NAME (the image is then NAME:{text}),"
                f" or name it REPOSITORY:{text} when writing the layout"
            )
            return candidate
        text = f"{repository}:{text}"
    try:
        name = _image_name(text)
    except (ValueError, RegistryError) as exc:
        candidate.result.error = f"not an image reference: {getattr(exc, 'message', exc)}"
        return candidate
    reference = str(name) if name.digest is None else str(
        ImageName(name.registry, name.repository, None, entry.digest)
    )
    candidate.result.reference = reference

    async def find(digest: str, media_type: str) -> Manifest | None:
        found = await _manifest(engine, plan, name, digest, media_type)
        if found is None and digest in plan.corrupt:
            raise _Unusable(f"manifest {digest}: corrupt in the bundle")
        return found

    try:
        top = await find(entry.digest, entry.media_type)
        if top is None:
            raise _Unusable(
                f"manifest {entry.digest}: not in the bundle and not held by the mirror"
            )
        content = await _content(
            reference, top, find, lambda digest: plan.members.get(digest, 0)
        )
    except _Unusable as exc:
        candidate.result.error = str(exc)
        return candidate
    if content.absent_children:
        candidate.result.notes.append(
            "not in the bundle, not imported: " + ", ".join(content.absent_children)
        )
    candidate.name, candidate.content = name, content
    return candidate


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
    name = split_image(text)
    repository = normalize_name(name.repository, name.registry)
    tag = name.tag
    if name.digest is not None:
        Reference.parse(name.digest)
        tag = None
    elif tag is None:
        tag = "latest"
    if tag is not None:
        Reference.parse(tag)
    return ImageName(name.registry, repository, tag, name.digest)


def _copy_blobs(
    engine: Engine, path: Path, wanted: dict[str, int], progress: Progress
) -> tuple[dict[str, int], dict[str, str]]:
    """Second pass: the wanted blobs copied in, verified; (written, failed with why)."""
    written: dict[str, int] = {}
    failed: dict[str, str] = {}
    for member in members(path):
        if len(written) + len(failed) == len(wanted):
            break  # everything wanted is done: the rest of the file is not read
        digest = member.digest
        if digest is None or str(digest) not in wanted or str(digest) in written:
            continue
        if engine.blobs.size(digest) is not None:
            continue  # another writer (a fill, a parallel import) brought it meanwhile
        expected = wanted[str(digest)]
        if expected and member.size != expected:
            failed[str(digest)] = f"{member.size} bytes in the bundle, {expected} expected"
            continue
        partial = engine.blobs.new_partial(digest)
        try:
            if copy_verified(member, digest, partial.fd, progress):
                partial.written = member.size
                partial.commit()
                written[str(digest)] = member.size
            else:
                partial.discard()
                failed[str(digest)] = "corrupt in the bundle (its bytes do not match it)"
        except BaseException:
            partial.discard()
            raise
    return written, failed


async def _commit(engine: Engine, name: ImageName, content: ImageContent, now: float) -> None:
    """Make an image whose blobs are all on disk known: manifests, tag, graph."""
    store, graph = engine.store, engine.store.graph
    for digest in content.blobs:
        size = engine.blobs.size(Digest.parse(digest))
        if size is not None:
            await graph.blob_stored(digest, size, now)
    for manifest in content.manifests.values():
        await store.put_manifest(name.registry, name.repository, manifest)
        await graph.add_manifest(
            name.registry, name.repository, manifest.digest, _references(manifest)
        )
    if name.tag is not None:
        record = TagRecord(content.top.digest, content.top.media_type, now)
        await store.put_tag(name.registry, name.repository, name.tag, record)
