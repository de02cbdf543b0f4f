"""Stopping a real ``mirror serve`` with SIGTERM: /readyz says 503 at once, transfers in
flight finish with the right bytes, fills nobody reads leave nothing behind, and the
process exits 0; a second signal stops it at once."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import signal
import ssl
from pathlib import Path

import aiohttp
import pytest

from tests.integration.test_tls import Certificates
from tests.support.fakehub import FakeHub
from tests.support.oci import Blob, make_image, make_random_layer
from tests.support.process import MirrorProcess

MIB = 1024 * 1024
# A bound for the test to give up, far above what any step takes: not a timed assertion.
EXIT_WAIT = 120.0


async def status_of(url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status


async def read_rest(response: aiohttp.ClientResponse, hasher: hashlib._Hash) -> int:
    received = 0
    async for chunk in response.content.iter_chunked(MIB):
        hasher.update(chunk)
        received += len(chunk)
    return received


def blob_url(mirror: MirrorProcess, layer: Blob) -> str:
    return f"{mirror.url}/v2/library/big/blobs/{layer.digest}"


async def digest_of(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return f"sha256:{hashlib.sha256(await response.read()).hexdigest()}"


async def stop_with_a_transfer_in_flight(
    mirror: MirrorProcess, layer: Blob, *, workers: int = 0
) -> None:
    """SIGTERM while a client is part-way through ``layer``, which it reads only once the
    port has closed: it must still get every byte, and the process then exit 0. With
    ``workers``, /readyz is asked once the supervisor has passed the signal on to them all."""
    url = blob_url(mirror, layer)
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        hasher = hashlib.sha256()
        head = await response.content.readexactly(MIB)  # the transfer is under way
        hasher.update(head)

        mirror.send_signal(signal.SIGTERM)
        if workers:
            await mirror.wait_for_event("shutdown_started", count=workers)
        assert await status_of(f"{mirror.url}/readyz") == 503
        assert await status_of(f"{mirror.url}/v2/") == 200  # still accepting, for the delay
        await mirror.wait_for_event("shutdown_draining")
        with pytest.raises(aiohttp.ClientConnectionError):
            await status_of(f"{mirror.url}/v2/")  # no longer accepting

        received = len(head) + await read_rest(response, hasher)
    assert received == len(layer.data)
    assert f"sha256:{hasher.hexdigest()}" == layer.digest
    assert await asyncio.to_thread(mirror.wait, EXIT_WAIT) == 0


async def test_a_200_mib_transfer_in_flight_at_sigterm_completes_and_the_process_exits_0(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    layer = make_random_layer(200 * MIB, seed=41)
    fake_hub.add_image("library/big", "1.0", make_image([layer]))
    mirror = MirrorProcess(
        tmp_path / "data", fake_hub.url, "--shutdown-delay", "5s", "--shutdown-grace", "5m"
    )
    await asyncio.to_thread(mirror.start)
    try:
        await stop_with_a_transfer_in_flight(mirror, layer)
    finally:
        mirror.stop()
    draining = await mirror.wait_for_event("shutdown_draining")
    assert draining["transfers"] == 1
    drained = await mirror.wait_for_event("shutdown_drained")
    assert (drained["finished"], drained["cut"]) == (1, 0)
    # The fill the client read landed whole: a restart serves it without the upstream.
    assert fake_hub.count("GET", "cdn") == 1
    with MirrorProcess(tmp_path / "data", fake_hub.url) as restarted:
        assert await digest_of(blob_url(restarted, layer)) == layer.digest
    assert fake_hub.count("GET", "cdn") == 1


async def test_workers_pass_sigterm_on_and_let_the_transfer_finish(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    layer = make_random_layer(32 * MIB, seed=42)
    fake_hub.add_image("library/big", "1.0", make_image([layer]))
    mirror = MirrorProcess(
        tmp_path / "data", fake_hub.url, "--workers", "2", "--shutdown-delay", "5s"
    )
    await asyncio.to_thread(mirror.start)
    await mirror.wait_for_event("listening", count=2)  # the first one answering is not enough
    try:
        await stop_with_a_transfer_in_flight(mirror, layer, workers=2)
    finally:
        mirror.stop()
    assert mirror.log().count('"shutdown_drained"') == 2  # each worker drained


async def test_a_transfer_outlasting_the_grace_is_cut_and_the_process_exits_0(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    layer = make_random_layer(64 * MIB, seed=45)
    fake_hub.add_image("library/big", "1.0", make_image([layer]))
    mirror = MirrorProcess(tmp_path / "data", fake_hub.url, "--shutdown-grace", "1s")
    await asyncio.to_thread(mirror.start)
    url = blob_url(mirror, layer)
    try:
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            await response.content.readexactly(MIB)
            # The client reads nothing more: far more than socket buffers hold is left.
            mirror.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(mirror.wait, EXIT_WAIT) == 0
            with pytest.raises(aiohttp.ClientPayloadError):
                await read_rest(response, hashlib.sha256())
    finally:
        mirror.stop()
    drained = await mirror.wait_for_event("shutdown_drained")
    assert (drained["finished"], drained["cut"]) == (0, 1)


@pytest.mark.parametrize(
    ("second", "workers"),
    [(signal.SIGINT, 1), (signal.SIGTERM, 1), (signal.SIGTERM, 2)],
    ids=["sigint", "sigterm", "sigterm-workers"],
)
async def test_a_second_signal_stops_at_once(
    fake_hub: FakeHub, tmp_path: Path, second: signal.Signals, workers: int
) -> None:
    layer = make_random_layer(64 * MIB, seed=43)
    fake_hub.add_image("library/big", "1.0", make_image([layer]))
    # A grace far longer than the test may wait: only the second signal can end it in time.
    mirror = MirrorProcess(
        tmp_path / "data",
        fake_hub.url,
        "--shutdown-delay",
        "10m",
        "--shutdown-grace",
        "1h",
        "--workers",
        str(workers),
    )
    await asyncio.to_thread(mirror.start)
    await mirror.wait_for_event("listening", count=workers)
    url = blob_url(mirror, layer)
    try:
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            await response.content.readexactly(MIB)
            mirror.send_signal(signal.SIGTERM)
            await mirror.wait_for_event("shutdown_started", count=workers)
            mirror.send_signal(second)
            assert await asyncio.to_thread(mirror.wait, EXIT_WAIT) == 0
            with pytest.raises(aiohttp.ClientPayloadError):
                await read_rest(response, hashlib.sha256())  # cut, never a clean end
    finally:
        mirror.stop()
    assert '"shutdown_forced"' in mirror.log()


async def test_a_fill_nobody_reads_any_more_stops_and_leaves_nothing_behind(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    layer = make_random_layer(16 * MIB, seed=44)
    fake_hub.add_image("library/big", "1.0", make_image([layer]))
    fake_hub.blob_delay_per_chunk = 0.05  # 256 chunks: the fill is still running at the stop
    data = tmp_path / "data"
    mirror = MirrorProcess(data, fake_hub.url)
    await asyncio.to_thread(mirror.start)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(blob_url(mirror, layer)) as response:
                await response.content.readexactly(64 * 1024)
            # The client has gone; its fill goes on, read by nobody.
            mirror.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(mirror.wait, EXIT_WAIT) == 0
    finally:
        mirror.stop()
    assert [path.name for path in (data / "blobs").rglob("*") if path.is_file()] == []
    fake_hub.blob_delay_per_chunk = 0.0
    with MirrorProcess(data, fake_hub.url) as restarted:
        assert await digest_of(blob_url(restarted, layer)) == layer.digest
    assert fake_hub.count("GET", "cdn") == 2


async def closed_without_a_byte(reader: asyncio.StreamReader) -> bool:
    """Whether the mirror closes this connection without sending anything more."""
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        return await asyncio.wait_for(reader.read(), EXIT_WAIT) == b""
    return True


async def test_at_the_stop_idle_connections_and_unfinished_handshakes_are_closed(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    certificates = Certificates(tmp_path / "tls")
    layer = make_random_layer(64 * MIB, seed=46)
    fake_hub.add_image("library/big", "1.0", make_image([layer]))
    # A grace far longer than the test may wait: the transfer held open below keeps the
    # process draining while the other connections must already have been closed.
    mirror = MirrorProcess(
        tmp_path / "data",
        fake_hub.url,
        *certificates.options,
        "--shutdown-delay",
        "1s",
        "--shutdown-grace",
        "1h",
        ca_file=certificates.ca_file,
    )
    await asyncio.to_thread(mirror.start)
    tls = ssl.create_default_context(cafile=str(certificates.ca_file))
    try:
        idle, idle_writer = await asyncio.open_connection(
            "127.0.0.1", mirror.port, ssl=tls, server_hostname="127.0.0.1"
        )
        idle_writer.write(f"GET /v2/ HTTP/1.1\r\nHost: {mirror.host}\r\n\r\n".encode())
        head = await idle.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")  # answered, and kept alive
        connector = aiohttp.TCPConnector(ssl=tls)
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(blob_url(mirror, layer)) as response,
        ):
            hasher = hashlib.sha256()
            hasher.update(await response.content.readexactly(MIB))
            # Connected, never sending its ClientHello: a handshake under way at the stop.
            handshake, handshake_writer = await asyncio.open_connection("127.0.0.1", mirror.port)
            mirror.send_signal(signal.SIGTERM)
            await mirror.wait_for_event("shutdown_draining")
            assert await closed_without_a_byte(handshake)
            await idle.readexactly(int(_content_length(head)))
            assert await closed_without_a_byte(idle)
            received = MIB + await read_rest(response, hasher)
        idle_writer.close()
        handshake_writer.close()
        assert received == len(layer.data)
        assert f"sha256:{hasher.hexdigest()}" == layer.digest
        assert await asyncio.to_thread(mirror.wait, EXIT_WAIT) == 0
    finally:
        mirror.stop()
    draining = await mirror.wait_for_event("shutdown_draining")
    assert (draining["transfers"], draining["handshakes_ended"]) == (1, 1)
    drained = await mirror.wait_for_event("shutdown_drained")
    assert (drained["finished"], drained["cut"]) == (1, 0)


def _content_length(head: bytes) -> str:
    for line in head.decode().split("\r\n"):
        name, _, value = line.partition(":")
        if name.lower() == "content-length":
            return value.strip()
    raise AssertionError(head)
