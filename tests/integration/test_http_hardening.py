"""What clients see when an upstream or a client misbehaves at the HTTP level (issue 10)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import cast

import aiohttp
import pytest
import pytest_asyncio

from mirror.config import UpstreamSettings
from mirror.content.embedded import EmbeddedStore
from mirror.content.protocols import MetadataStore
from mirror.domain.manifests import Manifest, TagRecord
from tests.support.fakehub import FakeHub
from tests.support.mirror import RunningMirror, metric_value, settings_for
from tests.support.oci import make_image, make_random_layer

RAW_TIMEOUT = 10.0


async def test_a_blob_without_content_length_reaches_every_client_of_the_cold_fill(
    fake_hub: FakeHub, mirror: RunningMirror
) -> None:
    layer = make_random_layer(3 * 1024 * 1024 + 17, seed=101)
    fake_hub.add_image("library/app", "latest", make_image([layer]))
    fake_hub.cdn_chunked = True
    fake_hub.blob_delay_per_chunk = 0.002
    url = f"/v2/app/blobs/{layer.digest}"

    cold = await asyncio.wait_for(asyncio.gather(*(mirror.get(url) for _ in range(5))), 20)
    warm = await mirror.get(url)

    for status, headers, body in [*cold, warm]:
        assert status == 200
        assert len(body) == layer.size
        assert "sha256:" + hashlib.sha256(body).hexdigest() == layer.digest
        assert headers["Docker-Content-Digest"] == layer.digest
    assert fake_hub.count("GET", "cdn") == 1


async def raw_request(host: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are on a new connection; the status, headers and body of the answer."""
    address, _, port = host.rpartition(":")
    reader, writer = await asyncio.open_connection(address, int(port))
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), RAW_TIMEOUT)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def error_code(body: bytes) -> str:
    return str(json.loads(body)["errors"][0]["code"])


