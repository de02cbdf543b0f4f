"""Pure parsing and validation of repository names, tags and digests.

Everything a file path or an upstream URL is built from passes through here first,
so nothing outside the grammar of the OCI distribution spec reaches the disk or the
network.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from mirror.domain.errors import DigestInvalid, ManifestUnknown, NameInvalid, TagInvalid

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST_RE = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
# The algorithms we can verify, with the length of their hex encoding.
_ALGORITHMS = {"sha256": 64, "sha512": 128}
_HEX_RE = re.compile(r"[a-f0-9]+")
# A registry as a reference names it: a DNS name or a bracketed IPv6 address, and a port.
_LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
_REGISTRY_RE = re.compile(rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9a-f:.]+\])(?::[0-9]{{1,5}})?")
# The spec bounds the whole name, registry host included; 255 is what registries enforce.
MAX_NAME_LENGTH = 255
DOCKER_HUB = "docker.io"


def normalize_name(raw: str, registry: str = DOCKER_HUB) -> str:
    """Check ``raw`` against the name grammar; Docker Hub's one-component names get ``library/``.

    The length is checked on the name as the upstream will see it: a name that only grows
    past the limit with ``library/`` would make the upstream fail, not answer.
    """
    if len(raw) > MAX_NAME_LENGTH or _NAME_RE.fullmatch(raw) is None:
        raise NameInvalid(detail={"name": raw[:300]})
    name = f"library/{raw}" if registry == DOCKER_HUB and "/" not in raw else raw
    if len(name) > MAX_NAME_LENGTH:
        raise NameInvalid("repository name too long", detail={"name": name[:300]})
    return name


def validate_registry(raw: str, repository: str) -> str:
    """Check a registry host (as ``split_image`` lowers it) and the whole name's length."""
    if _REGISTRY_RE.fullmatch(raw) is None or len(raw) > MAX_NAME_LENGTH:
        raise NameInvalid(f"invalid registry {raw[:100]!r}", detail={"registry": raw[:300]})
    if len(raw) + 1 + len(repository) > MAX_NAME_LENGTH:
        raise NameInvalid("name too long", detail={"name": f"{raw}/{repository}"[:300]})
    return raw


def validate_tag(raw: str) -> str:
    if _TAG_RE.fullmatch(raw) is None:
        raise TagInvalid(f"invalid tag {raw[:140]!r}", detail={"tag": raw[:300]})
    return raw


@dataclass(frozen=True, slots=True)
class Digest:
    algorithm: str
    hex: str
    # "algorithm:hex", made once: a digest is a key, a header and a log field of every blob
    # request, and one object serves all the requests for its path (``v2._parse_path``).
    text: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "text", f"{self.algorithm}:{self.hex}")

    def __str__(self) -> str:
        return self.text

    def __hash__(self) -> int:
        return hash(self.text)

    @classmethod
    def parse(cls, raw: str) -> Digest:
        if len(raw) > 200 or _DIGEST_RE.fullmatch(raw) is None:
            raise DigestInvalid(f"invalid digest {raw[:140]!r}", detail={"digest": raw[:300]})
        algorithm, _, encoded = raw.partition(":")
        length = _ALGORITHMS.get(algorithm)
        if length is None:
            raise DigestInvalid(
                f"unsupported digest algorithm {algorithm!r}", detail={"digest": raw}
            )
        if len(encoded) != length or _HEX_RE.fullmatch(encoded) is None:
            raise DigestInvalid(f"invalid {algorithm} digest", detail={"digest": raw})
        return cls(algorithm, encoded)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)


def is_digest(reference: str) -> bool:
    return ":" in reference


@dataclass(frozen=True, slots=True)
class Reference:
    """A manifest reference: exactly one of ``tag`` and ``digest`` is set."""

    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, raw: str) -> Reference:
        """A tag that cannot exist names a manifest that is not there: 404, as the OCI
        conformance suite expects (``.INVALID_MANIFEST_NAME``), not a 400."""
        if is_digest(raw):
            return cls(digest=Digest.parse(raw))
        try:
            return cls(tag=validate_tag(raw))
        except TagInvalid as exc:
            raise ManifestUnknown(exc.message, detail=exc.detail) from None

    def __str__(self) -> str:
        return self.tag if self.tag is not None else str(self.digest)
