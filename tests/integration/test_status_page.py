"""The status page, as an operator sees it: in a real headless browser (Debian's chromium
and chromedriver, driven by selenium), over a mirror of two workers."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.binaries import require_binary
from tests.support.fakehub import FakeHub
from tests.support.oci import OCI_MANIFEST, make_image, make_layer
from tests.support.process import MirrorProcess

HOSTILE = '<img src=x onerror="document.title=\'owned\'">'


async def get(url: str) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as session, session.get(
        url, headers={"Accept": OCI_MANIFEST}
    ) as answer:
        return answer.status, dict(answer.headers), await answer.read()


async def status_of(mirror: MirrorProcess) -> dict[str, Any]:
    status, _, body = await get(f"{mirror.url}/status.json")
    assert status == 200, (body, [line for line in mirror.log().splitlines() if "error" in line])
    document: dict[str, Any] = json.loads(body)
    return document


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    chromium = require_binary("chromium")
    driver_binary = require_binary("chromedriver")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--window-size=1366,900", f"--user-data-dir={tmp_path / 'chromium'}",
    ):  # fmt: skip
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=driver_binary)
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


async def test_the_page_shows_all_workers_pulls_hit_ratio_and_images(
    fake_hub: FakeHub, tmp_path: Path, browser: Any
) -> None:
    image = make_image([make_layer(b"status layer one"), make_layer(b"status layer two")])
    fake_hub.add_image("library/app", "1.0", image)
    data = tmp_path / "data"
    with MirrorProcess(data, fake_hub.url, "--workers", "2") as mirror:
        paths = ["/v2/app/manifests/1.0", *(f"/v2/app/blobs/{b.digest}" for b in image.blobs)]
        for _ in range(3):  # once from upstream, twice from the cache
            for path in paths:
                status, _, _ = await get(mirror.url + path)
                assert status == 200
        # An upstream error whose text is markup: the page must show it as text.
        errors = data / "run" / "upstream-errors.jsonl"
        line = {"at": time.time(), "upstream": "docker.io", "kind": "status", "error": HOSTILE}
        with errors.open("a") as file:
            file.write(json.dumps(line) + "\n")

        # Totals are the sum over both workers, whichever answers.
        deadline = time.monotonic() + 30
        while True:
            document = await status_of(mirror)
            pulls = sum(image["pulls"] for image in document["top_images"])
            if pulls == 3 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)  # pull counts reach the graph in batches (10 s)
        assert document["since_start"]["requests"] == 3 * len(paths)
        assert document["since_start"]["hits"] == 2 * len(paths)
        assert document["since_start"]["upstream_pulls_saved"] == 2
        assert document["top_images"] == [{"image": "docker.io/library/app:1.0", "pulls": 3}]
        assert document["upstreams"]["docker.io"]["reachable"] is True
        assert document["upstreams"]["docker.io"]["url"] == fake_hub.url
        assert document["disk"]["used"] == sum(blob.size for blob in image.blobs)
        again = await status_of(mirror)
        assert again["since_start"]["requests"] == document["since_start"]["requests"]

        status, headers, page = await get(mirror.url + "/")
        assert status == 200
        assert headers["Content-Type"].startswith("text/html")
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        assert not re.search(rb"""(src|href)=["']?(https?:)?//""", page)  # no outside asset

        await asyncio.to_thread(browser.get, mirror.url + "/")
        await asyncio.to_thread(_wait_loaded, browser)
        shown = await asyncio.to_thread(lambda: browser.find_element("tag name", "body").text)
        screenshot = tmp_path / "status.png"
        await asyncio.to_thread(browser.save_screenshot, str(screenshot))
        hostile_images = await asyncio.to_thread(
            lambda: browser.find_elements("css selector", "#errors img")
        )
        title = await asyncio.to_thread(lambda: browser.title)

    assert "docker.io/library/app:1.0" in shown
    ratio = f"{100 * 2 / 3:.1f}%"
    assert ratio in shown  # hit ratio since start (and in the last hour)
    assert "reachable" in shown
    assert fake_hub.url in shown  # where each upstream is
    assert HOSTILE in shown  # drawn as text
    assert hostile_images == []
    assert title == "mirror status"
    assert screenshot.stat().st_size > 10_000


def _wait_loaded(browser: Any) -> None:
    deadline = time.monotonic() + 20
    while browser.execute_script("return document.body.dataset.loaded") != "yes":
        assert time.monotonic() < deadline, "the page did not draw status.json"
        time.sleep(0.1)
