"""``serve --offline``: what is held is served whatever its age; nothing goes upstream."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from tests.support.fakehub import FakeHub
from tests.support.mirror import FakeClock, RunningMirror, metric_value, settings_for
from tests.support.oci import OCI_INDEX, OCI_MANIFEST, make_image, make_index, make_layer

ACCEPT = [OCI_INDEX, OCI_MANIFEST]


async def test_offline_serves_what_it_holds_forever_and_says_offline_for_the_rest(  # noqa: PLR0915
    fake_hub: FakeHub, tmp_path: Path, clock: FakeClock
) -> None:
    image = make_image([make_layer(b"held layer")])
    amd64 = make_image([make_layer(b"amd")], arch="amd64")
    arm64 = make_image([make_layer(b"arm")], arch="arm64")
    index = make_index([amd64, arm64])
    fake_hub.add_image("library/app", "1.0", image)
    fake_hub.add_image("library/app", "2.0", image)
    fake_hub.add_index("library/multi", "latest", index)
    settings = settings_for(fake_hub.url, tmp_path / "data", tag_ttl=60.0)
    async with RunningMirror(settings, clock=clock) as online:
        for path in (
            "/v2/app/manifests/1.0",
            "/v2/app/manifests/2.0",
            *(f"/v2/app/blobs/{b.digest}" for b in image.blobs),
            "/v2/multi/manifests/latest",
            f"/v2/multi/manifests/{amd64.digest}",
        ):
            status, _, _ = await online.get(path, accept=ACCEPT)
            assert status == 200, path

    fake_hub.clear_log()
    clock.advance(365 * 86400)  # a year later, far past any freshness window
    async with RunningMirror(replace(settings, offline=True), clock=clock) as offline:
        status, headers, body = await offline.get("/v2/app/manifests/1.0", accept=ACCEPT)
        assert status == 200
        assert headers["Docker-Content-Digest"] == image.digest
        assert body == image.manifest
        for blob in image.blobs:
            status, _, body = await offline.get(f"/v2/app/blobs/{blob.digest}")
            assert (status, body) == (200, blob.data)
        status, _, _ = await offline.get(f"/v2/multi/manifests/{amd64.digest}", accept=ACCEPT)
        assert status == 200

        status, _, body = await offline.get("/v2/app/manifests/3.0", accept=ACCEPT)
        error = json.loads(body)["errors"][0]
        assert (status, error["code"]) == (404, "MANIFEST_UNKNOWN")
        assert "offline" in error["message"]
        status, _, body = await offline.get(f"/v2/multi/manifests/{arm64.digest}", accept=ACCEPT)
        assert (status, json.loads(body)["errors"][0]["code"]) == (404, "MANIFEST_UNKNOWN")
        status, _, body = await offline.get(f"/v2/multi/blobs/{amd64.layers[0].digest}")
        error = json.loads(body)["errors"][0]
        assert (status, error["code"]) == (404, "BLOB_UNKNOWN")
        assert "offline" in error["message"]
        status, _, _ = await offline.get(
            f"/v2/multi/blobs/{amd64.layers[0].digest}", method="HEAD"
        )
        assert status == 404

        status, _, body = await offline.get("/v2/app/tags/list")
        assert (status, json.loads(body)) == (200, {"name": "library/app", "tags": ["1.0", "2.0"]})
        status, headers, body = await offline.get("/v2/app/tags/list?n=1")
        assert json.loads(body)["tags"] == ["1.0"]
        assert headers["Link"] == '</v2/app/tags/list?n=1&last=1.0>; rel="next"'
        status, _, body = await offline.get("/v2/app/tags/list?n=1&last=1.0")
        assert json.loads(body)["tags"] == ["2.0"]
        status, _, body = await offline.get("/v2/nothing/tags/list")
        assert (status, json.loads(body)["errors"][0]["code"]) == (404, "NAME_UNKNOWN")

        status, _, body = await offline.get("/readyz")
        ready = json.loads(body)
        assert (status, ready["status"], ready["offline"]) == (200, "ready", True)
        assert ready["upstreams"]["docker.io"]["reachable"] == "offline"
        _, _, metrics = await offline.get("/metrics")
        assert metric_value(metrics.decode(), "mirror_offline") == 1.0

        # Repeating a miss asks nothing of anyone and stays a plain 404.
        for _ in range(30):
            status, _, _ = await offline.get("/v2/unknown/manifests/latest", accept=ACCEPT)
            assert status == 404
    assert fake_hub.log == []


async def test_online_mirror_answers_tag_lists_from_what_it_holds_when_upstream_is_down(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    image = make_image([make_layer(b"x")])
    fake_hub.add_image("library/app", "1.0", image)
    settings = settings_for(fake_hub.url, tmp_path / "data", tag_ttl=0.0)
    async with RunningMirror(settings, probe_interval=0.1) as mirror:
        status, _, _ = await mirror.get("/v2/app/manifests/1.0", accept=ACCEPT)
        assert status == 200
        fake_hub.down = True
        status, _, body = await mirror.get("/v2/app/tags/list")
        assert (status, json.loads(body)["tags"]) == (200, ["1.0"])
        _, _, ready = await mirror.get("/readyz")
        assert json.loads(ready)["offline"] is False
