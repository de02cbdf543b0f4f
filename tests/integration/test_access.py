"""Who may read what: allow and deny lists, blobs that follow their repository, and what
one client address may spend or hold."""

from __future__ import annotations

import asyncio
import json
import subprocess
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from mirror.config import AuthSettings, UpstreamSettings
from mirror.domain.pins import Pin
from mirror.domain.rules import AccessRules
from tests.support.binaries import require_binary
from tests.support.fakehub import FakeHub
from tests.support.mirror import RunningMirror, settings_for
from tests.support.oci import (
    OCI_INDEX,
    OCI_MANIFEST,
    make_image,
    make_index,
    make_layer,
    make_random_layer,
)
from tests.support.secrets import (
    CLIENT_PASSWORD,
    CLIENT_USER,
    HUB_PASSWORD,
    HUB_USER,
)
from tests.support.waiting import eventually

ACCEPT = [OCI_MANIFEST]


async def fetch(
    url: str,
    *,
    method: str = "GET",
    source: str = "127.0.0.1",
    auth: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=connector) as session:
        headers = {"Accept": OCI_MANIFEST}
        if auth is not None:
            headers["Authorization"] = auth
        async with session.request(method, url, headers=headers) as answer:
            return answer.status, dict(answer.headers), await answer.read()


def code(body: bytes) -> str:
    return str(json.loads(body)["errors"][0]["code"])


