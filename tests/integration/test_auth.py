"""Logins: an htpasswd file of bcrypt entries, as ``htpasswd -B`` writes it."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
import time
import uuid
from pathlib import Path

import aiohttp
import pytest

from mirror.config import AuthSettings
from mirror.services.clients import RECHECK_INTERVAL
from tests.support.binaries import require_binary
from tests.support.clients import ClientError, Containerd, Dockerd, Podman
from tests.support.fakehub import FakeHub
from tests.support.mirror import MovingClock, RunningMirror, settings_for
from tests.support.oci import make_image, make_layer
from tests.support.process import MirrorProcess, dir_manifest_digest
from tests.support.secrets import CLIENT_PASSWORD, CLIENT_USER, SECOND_PASSWORD


def htpasswd(path: Path, user: str, password: str, *, create: bool = False) -> None:
    binary = require_binary("htpasswd")
    flags = "-cbB" if create else "-bB"
    subprocess.run([binary, flags, str(path), user, password], check=True, capture_output=True)


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@pytest.fixture
def config(tmp_path: Path) -> Path:
    passwords = tmp_path / "htpasswd"
    htpasswd(passwords, CLIENT_USER, CLIENT_PASSWORD, create=True)
    path = tmp_path / "mirror.yaml"
    path.write_text(f"auth:\n  htpasswd: {passwords}\n  metrics: true\n")
    return path


async def get(
    url: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as answer:
        return answer.status, dict(answer.headers), await answer.read()


async def test_logins_guard_v2_and_metrics_and_leave_the_probes_open(
    fake_hub: FakeHub, tmp_path: Path, config: Path
) -> None:
    image = make_image([make_layer(b"guarded")])
    fake_hub.add_image("library/app", "1", image)
    with MirrorProcess(tmp_path / "data", fake_hub.url, "--config", str(config)) as mirror:
        status, headers, body = await get(f"{mirror.url}/v2/")
        assert status == 401
        assert headers["WWW-Authenticate"] == 'Basic realm="mirror"'
        assert json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
        for path in ("/v2/app/manifests/1", f"/v2/app/blobs/{image.layers[0].digest}",
                     "/v2/app/tags/list", "/metrics"):  # fmt: skip
            status, _, _ = await get(mirror.url + path)
            assert status == 401, path
            status, _, _ = await get(mirror.url + path, basic(CLIENT_USER, "wrong"))
            assert status == 401, path
        for path in ("/healthz", "/readyz"):
            status, _, _ = await get(mirror.url + path)
            assert status == 200, path
        assert fake_hub.log == []  # nothing unauthenticated reached the upstream

        good = basic(CLIENT_USER, CLIENT_PASSWORD)
        status, _, _ = await get(f"{mirror.url}/v2/", good)
        assert status == 200
        status, _, body = await get(f"{mirror.url}/v2/app/manifests/1", good)
        assert (status, body) == (200, image.manifest)
        status, _, _ = await get(f"{mirror.url}/metrics", good)
        assert status == 200

        # A user added to the file logs in without a restart.
        htpasswd(tmp_path / "htpasswd", "bob", SECOND_PASSWORD)
        deadline = time.monotonic() + 10
        while (await get(f"{mirror.url}/v2/", basic("bob", SECOND_PASSWORD)))[0] != 200:
            assert time.monotonic() < deadline, "the changed htpasswd file was not re-read"
            await asyncio.sleep(0.2)

    lines = mirror.access_log()
    assert any(line.get("user") == CLIENT_USER for line in lines)
    assert CLIENT_PASSWORD not in mirror.log()
    assert SECOND_PASSWORD not in mirror.log()


async def logins(mirror: MirrorProcess) -> dict[str, float]:
    """mirror_logins_total by result (read with a login that is remembered: no check)."""
    status, _, body = await get(f"{mirror.url}/metrics", basic(CLIENT_USER, CLIENT_PASSWORD))
    assert status == 200
    found = re.findall(r'^mirror_logins_total\{result="(\w+)"\} (\S+)$', body.decode(), re.M)
    return {result: float(value) for result, value in found}


async def test_failures_past_the_first_few_are_refused_without_a_check(
    fake_hub: FakeHub, tmp_path: Path, config: Path
) -> None:
    with MirrorProcess(tmp_path / "data", fake_hub.url, "--config", str(config)) as mirror:
        status, _, _ = await get(f"{mirror.url}/v2/", basic(CLIENT_USER, CLIENT_PASSWORD))
        assert status == 200
        wrong = basic(CLIENT_USER, "guess")
        answers = [await get(f"{mirror.url}/v2/", wrong) for _ in range(9)]
        assert [status for status, _, _ in answers[:5]] == [401] * 5
        for status, headers, body in answers[5:]:
            assert (status, json.loads(body)["errors"][0]["code"]) == (429, "TOOMANYREQUESTS")
            assert int(headers["Retry-After"]) >= 1
        status, _, _ = await get(f"{mirror.url}/v2/")  # no credentials: not a failure
        assert status == 401
        counted = await logins(mirror)
        assert counted["failed"] == 5  # bcrypt ran five times, not nine
        assert counted["throttled"] == 4


async def test_concurrent_guesses_cost_a_few_checks_and_real_users_still_log_in(
    fake_hub: FakeHub, tmp_path: Path, config: Path
) -> None:
    image = make_image([make_layer(b"pulled during the guessing")])
    fake_hub.add_image("library/app", "1", image)
    htpasswd(tmp_path / "htpasswd", "bob", SECOND_PASSWORD)
    with MirrorProcess(tmp_path / "data", fake_hub.url, "--config", str(config)) as mirror:
        good = basic(CLIENT_USER, CLIENT_PASSWORD)
        assert (await get(f"{mirror.url}/v2/app/manifests/1", good))[0] == 200
        blob = f"{mirror.url}/v2/app/blobs/{image.layers[0].digest}"
        # 40 wrong passwords at once from one address, and a pull beside them.
        guesses = [get(f"{mirror.url}/v2/", basic(CLIENT_USER, f"guess{n}")) for n in range(40)]
        answers = await asyncio.gather(*guesses, get(blob, good))
        pulled = answers.pop()
        assert (pulled[0], pulled[2]) == (200, image.layers[0].data)
        statuses = [status for status, _, _ in answers]
        assert set(statuses) <= {401, 429}
        assert statuses.count(401) <= 5  # the only ones checked
        counted = await logins(mirror)
        assert counted["failed"] == statuses.count(401)
        assert counted["throttled"] == statuses.count(429) >= 35
        # The user who logged in before, and a neighbour behind the same address who never
        # did, still get in at once.
        assert (await get(f"{mirror.url}/v2/", good))[0] == 200
        assert (await get(f"{mirror.url}/v2/", basic("bob", SECOND_PASSWORD)))[0] == 200


async def test_unknown_users_and_long_passwords_are_failures_like_any_other(
    fake_hub: FakeHub, tmp_path: Path, config: Path
) -> None:
    with MirrorProcess(tmp_path / "data", fake_hub.url, "--config", str(config)) as mirror:
        long_password = "x" * 100  # bcrypt reads 72 bytes at most
        for user in (CLIENT_USER, "nobody"):
            status, _, body = await get(f"{mirror.url}/v2/", basic(user, long_password))
            assert (status, json.loads(body)["errors"][0]["code"]) == (401, "UNAUTHORIZED")
        for _ in range(4):
            status, _, _ = await get(f"{mirror.url}/v2/", basic("nobody", "guess"))
        # Five failures for the unknown name, as for a known one: the next is throttled.
        status, _, _ = await get(f"{mirror.url}/v2/", basic("nobody", "guess"))
        assert status == 429
        assert "Traceback" not in mirror.log()


async def test_a_deleted_password_file_refuses_every_login_until_it_is_back(
    fake_hub: FakeHub, tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    passwords = tmp_path / "htpasswd"
    good = basic(CLIENT_USER, CLIENT_PASSWORD)
    clock = MovingClock()
    settings = settings_for(
        fake_hub.url, tmp_path / "data", auth=AuthSettings(passwords, metrics=True)
    )
    async with RunningMirror(settings, clock=clock) as mirror:
        assert (await get(f"{mirror.url}/v2/", good))[0] == 200
        kept = passwords.read_bytes()
        passwords.unlink()
        clock.advance(RECHECK_INTERVAL)  # the file is looked at again
        status, _, body = await get(f"{mirror.url}/v2/", good)
        assert (status, json.loads(body)["errors"][0]["code"]) == (503, "UNAVAILABLE")
        status, _, body = await get(f"{mirror.url}/readyz")
        assert status == 503
        assert str(passwords) in json.loads(body)["checks"]["logins"]
        assert "htpasswd_unreadable" in capsys.readouterr().out

        passwords.write_bytes(kept)
        clock.advance(RECHECK_INTERVAL)
        assert (await get(f"{mirror.url}/v2/", good))[0] == 200
        status, _, body = await get(f"{mirror.url}/readyz")
        assert (status, json.loads(body)["checks"]["logins"]) == (200, "ok")


async def test_skopeo_and_podman_log_in_and_pull(
    fake_hub: FakeHub, tmp_path: Path, config: Path, podman: Podman
) -> None:
    require_binary("skopeo")
    name = f"library/login-{uuid.uuid4().hex[:10]}"
    image = make_image([make_layer(f"for {name}".encode())])
    fake_hub.add_image(name, "v1", image)
    with MirrorProcess(tmp_path / "data", fake_hub.url, "--config", str(config)) as mirror:
        source = f"docker://{mirror.host}/{name}:v1"
        for credentials, expected in (
            (f"{CLIENT_USER}:{CLIENT_PASSWORD}", 0), (f"{CLIENT_USER}:wrong", 1), (None, 1)
        ):
            destination = tmp_path / f"skopeo-{expected}-{credentials is None}"
            command = ["skopeo", "--insecure-policy", "copy", "--quiet", "--src-tls-verify=false"]
            command += ["--src-creds", credentials] if credentials else []
            process = await asyncio.create_subprocess_exec(
                *command, source, f"dir:{destination}",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            _, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
            assert (process.returncode != 0) == bool(expected), stderr.decode()
            if not expected:
                assert dir_manifest_digest(destination) == image.digest
            else:
                assert b"unauthorized" in stderr.lower() or b"401" in stderr

        reference = f"{mirror.host}/{name}:v1"
        with pytest.raises(ClientError, match=r"401|nauthorized|invalid"):
            await asyncio.to_thread(
                podman.podman, "login", "--tls-verify=false", "-u", CLIENT_USER,
                "-p", "wrong", mirror.host,
            )  # fmt: skip
        await asyncio.to_thread(
            podman.podman, "login", "--tls-verify=false", "-u", CLIENT_USER,
            "-p", CLIENT_PASSWORD, mirror.host,
        )  # fmt: skip
        try:
            await asyncio.to_thread(
                podman.podman, "pull", "--quiet", "--tls-verify=false", reference, timeout=120
            )
            digest = await asyncio.to_thread(podman.image_digest, reference)
            assert digest == image.digest
        finally:
            await asyncio.to_thread(podman.podman, "logout", mirror.host)
            await asyncio.to_thread(podman.remove_image, reference)


async def test_docker_login_and_ctr_with_credentials_pull(
    fake_hub: FakeHub, tmp_path: Path, config: Path, dockerd: Dockerd, containerd: Containerd
) -> None:
    name = f"library/daemons-{uuid.uuid4().hex[:10]}"
    image = make_image([make_layer(f"for {name}".encode())])
    fake_hub.add_image(name, "v1", image)
    with MirrorProcess(tmp_path / "data", fake_hub.url, "--config", str(config)) as mirror:
        reference = f"{mirror.host}/{name}:v1"
        # dockerd talks plain HTTP to a loopback registry; the login is checked all the same.
        with pytest.raises(ClientError, match=r"401|nauthorized|incorrect"):
            await asyncio.to_thread(
                dockerd.docker, "login", "-u", CLIENT_USER, "-p", "wrong", mirror.host
            )
        await asyncio.to_thread(
            dockerd.docker, "login", "-u", CLIENT_USER, "-p", CLIENT_PASSWORD, mirror.host
        )
        try:
            assert await asyncio.to_thread(dockerd.pull, reference) == image.digest
        finally:
            await asyncio.to_thread(dockerd.docker, "logout", mirror.host)
            await asyncio.to_thread(dockerd.remove_image, reference)

        hosts = tmp_path / "hosts"
        (hosts / mirror.host).mkdir(parents=True)
        (hosts / mirror.host / "hosts.toml").write_text(
            f'server = "{mirror.url}"\n\n'
            f'[host."{mirror.url}"]\n  capabilities = ["pull", "resolve"]\n'
        )
        options = ("images", "pull", "--hosts-dir", str(hosts), "--snapshotter", "native")
        with pytest.raises(ClientError, match=r"401|nauthorized"):
            await asyncio.to_thread(containerd.ctr, *options, reference)
        user = f"{CLIENT_USER}:{CLIENT_PASSWORD}"
        await asyncio.to_thread(containerd.ctr, *options, "--user", user, reference, timeout=120)
        try:
            assert await asyncio.to_thread(containerd.image_digest, reference) == image.digest
        finally:
            await asyncio.to_thread(containerd.remove_image, reference)
