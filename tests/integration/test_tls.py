"""HTTPS on the listen address, with certificates made here (trustme) and real clients."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.support.binaries import require_binary
from tests.support.clients import Containerd, Dockerd
from tests.support.fakehub import FakeHub
from tests.support.oci import make_image, make_layer
from tests.support.process import (
    MirrorProcess,
    dir_blobs_verified,
    dir_manifest_digest,
    run_mirror,
)


class Certificates:
    """A CA, and a certificate for 127.0.0.1 and localhost written where the mirror reads."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        self.ca_file = directory / "ca.pem"
        self.cert = directory / "tls.crt"
        self.key = directory / "tls.key"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.issue()

    def issue(self, ca: trustme.CA | None = None) -> bytes:
        """A new certificate (from ``ca``, or this CA) in place; its DER bytes."""
        issued = (ca or self.ca).issue_cert("127.0.0.1", "localhost")
        partial = self.cert.with_suffix(".new")
        # Written beside and renamed in, as cert-manager and certbot replace theirs.
        pems = ((issued.private_key_pem, self.key), (issued.cert_chain_pems[0], self.cert))
        for pem, path in pems:
            pem.write_to_path(str(partial))
            partial.replace(path)
        return ssl.PEM_cert_to_DER_cert(issued.cert_chain_pems[0].bytes().decode())

    @property
    def options(self) -> tuple[str, ...]:
        return ("--tls-cert", str(self.cert), "--tls-key", str(self.key))


@pytest.fixture
def certificates(tmp_path: Path) -> Certificates:
    return Certificates(tmp_path / "tls")


def peer_certificate(port: int, ca_file: Path) -> bytes:
    context = ssl.create_default_context(cafile=str(ca_file))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, context.wrap_socket(
        raw, server_hostname="127.0.0.1"
    ) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der


async def test_https_only_tls12_up_and_plain_http_fails_fast(
    fake_hub: FakeHub, tmp_path: Path, certificates: Certificates
) -> None:
    with MirrorProcess(
        tmp_path / "data", fake_hub.url, *certificates.options, ca_file=certificates.ca_file
    ) as mirror:
        first = await asyncio.to_thread(peer_certificate, mirror.port, certificates.ca_file)

        old = ssl.create_default_context(cafile=str(certificates.ca_file))
        with warnings.catch_warnings():  # deprecated: which is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            old.minimum_version = ssl.TLSVersion.TLSv1
            old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("ALL:@SECLEVEL=0")
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.open_connection("127.0.0.1", mirror.port, ssl=old)

        # Plain HTTP on the TLS port: refused at once, never a hang.
        started = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", mirror.port)
        writer.write(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(1024), timeout=10)
        writer.close()
        assert not answer.startswith(b"HTTP/1.1 200")
        assert time.monotonic() - started < 5

        # The certificate replaced on disk serves new connections, with no restart.
        replaced = await asyncio.to_thread(certificates.issue)
        assert replaced != first
        deadline = time.monotonic() + 15
        while await asyncio.to_thread(
            peer_certificate, mirror.port, certificates.ca_file
        ) != replaced:
            assert time.monotonic() < deadline, "the new certificate was not picked up"
            await asyncio.sleep(0.2)
        assert "tls_certificate_reloaded" in mirror.log()


async def test_a_certificate_that_cannot_serve_stops_the_start_in_one_line(
    tmp_path: Path, certificates: Certificates
) -> None:
    certificates.key.write_text("not a key")
    done = await asyncio.to_thread(
        run_mirror, "serve", "--data-dir", str(tmp_path / "d"), *certificates.options
    )
    assert done.returncode == 2
    assert done.stderr.startswith("mirror: error: cannot use")
    assert "Traceback" not in done.stderr
    only_one = await asyncio.to_thread(
        run_mirror, "serve", "--data-dir", str(tmp_path / "d"), "--tls-cert", str(certificates.cert)
    )
    assert only_one.returncode == 2
    assert "tls_cert and tls_key must be given together" in only_one.stderr


