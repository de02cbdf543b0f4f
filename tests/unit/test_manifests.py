import json

import pytest

from mirror.domain.manifests import ManifestParseError, parse
from mirror.domain.mediatypes import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from tests.support.oci import make_image, make_index, make_layer

DIGEST = "sha256:" + "a" * 64


def test_an_image_references_its_config_and_layers() -> None:
    layers = [make_layer(b"one"), make_layer(b"two")]
    image = make_image(layers)
    refs = parse(image.manifest, OCI_MANIFEST)
    assert not refs.is_index
    assert [(b.digest, b.size) for b in refs.blobs] == [(b.digest, b.size) for b in image.blobs]
    assert refs.children == ()


def test_an_index_references_its_manifests_with_platforms() -> None:
    amd64 = make_image([make_layer(b"a")], arch="amd64")
    arm = make_image([make_layer(b"b")], arch="arm64", variant="v8")
    index = make_index([amd64, arm])
    refs = parse(index.index, "")
    assert refs.is_index
    assert [(c.digest, c.platform) for c in refs.children] == [
        (amd64.digest, "linux/amd64"),
        (arm.digest, "linux/arm64/v8"),
    ]


def test_docker_forms_and_schema1() -> None:
    docker = {"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": []}
    assert parse(json.dumps(docker).encode(), "").media_type == DOCKER_LIST
    schema1 = {"schemaVersion": 1, "fsLayers": [{"blobSum": DIGEST}, {"blobSum": DIGEST}]}
    refs = parse(json.dumps(schema1).encode(), "")
    assert [(b.digest, b.size) for b in refs.blobs] == [(DIGEST, None)]
    image = {"schemaVersion": 2, "config": {"digest": DIGEST, "size": 7}, "layers": []}
    assert parse(json.dumps(image).encode(), DOCKER_MANIFEST).blobs[0].size == 7
    assert parse(json.dumps({"manifests": []}).encode(), "").media_type == OCI_INDEX


@pytest.mark.parametrize(
    "body",
    [
        b"<html>",
        b"[]",
        b'{"mediaType": "text/html"}',
        b'{"layers": [{"digest": "md5:abc", "size": 1}]}',
        b'{"layers": [{"digest": "sha256:' + b"a" * 64 + b'", "size": -1}]}',
        b'{"manifests": "nope"}',
        b'{"layers": [{"digest": "../../etc/passwd"}]}',
    ],
)
def test_what_is_not_a_readable_manifest_is_refused(body: bytes) -> None:
    with pytest.raises(ManifestParseError):
        parse(body, "")
