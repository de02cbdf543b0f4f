"""An upstream that takes connections and never answers costs seconds, not minutes."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest_asyncio

from tests.support.fakehub import FakeHub
from tests.support.oci import OCI_MANIFEST, make_image, make_layer
from tests.support.process import MirrorProcess


@pytest_asyncio.fixture
async def silent_url() -> AsyncIterator[str]:
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    for writer in held:
        writer.close()
    server.close()


async def timed_get(url: str) -> tuple[int, dict[str, object], float]:
    started = time.monotonic()
    async with aiohttp.ClientSession() as session, session.get(
        url, headers={"Accept": OCI_MANIFEST}
    ) as response:
        body = json.loads(await response.read())
        return response.status, body, time.monotonic() - started


async def test_a_registry_that_never_answers_fails_a_pull_within_the_request_timeout(
    tmp_path: Path, silent_url: str
) -> None:
    options = ("--request-timeout", "1", "--read-timeout", "30")
    with MirrorProcess(tmp_path / "data", silent_url, *options) as mirror:
        for _ in range(3):
            status, body, elapsed = await timed_get(f"{mirror.url}/v2/app/manifests/1.0")
            assert status == 503
            assert body["errors"][0]["code"] == "UNAVAILABLE"  # type: ignore[index]
            assert elapsed < 3.0
        log = mirror.log()
    failures = [line for line in log.splitlines() if "upstream_request_failed" in line]
    assert len(failures) == 1  # the cause, once: the repeats are counted, not logged
    assert "no answer in time" in failures[0]


async def test_a_token_server_that_never_answers_fails_within_the_request_timeout(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    fake_hub.add_image("library/app", "1.0", make_image([make_layer(b"x")]))
    fake_hub.token_hangs = True
    options = ("--request-timeout", "1", "--read-timeout", "30")
    with MirrorProcess(tmp_path / "data", fake_hub.url, *options) as mirror:
        status, _, elapsed = await timed_get(f"{mirror.url}/v2/app/manifests/1.0")
    assert status == 503
    assert elapsed < 3.0
