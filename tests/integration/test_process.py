"""The mirror as a process: how it starts, stops and fails where an operator runs it."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

from tests.support.fakehub import FakeHub
from tests.support.process import MirrorProcess


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
        with urllib.request.urlopen(f"{mirror.url}/healthz", timeout=5) as response:
            assert response.status == 200
    assert os.environ.get("MIRROR_SERVICE_HOST") is None
