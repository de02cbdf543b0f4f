"""What one abusive client can cost everyone else: the cold-lookup budget, descriptors held
by downloads that never read, half-finished TLS handshakes, and pipelined requests (issue 21).
Each client here is a loopback address of its own (127.0.0.2, 127.0.0.3 ...): the mirror
tells clients apart by the address a connection comes from."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
from pathlib import Path

import aiohttp
import pytest

from tests.integration.test_tls import Certificates
from tests.support.fakehub import FakeHub
from tests.support.mirror import RunningMirror, settings_for
from tests.support.oci import OCI_MANIFEST, Image, make_image, make_layer, make_random_layer
from tests.support.process import MirrorProcess


async def fetch(url: str, *, source: str = "127.0.0.1") -> tuple[int, bytes]:
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=connector) as session:
        headers = {"Accept": OCI_MANIFEST}
        async with session.get(url, headers=headers) as answer:
            return answer.status, await answer.read()


async def pull(base: str, name: str, image: Image, source: str) -> list[int]:
    """A client's pull of an image: its manifest, then its blobs; the statuses it got."""
    statuses = [(await fetch(f"{base}/v2/{name}/manifests/latest", source=source))[0]]
    for blob in image.blobs:
        status, body = await fetch(f"{base}/v2/{name}/blobs/{blob.digest}", source=source)
        statuses.append(status)
        assert status != 200 or body == blob.data
    return statuses


@pytest.mark.parametrize("miss_limit", [0.0, 1 / 60], ids=["miss-limit-off", "miss-limit-on"])
async def test_one_address_flooding_cold_lookups_leaves_the_budget_to_the_others(
    fake_hub: FakeHub, tmp_path: Path, miss_limit: float
) -> None:
    images = {f"library/app{n}": make_image([make_layer(f"app{n}".encode())]) for n in range(3)}
    for name, image in images.items():
        fake_hub.add_image(name, "latest", image)
    settings = settings_for(
        fake_hub.url, tmp_path / "data", cold_lookup_rate=1.0, client_miss_limit=miss_limit
    )
    async with RunningMirror(settings) as mirror:
        flood = await asyncio.gather(
            *(fetch(f"{mirror.url}/v2/library/app0/manifests/made-up-{n}") for n in range(100))
        )
        flooded = [status for status, _ in flood]
        assert flooded.count(429) >= 90  # the flood itself is bounded
        assert set(flooded) <= {404, 429}

        pulls = await asyncio.gather(
            *(
                pull(mirror.url, name, image, f"127.0.0.{n + 2}")
                for n, (name, image) in enumerate(images.items())
            )
        )
    statuses = [status for statuses in pulls for status in statuses]
    assert statuses.count(429) == 0, pulls
    assert set(statuses) == {200}


