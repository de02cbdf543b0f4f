"""What the mirror believes of an upstream: only what it can check."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.support.fakehub import FakeHub
from tests.support.mirror import RunningMirror, settings_for
from tests.support.oci import OCI_MANIFEST, make_image, make_layer

ACCEPT = [OCI_MANIFEST]


async def test_a_digest_the_upstream_claims_is_never_passed_on(
    fake_hub: FakeHub, mirror: RunningMirror
) -> None:
    image = make_image([make_layer(b"claims")])
    fake_hub.add_image("library/app", "1.0", image)
    fake_hub.claimed_digest = "md5:" + hashlib.md5(image.manifest).hexdigest()
    status, headers, body = await mirror.get("/v2/app/manifests/1.0", accept=ACCEPT)
    assert status == 200
    assert headers["Docker-Content-Digest"] == image.digest  # computed, sha256
    assert body == image.manifest
    status, headers, _ = await mirror.get(f"/v2/app/manifests/{image.digest}", accept=ACCEPT)
    assert (status, headers["Docker-Content-Digest"]) == (200, image.digest)


async def test_a_wrong_sha256_claim_is_refused(fake_hub: FakeHub, mirror: RunningMirror) -> None:
    image = make_image([make_layer(b"lies")])
    fake_hub.add_image("library/app", "1.0", image)
    fake_hub.claimed_digest = "sha256:" + "0" * 64
    status, _, body = await mirror.get("/v2/app/manifests/1.0", accept=ACCEPT)
    assert status == 503
    assert json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"


async def test_a_manifest_sent_as_html_is_kept_and_served_as_what_it_says_it_is(
    fake_hub: FakeHub, mirror: RunningMirror
) -> None:
    image = make_image([make_layer(b"html")])
    fake_hub.add_image("library/app", "1.0", image)
    fake_hub.manifest_content_type = "text/html"
    status, headers, body = await mirror.get("/v2/app/manifests/1.0", accept=ACCEPT)
    assert (status, body) == (200, image.manifest)
    assert headers["Content-Type"] == OCI_MANIFEST  # its own mediaType, never text/html
    assert headers["X-Content-Type-Options"] == "nosniff"


async def test_html_that_is_no_manifest_is_refused(
    fake_hub: FakeHub, mirror: RunningMirror
) -> None:
    fake_hub.add_image("library/app", "1.0", make_image([make_layer(b"x")]))
    repo = fake_hub.repo("library/app")
    page = b"<html><script>alert(1)</script></html>"
    digest = "sha256:" + hashlib.sha256(page).hexdigest()
    repo.manifests[digest] = (page, OCI_MANIFEST)
    repo.tags["evil"] = digest
    fake_hub.manifest_content_type = "text/html"
    status, headers, body = await mirror.get("/v2/app/manifests/evil", accept=["*/*"])
    assert status == 503
    assert headers["Content-Type"].startswith("application/json")
    assert b"<script>" not in body


async def test_credentials_never_go_to_a_realm_a_redirect_target_names(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    elsewhere: list[web.Request] = []

    async def collect(request: web.Request) -> web.Response:
        elsewhere.append(request)
        return web.json_response({"token": "stolen"})

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", collect)
    thief = TestServer(app, host="127.0.0.1")
    await thief.start_server()
    fake_hub.credentials = ("site-user", "site-secret")
    image, other = make_image([make_layer(b"one")]), make_image([make_layer(b"two")])
    fake_hub.add_image("acme/app", "1.0", image)
    fake_hub.add_image("acme/other", "1.0", other)
    settings = settings_for(
        fake_hub.url, tmp_path / "data", username="site-user", password="site-secret"
    )
    try:
        async with RunningMirror(settings) as mirror:
            fake_hub.cdn_challenge = f'Bearer realm="{thief.make_url("/token")}",service="x"'
            layer = image.blobs[-1]
            status, _, body = await mirror.get(f"/v2/acme/app/blobs/{layer.digest}")
            assert status == 503
            assert json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
            fake_hub.cdn_challenge = None
            for name, wanted in (("app", image), ("other", other)):
                status, _, body = await mirror.get(f"/v2/acme/{name}/manifests/1.0", accept=ACCEPT)
                assert (status, body) == (200, wanted.manifest)
                for blob in wanted.blobs:
                    status, _, body = await mirror.get(f"/v2/acme/{name}/blobs/{blob.digest}")
                    assert (status, body) == (200, blob.data)
    finally:
        await thief.close()
    assert elsewhere == []
    assert fake_hub.count(server="token") >= 1  # the tokens came from the registry's realm


async def test_names_the_upstream_chokes_on_do_not_open_the_circuit(
    fake_hub: FakeHub, mirror: RunningMirror
) -> None:
    fake_hub.fail_names = "choke"
    for number in range(20):
        status, _, _ = await mirror.get(f"/v2/choke{number}/manifests/1.0", accept=ACCEPT)
        assert status == 503
    await asyncio.sleep(0.1)  # the breaker's /v2/ checks
    images = [make_image([make_layer(f"legit {n}".encode())]) for n in range(10)]
    for number, image in enumerate(images):
        fake_hub.add_image(f"library/legit{number}", "1.0", image)
        status, _, body = await mirror.get(f"/v2/legit{number}/manifests/1.0", accept=ACCEPT)
        assert (status, body) == (200, image.manifest)
    _, _, page = await mirror.get("/metrics")
    assert b'mirror_upstream_circuit_open{upstream="docker.io"} 0.0' in page
