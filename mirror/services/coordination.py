"""Leases that make one process, of many, do a piece of work: one upstream fetch per blob
and per tag resolution, whichever worker or replica receives the request.

A lease is taken without waiting; whoever fails to take it follows the holder instead.
The holder may publish a little information for its followers (the partial file it
writes, the blob size). A holder that dies loses its lease: the kernel drops a flock
at once, and a Redis lease runs out after ``ttl`` since nobody renews it.

- ``LocalCoordinator``: flock(2) on files under ``<data_dir>/locks``, for the worker
  processes of one host sharing one data dir.
- ``RedisCoordinator``: ``SET NX PX`` leases renewed while held, for replicas sharing
  Redis and a data dir volume. When Redis cannot be reached it falls back to the local
  coordinator, so workers on one host still coordinate; from then on no lease asks Redis
  (not even to renew or release one taken before) until the one probe of
  :class:`~mirror.health.StoreHealth`, shared with the metadata store, hears it answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from mirror.health import StoreHealth

log = structlog.get_logger(__name__)


class Lease(Protocol):
    async def publish(self, info: dict[str, Any]) -> None: ...

    async def release(self) -> None: ...


class Coordinator(Protocol):
    async def acquire(self, key: str) -> Lease | None:
        """The lease on ``key``, or None when another process holds it."""
        ...

    async def holder(self, key: str) -> dict[str, Any] | None:
        """What the holder of ``key`` published ({} before it published), or None if free."""
        ...

    async def close(self) -> None: ...


class _FlockLease:
    def __init__(self, path: Path, fd: int) -> None:
        self._path = path
        self._fd: int | None = fd

    async def publish(self, info: dict[str, Any]) -> None:
        if self._fd is not None:
            data = json.dumps(info).encode()
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)

    async def release(self) -> None:
        if self._fd is not None:
            # Unlink while still holding the lock: a newcomer then locks a fresh inode.
            with contextlib.suppress(FileNotFoundError):
                self._path.unlink()
            os.close(self._fd)
            self._fd = None


class LocalCoordinator:
    def __init__(self, directory: Path) -> None:
        self._directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self._directory / hashlib.sha256(key.encode()).hexdigest()

    async def acquire(self, key: str) -> Lease | None:
        path = self._path(key)
        for _ in range(10):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            if _same_file(fd, path):
                return _FlockLease(path, fd)
            os.close(fd)  # locked a file its releaser had just unlinked: try again
        return None

    async def holder(self, key: str) -> dict[str, Any] | None:
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _parse(os.pread(fd, 65536, 0))
            return None  # nobody holds it
        finally:
            os.close(fd)

    async def close(self) -> None:
        pass


# Renew the lease when a third of its time is gone, so two missed renewals still hold it.
_RENEW = """
local value = redis.call('GET', KEYS[1])
if value and string.sub(value, 1, string.len(ARGV[1])) == ARGV[1] then
    if ARGV[3] ~= '' then
        redis.call('SET', KEYS[1], ARGV[1] .. ARGV[3], 'PX', ARGV[2])
    else
        redis.call('PEXPIRE', KEYS[1], ARGV[2])
    end
    return 1
end
return 0
"""
_RELEASE = """
local value = redis.call('GET', KEYS[1])
if value and string.sub(value, 1, string.len(ARGV[1])) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


class _RedisLease:
    def __init__(self, coordinator: RedisCoordinator, key: str, token: str) -> None:
        self._coordinator = coordinator
        self._key = key
        self._token = token
        self._renewer = asyncio.create_task(self._renew_forever())

    async def publish(self, info: dict[str, Any]) -> None:
        with contextlib.suppress(RedisError):
            await self._coordinator.renew(self._key, self._token, json.dumps(info))

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._coordinator.ttl / 3)
            try:
                if not await self._coordinator.renew(self._key, self._token, ""):
                    log.warning("lease_lost", key=self._key)
                    return
            except RedisError as exc:
                log.warning("lease_renewal_failed", key=self._key, error=str(exc))

    async def release(self) -> None:
        self._renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._renewer
        await self._coordinator.drop(self._key, self._token)


class RedisCoordinator:
    def __init__(
        self,
        client: Redis,
        fallback: LocalCoordinator,
        *,
        scope: str,
        health: StoreHealth,
        ttl: float = 15.0,
    ) -> None:
        """``health`` is the verdict on ``client``'s Redis that the metadata store on it
        shares: a failure seen here takes it down for both."""
        self._client = client
        self._fallback = fallback
        self._scope = quote(scope, safe="")
        self._health = health
        self.ttl = ttl
        self._renew_script = client.register_script(_RENEW)
        self._release_script = client.register_script(_RELEASE)

    @property
    def client(self) -> Redis:
        return self._client

    def _key(self, key: str) -> str:
        return f"mirror:v1:{{lease:{self._scope}}}:{quote(key, safe='')}"

    async def acquire(self, key: str) -> Lease | None:
        if not self._health.available:
            return await self._fallback.acquire(key)
        token = secrets.token_hex(8) + "|"
        try:
            taken = await self._client.set(
                self._key(key), token + "{}", nx=True, px=int(self.ttl * 1000)
            )
        except RedisError as exc:
            self._health.failed(exc)
            return await self._fallback.acquire(key)
        return _RedisLease(self, key, token) if taken else None

    async def holder(self, key: str) -> dict[str, Any] | None:
        if not self._health.available:
            return await self._fallback.holder(key)
        try:
            value = await self._client.get(self._key(key))
        except RedisError as exc:
            self._health.failed(exc)
            return await self._fallback.holder(key)
        if value is None:
            return None
        raw = value.encode() if isinstance(value, str) else bytes(value)
        return _parse(raw.partition(b"|")[2])

    async def renew(self, key: str, token: str, info: str) -> bool:
        """Keep a lease (and publish ``info`` with it, if any). While Redis is down nobody
        asks it: the lease counts as kept (in Redis it runs out unless renewed later)."""
        if not self._health.available:
            return True
        args: list[str | int] = [token, int(self.ttl * 1000), info]
        try:
            return bool(await self._renew_script(keys=[self._key(key)], args=args))
        except RedisError as exc:
            self._health.failed(exc)
            raise

    async def drop(self, key: str, token: str) -> None:
        """Release a lease; while Redis is down it runs out there instead."""
        if not self._health.available:
            return
        try:
            await self._release_script(keys=[self._key(key)], args=[token])
        except RedisError as exc:
            self._health.failed(exc)

    async def close(self) -> None:
        """Nothing of its own: the client and the probe are the Redis store's."""


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == path.stat().st_ino
    except FileNotFoundError:
        return False


def _parse(data: bytes) -> dict[str, Any]:
    try:
        info = json.loads(data) if data else {}
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def data_dir_identity(data_dir: Path) -> str:
    """A random name for this data dir, made once: shared by every process that mounts it."""
    path = data_dir / ".mirror-id"
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, secrets.token_hex(16).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    for _ in range(50):  # another process may be between its create and its write
        identity = path.read_text().strip()
        if identity:
            return identity
        time.sleep(0.01)
    raise RuntimeError(f"{path} stays empty")