async def stalled_get(port: int, path: str) -> socket.socket:
    """A GET whose client never reads: a receive buffer as small as the kernel allows, so
    the server's sends stall after a few KiB."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock


def first_bytes(sock: socket.socket) -> bytes:
    """What the server had sent first, or b"" when it sent nothing or cut the connection."""
    try:
        return sock.recv(12)
    except OSError:
        return b""


async def fetch_blob(url: str) -> tuple[int, bytes]:
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as answer:
        return answer.status, await answer.read()


async def fetch_blob_as_clients_do(
    url: str, tls: ssl.SSLContext | None = None
) -> tuple[list[int], bytes]:
    """A blob, asked again after a 503 as pulling clients do (Retry-After seconds later, a
    bounded number of times); the statuses on the way, and the last body."""
    statuses: list[int] = []
    for _ in range(30):
        timeout = aiohttp.ClientTimeout(total=60)
        connector = aiohttp.TCPConnector(ssl=tls if tls is not None else True)
        async with (
            aiohttp.ClientSession(timeout=timeout, connector=connector) as session,
            session.get(url) as answer,
        ):
            statuses.append(answer.status)
            body = await answer.read()
            if answer.status != 503:
                return statuses, body
            await asyncio.sleep(float(answer.headers["Retry-After"]))
    return statuses, body


def log_statuses(mirror: MirrorProcess) -> list[object]:
    return [line.get("status") for line in mirror.access_log()]


async def test_downloads_that_never_read_are_shed_before_descriptors_run_out(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    layer = make_random_layer(8 * 1024 * 1024, seed=211)
    fake_hub.add_image("library/app", "latest", make_image([layer]))
    url_path = f"/v2/library/app/blobs/{layer.digest}"
    limit = ("prlimit", "--nofile=256:256", "--")
    extra = ("--client-max-transfers", "1000")
    with MirrorProcess(tmp_path / "data", fake_hub.url, *extra, prefix=limit) as mirror:
        assert await fetch_blob(mirror.url + url_path) == (200, layer.data)
        # More connections than the process may hold at once, so it must shed some whatever
        # the order they are answered in.
        crowd = [await stalled_get(mirror.port, url_path) for _ in range(250)]
        try:
            # Three descriptors each (socket, blob file, the socket's duplicate): far more
            # than the process has; new pulls must still get their bytes.
            for _ in range(3):
                statuses, body = await fetch_blob_as_clients_do(mirror.url + url_path)
                assert statuses[-1] == 200, statuses
                assert body == layer.data
            answers = [first_bytes(sock) for sock in crowd]
        finally:
            for sock in crowd:
                sock.close()
        logged = log_statuses(mirror)
        log = mirror.log()
    assert not [a for a in answers if a.startswith(b"HTTP/1.1 5") and b" 503" not in a]
    assert 500 not in logged
    assert "Traceback" not in log
    assert "idle_connections_shed" in log


async def test_a_download_the_client_stops_reading_ends_after_send_timeout(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    layer = make_random_layer(8 * 1024 * 1024, seed=212)
    fake_hub.add_image("library/app", "latest", make_image([layer]))
    url_path = f"/v2/library/app/blobs/{layer.digest}"
    with MirrorProcess(tmp_path / "data", fake_hub.url, "--send-timeout", "1") as mirror:
        assert await fetch_blob(mirror.url + url_path) == (200, layer.data)
        sock = await stalled_get(mirror.port, url_path)
        try:
            for _ in range(300):  # the deadline is 1 s; 30 s is only a bound for a broken run
                if "download_stalled_ended" in mirror.log():
                    break
                await asyncio.sleep(0.1)
            received = b""
            with contextlib.suppress(OSError):
                sock.setblocking(True)
                sock.settimeout(10)
                while chunk := sock.recv(1 << 20):
                    received += chunk
        finally:
            sock.close()
        log = mirror.log()
    assert "download_stalled_ended" in log
    assert received.startswith(b"HTTP/1.1 200")
    assert len(received) < layer.size  # cut, not completed
    assert "Traceback" not in log


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    """User and system CPU time the process has used (/proc/PID/stat, fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_pipelined_requests_never_read_pile_up_nothing_and_cost_no_cpu(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    layer = make_random_layer(8 * 1024 * 1024, seed=213)
    fake_hub.add_image("library/app", "latest", make_image([layer]))
    path = f"/v2/library/app/blobs/{layer.digest}"
    ranged = f"GET {path} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-59999\r\n\r\n".encode()
    whole = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    with MirrorProcess(tmp_path / "data", fake_hub.url) as mirror:
        assert await fetch_blob(mirror.url + path) == (200, layer.data)
        before = rss_bytes(mirror.pid)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_connect(sock, ("127.0.0.1", mirror.port))
            # 2,000 answers of 60 kB the client never reads (115 MiB), then a whole blob.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(loop.sock_sendall(sock, ranged * 2000 + whole), 5)
            await asyncio.sleep(1)
            cpu, window = cpu_seconds(mirror.pid), 3.0
            await asyncio.sleep(window)
            spent = cpu_seconds(mirror.pid) - cpu
            grown = rss_bytes(mirror.pid) - before
        finally:
            sock.close()
        assert await fetch_blob(mirror.url + path) == (200, layer.data)
    assert spent < window / 6, spent  # waiting for a client that does not read is free
    assert grown < 32 * 1024 * 1024, grown  # was 114 MiB: every answer kept in memory


@pytest.fixture
def certificates(tmp_path: Path) -> Certificates:
    return Certificates(tmp_path / "tls")


async def test_half_finished_tls_handshakes_are_shed_at_the_descriptor_limit(
    fake_hub: FakeHub, tmp_path: Path, certificates: Certificates
) -> None:
    layer = make_layer(b"over tls")
    fake_hub.add_image("library/app", "latest", make_image([layer]))
    path = f"/v2/library/app/blobs/{layer.digest}"
    limit = ("prlimit", "--nofile=256:256", "--")
    with MirrorProcess(
        tmp_path / "data",
        fake_hub.url,
        *certificates.options,
        ca_file=certificates.ca_file,
        prefix=limit,
    ) as mirror:
        tls = ssl.create_default_context(cafile=str(certificates.ca_file))
        crowd = []
        for _ in range(300):  # connections that never send their ClientHello
            with contextlib.suppress(OSError):
                crowd.append(await asyncio.open_connection("127.0.0.1", mirror.port))
        try:
            for _ in range(3):
                statuses, body = await fetch_blob_as_clients_do(mirror.url + path, tls)
                assert statuses[-1] == 200, statuses
                assert body == layer.data
        finally:
            for _, writer in crowd:
                writer.close()
        log = mirror.log()
    assert "Traceback" not in log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert sum(line.get("tls_handshakes_shed", 0) for line in lines) > 0


async def test_a_tls_handshake_never_finished_is_closed_within_its_bound(
    fake_hub: FakeHub, tmp_path: Path, certificates: Certificates
) -> None:
    with MirrorProcess(
        tmp_path / "data", fake_hub.url, *certificates.options, ca_file=certificates.ca_file
    ) as mirror:
        reader, writer = await asyncio.open_connection("127.0.0.1", mirror.port)
        try:
            # The bound is 10 s; 40 s only keeps a broken run from hanging (it was 60 s).
            data = await asyncio.wait_for(reader.read(), 40)
        finally:
            writer.close()
    assert data == b""