async def test_a_range_number_beyond_pythons_int_limit_is_416(
    fake_hub: FakeHub, mirror: RunningMirror
) -> None:
    layer = make_random_layer(64 * 1024, seed=102)
    fake_hub.add_image("library/app", "latest", make_image([layer]))
    assert (await mirror.get(f"/v2/app/blobs/{layer.digest}"))[0] == 200

    for header in ("bytes=" + "9" * 5000 + "-", "bytes=0-" + "1" * 5000, "bytes=-" + "7" * 4400):
        request = (
            f"GET /v2/app/blobs/{layer.digest} HTTP/1.1\r\nHost: x\r\nRange: {header}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        status, headers, body = await raw_request(mirror.host, request)
        assert status == 416
        assert headers["content-type"].startswith("application/json")
        assert error_code(body) == "RANGE_INVALID"
        assert headers["content-range"] == f"bytes */{layer.size}"


async def test_an_expect_header_that_is_not_utf8_is_no_500(mirror: RunningMirror) -> None:
    for path in (b"/v2/", b"/v2/app/manifests/latest", b"/healthz", b"/nowhere"):
        for expect in (b"\xff\xfe100-continue", b"something-else"):
            request = (
                b"GET "
                + path
                + b" HTTP/1.1\r\nHost: x\r\nExpect: "
                + expect
                + b"\r\nConnection: close\r\n\r\n"
            )
            status, headers, body = await raw_request(mirror.host, request)
            assert status < 500, (path, expect, body)
            assert headers["content-type"].startswith("application/json"), (path, expect, body)


class BrokenGraph:
    """A content graph with the same bug: every call raises."""

    def __getattr__(self, name: str) -> Callable[..., Awaitable[None]]:
        async def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("a bug in the graph")

        return broken


class BrokenStore:
    """A metadata store with a bug: every read raises what nothing expects."""

    graph = BrokenGraph()

    async def list_tags(self) -> list[object]:
        raise RuntimeError("a bug in the store")

    async def get_manifest(self, registry: str, repository: str, digest: str) -> Manifest | None:
        raise RuntimeError("a bug in the store")

    async def put_manifest(self, registry: str, repository: str, manifest: Manifest) -> None:
        raise RuntimeError("a bug in the store")

    async def get_tag(self, registry: str, repository: str, tag: str) -> TagRecord | None:
        raise RuntimeError("a bug in the store")

    async def put_tag(self, registry: str, repository: str, tag: str, record: TagRecord) -> None:
        raise RuntimeError("a bug in the store")

    async def get_missing(self, registry: str, repository: str, tag: str) -> bool:
        raise RuntimeError("a bug in the store")

    async def put_missing(self, registry: str, repository: str, tag: str, ttl: float) -> None:
        raise RuntimeError("a bug in the store")

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        pass


async def test_an_unexpected_error_is_the_registry_error_body_counted_and_logged_once(
    fake_hub: FakeHub,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake_hub.add_image("library/app", "latest", make_image([make_random_layer(1024, seed=103)]))
    settings = settings_for(fake_hub.url, tmp_path / "data")
    # Only the calls a manifest GET makes: the store is broken, not complete.
    broken = cast(MetadataStore, BrokenStore())
    async with RunningMirror(settings, store=broken) as mirror:
        for _ in range(3):
            status, headers, body = await mirror.get("/v2/app/manifests/latest")
            assert status == 500
            assert headers["Content-Type"].startswith("application/json")
            assert error_code(body) == "UNKNOWN"
            assert "a bug in the store" not in body.decode()  # no internals for the client
        metrics = (await mirror.get("/metrics"))[2].decode()

    assert metric_value(metrics, "mirror_requests_total", route="manifest", status="500") == 3
    logged = capsys.readouterr().out + caplog.text
    assert logged.count("Traceback (most recent call last)") == 1
    assert "a bug in the store" in logged


async def test_a_blob_truncated_on_disk_while_served_fails_fast_and_is_fetched_again(
    fake_hub: FakeHub, mirror: RunningMirror
) -> None:
    layer = make_random_layer(48 * 1024 * 1024, seed=104)
    fake_hub.add_image("library/app", "latest", make_image([layer]))
    url = f"{mirror.url}/v2/app/blobs/{layer.digest}"
    assert (await mirror.get(f"/v2/app/blobs/{layer.digest}"))[0] == 200
    [stored] = [p for p in (mirror.settings.data_dir / "blobs").rglob("*") if p.is_file()]
    assert mirror.session is not None

    async with mirror.session.get(url) as response:
        await response.content.readexactly(64 * 1024)  # a slow reader: the mirror waits on it
        with stored.open("r+b") as file:
            file.truncate(1024 * 1024)
        started = time.monotonic()
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(response.read(), 10)
    assert time.monotonic() - started < 5

    status, _, body = await mirror.get(f"/v2/app/blobs/{layer.digest}")
    assert (status, body == layer.data) == (200, True)
    assert fake_hub.count("GET", "cdn") == 2
    assert stored.stat().st_size == layer.size


@pytest_asyncio.fixture
async def second_hub() -> AsyncIterator[FakeHub]:
    async with FakeHub() as hub:
        yield hub


async def follow_tag_pages(mirror: RunningMirror, path: str) -> tuple[list[str], list[str]]:
    """Every tag of a listing, following Link from page to page; and the Links followed."""
    tags: list[str] = []
    links: list[str] = []
    for _ in range(20):
        status, headers, body = await mirror.get(path)
        assert status == 200, body
        tags += json.loads(body)["tags"]
        link = headers.get("Link")
        if link is None:
            return tags, links
        links.append(link)
        match = re.fullmatch(r'<([^>]+)>;\s*rel="next"', link)
        assert match is not None, link
        path = match[1]
    raise AssertionError("the pages never end")


async def test_tag_list_pages_link_to_the_mirror_with_ns_kept(
    fake_hub: FakeHub, second_hub: FakeHub, tmp_path: Path
) -> None:
    image = make_image([make_random_layer(1024, seed=105)])
    second_hub.add_image("org/app", None, image)
    fake_hub.add_image("library/app", None, image)
    for tag in ("a", "b", "c", "d", "e"):
        second_hub.set_tag("org/app", tag, image.digest)
    for tag in ("x", "y", "z"):
        fake_hub.set_tag("library/app", tag, image.digest)
    settings = settings_for(fake_hub.url, tmp_path / "data")
    upstreams = {**settings.upstreams, "ghcr.io": UpstreamSettings("ghcr.io", second_hub.url)}
    async with RunningMirror(replace(settings, upstreams=upstreams)) as mirror:
        tags, links = await follow_tag_pages(mirror, "/v2/org/app/tags/list?ns=ghcr.io&n=2")
        assert tags == ["a", "b", "c", "d", "e"]
        assert all(link.startswith("</v2/org/app/tags/list?") for link in links)
        assert all("ns=ghcr.io" in link for link in links)
        assert fake_hub.count(path_contains="tags/list") == 0

        # Docker Hub's short names stay as the client wrote them.
        tags, links = await follow_tag_pages(mirror, "/v2/app/tags/list?n=2")
        assert tags == ["x", "y", "z"]
        assert links
        assert all(link.startswith("</v2/app/tags/list?") for link in links)


NOSNIFF = "nosniff"


async def test_every_answer_says_nosniff(fake_hub: FakeHub, mirror: RunningMirror) -> None:
    layer = make_random_layer(1024, seed=106)
    image = make_image([layer])
    fake_hub.add_image("library/app", "latest", image)
    paths = [
        "/v2/",
        "/v2/app/manifests/latest",
        f"/v2/app/manifests/{image.digest}",
        f"/v2/app/blobs/{layer.digest}",  # cold
        f"/v2/app/blobs/{layer.digest}",  # cached
        "/v2/app/tags/list",
        "/v2/app/manifests/missing",
        "/v2/app/blobs/sha256:" + "0" * 64,
        "/v2/..bad/manifests/latest",
        "/nowhere",
        "/healthz",
        "/readyz",
        "/metrics",
    ]
    for path in paths:
        for method in ("GET", "HEAD", "DELETE"):
            status, headers, _ = await mirror.get(path, method=method)
            assert headers.get("X-Content-Type-Options") == NOSNIFF, (method, path, status)
    status, headers, _ = await mirror.get(
        f"/v2/app/blobs/{layer.digest}", headers={"Range": "bytes=999999-"}
    )
    assert (status, headers.get("X-Content-Type-Options")) == (416, NOSNIFF)
    etag = (await mirror.get("/v2/app/manifests/latest"))[1]["ETag"]
    status, headers, _ = await mirror.get(
        "/v2/app/manifests/latest", headers={"If-None-Match": etag}
    )
    assert (status, headers.get("X-Content-Type-Options")) == (304, NOSNIFF)


async def test_a_stored_manifest_of_an_unknown_type_is_served_as_a_generic_type(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    body = b"<html><script>alert(1)</script></html>"
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    (tmp_path / "data").mkdir()
    store = await EmbeddedStore.open(tmp_path / "data")
    await store.put_manifest("docker.io", "library/app", Manifest(body, "text/html", digest))
    await store.close()

    settings = settings_for(fake_hub.url, tmp_path / "data")
    async with RunningMirror(settings) as mirror:
        status, headers, served = await mirror.get(f"/v2/app/manifests/{digest}")
    assert (status, served) == (200, body)
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["X-Content-Type-Options"] == NOSNIFF
    assert fake_hub.count(server="registry") == 0


async def test_a_tag_list_page_size_that_is_not_a_number_is_refused_before_upstream(
    fake_hub: FakeHub, mirror: RunningMirror
) -> None:
    fake_hub.add_image("library/app", "1.0", make_image([make_random_layer(1024, seed=107)]))
    for n in ("-1", "abc", "9" * 30, "", "1.5"):
        status, _, body = await mirror.get(f"/v2/app/tags/list?n={n}")
        assert (status, error_code(body)) == (400, "PAGINATION_NUMBER_INVALID"), n
    assert fake_hub.count(server="registry") == 0
    status, _, body = await mirror.get("/v2/app/tags/list?n=0")
    assert status == 200
