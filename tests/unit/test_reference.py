"""The name, tag and digest grammar that guards every path and URL the mirror builds."""

import pytest

from mirror.domain.errors import DigestInvalid, ManifestUnknown, NameInvalid
from mirror.domain.mediatypes import accepts, parse_accept
from mirror.domain.reference import Digest, Reference, normalize_name


@pytest.mark.parametrize(
    ("raw", "registry", "expected"),
    [
        ("alpine", "docker.io", "library/alpine"),
        ("library/alpine", "docker.io", "library/alpine"),
        ("org/team/app", "docker.io", "org/team/app"),
        ("a.b_c__d-e--f/g", "docker.io", "a.b_c__d-e--f/g"),
        ("alpine", "ghcr.io", "alpine"),
    ],
)
def test_valid_names(raw: str, registry: str, expected: str) -> None:
    assert normalize_name(raw, registry) == expected


@pytest.mark.parametrize("raw", ["", "A", "a/", "/a", "a//b", "a..b", "a___b", "-a", "a-", "é"])
def test_invalid_names(raw: str) -> None:
    with pytest.raises(NameInvalid):
        normalize_name(raw)


def test_names_are_measured_as_the_upstream_sees_them() -> None:
    name = "a" * 248
    assert normalize_name(name, "ghcr.io") == name
    with pytest.raises(NameInvalid):
        normalize_name(name)  # library/ + 248 characters: 256


def test_tags_and_digests() -> None:
    assert Reference.parse("v1.2.3_rc-1").tag == "v1.2.3_rc-1"
    digest = Reference.parse("sha256:" + "0" * 64).digest
    assert digest == Digest("sha256", "0" * 64)
    assert str(Digest.of(b"")).endswith(
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
    for bad in (".x", "-x", "x" * 129, "a/b", ".INVALID_MANIFEST_NAME"):
        with pytest.raises(ManifestUnknown):
            Reference.parse(bad)
    for bad in ("sha256:" + "0" * 63, "sha256:" + "G" * 64, "sha1:" + "0" * 40, "sha256:"):
        with pytest.raises(DigestInvalid):
            Reference.parse(bad)


def test_accept_lines_merge() -> None:
    merged = parse_accept(("a/x, b/y;q=0.5", "c/z", "a/x"))
    assert merged == ("a/x", "b/y", "c/z")
    assert accepts((), "anything/at-all")
    assert accepts(("*/*",), "application/vnd.oci.image.index.v1+json")
    assert not accepts(
        ("application/vnd.docker.distribution.manifest.v2+json",),
        "application/vnd.oci.image.index.v1+json",
    )
