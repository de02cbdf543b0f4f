"""Upgrades keep the data: what the previous release wrote, this one serves.

The previous release is built from its git commit (``git archive``, once a session) and run
with this interpreter and ``PYTHONPATH`` on its tree: its dependencies are this release's.
It fills a data dir (and a Redis) from the fake hub; this release, started on them, must
serve every image byte for byte without one upstream request. During a rolling upgrade a
replica of each release shares one Redis and one data dir. And a Redis whose keys a newer
release laid out is refused in one line, so that the next upgrade is protected as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from redis import Redis

from mirror.content import schema
from mirror.content.redis_store import SCHEMA, SCHEMA_KEY
from tests.support.binaries import require_binary
from tests.support.fakehub import FakeHub
from tests.support.oci import (
    ALL_MANIFEST_TYPES,
    Image,
    Index,
    make_image,
    make_index,
    make_layer,
    make_random_layer,
)
from tests.support.process import MirrorProcess, run_mirror
from tests.support.redis_server import RedisServer

# The last release before this one: main as it stood when the upgrade work began.
PREVIOUS_RELEASE = "6fdffc1"
ROOT = Path(__file__).resolve().parents[2]
ACCEPT = {"Accept": ", ".join(ALL_MANIFEST_TYPES)}

Content = dict[str, bytes]  # path under /v2/ -> the bytes a client must get


@pytest.fixture(scope="session")
def previous_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The previous release's package, extracted from git once per session."""
    git = require_binary("git")
    found = subprocess.run(
        [git, "-C", str(ROOT), "cat-file", "-e", f"{PREVIOUS_RELEASE}^{{commit}}"],
        capture_output=True,
        check=False,
    )
    if found.returncode != 0:
        message = f"commit {PREVIOUS_RELEASE} is not in this clone (a shallow clone?)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message} (CI=true, so this is a failure, not a skip)")
        pytest.skip(message)
    tree = tmp_path_factory.mktemp(f"release-{PREVIOUS_RELEASE}")
    archive = subprocess.run(
        [git, "-C", str(ROOT), "archive", PREVIOUS_RELEASE, "mirror"],
        capture_output=True,
        check=True,
    )
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    where = subprocess.run(
        [sys.executable, "-c", "import mirror; print(mirror.__file__)"],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert where == str(tree / "mirror" / "__init__.py")  # not this checkout's package
    return tree


def old_mirror(tree: Path, data_dir: Path, upstream: str, *extra: str, name: str) -> MirrorProcess:
    """``mirror serve`` of the previous release (``-m mirror`` finds the package in the
    working directory first, so the command runs from the old tree)."""
    return MirrorProcess(
        data_dir,
        upstream,
        *extra,
        env={"PYTHONPATH": str(tree)},
        prefix=("env", f"--chdir={tree}"),
        name=name,
        quick_stop=False,  # it has no shutdown_delay: SIGTERM stops it at once
    )


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer(require_binary("redis-server")) as server:
        yield server


def publish(hub: FakeHub, generation: int) -> Content:
    """Images of every kind a site pulls: Docker schema 2, OCI, an OCI index and a Docker
    manifest list with two platforms each, one layer of a few MiB; what each path serves."""
    n = generation
    big = make_random_layer(3 * 1024 * 1024, seed=100 + n)
    docker = make_image([make_layer({"etc/os": f"docker {n}".encode()}), big], docker=True)
    oci = make_image([make_layer({"app": f"oci {n}".encode()})])
    platforms = [
        make_image([make_layer({"bin": f"{arch} {n}".encode()})], arch=arch)
        for arch in ("amd64", "arm64")
    ]
    docker_platforms = [
        make_image([make_layer({"x": f"{arch} {n}".encode()})], arch=arch, docker=True)
        for arch in ("amd64", "arm64")
    ]
    images: list[tuple[str, str, Image | Index]] = [
        ("library/debian", f"12.{n}", docker),
        ("library/app", f"1.{n}", oci),
        ("library/multi", f"v{n}", make_index(platforms)),
        ("org/tool", f"v{n}", make_index(docker_platforms, docker=True)),
    ]
    content: Content = {}
    for repository, tag, item in images:
        if isinstance(item, Index):
            hub.add_index(repository, tag, item)
            content[f"{repository}/manifests/{tag}"] = item.index
            content[f"{repository}/manifests/{item.digest}"] = item.index
            members = item.images
        else:
            hub.add_image(repository, tag, item)
            content[f"{repository}/manifests/{tag}"] = item.manifest
            members = [item]
        for image in members:
            content[f"{repository}/manifests/{image.digest}"] = image.manifest
            for blob in image.blobs:
                content[f"{repository}/blobs/{blob.digest}"] = blob.data
    return content


async def pull(mirror: MirrorProcess, content: Content) -> None:
    """Every path of ``content`` through ``mirror``, in a client's order (tags first);
    each body must be the upstream's, byte for byte."""
    async with aiohttp.ClientSession() as session:
        for path, expected in content.items():
            async with session.get(f"{mirror.url}/v2/{path}", headers=ACCEPT) as response:
                body = await response.read()
                assert response.status == 200, (path, response.status, body[:300])
            assert body == expected, f"{path}: {len(body)} bytes, not the upstream's"


async def start(process: MirrorProcess) -> MirrorProcess:
    await asyncio.to_thread(process.start)
    return process


async def stop(process: MirrorProcess) -> None:
    await asyncio.to_thread(process.stop)


@contextlib.contextmanager
def store_args(store: str) -> Iterator[tuple[str, ...]]:
    """``--redis-url`` of a fresh redis-server for the Redis case; nothing for embedded."""
    if store == "embedded":
        yield ()
        return
    with RedisServer(require_binary("redis-server")) as server:
        yield ("--redis-url", server.url())


@pytest.mark.parametrize("store", ["embedded", "redis"])
async def test_what_the_previous_release_cached_is_served_without_the_upstream(
    store: str, previous_release: Path, fake_hub: FakeHub, tmp_path: Path
) -> None:
    with store_args(store) as redis_args:
        data = tmp_path / "data"
        content = publish(fake_hub, 1)
        old = await start(
            old_mirror(previous_release, data, fake_hub.url, *redis_args, name="previous")
        )
        try:
            await pull(old, content)
        finally:
            await stop(old)
        fake_hub.clear_log()

        new = await start(MirrorProcess(data, fake_hub.url, *redis_args, name="this"))
        try:
            await pull(new, content)
        finally:
            await stop(new)

        assert [(e.method, e.path) for e in fake_hub.log] == []
        assert "Traceback" not in new.log()


async def test_a_replica_of_each_release_share_one_redis_during_a_rolling_upgrade(
    previous_release: Path, fake_hub: FakeHub, redis: RedisServer, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    args = ("--redis-url", redis.url())
    client = Redis.from_url(redis.url())
    old = await start(old_mirror(previous_release, shared, fake_hub.url, *args, name="previous"))
    assert client.get(SCHEMA_KEY) is None  # the previous release knows no schema record
    new = await start(MirrorProcess(shared, fake_hub.url, *args, name="this"))
    assert client.get(SCHEMA_KEY) == str(SCHEMA).encode()
    try:
        # What the old replica fetched, the new one serves from the shared cache; and back.
        for generation, (first, second) in enumerate([(old, new), (new, old)]):
            content = publish(fake_hub, generation)
            await pull(first, content)
            fake_hub.clear_log()
            await pull(second, content)
            assert [(e.method, e.path) for e in fake_hub.log] == [], second.log_path
        # The old replica, restarted beside the new one, still starts and serves.
        await stop(old)
        await start(old)
        fake_hub.clear_log()
        await pull(old, content)
        assert fake_hub.log == []
    finally:
        await stop(old)
        await stop(new)
    for process in (old, new):
        assert "Traceback" not in process.log(), process.log_path


async def test_a_redis_a_newer_release_laid_out_is_refused_in_one_line(
    fake_hub: FakeHub, redis: RedisServer, tmp_path: Path
) -> None:
    client = Redis.from_url(redis.url())
    client.set(SCHEMA_KEY, SCHEMA + 1)
    client.set("mirror:v2:somebody-elses", b"kept")

    for workers in ("1", "2"):
        result = await asyncio.to_thread(
            run_mirror,
            "serve",
            "--listen", "127.0.0.1:0",
            "--data-dir", str(tmp_path / "data"),
            "--upstream", fake_hub.url,
            "--redis-url", redis.url(),
            "--workers", workers,
            timeout=60,
        )  # fmt: skip

        assert result.returncode == 1, result.stderr
        assert result.stderr.splitlines() == [
            f"mirror: error: Redis at 127.0.0.1:{redis.port} db 0 holds keys of schema"
            f" v{SCHEMA + 1}, newer than this mirror's v{SCHEMA}: run the newer release,"
            " or give this one a Redis (or db) of its own"
        ]
    for command in ("ls", "gc", "verify"):
        result = await asyncio.to_thread(
            run_mirror, command, "--data-dir", str(tmp_path / "data"), "--redis-url", redis.url()
        )
        assert (result.returncode, len(result.stderr.splitlines())) == (1, 1), result.stderr
        assert "newer than this mirror's" in result.stderr
    # Nothing was written: the record and the newer release's keys are as they were.
    assert sorted(client.keys()) == [SCHEMA_KEY.encode(), b"mirror:v2:somebody-elses"]
    assert client.get(SCHEMA_KEY) == str(SCHEMA + 1).encode()
    assert fake_hub.log == []


def test_a_data_dir_a_newer_release_migrated_is_refused_in_one_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with sqlite3.connect(data / "metadata.sqlite3") as db:
        db.execute(f"PRAGMA user_version = {schema.VERSION + 1}")

    result = run_mirror("serve", "--listen", "127.0.0.1:0", "--data-dir", str(data), timeout=60)

    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        f"mirror: error: the metadata store is at schema v{schema.VERSION + 1}, newer than this"
        f" mirror (v{schema.VERSION})"
    ]
