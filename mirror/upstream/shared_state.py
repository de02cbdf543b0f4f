"""What every process serving one site must agree on about an upstream, shared.

A 429 promises the upstream "no manifest GET until Retry-After", and an open circuit
breaker means "the upstream is down, fail fast": both must hold for the whole site, not
per worker process. The state is a few numbers per upstream (wall-clock times, so they
mean the same in every process):

    blocked_until  no manifest GET before this (after a 429 or below the reserve)
    open_until     the circuit is open until then, unless the prober renews it
    remaining      the quota the upstream last announced
    limit          ... and its size
    contacted_at   when some process first had an answer (or a failure) from it

- ``FileState``: ``<data_dir>/run/upstream-<name>.json``, replaced atomically; for the
  worker processes of one host.
- ``RedisState``: one hash per upstream (``mirror:v1:{upstream:<name>}:state``), for replicas
  sharing Redis; while Redis fails, the host's file stands in.

It is read only when a request is about to go upstream, never on a cache hit.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Protocol
from urllib.parse import quote

from redis.asyncio import Redis
from redis.exceptions import RedisError

from mirror.health import StoreHealth

FIELDS = ("blocked_until", "open_until", "remaining", "limit", "contacted_at")


class UpstreamState(Protocol):
    async def read(self) -> dict[str, float]:
        """The shared values known so far (missing ones are absent)."""
        ...

    async def write(self, values: dict[str, float]) -> None:
        """Merge ``values`` into the shared state."""
        ...


class LocalState:
    """State of one process only: for tests and programs that share nothing."""

    def __init__(self) -> None:
        self._values: dict[str, float] = {}

    async def read(self) -> dict[str, float]:
        return dict(self._values)

    async def write(self, values: dict[str, float]) -> None:
        self._values.update(values)


class FileState:
    def __init__(self, directory: Path, upstream: str) -> None:
        self._path = directory / f"upstream-{quote(upstream, safe='')}.json"

    async def read(self) -> dict[str, float]:
        return await asyncio.to_thread(self._read)

    async def write(self, values: dict[str, float]) -> None:
        await asyncio.to_thread(self._write, values)

    def _read(self) -> dict[str, float]:
        try:
            data = json.loads(self._path.read_bytes())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: float(v) for k, v in data.items() if k in FIELDS and _number(v)}

    def _write(self, values: dict[str, float]) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        # Read, merge and replace under one lock, or two writers would lose an update.
        lock = os.open(self._path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            merged = {**self._read(), **values}
            temporary = self._path.with_name(f".{self._path.name}.{os.getpid()}")
            temporary.write_text(json.dumps(merged))
            os.replace(temporary, self._path)  # readers see the old state or the new, whole
        finally:
            os.close(lock)


class RedisState:
    """While Redis is known to be down, no request waits on it: the file stands in. The
    verdict (``health``) is the one the metadata store and the leases on the same Redis
    share: a failure seen here takes it down for them too."""

    def __init__(
        self, client: Redis, upstream: str, fallback: FileState, health: StoreHealth
    ) -> None:
        self._client = client
        self._key = f"mirror:v1:{{upstream:{quote(upstream, safe='')}}}:state"
        self._fallback = fallback
        self._health = health

    async def read(self) -> dict[str, float]:
        if not self._health.available:
            return await self._fallback.read()
        try:
            raw = await self._client.hgetall(self._key)
        except RedisError as exc:
            self._health.failed(exc)
            return await self._fallback.read()
        values: dict[str, float] = {}
        for key, value in raw.items():
            name = key.decode() if isinstance(key, bytes) else str(key)
            with contextlib.suppress(ValueError):
                if name in FIELDS:
                    values[name] = float(value)
        return values

    async def write(self, values: dict[str, float]) -> None:
        await self._fallback.write(values)
        if not self._health.available:
            return
        try:
            await self._client.hset(
                self._key, mapping={key: repr(value) for key, value in values.items()}
            )
        except RedisError as exc:
            self._health.failed(exc)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
