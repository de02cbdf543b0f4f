"""With Redis unreachable the mirror keeps serving: nothing waits on Redis behind a lock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from tests.support.fakehub import FakeHub
from tests.support.mirror import RunningMirror, settings_for
from tests.support.oci import OCI_MANIFEST, make_image, make_layer, make_random_layer


@pytest_asyncio.fixture
async def silent_port() -> AsyncIterator[int]:
    """A TCP port that accepts connections and never answers: a Redis that hangs."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    for writer in held:
        writer.close()
    server.close()


class HungRedis:
    """A Redis that completes the connection handshake and then answers nothing: every
    command it is sent waits out the client's timeout. It notes each command's name."""

    HANDSHAKE = frozenset({"CLIENT", "SELECT", "AUTH"})

    def __init__(self) -> None:
        self.commands: list[str] = []
        self._held: list[asyncio.StreamWriter] = []

    def asked(self) -> list[str]:
        """Commands sent by anyone but a probe (a probe only pings)."""
        return [name for name in self.commands if name != "PING"]

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._held.append(writer)
        try:
            while header := await reader.readline():
                words = [
                    (await reader.readexactly(int((await reader.readline())[1:]) + 2))[:-2]
                    for _ in range(int(header[1:]))
                ]
                name = words[0].decode().upper()
                if name == "HELLO":  # RESP3: a map whose "proto" says which was agreed
                    writer.write(b"%1\r\n+proto\r\n:" + words[1] + b"\r\n")
                elif name in self.HANDSHAKE:
                    writer.write(b"+OK\r\n")
                else:
                    self.commands.append(name)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError):
            pass

    def close(self) -> None:
        for writer in self._held:
            writer.close()


@pytest_asyncio.fixture
async def hung_redis() -> AsyncIterator[tuple[HungRedis, int]]:
    redis = HungRedis()
    server = await asyncio.start_server(redis.serve, "127.0.0.1", 0)
    yield redis, server.sockets[0].getsockname()[1]
    redis.close()
    server.close()


async def test_manifest_misses_do_not_wait_on_a_redis_known_to_hang(
    fake_hub: FakeHub, tmp_path: Path, hung_redis: tuple[HungRedis, int]
) -> None:
    redis, port = hung_redis
    images = [make_image([make_layer(f"image {n}".encode())]) for n in range(4)]
    for number, image in enumerate(images):
        fake_hub.add_image(f"library/app{number}", "latest", image)
    settings = settings_for(fake_hub.url, tmp_path / "data", redis_url=f"redis://127.0.0.1:{port}")
    async with RunningMirror(settings) as mirror:
        # The first miss finds Redis hanging and pays one timeout: the outage is known now,
        # to the store, the content graph and the leases alike.
        status, _, body = await mirror.get("/v2/app0/manifests/latest", accept=[OCI_MANIFEST])
        assert (status, body) == (200, images[0].manifest)
        assert redis.asked() == ["HMGET"]  # the tag's record: the one command waited out
        asked = len(redis.asked())
        for number, image in enumerate(images[1:], start=1):
            status, _, body = await mirror.get(
                f"/v2/app{number}/manifests/latest", accept=[OCI_MANIFEST]
            )
            assert (status, body) == (200, image.manifest)
        # Every later miss is answered without sending Redis anything (only probes ping it).
        assert redis.asked()[asked:] == []


async def test_cold_blobs_start_promptly_while_redis_hangs(
    fake_hub: FakeHub, tmp_path: Path, silent_port: int
) -> None:
    first, *layers = [make_random_layer(64 * 1024, seed=seed) for seed in range(7)]
    fake_hub.add_image("library/app", "latest", make_image([first, *layers]))
    settings = settings_for(
        fake_hub.url, tmp_path / "data", redis_url=f"redis://127.0.0.1:{silent_port}"
    )
    async with RunningMirror(settings) as mirror:
        # The first cold blob finds Redis hanging: it pays one timeout (2 s), unavoidably.
        status, _, body = await mirror.get(f"/v2/app/blobs/{first.digest}")
        assert (status, body) == (200, first.data)
        await asyncio.sleep(2.5)  # past the moment Redis is worth asking again
        started = time.monotonic()
        answers = await asyncio.gather(
            *(mirror.get(f"/v2/app/blobs/{layer.digest}") for layer in layers)
        )
        elapsed = time.monotonic() - started
    assert [status for status, _, _ in answers] == [200] * 6
    assert [body for _, _, body in answers] == [layer.data for layer in layers]
    # Nobody waits on Redis again: the outage is known, the local locks serve meanwhile.
    assert elapsed < 1.0, elapsed
