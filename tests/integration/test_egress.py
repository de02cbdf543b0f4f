"""Upstreams over HTTPS: verified against a CA the site trusts, through a real forward proxy.

The fake Docker Hub (registry, token server and CDN) speaks TLS with a certificate from a
test CA; tinyproxy from Debian stands in for the corporate egress proxy.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
import trustme

from tests.support.binaries import require_binary
from tests.support.fakehub import FakeHub
from tests.support.oci import OCI_MANIFEST, make_image, make_layer
from tests.support.process import MirrorProcess
from tests.support.realregistry import free_port
from tests.support.secrets import HUB_PASSWORD, HUB_USER
from tests.support.waiting import eventually


@pytest.fixture(scope="module")
def upstream_ca() -> trustme.CA:
    return trustme.CA()


@pytest_asyncio.fixture
async def tls_hub(upstream_ca: trustme.CA) -> AsyncIterator[FakeHub]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    upstream_ca.issue_cert("127.0.0.1").configure_cert(context)
    async with FakeHub(ssl_context=context) as hub:
        hub.credentials = (HUB_USER, HUB_PASSWORD)
        yield hub


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """tinyproxy on a loopback port: (its URL, its log file)."""
    binary = require_binary("tinyproxy")
    port = free_port()
    log = tmp_path / "tinyproxy.log"
    config = tmp_path / "tinyproxy.conf"
    config.write_text(
        f"Port {port}\nListen 127.0.0.1\nTimeout 60\nMaxClients 50\nAllow 127.0.0.1\n"
        f'LogFile "{log}"\nLogLevel Info\nPidFile "{tmp_path / "tinyproxy.pid"}"\n'
    )
    process = subprocess.Popen(
        [binary, "-d", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", port), timeout=0.5
            ):
                break
            assert process.poll() is None, "tinyproxy exited"
            assert time.monotonic() < deadline, "tinyproxy did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", log
    finally:
        process.terminate()
        process.wait(timeout=10)


def write_config(tmp_path: Path, hub: FakeHub, **upstream: object) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    secret = tmp_path / "hub-password"
    secret.write_text(HUB_PASSWORD + "\n")
    entry = {"url": hub.url, "username": HUB_USER, "password_file": str(secret), **upstream}
    path = tmp_path / "mirror.yaml"
    path.write_text(json.dumps({"upstreams": {"docker.io": entry}}))  # JSON is YAML
    return path


async def pull(mirror: MirrorProcess, image_path: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.get(
        f"{mirror.url}{image_path}", headers={"Accept": OCI_MANIFEST}
    ) as answer:
        return answer.status, await answer.read()


def no_proxy_env(proxy_url: str | None = None) -> dict[str, str]:
    env = {"NO_PROXY": "", "no_proxy": "", "HTTPS_PROXY": "", "HTTP_PROXY": ""}
    if proxy_url is not None:
        env |= {"HTTPS_PROXY": proxy_url, "HTTP_PROXY": proxy_url}
    return env


async def test_https_upstream_trusted_through_its_ca_file_and_refused_without(
    tls_hub: FakeHub, tmp_path: Path, upstream_ca: trustme.CA
) -> None:
    image = make_image([make_layer(b"over https")])
    tls_hub.add_image("library/app", "1", image)
    ca_file = tmp_path / "upstream-ca.pem"
    upstream_ca.cert_pem.write_to_path(str(ca_file))
    path = f"/v2/app/blobs/{image.layers[0].digest}"

    trusted = write_config(tmp_path / "trusted", tls_hub, ca_file=str(ca_file))
    with MirrorProcess(
        tmp_path / "trusted" / "data", tls_hub.url, "--config", str(trusted), env=no_proxy_env()
    ) as mirror:
        assert await pull(mirror, "/v2/app/manifests/1") == (200, image.manifest)
        assert await pull(mirror, path) == (200, image.layers[0].data)
    assert tls_hub.count(server="cdn") >= 1  # the CDN, over TLS, trusted through the same CA

    plain = write_config(tmp_path / "plain", tls_hub)
    with MirrorProcess(
        tmp_path / "plain" / "data", tls_hub.url, "--config", str(plain), env=no_proxy_env()
    ) as mirror:
        status, body = await pull(mirror, "/v2/app/manifests/1")
        assert status == 503
        assert json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
    assert "certificate" in mirror.log().lower()

    lab = write_config(tmp_path / "lab", tls_hub, insecure=True)
    with MirrorProcess(
        tmp_path / "lab" / "data", tls_hub.url, "--config", str(lab), env=no_proxy_env()
    ) as mirror:
        assert await pull(mirror, "/v2/app/manifests/1") == (200, image.manifest)
    assert "upstream_tls_unverified" in mirror.log()


async def test_upstream_traffic_goes_through_the_egress_proxy_and_leaks_nothing_to_it(
    tls_hub: FakeHub, tmp_path: Path, upstream_ca: trustme.CA, proxy: tuple[str, Path]
) -> None:
    proxy_url, proxy_log = proxy
    image = make_image([make_layer(b"through the proxy")])
    tls_hub.add_image("library/app", "1", image)
    ca_file = tmp_path / "upstream-ca.pem"
    upstream_ca.cert_pem.write_to_path(str(ca_file))
    config = write_config(tmp_path, tls_hub, ca_file=str(ca_file))
    with MirrorProcess(
        tmp_path / "data", tls_hub.url, "--config", str(config), env=no_proxy_env(proxy_url)
    ) as mirror:
        assert await pull(mirror, "/v2/app/manifests/1") == (200, image.manifest)
        path = f"/v2/app/blobs/{image.layers[0].digest}"
        assert await pull(mirror, path) == (200, image.layers[0].data)
    hosts = {url.partition("://")[2] for url in (tls_hub.url, tls_hub.token_url, tls_hub.cdn_url)}

    def tunnels() -> set[str]:
        logged = proxy_log.read_text(errors="replace")
        return set(re.findall(r"Request \(file descriptor \d+\): CONNECT (\S+) HTTP", logged))

    wanted = {host.split("/")[0] for host in hosts}
    # The proxy writes its log on its own time: wait for the tunnels it must have made
    # (the assertion below shows the log if they never come).
    with contextlib.suppress(AssertionError):
        await eventually(lambda: wanted <= tunnels(), "the proxy's tunnels")
    logged = proxy_log.read_text(errors="replace")
    assert wanted <= tunnels(), logged
    for secret in (HUB_PASSWORD, "fake-", "Bearer", "Authorization"):
        assert secret not in logged
