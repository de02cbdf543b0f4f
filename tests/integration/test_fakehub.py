"""The fake Docker Hub behaves like the real one where the mirror depends on it."""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio
from multidict import CIMultiDict

from tests.support import oci
from tests.support.fakehub import FakeHub
from tests.support.waiting import eventually

REPO = "library/demo"


@pytest_asyncio.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
def image() -> oci.Image:
    return oci.make_image(
        [oci.make_layer({"etc/hello": b"hello\n"}), oci.make_random_layer(300_000, 1)]
    )


def challenge_params(header: str) -> dict[str, str]:
    assert header.startswith("Bearer ")
    return dict(re.findall(r'(\w+)="([^"]*)"', header))


async def fetch_token(
    session: aiohttp.ClientSession,
    hub: FakeHub,
    repo: str = REPO,
    credentials: tuple[str, str] | None = None,
) -> str:
    params = {"service": "fake-registry", "scope": f"repository:{repo}:pull"}
    headers = {} if credentials is None else basic(*credentials)
    async with session.get(hub.token_url, params=params, headers=headers) as response:
        assert response.status == 200
        body = await response.json()
    assert body["token"] == body["access_token"]
    assert body["expires_in"] == hub.token_ttl
    return str(body["token"])


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": aiohttp.encode_basic_auth(user, password)}


def bearer(token: str, accept: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}"}
    if accept is not None:
        headers["Accept"] = accept
    return headers


async def test_token_flow_from_ping_challenge(
    fake_hub: FakeHub, session: aiohttp.ClientSession, image: oci.Image
) -> None:
    fake_hub.add_image(REPO, "latest", image)
    async with session.get(f"{fake_hub.url}/v2/") as response:
        assert response.status == 401
        params = challenge_params(response.headers["WWW-Authenticate"])
    assert params == {"realm": fake_hub.token_url, "service": "fake-registry"}

    token = await fetch_token(session, fake_hub)
    assert token != await fetch_token(session, fake_hub)  # unique per request
    url = f"{fake_hub.url}/v2/{REPO}/manifests/latest"
    async with session.get(url, headers=bearer(token, oci.OCI_MANIFEST)) as response:
        assert response.status == 200
        assert await response.read() == image.manifest
        assert response.headers["Docker-Content-Digest"] == image.digest
        assert response.headers["Content-Type"] == oci.OCI_MANIFEST
        assert response.headers["Content-Length"] == str(image.size)
        assert response.headers["ratelimit-remaining"] == "99;w=21600"
    async with session.get(f"{fake_hub.url}/v2/", headers=bearer(token)) as response:
        assert response.status == 200


async def test_manifest_without_token_is_challenged_with_scope(
    fake_hub: FakeHub, session: aiohttp.ClientSession, image: oci.Image
) -> None:
    fake_hub.add_image(REPO, "latest", image)
    async with session.get(f"{fake_hub.url}/v2/{REPO}/manifests/latest") as response:
        assert response.status == 401
        params = challenge_params(response.headers["WWW-Authenticate"])
        body = await response.json()
    assert params["scope"] == f"repository:{REPO}:pull"
    assert body["errors"][0]["code"] == "UNAUTHORIZED"


async def test_token_for_another_repo_is_insufficient(
    fake_hub: FakeHub, session: aiohttp.ClientSession, image: oci.Image
) -> None:
    fake_hub.add_image(REPO, "latest", image)
    fake_hub.add_image("library/other", "latest", image)
    token = await fetch_token(session, fake_hub, "library/other")
    url = f"{fake_hub.url}/v2/{REPO}/manifests/latest"
    async with session.get(url, headers=bearer(token, oci.OCI_MANIFEST)) as response:
        assert response.status == 401
        params = challenge_params(response.headers["WWW-Authenticate"])
    assert params["error"] == "insufficient_scope"


async def test_expired_token_is_rejected(
    fake_hub: FakeHub, session: aiohttp.ClientSession, image: oci.Image
) -> None:
    fake_hub.add_image(REPO, "latest", image)
    fake_hub.token_ttl = 0
    token = await fetch_token(session, fake_hub)
    url = f"{fake_hub.url}/v2/{REPO}/manifests/latest"
    async with session.head(url, headers=bearer(token, oci.OCI_MANIFEST)) as response:
        assert response.status == 401
        params = challenge_params(response.headers["WWW-Authenticate"])
    assert params["error"] == "invalid_token"


async def test_unknown_repository_gets_no_access(
    fake_hub: FakeHub, session: aiohttp.ClientSession
) -> None:
    token = await fetch_token(session, fake_hub, "library/nope")
    assert not fake_hub.tokens[token].granted
    fake_hub.deny_unknown_repos = False
    token = await fetch_token(session, fake_hub, "library/nope")
    url = f"{fake_hub.url}/v2/library/nope/manifests/latest"
    async with session.get(url, headers=bearer(token)) as response:
        assert response.status == 404
        assert (await response.json())["errors"][0]["code"] == "NAME_UNKNOWN"


