import pytest

from mirror.domain.pins import ImageName, Pin, pinned, split_image


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alpine", ImageName("docker.io", "library/alpine")),
        ("alpine:3.20", ImageName("docker.io", "library/alpine", "3.20")),
        ("acme/tool:1.0", ImageName("docker.io", "acme/tool", "1.0")),
        ("ghcr.io/acme/tool:1.0", ImageName("ghcr.io", "acme/tool", "1.0")),
        ("localhost:5000/x", ImageName("localhost:5000", "x")),
        ("docker.io/alpine", ImageName("docker.io", "library/alpine")),
        ("index.docker.io/library/alpine", ImageName("docker.io", "library/alpine")),
        ("*", ImageName("*", "*")),
        ("docker.io/*", ImageName("docker.io", "*")),
        ("al*", ImageName("docker.io", "library/al*")),
        (
            "alpine@sha256:" + "a" * 64,
            ImageName("docker.io", "library/alpine", None, "sha256:" + "a" * 64),
        ),
        (
            "ghcr.io/acme/tool:1.0@sha256:" + "b" * 64,
            ImageName("ghcr.io", "acme/tool", "1.0", "sha256:" + "b" * 64),
        ),
    ],
)
def test_references_are_completed_as_docker_pull_does(text: str, expected: ImageName) -> None:
    assert split_image(text) == expected


@pytest.mark.parametrize("text", ["", "alpine:", "alpine@", ":tag"])
def test_malformed_references_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="reference"):
        split_image(text)


def test_pins_match_registry_repository_and_tag_with_wildcards() -> None:
    pins = (Pin.parse("library/postgres:16*"), Pin.parse("ghcr.io/acme/*"), Pin.parse("redis"))
    assert pinned(pins, "docker.io", "library/postgres", "16.4")
    assert not pinned(pins, "docker.io", "library/postgres", "15")
    assert not pinned(pins, "docker.io", "library/postgres", None)
    assert pinned(pins, "ghcr.io", "acme/tools/cli", "latest")
    assert pinned(pins, "ghcr.io", "acme/x", None)
    assert not pinned(pins, "docker.io", "acme/x", "1")
    assert pinned(pins, "docker.io", "library/redis", "7")
    assert pinned(pins, "docker.io", "library/redis", None)
