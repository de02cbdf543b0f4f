"""Real clients pulling through the mirror: containerd (ctr), dockerd and podman.

Each test pushes fresh content to the real registry under a name of its own, pulls it through
the session's mirror process with one client, and checks two things: the client ends up with
the digest the upstream serves, and the mirror's access log shows the manifests and every blob
of the pulled image went through it. The second check is what proves the mirror did the work:
dockerd falls back to Docker Hub on any mirror error and containerd tries the next host, so on
a machine with internet a broken mirror could otherwise go unnoticed.
"""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.binaries import require_binary
from tests.support.clients import (
    ClientError,
    Containerd,
    Dockerd,
    Podman,
    remove_tree,
    short_tempdir,
    write_hosts_toml,
)
from tests.support.oci import Image, Index, make_image, make_index, make_layer
from tests.support.process import MirrorProcess
from tests.support.realregistry import RealRegistry
from tests.support.redis_server import RedisServer
from tests.support.seaweedfs import SeaweedFS

TAG = "v1"
HOST_ARCH = "amd64"  # uname -m is x86_64 on these machines and in CI
OTHER_ARCH = "arm64"  # what ctr and podman pick from an index: pulled, never run
LOG_WAIT = 5.0  # the mirror writes an access-log line just after the response goes out


def _image(token: str, arch: str = HOST_ARCH) -> Image:
    # Content unique to the test, so no client or cache already holds any of its blobs.
    return make_image([make_layer({"id": f"{token} {arch}".encode()})], arch=arch)


def _two_platforms(token: str) -> Index:
    return make_index([_image(token, arch) for arch in (HOST_ARCH, OTHER_ARCH)])


@dataclass(frozen=True)
class Case:
    namespace: str  # the repository is NAMESPACE + a unique name
    build: Callable[[str], Image | Index]
    v2s2: bool  # pushed as Docker schema2 / manifest list

    @property
    def multi_platform(self) -> bool:
        return self.build is _two_platforms


CASES = {
    "oci-image": Case("library/", _image, v2s2=False),
    "oci-index": Case("library/", _two_platforms, v2s2=False),
    "docker-image": Case("library/", _image, v2s2=True),
    "docker-list": Case("library/", _two_platforms, v2s2=True),
    "outside-library": Case("someorg/", _image, v2s2=False),
    "three-level-name": Case("org/team/", _two_platforms, v2s2=True),
}


@dataclass(frozen=True)
class Pushed:
    repository: str  # as the upstream and the mirror's access log name it
    digest: str  # what the upstream serves for the tag


def _push(registry: RealRegistry, case_id: str) -> Pushed:
    case = CASES[case_id]
    token = uuid.uuid4().hex[:12]
    repository = f"{case.namespace}{case_id}-{token}"
    digest = registry.push_image(case.build(token), repository, TAG, v2s2=case.v2s2)
    return Pushed(repository, digest)


def _blobs_for(registry: RealRegistry, repository: str, digest: str, arch: str) -> list[str]:
    """The config and layer digests a client pulling `arch` must fetch, as the upstream has them.

    Read back from the upstream because skopeo rewrites manifests when it pushes Docker types.
    """
    document = json.loads(registry.get_manifest(repository, digest)[0])
    if "manifests" in document:
        child = next(
            entry["digest"]
            for entry in document["manifests"]
            if entry["platform"] == {"architecture": arch, "os": "linux"}
        )
        document = json.loads(registry.get_manifest(repository, child)[0])
    return [document["config"]["digest"], *(layer["digest"] for layer in document["layers"])]


def assert_pulled_through(mirror: MirrorProcess, repository: str, blobs: list[str]) -> None:
    """The mirror answered a manifest request and a GET of every blob for `repository`."""
    prefix = f"/v2/{repository}/"
    deadline = time.monotonic() + LOG_WAIT
    while True:
        lines = [line for line in mirror.access_log() if str(line["path"]).startswith(prefix)]
        served = {str(line["path"]) for line in lines if line["status"] in (200, 206)}
        fetched = {
            str(line["path"])
            for line in lines
            if line["method"] == "GET" and line["status"] in (200, 206)
        }
        manifests = any(path.startswith(f"{prefix}manifests/") for path in served)
        missing = [blob for blob in blobs if f"{prefix}blobs/{blob}" not in fetched]
        if (manifests and not missing) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    shown = "\n".join(f"{line['method']} {line['path']} {line['status']}" for line in lines)
    assert manifests, f"no manifest of {repository} served by the mirror:\n{shown}"
    assert not missing, f"blobs of {repository} not fetched through the mirror: {missing}\n{shown}"


def _pull_platform(case_id: str) -> tuple[str | None, str]:
    """(--platform option, architecture pulled) for ctr and podman: arm64 out of an index."""
    if CASES[case_id].multi_platform:
        return f"linux/{OTHER_ARCH}", OTHER_ARCH
    return None, HOST_ARCH


@pytest.fixture
def hosts_dir(tmp_path: Path, session_mirror: MirrorProcess) -> Path:
    """hosts.toml as the README recommends: the mirror first, Docker Hub as the fallback."""
    return write_hosts_toml(tmp_path / "hosts", session_mirror.url, fallback=True)


@pytest.mark.parametrize("case_id", list(CASES))
def test_ctr_pulls_through_the_mirror(
    real_registry: RealRegistry,
    session_mirror: MirrorProcess,
    containerd: Containerd,
    hosts_dir: Path,
    case_id: str,
) -> None:
    pushed = _push(real_registry, case_id)
    platform, arch = _pull_platform(case_id)

    digest = containerd.pull(f"docker.io/{pushed.repository}:{TAG}", hosts_dir, platform=platform)

    assert digest == pushed.digest
    blobs = _blobs_for(real_registry, pushed.repository, pushed.digest, arch)
    assert_pulled_through(session_mirror, pushed.repository, blobs)