async def test_a_certificate_and_key_mixed_up_name_the_file_at_fault(
    tmp_path: Path, certificates: Certificates
) -> None:
    cert, key = str(certificates.cert), str(certificates.key)
    other = Certificates(tmp_path / "other")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    cases = (
        ((key, cert), f"{key} is a private key, not a certificate (tls_cert and tls_key swapped?)"),
        ((key, key), f"{key} is a private key, not a certificate"),
        ((cert, cert), f"{cert} is a certificate, not a private key"),
        ((cert, str(other.key)), f"{other.key} is not the key of the certificate in {cert}"),
        ((cert, str(garbage)), f"{garbage} holds no PEM private key"),
    )
    for (given_cert, given_key), message in cases:
        done = await asyncio.to_thread(
            run_mirror, "serve", "--data-dir", str(tmp_path / "d"),
            "--tls-cert", given_cert, "--tls-key", given_key,
        )  # fmt: skip
        assert done.returncode == 2
        assert done.stderr.startswith(f"mirror: error: cannot use {given_cert} with {given_key}: ")
        assert done.stderr.endswith(f": {message}\n")
        assert len(done.stderr.splitlines()) == 1


@pytest.fixture
def served_over_tls(
    fake_hub: FakeHub, tmp_path: Path, certificates: Certificates
) -> Iterator[tuple[MirrorProcess, str, str]]:
    """A TLS mirror in front of the fake hub holding an image; (mirror, name, digest)."""
    name = f"library/tls-{uuid.uuid4().hex[:10]}"
    image = make_image([make_layer(f"over tls {name}".encode())])
    fake_hub.add_image(name, "v1", image)
    with MirrorProcess(
        tmp_path / "data", fake_hub.url, *certificates.options, ca_file=certificates.ca_file
    ) as mirror:
        yield mirror, name, image.digest


async def test_skopeo_pulls_over_tls_with_the_ca_in_its_cert_dir(
    served_over_tls: tuple[MirrorProcess, str, str], certificates: Certificates, tmp_path: Path
) -> None:
    require_binary("skopeo")
    mirror, name, digest = served_over_tls
    cert_dir = tmp_path / "certs"
    cert_dir.mkdir()
    shutil.copy(certificates.ca_file, cert_dir / "ca.crt")
    destination = tmp_path / "pulled"
    process = await asyncio.create_subprocess_exec(
        "skopeo", "--insecure-policy", "copy", "--quiet", "--src-cert-dir", str(cert_dir),
        f"docker://{mirror.host}/{name}:v1", f"dir:{destination}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 0, stderr.decode()
    assert dir_manifest_digest(destination) == digest
    assert dir_blobs_verified(destination) == 2

    # Without the CA, skopeo refuses the mirror: the certificate is checked.
    process = await asyncio.create_subprocess_exec(
        "skopeo", "--insecure-policy", "copy", "--quiet",
        f"docker://{mirror.host}/{name}:v1", f"dir:{tmp_path / 'refused'}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode != 0
    assert b"certificate" in stderr


async def test_ctr_pulls_over_tls_with_the_ca_in_hosts_toml(
    served_over_tls: tuple[MirrorProcess, str, str],
    certificates: Certificates,
    tmp_path: Path,
    containerd: Containerd,
) -> None:
    mirror, name, digest = served_over_tls
    hosts = tmp_path / "hosts"
    (hosts / "docker.io").mkdir(parents=True)
    (hosts / "docker.io" / "hosts.toml").write_text(
        f'server = "{mirror.url}"\n\n'
        f'[host."{mirror.url}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
        f'  ca = "{certificates.ca_file}"\n'
    )
    reference = f"docker.io/{name}:v1"
    try:
        assert await asyncio.to_thread(containerd.pull, reference, hosts) == digest
    finally:
        await asyncio.to_thread(containerd.remove_image, reference)


async def test_dockerd_pulls_over_tls_with_the_ca_in_certs_d(
    served_over_tls: tuple[MirrorProcess, str, str],
    certificates: Certificates,
    dockerd: Dockerd,
) -> None:
    mirror, name, digest = served_over_tls
    certs = Path("/etc/docker/certs.d") / mirror.host
    certs.mkdir(parents=True, exist_ok=True)
    shutil.copy(certificates.ca_file, certs / "ca.crt")
    reference = f"{mirror.host}/{name}:v1"
    try:
        pulled = await asyncio.to_thread(dockerd.pull, reference)
        assert pulled == digest
    finally:
        shutil.rmtree(certs, ignore_errors=True)
        await asyncio.to_thread(dockerd.remove_image, reference)
    served = [line for line in mirror.access_log() if str(line["path"]).startswith(f"/v2/{name}/")]
    assert any(line["status"] == 200 for line in served), json.dumps(served)
