"""The mirror as a process: how it starts, stops and fails where an operator runs it."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from tests.support.fakehub import FakeHub
from tests.support.process import MirrorProcess


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