@pytest.mark.parametrize("case_id", list(CASES))
def test_dockerd_pulls_through_its_registry_mirror(
    real_registry: RealRegistry,
    session_mirror: MirrorProcess,
    dockerd: Dockerd,
    case_id: str,
) -> None:
    pushed = _push(real_registry, case_id)

    # An unqualified name is a Docker Hub name, the only kind dockerd sends to its mirror.
    digest = dockerd.pull(f"{pushed.repository.removeprefix('library/')}:{TAG}")

    assert digest == pushed.digest
    blobs = _blobs_for(real_registry, pushed.repository, pushed.digest, HOST_ARCH)
    assert_pulled_through(session_mirror, pushed.repository, blobs)


@pytest.mark.parametrize("case_id", list(CASES))
def test_podman_pulls_through_the_registries_conf_mirror(
    real_registry: RealRegistry,
    session_mirror: MirrorProcess,
    podman: Podman,
    case_id: str,
) -> None:
    pushed = _push(real_registry, case_id)
    platform, arch = _pull_platform(case_id)

    digest = podman.pull(f"docker.io/{pushed.repository}:{TAG}", platform=platform)

    assert digest == pushed.digest
    blobs = _blobs_for(real_registry, pushed.repository, pushed.digest, arch)
    assert_pulled_through(session_mirror, pushed.repository, blobs)


@pytest.mark.parametrize("case_id", ["oci-index", "docker-image"])
def test_ctr_pulls_with_the_mirror_as_the_only_server(
    real_registry: RealRegistry,
    session_mirror: MirrorProcess,
    containerd: Containerd,
    tmp_path: Path,
    case_id: str,
) -> None:
    hosts = write_hosts_toml(tmp_path / "hosts", session_mirror.url, fallback=False)
    pushed = _push(real_registry, case_id)
    platform, arch = _pull_platform(case_id)

    digest = containerd.pull(f"docker.io/{pushed.repository}:{TAG}", hosts, platform=platform)

    assert digest == pushed.digest
    blobs = _blobs_for(real_registry, pushed.repository, pushed.digest, arch)
    assert_pulled_through(session_mirror, pushed.repository, blobs)


def _upstream_requests(mirror: MirrorProcess) -> float:
    with urllib.request.urlopen(f"{mirror.url}/metrics", timeout=10) as response:
        page = response.read().decode()
    return sum(
        float(line.rpartition(" ")[2])
        for line in page.splitlines()
        if line.startswith("mirror_upstream_requests_total{")
    )


def test_ctr_reaches_a_second_upstream_by_ns_and_an_unknown_ns_is_refused(
    second_registry: RealRegistry,
    session_mirror: MirrorProcess,
    containerd: Containerd,
    tmp_path: Path,
) -> None:
    token = uuid.uuid4().hex[:8]
    repository = f"someorg/tool-{token}"
    pushed = second_registry.push_image(_image(token), repository, TAG)
    hosts = tmp_path / "hosts"
    for registry in ("ghcr.io", "quay.io"):
        write_hosts_toml(hosts, session_mirror.url, fallback=False, registry=registry)

    digest = containerd.pull(f"ghcr.io/{repository}:{TAG}", hosts)
    assert digest == pushed

    before = _upstream_requests(session_mirror)
    with pytest.raises(ClientError):
        containerd.pull(f"quay.io/{repository}:{TAG}", hosts)
    assert _upstream_requests(session_mirror) == before  # nothing was forwarded anywhere
    refused = [
        line
        for line in session_mirror.access_log()
        if line["path"] == f"/v2/{repository}/manifests/{TAG}" and line["status"] == 404
    ]
    assert refused


def test_ctr_and_podman_pull_through_two_replicas_that_share_only_a_bucket_and_redis(
    real_registry: RealRegistry, containerd: Containerd, tmp_path: Path
) -> None:
    """Replicas with data dirs of their own, one Redis and one SeaweedFS bucket: containerd
    pulls through one, podman through the other, both get the upstream's digest, and
    neither replica keeps a blob file (the bytes are in the bucket)."""
    with (
        SeaweedFS() as storage,
        RedisServer(require_binary("redis-server")) as redis,
    ):
        pair = [
            MirrorProcess(
                tmp_path / f"data-{name}",
                real_registry.url,
                "--redis-url",
                redis.url(),
                env=storage.env("clients"),
                name=name,
            )
            for name in ("a", "b")
        ]
        for process in pair:
            process.start()
        podman = Podman(short_tempdir("podman-s3-"), pair[1].host, require_binary("podman"))
        try:
            podman.start()
            for case_id in ("oci-index", "docker-image"):
                pushed = _push(real_registry, case_id)
                platform, arch = _pull_platform(case_id)
                hosts = write_hosts_toml(tmp_path / f"hosts-{case_id}", pair[0].url, fallback=False)
                name = f"docker.io/{pushed.repository}:{TAG}"
                assert containerd.pull(name, hosts, platform=platform) == pushed.digest
                assert podman.pull(name, platform=platform) == pushed.digest
                blobs = _blobs_for(real_registry, pushed.repository, pushed.digest, arch)
                for process in pair:
                    assert_pulled_through(process, pushed.repository, blobs)
        finally:
            podman.stop()
            remove_tree(podman.directory)
            for process in pair:
                process.stop()
        for process in pair:
            kept = [p for p in process.data_dir.rglob("*") if p.is_file() and len(p.name) >= 64]
            assert kept == []
