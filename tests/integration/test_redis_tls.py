"""Redis over TLS (``rediss://``) with a CA of the site's own: a real redis-server with a
TLS port, certificates made here (trustme)."""

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import redis
import trustme

from tests.support.binaries import require_binary
from tests.support.fakehub import FakeHub
from tests.support.oci import OCI_MANIFEST, make_image, make_layer
from tests.support.process import MirrorProcess
from tests.support.realregistry import free_port
from tests.support.redis_server import RedisServer


class TLSRedis(RedisServer):
    """A redis-server answering TLS on ``tls_port`` (and plain TCP on ``port``, for checks)."""

    def __init__(self, binary: str, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        self.ca_file = directory / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        issued = ca.issue_cert("127.0.0.1", "localhost")
        cert, key = directory / "redis.crt", directory / "redis.key"
        issued.cert_chain_pems[0].write_to_path(str(cert))
        issued.private_key_pem.write_to_path(str(key))
        self.tls_port = free_port()
        super().__init__(
            binary,
            extra=(
                "--tls-port", str(self.tls_port),
                "--tls-cert-file", str(cert),
                "--tls-key-file", str(key),
                "--tls-ca-cert-file", str(self.ca_file),
                "--tls-auth-clients", "no",
            ),
        )  # fmt: skip

    def tls_url(self, db: int = 0) -> str:
        return f"rediss://127.0.0.1:{self.tls_port}/{db}"


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TLSRedis]:
    server = TLSRedis(require_binary("redis-server"), tmp_path / "redis-tls")
    server.start()
    try:
        yield server
    finally:
        server.close()


async def readyz_store(session: aiohttp.ClientSession, process: MirrorProcess) -> str:
    async with session.get(f"{process.url}/readyz") as response:
        store: str = (await response.json())["checks"]["store"]
        return store


async def test_rediss_with_the_sites_ca_file_works(
    fake_hub: FakeHub, tls_redis: TLSRedis, tmp_path: Path
) -> None:
    image = make_image([make_layer(b"over tls" * 1000)])
    fake_hub.add_image("library/app", "1.0", image)
    url, ca = tls_redis.tls_url(), str(tls_redis.ca_file)
    trusting = MirrorProcess(
        tmp_path / "data", fake_hub.url, "--redis-url", url, "--redis-ca-file", ca
    )
    # Without the CA the certificate is not trusted: Redis is as good as down.
    distrusting = MirrorProcess(tmp_path / "other", fake_hub.url, "--redis-url", url)
    for process in (trusting, distrusting):
        await asyncio.to_thread(process.start)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(
                f"{trusting.url}/v2/app/manifests/1.0", headers={"Accept": OCI_MANIFEST}
            ) as response:
                assert (response.status, await response.read()) == (200, image.manifest)
            assert await readyz_store(session, trusting) == "ok"
            assert await readyz_store(session, distrusting) == "degraded"
    finally:
        for process in (trusting, distrusting):
            await asyncio.to_thread(process.stop)
    with redis.Redis(port=tls_redis.port, socket_timeout=2) as client:
        assert len(list(client.scan_iter(match="mirror:v1:*:tag:1.0"))) == 1
