"""The pull workflow of the OCI distribution-spec conformance suite (v1.1.1), in Python.

The Go suite cannot be fetched here; these are its pull checks (conformance/02_pull_test.go),
request for request, against the mirror in front of the fake Docker Hub.
"""

from __future__ import annotations

import hashlib
import json

from tests.support.fakehub import FakeHub
from tests.support.mirror import RunningMirror
from tests.support.oci import OCI_MANIFEST, make_image, make_layer

NONEXISTENT_MANIFEST = ".INVALID_MANIFEST_NAME"
NONEXISTENT_BLOB = "sha256:" + "b" * 64
ERROR_CODES = {
    "BLOB_UNKNOWN", "BLOB_UPLOAD_INVALID", "BLOB_UPLOAD_UNKNOWN", "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN", "MANIFEST_INVALID", "MANIFEST_UNKNOWN", "NAME_INVALID",
    "NAME_UNKNOWN", "SIZE_INVALID", "UNAUTHORIZED", "DENIED", "UNSUPPORTED", "TOOMANYREQUESTS",
}  # fmt: skip


def error_codes(body: bytes) -> set[str]:
    return {error["code"] for error in json.loads(body)["errors"]}


async def test_pull_workflow(fake_hub: FakeHub, mirror: RunningMirror) -> None:
    layer = make_layer({"hello.txt": b"conformance\n"})
    image = make_image([layer])
    fake_hub.add_image("conformance/test", "tagtest0", image)
    base = "/v2/conformance/test"
    accept = [OCI_MANIFEST]

    # Pull blobs: a nonexistent blob is 404, HEAD and GET; an existing one is 200.
    status, _, _ = await mirror.get(f"{base}/blobs/{NONEXISTENT_BLOB}", method="HEAD")
    assert status == 404
    status, _, body = await mirror.get(f"{base}/blobs/{NONEXISTENT_BLOB}")
    assert status == 404
    assert error_codes(body) <= ERROR_CODES
    for blob in image.blobs:
        status, headers, _ = await mirror.get(f"{base}/blobs/{blob.digest}", method="HEAD")
        assert status == 200
        assert headers["Content-Length"] == str(blob.size)
        status, _, body = await mirror.get(f"{base}/blobs/{blob.digest}")
        assert (status, body) == (200, blob.data)

    # Pull manifests: HEAD and GET by digest and by tag, 200 with the digest header.
    for reference in (image.digest, "tagtest0"):
        status, headers, _ = await mirror.get(
            f"{base}/manifests/{reference}", method="HEAD", accept=accept
        )
        assert status == 200
        assert headers["Docker-Content-Digest"] == image.digest
        status, headers, body = await mirror.get(f"{base}/manifests/{reference}", accept=accept)
        assert status == 200
        assert body == image.manifest
        assert "sha256:" + hashlib.sha256(body).hexdigest() == image.digest
        assert headers["Content-Type"] == OCI_MANIFEST

    # A manifest that does not exist: 404, with a known error code, nothing sent upstream.
    upstream_before = len(fake_hub.log)
    status, _, body = await mirror.get(f"{base}/manifests/{NONEXISTENT_MANIFEST}", accept=accept)
    assert status == 404
    assert error_codes(body) <= ERROR_CODES
    status, _, _ = await mirror.get(
        f"{base}/manifests/{NONEXISTENT_MANIFEST}", method="HEAD", accept=accept
    )
    assert status == 404
    assert len(fake_hub.log) == upstream_before

    # Tags of the repository.
    status, _, body = await mirror.get(f"{base}/tags/list")
    assert status == 200
    assert "tagtest0" in json.loads(body)["tags"]
