"""The optional signature policy (``signatures:``): in the repositories it covers, a manifest
is served only when a cosign signature made with one of the trusted keys names its digest.

- Signatures are looked for where cosign puts them: the ``sha256-<hex>.sig`` tag, and the
  referrers of artifactType ``application/vnd.dev.cosign.artifact.sig.v1+json``; both pull
  through the resolver like any manifest and blob, so offline the imported ones are read.
- The verdict is kept per digest: "signed" for as long as memory holds it, "not signed" for
  ``tag_ttl`` seconds (a signature may be pushed after the image).
- The platform images of a signed index pass with it (``cosign sign`` signs the digest a tag
  names, the index, unless told ``--recursive``).
- Manifests with no layer a runtime would unpack (signatures, attestations, SBOMs) are
  served unchecked: a verifier must be able to read them, and they run nothing.
- An upstream that cannot be asked fails the pull (503, 429), never lets it through unchecked.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import structlog
from cachetools import LRUCache

from mirror.domain.cosign import (
    COSIGN_SIG_TYPE,
    MAX_PAYLOAD,
    load_public_key,
    payload_names,
    signatures_in,
    signed_by,
)
from mirror.domain.errors import (
    Denied,
    DigestInvalid,
    ManifestUnknown,
    NotFound,
    Offline,
    UpstreamError,
)
from mirror.domain.manifests import Manifest, ManifestParseError, parse
from mirror.domain.mediatypes import DOCKER_MANIFEST, OCI_MANIFEST
from mirror.domain.pins import Pin
from mirror.domain.reference import Digest, Reference
from mirror.services.fills import FillState
from mirror.services.referrers import Referrers, descriptors_of, fallback_tag
from mirror.services.resolver import CachedBlob, Resolver
from mirror.services.singleflight import SingleFlight

log = structlog.get_logger(__name__)

VERDICTS = 65536
# Signature manifests read per image, and signatures per manifest (cosign adds a layer per
# signing): more than any real image carries, and a bound on what a hostile one costs.
MAX_SIGNATURE_MANIFESTS = 16
MAX_SIGNATURES = 64
SIGNATURE_ACCEPT = (OCI_MANIFEST, DOCKER_MANIFEST)
# Layer media types a container runtime unpacks into a root file system.
_RUNNABLE = re.compile(r"image\.(layer|rootfs)|^$")


@dataclass(frozen=True, slots=True)
class Verdict:
    signed: bool
    reason: str
    at: float


class SignaturePolicy:
    def __init__(
        self,
        key_files: Sequence[Path],
        repositories: Sequence[Pin],
        resolver: Resolver,
        referrers: Referrers,
        *,
        recheck: float,
    ) -> None:
        self._keys = [load_public_key(path) for path in key_files]
        self._repositories = tuple(repositories)
        self._resolver = resolver
        self._referrers = referrers
        self._recheck = recheck
        self._verdicts: LRUCache[tuple[str, str, str], Verdict] = LRUCache(VERDICTS)
        self._flights: SingleFlight[Verdict] = SingleFlight()

    def covers(self, registry: str, repository: str) -> bool:
        return any(pin.matches(registry, repository, None) for pin in self._repositories)

    async def check(
        self, registry: str, repository: str, manifest: Manifest, tag: str | None = None
    ) -> None:
        """Return when ``manifest`` (pulled as ``tag``, if by tag) may be served; raise
        ``Denied`` saying why not."""
        if not self.covers(registry, repository) or _exempt(manifest):
            return
        if tag is not None:
            # An old client pulling a signed index's tag is given its linux/amd64 image:
            # judge the index first, which passes its images.
            record = await self._resolver.store.get_tag(registry, repository, tag)
            if record is not None and record.digest != manifest.digest:
                top = await self._resolver.store.get_manifest(registry, repository, record.digest)
                if top is not None:
                    await self._verdict(registry, repository, top)
        verdict = await self._verdict(registry, repository, manifest)
        if not verdict.signed:
            raise Denied(
                f"the signature policy refuses this image: {verdict.reason}",
                detail={"repository": f"{registry}/{repository}", "digest": manifest.digest},
            )

    async def _verdict(self, registry: str, repository: str, manifest: Manifest) -> Verdict:
        key = (registry, repository, manifest.digest)
        verdict = self._verdicts.get(key)
        if verdict is None or (not verdict.signed and self._expired(verdict)):
            verdict, _ = await self._flights.run(
                key, lambda: self._judge(registry, repository, manifest)
            )
        return verdict

    def _expired(self, verdict: Verdict) -> bool:
        return self._resolver.now() - verdict.at >= self._recheck

    async def _judge(self, registry: str, repository: str, manifest: Manifest) -> Verdict:
        digest = Digest.parse(manifest.digest)
        candidates = await self._signature_manifests(registry, repository, digest)
        verdict = await self._verify(registry, repository, digest, candidates)
        self._verdicts[(registry, repository, manifest.digest)] = verdict
        log.info(
            "signature_verdict",
            repository=repository,
            digest=manifest.digest,
            signed=verdict.signed,
            reason=verdict.reason,
        )
        if verdict.signed:
            self._pass_children(registry, repository, manifest, verdict)
        return verdict

    async def _verify(
        self, registry: str, repository: str, digest: Digest, candidates: list[Manifest]
    ) -> Verdict:
        now = self._resolver.now()
        if not candidates:
            return Verdict(False, f"no cosign signature found for {digest}", now)
        for candidate in candidates:
            for signature in signatures_in(candidate.body)[:MAX_SIGNATURES]:
                payload = await self._payload(registry, repository, signature.payload_digest)
                if payload is None or not payload_names(payload, str(digest)):
                    continue
                trusted = signed_by(self._keys, signature.signature, payload)
                if trusted is not None:
                    return Verdict(True, f"signed with {trusted.path.name}", now)
        return Verdict(False, f"no signature of {digest} is made with a trusted key", now)

    def _pass_children(
        self, registry: str, repository: str, index: Manifest, verdict: Verdict
    ) -> None:
        try:
            refs = parse(index.body, index.media_type)
        except ManifestParseError:
            return
        for child in refs.children:
            reason = f"{verdict.reason}, in the signed index {index.digest}"
            self._verdicts[(registry, repository, child.digest)] = Verdict(True, reason, verdict.at)

    async def _signature_manifests(
        self, registry: str, repository: str, digest: Digest
    ) -> list[Manifest]:
        """The manifests that may hold signatures of ``digest``: its ``.sig`` tag and its
        cosign referrers."""
        found: list[Manifest] = []
        sig_tag = Reference(tag=f"{fallback_tag(digest)}.sig")
        held = await self._manifest(registry, repository, sig_tag)
        if held is not None:
            found.append(held)
        try:
            answer, _ = await self._referrers.answer(registry, repository, digest)
        except Offline:
            return found  # offline and never asked: only what is held
        for entry in descriptors_of(answer.body)[:MAX_SIGNATURE_MANIFESTS]:
            if entry.get("artifactType") != COSIGN_SIG_TYPE:
                continue
            try:
                reference = Reference(digest=Digest.parse(str(entry.get("digest"))))
            except DigestInvalid:
                continue
            held = await self._manifest(registry, repository, reference)
            if held is not None:
                found.append(held)
        return found

    async def _manifest(
        self, registry: str, repository: str, reference: Reference
    ) -> Manifest | None:
        try:
            manifest, _ = await self._resolver.manifest(
                registry, repository, reference, SIGNATURE_ACCEPT
            )
        except (ManifestUnknown, Offline):
            return None
        return manifest

    async def _payload(self, registry: str, repository: str, digest_text: str) -> bytes | None:
        """A signature's payload blob, pulled through the resolver like any blob."""
        try:
            digest = Digest.parse(digest_text)
        except DigestInvalid:
            return None
        for _ in range(3):
            try:
                source = await self._resolver.blob(registry, repository, digest)
            except (NotFound, Offline):
                return None  # a signature whose payload is gone proves nothing
            if isinstance(source, CachedBlob):
                if source.size > MAX_PAYLOAD:
                    return None
                data = source.data
                if data is None and source.open is not None:
                    data = await asyncio.to_thread(_read_all, source.open)
                return data if data is not None and Digest.of(data) == digest else None
            try:
                # Then read where it is stored (landing: verified, not in the bucket yet).
                while source.state is FillState.RUNNING or source.landing:
                    await source.changed()
                if source.state is FillState.FAILED:
                    raise source.error or UpstreamError(detail={"digest": digest_text})
            finally:
                source.detach()
        return None


def _exempt(manifest: Manifest) -> bool:
    """What a verifier reads is served unchecked: a manifest none of whose layers a runtime
    would unpack (signatures, attestations, SBOMs). An index never is: it names images."""
    try:
        document = json.loads(manifest.body)
    except ValueError:
        return False
    layers = document.get("layers") if isinstance(document, dict) else None
    if not isinstance(layers, list) or not layers:
        return False
    return not any(
        not isinstance(layer, dict) or _RUNNABLE.search(str(layer.get("mediaType", "")))
        for layer in layers
    )


def _read_all(open_blob: Callable[[], BinaryIO]) -> bytes:
    with open_blob() as file:
        return file.read()
