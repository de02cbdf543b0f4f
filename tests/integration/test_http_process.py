"""A real ``mirror serve`` process: what its log and its ops endpoints tell an operator, and
how little a hostile client can make it write (issue 10)."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import bcrypt
import pytest_asyncio

from tests.support.fakehub import FakeHub
from tests.support.mirror import metric_value
from tests.support.oci import make_image, make_random_layer
from tests.support.process import MirrorProcess
from tests.support.waiting import eventually


@pytest_asyncio.fixture
async def second_hub() -> AsyncIterator[FakeHub]:
    async with FakeHub() as hub:
        yield hub


@pytest_asyncio.fixture
async def process(
    fake_hub: FakeHub, second_hub: FakeHub, tmp_path: Path
) -> AsyncIterator[MirrorProcess]:
    running = MirrorProcess(
        tmp_path / "data", fake_hub.url, "--upstream", f"ghcr.io={second_hub.url}"
    )
    await asyncio.to_thread(running.start)
    yield running
    await asyncio.to_thread(running.stop)


def log_lines(process: MirrorProcess) -> list[dict[str, object]]:
    return [json.loads(line) for line in process.log().splitlines() if line.startswith("{")]


def v2_requests(process: MirrorProcess) -> list[dict[str, object]]:
    """The access lines of API requests, as written so far."""
    return [
        line
        for line in log_lines(process)
        if line["event"] == "request" and str(line["path"]).startswith("/v2/")
    ]


async def test_the_log_says_where_it_listens_and_who_asked_what_of_which_registry(
    fake_hub: FakeHub, second_hub: FakeHub, process: MirrorProcess
) -> None:
    image = make_image([make_random_layer(1024, seed=201)])
    second_hub.add_image("org/app", "1.0", image)
    async with aiohttp.ClientSession() as session:
        url = f"{process.url}/v2/org/app/manifests/1.0?ns=ghcr.io"
        async with session.get(url, headers={"User-Agent": "containerd/2.0 test"}) as response:
            assert response.status == 200
        async with session.get(f"{process.url}/v2/app/manifests/none") as response:
            assert response.status == 404
    # The access line is written once the answer is sent.
    await eventually(lambda: len(v2_requests(process)) >= 2, "both access lines")

    [started] = [line for line in log_lines(process) if line["event"] == "mirror_started"]
    assert started["listen"] == process.host
    ghcr, hub = process.access_log()[-2:]
    assert ghcr["ns"] == "ghcr.io"
    assert ghcr["client"] == "127.0.0.1"
    assert ghcr["user_agent"] == "containerd/2.0 test"
    assert hub["ns"] == "docker.io"


async def test_the_access_line_times_each_request_to_a_hundredth_of_a_millisecond(
    fake_hub: FakeHub, process: MirrorProcess
) -> None:
    # The process runs on its default loop, uvloop, whose loop.time() moves in whole
    # milliseconds: durations taken from it read 0.00, 1.00 or 2.00 for a cached tag.
    layer = make_random_layer(4 * 64 * 1024, seed=203)  # four of the fake Hub's chunks
    fake_hub.add_image("library/timed", "1.0", make_image([layer]))
    fake_hub.blob_delay_per_chunk = 0.1
    manifest = f"{process.url}/v2/library/timed/manifests/1.0"
    async with aiohttp.ClientSession() as session:
        for _ in range(12):
            async with session.get(manifest) as response:
                assert response.status == 200
        async with session.get(f"{process.url}/v2/library/timed/blobs/{layer.digest}") as blob:
            assert await blob.read() == layer.data

    lines = [line for line in process.access_log() if "/library/timed/" in str(line["path"])]
    hits = [float(str(line["duration_ms"])) for line in lines if line["cache"] == "hit"]
    assert len(hits) == 11
    assert all(0 < duration < 1000 for duration in hits), hits
    assert not all(duration.is_integer() for duration in hits), hits
    [slow] = [line for line in lines if "/blobs/" in str(line["path"])]
    assert 390 <= float(str(slow["duration_ms"])) < 5000, slow


async def test_readyz_and_the_upstream_gauges_before_and_after_contact(
    fake_hub: FakeHub, process: MirrorProcess
) -> None:
    fake_hub.add_image("library/app", "1.0", make_image([make_random_layer(1024, seed=202)]))
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{process.url}/readyz") as response:
            upstreams = (await response.json())["upstreams"]
        async with session.get(f"{process.url}/metrics") as response:
            metrics = await response.text()
        assert upstreams["docker.io"]["reachable"] == "unknown"
        assert upstreams["ghcr.io"]["reachable"] == "unknown"
        for name in ("docker.io", "ghcr.io"):
            assert metric_value(metrics, "mirror_upstream_circuit_open", upstream=name) == 0
            for gauge in ("mirror_upstream_ratelimit_remaining", "mirror_upstream_ratelimit_limit"):
                value = metric_value(metrics, gauge, upstream=name)
                assert value is not None, (gauge, name)
                assert math.isnan(value)

        async with session.get(f"{process.url}/v2/app/manifests/1.0") as response:
            assert response.status == 200
        async with session.get(f"{process.url}/readyz") as response:
            upstreams = (await response.json())["upstreams"]
        async with session.get(f"{process.url}/metrics") as response:
            metrics = await response.text()
    assert upstreams["docker.io"]["reachable"] is True
    assert upstreams["ghcr.io"]["reachable"] == "unknown"
    remaining = metric_value(metrics, "mirror_upstream_ratelimit_remaining", upstream="docker.io")
    assert remaining == fake_hub.ratelimit_remaining


MALFORMED = [
    b"GARBAGE\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(64)),  # a TLS hello
    b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n",
    b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"G\x00T /v2/ HTTP/1.1\r\n\r\n",
    b"GET /v2/ HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
]


async def send_raw(host: str, data: bytes, *, half_close: bool = False) -> bytes:
    address, _, port = host.rpartition(":")
    reader, writer = await asyncio.open_connection(address, int(port))
    try:
        writer.write(data)
        await writer.drain()
        if half_close:
            writer.write_eof()
            return b""
        return await asyncio.wait_for(reader.read(65536), 10)
    except ConnectionError:
        return b""
    finally:
        writer.close()


async def test_a_flood_of_malformed_requests_and_half_closed_gets_logs_a_few_short_lines(
    fake_hub: FakeHub, process: MirrorProcess
) -> None:
    layer = make_random_layer(8 * 1024 * 1024, seed=203)
    fake_hub.add_image("library/app", "1.0", make_image([layer]))
    url = f"{process.url}/v2/app/blobs/{layer.digest}"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert await response.read() == layer.data  # now cached
    get_blob = f"GET /v2/app/blobs/{layer.digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    before = len(process.log().splitlines())

    for _ in range(20):
        answers = await asyncio.gather(*(send_raw(process.host, data) for data in MALFORMED))
        assert all(not answer.startswith(b"HTTP/1.1 5") for answer in answers)
        await asyncio.gather(
            *(send_raw(process.host, get_blob, half_close=True) for _ in range(10))
        )
    # What must not happen (a traceback, a flood of lines) has no moment to wait for: a
    # bounded while for the server to notice the connections closing.
    await asyncio.sleep(0.5)

    new = process.log().splitlines()[before:]
    assert "Traceback" not in "\n".join(new)
    noise = [line for line in new if '"event": "request"' not in line]
    assert len(noise) <= 10, "\n".join(noise[:20])
    assert all(len(line) < 600 for line in noise), "\n".join(noise)
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert await response.read() == layer.data  # still serving


async def test_workers_writing_one_log_never_mix_their_lines(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    # Unbuffered, as container images often run Python: each write() is a system call.
    running = MirrorProcess(
        tmp_path / "data", fake_hub.url, "--workers", "2", env={"PYTHONUNBUFFERED": "1"}
    )
    await asyncio.to_thread(running.start)
    try:
        async with aiohttp.ClientSession() as session:
            gate = asyncio.Semaphore(64)

            async def one(i: int) -> None:
                async with gate, session.get(f"{running.url}/v2/x{i}/tags/list?n=z") as answer:
                    await answer.read()

            await asyncio.gather(*(one(i) for i in range(3000)))
        await eventually(lambda: len(running.log().splitlines()) >= 3000, "3000 log lines")
    finally:
        await asyncio.to_thread(running.stop)
    lines = running.log().splitlines()
    broken = [line for line in lines if not _is_json(line)]
    assert broken == []
    assert len(lines) >= 3000


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


async def test_the_start_warns_of_logins_over_plain_http_once_and_says_offline(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    passwords = tmp_path / "htpasswd"
    passwords.write_text(f"alice:{bcrypt.hashpw(b'secret', bcrypt.gensalt(4)).decode()}\n")
    config = tmp_path / "mirror.yaml"
    config.write_text(f"auth:\n  htpasswd: {passwords}\n")
    plain = MirrorProcess(tmp_path / "plain", fake_hub.url, "--config", str(config),
                          "--workers", "2")  # fmt: skip
    with plain:
        pass
    warnings = [line for line in log_lines(plain) if line["event"] == "logins_over_plain_http"]
    assert len(warnings) == 1
    assert warnings[0]["level"] == "warning"

    offline = MirrorProcess(tmp_path / "offline", fake_hub.url, "--offline")
    with offline:
        pass
    [started] = [line for line in log_lines(offline) if line["event"] == "mirror_started"]
    assert started["offline"] is True
    assert fake_hub.url not in json.dumps(started)
    assert not [line for line in log_lines(offline) if line["event"] == "logins_over_plain_http"]
