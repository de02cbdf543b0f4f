"""Malformed and refused requests: the JSON error body, the right status, nothing upstream."""

import json

import pytest

from tests.support.fakehub import FakeHub
from tests.support.mirror import RunningMirror

GOOD_DIGEST = "sha256:" + "a" * 64


def error_code(body: bytes) -> str:
    errors = json.loads(body)["errors"]
    assert set(errors[0]) == {"code", "message", "detail"}
    code: str = errors[0]["code"]
    return code


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v2/UPPER/manifests/latest", 400, "NAME_INVALID"),
        ("GET", "/v2/a..b/manifests/latest", 400, "NAME_INVALID"),
        ("GET", "/v2/-lead/manifests/latest", 400, "NAME_INVALID"),
        ("GET", "/v2/a//b/manifests/latest", 400, "NAME_INVALID"),
        ("GET", "/v2/" + "a" * 300 + "/manifests/latest", 400, "NAME_INVALID"),
        ("GET", "/v2/alpine/manifests/.hidden", 404, "MANIFEST_UNKNOWN"),
        ("GET", "/v2/alpine/manifests/.INVALID_MANIFEST_NAME", 404, "MANIFEST_UNKNOWN"),
        ("HEAD", "/v2/alpine/manifests/.INVALID_MANIFEST_NAME", 404, None),
        ("GET", "/v2/alpine/manifests/" + "t" * 129, 404, "MANIFEST_UNKNOWN"),
        ("GET", "/v2/" + "a" * 248 + "/manifests/latest", 400, "NAME_INVALID"),
        ("GET", "/v2/alpine/manifests/sha256:xyz", 400, "DIGEST_INVALID"),
        ("GET", "/v2/alpine/manifests/md5:" + "a" * 32, 400, "DIGEST_INVALID"),
        ("GET", "/v2/alpine/blobs/latest", 400, "DIGEST_INVALID"),
        ("GET", "/v2/alpine/blobs/sha256:" + "A" * 64, 400, "DIGEST_INVALID"),
        ("GET", "/v2/alpine/blobs/sha256:" + "a" * 63, 400, "DIGEST_INVALID"),
        ("GET", "/v2/alpine/blobs/sha256:../../../etc/passwd", 404, "NOT_FOUND"),
        ("GET", "/v2/alpine/blobs/sha256%3A..%2F..%2Fetc%2Fpasswd", 404, "NOT_FOUND"),
        ("PUT", "/v2/alpine/manifests/latest", 405, "UNSUPPORTED"),
        ("DELETE", "/v2/alpine/manifests/latest", 405, "UNSUPPORTED"),
        ("DELETE", f"/v2/alpine/blobs/{GOOD_DIGEST}", 405, "UNSUPPORTED"),
        ("POST", "/v2/alpine/blobs/uploads/", 405, "UNSUPPORTED"),
        ("PATCH", "/v2/alpine/blobs/uploads/some-uuid", 405, "UNSUPPORTED"),
        ("GET", "/v2/alpine/blobs/uploads/some-uuid", 405, "UNSUPPORTED"),
        ("POST", "/v2/", 405, "UNSUPPORTED"),
        ("GET", "/v2/alpine/whatever", 404, "NOT_FOUND"),
        ("GET", "/v2/_catalog", 404, "NOT_FOUND"),
        ("GET", "/not-the-api", 404, "NOT_FOUND"),
        ("GET", "/v2/alpine/manifests/latest?ns=evil.example.com", 404, "NAME_UNKNOWN"),
    ],
)
async def test_refused_before_anything_reaches_upstream(
    fake_hub: FakeHub, mirror: RunningMirror, method: str, path: str, status: int, code: str | None
) -> None:
    got_status, headers, body = await mirror.get(path, method=method)

    assert got_status == status
    assert headers["Content-Type"].startswith("application/json")
    if code is not None:  # a HEAD answer has no body
        assert error_code(body) == code
    assert fake_hub.log == []
    assert not list((mirror.settings.data_dir / "blobs").rglob("*"))


async def test_v2_base_answers_without_a_challenge(mirror: RunningMirror) -> None:
    status, headers, body = await mirror.get("/v2/")

    assert (status, json.loads(body)) == (200, {})
    assert headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert "WWW-Authenticate" not in headers


async def test_unknown_repository_is_a_404_not_an_auth_error(
    fake_hub: FakeHub, mirror: RunningMirror
) -> None:
    # Docker Hub answers 401 for repositories that do not exist; clients must see a 404.
    status, _, body = await mirror.get("/v2/nosuchuser/nosuchrepo/manifests/latest")
    assert status == 404
    assert error_code(body) == "NAME_UNKNOWN"


async def test_upstream_down_is_a_503_with_the_error_body(
    fake_hub: FakeHub, mirror: RunningMirror
) -> None:
    fake_hub.down = True
    status, _, body = await mirror.get("/v2/alpine/manifests/latest")
    assert status == 503
    assert error_code(body) == "UNAVAILABLE"


async def test_health_and_readiness_on_a_fresh_data_dir(mirror: RunningMirror) -> None:
    status, _, body = await mirror.get("/healthz")
    assert status == 200
    status, _, body = await mirror.get("/readyz")
    report = json.loads(body)
    assert (status, report["status"]) == (200, "ready")
    assert report["checks"] == {"data_dir": "ok", "store": "ok"}
    # Nothing has asked the upstream yet, so nothing is claimed about it (issue 10 item 13).
    assert report["upstreams"]["docker.io"]["reachable"] == "unknown"
