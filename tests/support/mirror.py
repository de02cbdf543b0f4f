"""Run the mirror in-process against an upstream, the way tests need it."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from mirror.config import Settings, UpstreamSettings
from mirror.content.protocols import MetadataStore
from mirror.domain.reference import DOCKER_HUB
from mirror.engine import Engine
from mirror.web.app import Overrides, create_app
from mirror.web.routes.middleware import AccessLogger
from mirror.web.routes.state import ENGINE


@dataclass
class FakeClock:
    """Wall-clock time that tests move forward to step past the freshness window."""

    now: float = field(default_factory=time.time)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class MovingClock:
    """The engine's whole clock, moved by the test: wall time and intervals alike (token
    lifetimes, outage timing), unlike FakeClock, which moves the wall time only."""

    now: float = field(default_factory=time.time)
    since_start: float = 0.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.since_start

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.since_start += seconds


def settings_for(upstream_url: str, data_dir: Path, **changes: Any) -> Settings:
    upstream = UpstreamSettings(
        DOCKER_HUB,
        upstream_url,
        username=changes.pop("username", None),
        password=changes.pop("password", None),
    )
    base = Settings(
        listen_host="127.0.0.1",
        listen_port=0,
        data_dir=data_dir,
        upstreams={DOCKER_HUB: upstream},
        connect_timeout=2.0,
        read_timeout=5.0,
    )
    return replace(base, **changes)


class RunningMirror:
    """A mirror app on a loopback port, with a client session pointed at it."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: FakeClock | MovingClock | None = None,
        probe_interval: float = 5.0,
        store: MetadataStore | None = None,
        eviction_interval: float = 10.0,
    ) -> None:
        self.settings = settings
        self.eviction_interval = eviction_interval  # tests run passes by hand with a long one
        self.clock = clock
        self.probe_interval = probe_interval
        self.store = store  # a metadata store of the test's own instead of the embedded one
        self._server: TestServer | None = None
        self.session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return str(self._server.make_url("")).rstrip("/")

    @property
    def engine(self) -> Engine:
        assert self._server is not None
        return self._server.app[ENGINE]

    @property
    def host(self) -> str:
        return self.url.removeprefix("http://")

    async def start(self) -> None:
        overrides = Overrides(
            clock=self.clock,
            probe_interval=self.probe_interval,
            store=self.store,
            eviction_interval=self.eviction_interval,
        )
        app = create_app(self.settings, overrides=overrides)
        self._server = TestServer(app, host="127.0.0.1", access_log_class=AccessLogger)
        await self._server.start_server()
        self.session = aiohttp.ClientSession(auto_decompress=False)

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self._server is not None:
            await self._server.close()

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def __aenter__(self) -> RunningMirror:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def get(
        self,
        path: str,
        *,
        method: str = "GET",
        headers: Mapping[str, str] | None = None,
        accept: list[str] | None = None,
    ) -> tuple[int, Mapping[str, str], bytes]:
        """One request; Accept types go on separate header lines, as dockerd sends them."""
        assert self.session is not None
        sent = CIMultiDict(headers or {})
        for media_type in accept or []:
            sent.add("Accept", media_type)
        async with self.session.request(method, self.url + path, headers=sent) as response:
            body = await response.read()
            return response.status, response.headers, body


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """One sample from a Prometheus text page, or None when it is not there."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, _, value = line.rpartition(" ")
        if series.partition("{")[0] != name:
            continue
        if all(f'{key}="{val}"' in series for key, val in labels.items()):
            return float(value)
    return None