async def test_token_server_checks_credentials(
    fake_hub: FakeHub, session: aiohttp.ClientSession, image: oci.Image
) -> None:
    fake_hub.add_image(REPO, "latest", image)
    fake_hub.credentials = ("alice", "secret")
    params = {"service": "fake-registry", "scope": f"repository:{REPO}:pull"}
    wrong = basic("alice", "wrong")
    async with session.get(fake_hub.token_url, params=params, headers=wrong) as response:
        assert response.status == 401
    async with session.get(fake_hub.token_url, params=params) as response:
        assert response.status == 401
    token = await fetch_token(session, fake_hub, credentials=("alice", "secret"))
    assert fake_hub.tokens[token].account == "alice"


async def test_head_does_not_count_against_rate_limit(
    fake_hub: FakeHub, session: aiohttp.ClientSession, image: oci.Image
) -> None:
    fake_hub.add_image(REPO, "latest", image)
    token = await fetch_token(session, fake_hub)
    url = f"{fake_hub.url}/v2/{REPO}/manifests/latest"
    async with session.head(url, headers=bearer(token, oci.OCI_MANIFEST)) as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == str(image.size)
        assert response.headers["Docker-Content-Digest"] == image.digest
        assert response.headers["ratelimit-remaining"] == "100;w=21600"  # reported, not spent
    assert fake_hub.ratelimit_remaining == 100
    fake_hub.ratelimit_remaining = 0
    async with session.get(url, headers=bearer(token, oci.OCI_MANIFEST)) as response:
        assert response.status == 429


def two_platforms(docker: bool) -> oci.Index:
    layer = oci.make_layer({"bin/tool": b"x"})
    images = [oci.make_image([layer], arch=arch, docker=docker) for arch in ("amd64", "arm64")]
    return oci.make_index(images, docker=docker)


async def get_manifest(
    session: aiohttp.ClientSession, hub: FakeHub, reference: str, accept: CIMultiDict[str]
) -> tuple[int, bytes]:
    token = await fetch_token(session, hub)
    accept.add("Authorization", f"Bearer {token}")
    url = f"{hub.url}/v2/{REPO}/manifests/{reference}"
    async with session.get(url, headers=accept) as response:
        return response.status, await response.read()


@pytest.mark.parametrize(
    "accept",
    [
        CIMultiDict([("Accept", oci.OCI_INDEX), ("Accept", oci.OCI_MANIFEST)]),
        CIMultiDict([("Accept", f"{oci.DOCKER_MANIFEST}, {oci.OCI_INDEX}, */*")]),
    ],
    ids=["separate-lines", "comma-joined"],
)
async def test_accept_selects_oci_index(
    fake_hub: FakeHub, session: aiohttp.ClientSession, accept: CIMultiDict[str]
) -> None:
    index = two_platforms(docker=False)
    fake_hub.add_index(REPO, "multi", index)
    assert await get_manifest(session, fake_hub, "multi", accept.copy()) == (200, index.index)


async def test_oci_index_not_accepted_is_unknown(
    fake_hub: FakeHub, session: aiohttp.ClientSession
) -> None:
    fake_hub.add_index(REPO, "multi", two_platforms(docker=False))
    accept = CIMultiDict([("Accept", oci.DOCKER_MANIFEST), ("Accept", oci.DOCKER_LIST)])
    status, _ = await get_manifest(session, fake_hub, "multi", accept)
    assert status == 404


async def test_manifest_list_not_accepted_falls_back_to_amd64(
    fake_hub: FakeHub, session: aiohttp.ClientSession
) -> None:
    index = two_platforms(docker=True)
    fake_hub.add_index(REPO, "multi", index)
    accept = CIMultiDict([("Accept", oci.DOCKER_MANIFEST)])
    amd64 = index.image_for("amd64").manifest
    assert await get_manifest(session, fake_hub, "multi", accept.copy()) == (200, amd64)
    by_digest = await get_manifest(session, fake_hub, index.digest, accept.copy())
    assert by_digest == (200, index.index)
    accept = CIMultiDict([("Accept", oci.DOCKER_LIST)])
    assert await get_manifest(session, fake_hub, "multi", accept) == (200, index.index)


async def test_tags_list_paginates_with_link(
    fake_hub: FakeHub, session: aiohttp.ClientSession, image: oci.Image
) -> None:
    for tag in ("c", "a", "b"):
        fake_hub.add_image(REPO, tag, image)
    token = await fetch_token(session, fake_hub)
    url = f"{fake_hub.url}/v2/{REPO}/tags/list?n=2"
    async with session.get(url, headers=bearer(token)) as response:
        assert (await response.json())["tags"] == ["a", "b"]
        link = response.headers["Link"]
    next_path = re.fullmatch(r'<([^>]+)>; rel="next"', link)
    assert next_path is not None
    async with session.get(fake_hub.url + next_path[1], headers=bearer(token)) as response:
        assert (await response.json())["tags"] == ["c"]
        assert "Link" not in response.headers


