"""The mirror as a process: how it starts, stops and fails where an operator runs it."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import aiohttp

from tests.support.fakehub import FakeHub
from tests.support.oci import make_image, make_layer
from tests.support.process import MirrorProcess, run_mirror
from tests.support.realregistry import free_port


async def status_of(url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status


async def test_starts_with_kubernetes_service_link_variables(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    env = {
        "MIRROR_SERVICE_HOST": "10.96.0.10",
        "MIRROR_SERVICE_PORT": "5000",
        "MIRROR_PORT": "tcp://10.96.0.10:5000",
        "MIRROR_PORT_5000_TCP": "tcp://10.96.0.10:5000",
        "MIRROR_PORT_5000_TCP_ADDR": "10.96.0.10",
        "MIRROR_PORT_5000_TCP_PORT": "5000",
        "MIRROR_PORT_5000_TCP_PROTO": "tcp",
    }
    with MirrorProcess(tmp_path / "data", fake_hub.url, env=env) as mirror:
        assert await status_of(f"{mirror.url}/healthz") == 200


async def test_workers_on_a_port_in_use_exit_1_with_one_line(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    with MirrorProcess(tmp_path / "first", fake_hub.url, "--workers", "2") as first:
        started = time.monotonic()
        second = await asyncio.to_thread(
            run_mirror,
            "serve",
            "--log-format",
            "json",
            "--workers", "2",
            "--listen", first.host,
            "--data-dir", str(tmp_path / "second"),
            "--upstream", fake_hub.url,
        )  # fmt: skip
        assert second.returncode == 1
        assert time.monotonic() - started < 10
        errors = [line for line in second.stderr.splitlines() if line.startswith("mirror: error")]
        assert len(errors) == 1
        assert "in use" in errors[0]
        assert await status_of(f"{first.url}/healthz") == 200


async def test_supervisor_gives_up_when_workers_keep_dying(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    (data / "metadata.sqlite3").mkdir(parents=True)  # every worker fails to open its store
    result = await asyncio.to_thread(
        run_mirror,
        "serve",
        "--log-format",
        "json",
        "--workers", "2",
        "--listen", f"127.0.0.1:{free_port()}",
        "--data-dir", str(data),
        "--upstream", fake_hub.url,
    )  # fmt: skip
    assert result.returncode == 1
    assert "workers_keep_dying" in result.stderr


async def test_workers_keep_their_files_under_the_data_dir(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    with MirrorProcess(data, fake_hub.url, "--workers", "2") as mirror:
        assert await status_of(f"{mirror.url}/v2/") == 200
        # The workers' metrics files (one set per process) are where the data is.
        assert [name for name in os.listdir(data / "run" / "metrics") if name.endswith(".db")]
        assert await status_of(f"{mirror.url}/metrics") == 200


async def test_an_idle_crowd_at_the_fd_limit_does_not_lock_everyone_out(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    fake_hub.add_image("library/app", "latest", make_image([make_layer(b"x" * 100)]))
    limit = ("prlimit", "--nofile=256:256", "--")
    with MirrorProcess(tmp_path / "data", fake_hub.url, prefix=limit) as mirror:
        crowd = []
        for _ in range(400):
            try:
                crowd.append(await asyncio.open_connection("127.0.0.1", mirror.port))
            except OSError:
                break
        await asyncio.sleep(0.5)
        started = time.monotonic()
        assert await status_of(f"{mirror.url}/healthz") == 200
        assert await status_of(f"{mirror.url}/v2/app/manifests/latest") == 200
        assert time.monotonic() - started < 3.0
        for _, writer in crowd:
            writer.close()
        await asyncio.sleep(1.5)  # accept failures, if any, would be logged by now
        log = mirror.log()
    assert "Traceback" not in log
    assert len(log.encode()) < 20_000, log[-2000:]
    assert "idle_connections_shed" in log