async def test_denied_and_unlisted_repositories_get_403_and_nothing_goes_upstream(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    image = make_image([make_layer(b"allowed")])
    for name in ("library/app", "library/forbidden", "someorg/tool", "acme/tool"):
        fake_hub.add_image(name, "1", image)
    rules = AccessRules(
        allow=(Pin.parse("docker.io/library/*"), Pin.parse("ghcr.io/acme/*")),
        deny=(Pin.parse("docker.io/library/forbidden"),),
    )
    settings = settings_for(fake_hub.url, tmp_path / "data", repositories=rules)
    settings = replace(
        settings,
        upstreams={**settings.upstreams, "ghcr.io": UpstreamSettings("ghcr.io", fake_hub.url)},
    )
    async with RunningMirror(settings) as mirror:
        refused = ("forbidden", "someorg/tool", "acme/tool")  # the last: allowed on ghcr.io only
        blob = image.layers[0].digest
        for name in refused:
            for path in ("manifests/1", f"blobs/{blob}", "tags/list"):
                for method in ("GET", "HEAD"):
                    status, _, body = await mirror.get(f"/v2/{name}/{path}", method=method)
                    assert status == 403, (name, path, method)
                    if method == "GET":
                        assert code(body) == "DENIED"
        assert fake_hub.log == []
        status, _, _ = await mirror.get("/v2/app/manifests/1", accept=ACCEPT)
        assert status == 200
        status, _, _ = await mirror.get("/v2/acme/tool/manifests/1?ns=ghcr.io", accept=ACCEPT)
        assert status == 200


def rules(allow: tuple[str, ...] = (), deny: tuple[str, ...] = ()) -> AccessRules:
    return AccessRules.parse(allow, deny)


async def test_a_deny_rule_with_a_tag_or_digest_refuses_that_image_and_its_blobs(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    latest = make_image([make_layer(b"latest")])
    older = make_image([make_layer(b"older")])
    bad = make_image([make_layer(b"known bad")])
    fake_hub.add_image("library/busybox", "latest", latest)
    fake_hub.add_image("library/busybox", "1.36", older)
    fake_hub.add_image("library/busybox", "1.35", bad)
    denied = rules(deny=("docker.io/library/busybox:latest", f"busybox@{bad.digest}"))
    settings = settings_for(fake_hub.url, tmp_path / "data", repositories=denied)
    async with RunningMirror(settings) as mirror:
        for path in ("manifests/latest", f"manifests/{bad.digest}"):
            status, _, body = await mirror.get(f"/v2/busybox/{path}", accept=ACCEPT)
            assert (status, code(body)) == (403, "DENIED"), path
        assert fake_hub.log == []
        # A tag that resolves to the denied digest: the manifest is refused, and now that
        # the mirror knows it, so are its blobs.
        status, _, _ = await mirror.get("/v2/busybox/manifests/1.35", accept=ACCEPT)
        assert status == 403
        status, _, body = await mirror.get(f"/v2/busybox/blobs/{bad.layers[0].digest}")
        assert (status, code(body)) == (403, "DENIED")
        # Every other tag, and its blobs, as before.
        status, _, body = await mirror.get("/v2/busybox/manifests/1.36", accept=ACCEPT)
        assert (status, body) == (200, older.manifest)
        for blob in older.blobs:
            status, _, body = await mirror.get(f"/v2/busybox/blobs/{blob.digest}")
            assert (status, body) == (200, blob.data)


async def test_wildcards_span_every_namespace_and_every_upstream(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    image = make_image([make_layer(b"anywhere")])
    for name in ("library/app", "acme/private", "acme/tools/cli"):
        fake_hub.add_image(name, "1", image)
    ghcr = {"ghcr.io": UpstreamSettings("ghcr.io", fake_hub.url)}
    cases = (
        (
            rules(allow=("*",)),
            ("app", "acme/private", "acme/tools/cli", "acme/private?ns=ghcr.io"),
            (),
        ),
        (rules(deny=("docker.io/*",)), ("acme/private?ns=ghcr.io",), ("app", "acme/private")),
        (rules(allow=("acme/*",)), ("acme/private", "acme/tools/cli"), ("app",)),
    )
    for number, (access, served, refused) in enumerate(cases):
        settings = settings_for(fake_hub.url, tmp_path / f"data{number}", repositories=access)
        settings = replace(settings, upstreams={**settings.upstreams, **ghcr})
        async with RunningMirror(settings) as mirror:
            for name in served:
                path, _, query = name.partition("?")
                url = f"/v2/{path}/manifests/1" + (f"?{query}" if query else "")
                status, _, _ = await mirror.get(url, accept=ACCEPT)
                assert status == 200, (number, name)
            for name in refused:
                status, _, body = await mirror.get(f"/v2/{name}/manifests/1", accept=ACCEPT)
                assert (status, code(body)) == (403, "DENIED"), (number, name)


async def test_an_allow_rule_with_a_tag_serves_that_tag_its_platforms_and_its_blobs_only(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    amd, arm = make_image([make_layer(b"amd")]), make_image([make_layer(b"arm")], arch="arm64")
    index = make_index([amd, arm])
    other = make_image([make_layer(b"not allowed")])
    fake_hub.add_index("library/app", "1.2", index)
    fake_hub.add_image("library/app", "2.0", other)
    allowed = rules(allow=("app:1.*",))
    settings = settings_for(fake_hub.url, tmp_path / "data", repositories=allowed)
    async with RunningMirror(settings) as mirror:
        status, _, body = await mirror.get("/v2/app/manifests/1.2", accept=[OCI_INDEX])
        assert (status, body) == (200, index.index)
        for image in (amd, arm):
            status, _, body = await mirror.get(f"/v2/app/manifests/{image.digest}", accept=ACCEPT)
            assert (status, body) == (200, image.manifest)
            for blob in image.blobs:
                status, _, body = await mirror.get(f"/v2/app/blobs/{blob.digest}")
                assert (status, body) == (200, blob.data)
        fake_hub.clear_log()
        for path in (
            "manifests/2.0",
            f"manifests/{other.digest}",
            f"blobs/{other.layers[0].digest}",
        ):
            status, _, body = await mirror.get(f"/v2/app/{path}", accept=ACCEPT)
            assert (status, code(body)) == (403, "DENIED"), path
        assert fake_hub.log == []


@pytest.mark.parametrize("logins", [False, True], ids=["anonymous", "authenticated"])
async def test_a_private_blob_is_not_readable_through_another_repository(
    fake_hub: FakeHub, tmp_path: Path, logins: bool
) -> None:
    fake_hub.credentials = (HUB_USER, HUB_PASSWORD)
    fake_hub.private = {"acme/private"}
    secret = make_image([make_layer(b"the private layer")])
    public = make_image([make_layer(b"a public layer")])
    fake_hub.add_image("acme/private", "1", secret)
    fake_hub.add_image("library/public", "1", public)
    settings = settings_for(
        fake_hub.url, tmp_path / "data", username=HUB_USER, password=HUB_PASSWORD
    )
    auth = None
    if logins:
        passwords = tmp_path / "htpasswd"
        command = [require_binary("htpasswd"), "-cbB", str(passwords), CLIENT_USER]
        await asyncio.to_thread(
            subprocess.run, [*command, CLIENT_PASSWORD], check=True, capture_output=True
        )
        settings = replace(settings, auth=AuthSettings(passwords))
        auth = aiohttp.encode_basic_auth(CLIENT_USER, CLIENT_PASSWORD)
    async with RunningMirror(settings) as mirror:
        # The site's own pull of its private image: cached, blobs and all.
        status, _, _ = await fetch(f"{mirror.url}/v2/acme/private/manifests/1", auth=auth)
        assert status == 200
        layer = secret.layers[0]
        url = f"{mirror.url}/v2/acme/private/blobs/{layer.digest}"
        status, _, body = await fetch(url, auth=auth)
        assert (status, body) == (200, layer.data)

        # A normal pull of the public image pays no extra upstream request for its blobs.
        status, _, _ = await fetch(f"{mirror.url}/v2/library/public/manifests/1", auth=auth)
        assert status == 200
        fake_hub.clear_log()
        for blob in public.blobs:
            url = f"{mirror.url}/v2/library/public/blobs/{blob.digest}"
            status, _, body = await fetch(url, auth=auth)
            assert (status, body) == (200, blob.data)
        assert fake_hub.count("HEAD", path_contains="/blobs/") == 0

        # The private layer asked for under the public name, or a made-up one: refused.
        for name in ("library/public", "library/made-up", "acme/other"):
            for method in ("GET", "HEAD"):
                url = f"{mirror.url}/v2/{name}/blobs/{layer.digest}"
                status, _, body = await fetch(url, method=method, auth=auth)
                assert status in (401, 404), (name, method, status)
                assert body != layer.data
        asked = fake_hub.requests("HEAD", path_contains=f"/blobs/{layer.digest}")
        assert [r.path for r in asked if "library/public" in r.path]  # asked with its scope


async def test_a_client_over_its_miss_limit_gets_429_and_others_do_not(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    for tag in ("1", "2", "3"):
        fake_hub.add_image("library/app", tag, make_image([make_layer(tag.encode())]))
    settings = settings_for(fake_hub.url, tmp_path / "data", client_miss_limit=1 / 60)
    async with RunningMirror(settings) as mirror:
        status, _, _ = await fetch(f"{mirror.url}/v2/library/app/manifests/1")
        assert status == 200
        fake_hub.clear_log()
        status, headers, body = await fetch(f"{mirror.url}/v2/library/app/manifests/2")
        assert (status, code(body)) == (429, "TOOMANYREQUESTS")
        assert int(headers["Retry-After"]) > 0
        assert fake_hub.count("GET", path_contains="/manifests/") == 0
        # Cached content is never limited; another address has its own allowance.
        status, _, _ = await fetch(f"{mirror.url}/v2/library/app/manifests/1")
        assert status == 200
        status, _, _ = await fetch(f"{mirror.url}/v2/library/app/manifests/2", source="127.0.0.2")
        assert status == 200


async def test_one_address_cannot_hold_more_transfers_than_its_share(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    big = make_random_layer(4 * 1024 * 1024, seed=5)
    small = make_layer(b"small")
    fake_hub.add_image("library/app", "1", make_image([big, small]))
    fake_hub.blob_delay_per_chunk = 0.05
    settings = settings_for(fake_hub.url, tmp_path / "data", client_max_transfers=1)
    async with RunningMirror(settings) as mirror:
        status, _, _ = await fetch(f"{mirror.url}/v2/library/app/manifests/1")
        assert status == 200
        slow = asyncio.create_task(fetch(f"{mirror.url}/v2/library/app/blobs/{big.digest}"))
        await eventually(lambda: fake_hub.count("GET", "cdn"), "the slow transfer to start")
        status, headers, body = await fetch(f"{mirror.url}/v2/library/app/blobs/{small.digest}")
        assert (status, code(body)) == (429, "TOOMANYREQUESTS")
        assert "Retry-After" in headers
        other = await fetch(f"{mirror.url}/v2/library/app/blobs/{small.digest}", source="127.0.0.2")
        assert other[0] == 200
        status, _, body = await slow
        assert (status, body) == (200, big.data)
        status, _, _ = await fetch(f"{mirror.url}/v2/library/app/blobs/{small.digest}")
        assert status == 200  # the slot is free again