async def blob_location(
    session: aiohttp.ClientSession, hub: FakeHub, digest: str
) -> tuple[str, str]:
    """(CDN URL, token) for a blob, without following the redirect."""
    token = await fetch_token(session, hub)
    url = f"{hub.url}/v2/{REPO}/blobs/{digest}"
    async with session.get(url, headers=bearer(token), allow_redirects=False) as response:
        assert response.status == 307
        return response.headers["Location"], token


async def test_blob_redirects_to_cdn_that_refuses_authorization(
    fake_hub: FakeHub, session: aiohttp.ClientSession, image: oci.Image
) -> None:
    fake_hub.add_image(REPO, "latest", image)
    layer = image.layers[1]
    location, token = await blob_location(session, fake_hub, layer.digest)
    assert location.startswith(fake_hub.cdn_url)
    async with session.get(location, headers=bearer(token)) as response:
        assert response.status == 400
    assert fake_hub.cdn_authorization_rejections == 1
    async with session.get(location) as response:
        assert response.status == 200
        assert await response.read() == layer.data
        assert "Content-Encoding" not in response.headers
    async with session.get(location, headers={"Range": "bytes=10-19"}) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 10-19/{layer.size}"
        assert await response.read() == layer.data[10:20]


async def test_blob_head_answers_without_redirect(
    fake_hub: FakeHub, session: aiohttp.ClientSession, image: oci.Image
) -> None:
    fake_hub.add_image(REPO, "latest", image)
    token = await fetch_token(session, fake_hub)
    url = f"{fake_hub.url}/v2/{REPO}/blobs/{image.config.digest}"
    async with session.head(url, headers=bearer(token)) as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == str(image.config.size)
    async with session.get(f"{fake_hub.url}/v2/{REPO}/blobs/sha256:{'0' * 64}") as response:
        assert response.status == 401
    missing = f"{fake_hub.url}/v2/{REPO}/blobs/sha256:{'0' * 64}"
    async with session.get(missing, headers=bearer(token)) as response:
        assert response.status == 404
        assert (await response.json())["errors"][0]["code"] == "BLOB_UNKNOWN"


async def test_corrupt_and_truncated_blobs(
    fake_hub: FakeHub, session: aiohttp.ClientSession, image: oci.Image
) -> None:
    fake_hub.add_image(REPO, "latest", image)
    layer = image.layers[1]
    fake_hub.corrupt_next_blob = True
    location, _ = await blob_location(session, fake_hub, layer.digest)
    async with session.get(location) as response:
        body = await response.read()
    assert len(body) == layer.size
    assert "sha256:" + hashlib.sha256(body).hexdigest() != layer.digest
    fake_hub.truncate_next_blob_at = 1000
    with pytest.raises(aiohttp.ClientPayloadError):
        async with session.get(location) as response:
            await response.read()
    assert fake_hub.requests(server="cdn")[-1].bytes_sent == 1000
    async with session.get(location) as response:
        assert await response.read() == layer.data  # faults are one-shot


async def test_down_and_status_override(fake_hub: FakeHub, session: aiohttp.ClientSession) -> None:
    fake_hub.down = True
    async with session.get(f"{fake_hub.url}/v2/") as response:
        assert response.status == 503
    fake_hub.down = False
    fake_hub.status_override = 500
    async with session.get(f"{fake_hub.url}/v2/") as response:
        assert response.status == 500


async def test_request_log_records_all_servers(
    fake_hub: FakeHub, session: aiohttp.ClientSession, image: oci.Image
) -> None:
    fake_hub.add_image(REPO, "latest", image)
    location, _ = await blob_location(session, fake_hub, image.config.digest)
    async with session.get(location, headers={"X-Probe": "1"}) as response:
        await response.read()
    assert fake_hub.count(server="token") == 1
    assert fake_hub.count("GET", "registry", "/blobs/") == 1
    assert fake_hub.count(server="cdn", path_contains=image.config.digest) == 1
    cdn = fake_hub.requests(server="cdn")[0]
    assert cdn.headers["x-probe"] == ["1"]
    assert cdn.status == 200
    assert cdn.bytes_sent == image.config.size
    assert "sig" in cdn.query
    fake_hub.clear_log()
    assert fake_hub.count() == 0


async def test_slow_blob_notices_client_leaving(
    fake_hub: FakeHub, session: aiohttp.ClientSession
) -> None:
    layer = oci.make_random_layer(4 << 20, 2)
    fake_hub.add_image(REPO, "big", oci.make_image([layer]))
    fake_hub.blob_delay_per_chunk = 0.02
    location, _ = await blob_location(session, fake_hub, layer.digest)
    async with session.get(location) as response:
        await response.content.readexactly(100_000)
        response.close()  # hang up mid-transfer
    await eventually(
        lambda: fake_hub.requests(server="cdn")[-1].status is not None,
        "the CDN to notice the client leaving",
    )
    sent = fake_hub.requests(server="cdn")[-1].bytes_sent
    assert 100_000 <= sent < layer.size
