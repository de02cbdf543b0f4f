"""The content graph in Redis, for replicas sharing it (key schema v1, beside the store's).

With R, P and D the percent-encoded registry, repository and digest (as in
``mirror.content.redis_store``), and S the percent-encoded storage the blobs are on (the
data dir's identity, ``mirror.services.coordination.data_dir_identity``)::

    mirror:v1:{R:P}:edges:D        hash   child digest -> "kind size platform" (JSON)
    mirror:v1:{R:P}:pulls          hash   tag or manifest digest -> last pull
    mirror:v1:{graph:S}:blob:D     hash   size, present (0/1), last_pulled
    mirror:v1:{graph:S}:lru        zset   present blobs, scored by last pull
    mirror:v1:{graph:S}:usage      hash   blobs, bytes: of the present blobs; reconciled:
                                          "1" once reconcile aligned them with the disk
    mirror:v1:{graph}:holders:D    set    "R:P" of every repository referencing blob D
    mirror:v1:{graph}:popular      zset   "R:P:T" of every pulled tag, scored by pull count

Blob records say what one storage holds, so they are scoped by it: replicas sharing a data
dir volume share them (and one budget), replicas with data dirs of their own sharing one
Redis keep their own, and still share manifests, tags and what references what. The
``{graph:S}`` keys share one Redis Cluster slot, so the scripts that keep a blob's record,
the LRU order and the usage counters in step run atomically.

A Redis that loses its keys (restarted without persistence, flushed) loses the mark
``reconciled`` with them, whether or not the mirror saw an outage: eviction looks for it
every pass and reconciles again when it is gone (blob_stored recreates the counters
without it).

Releases before the scope kept the blob records at ``mirror:v1:{graph}:blob:D``,
``{graph}:lru`` and ``{graph}:usage``. The first reconciliation after start (eviction's
first pass) takes them over: the last pulls of the blobs on its disk are kept, and the old
keys removed; the disk says what is present, as always.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar, cast
from urllib.parse import quote, unquote

from redis.asyncio import Redis
from redis.exceptions import RedisError

from mirror.content.graph import BlobEntry, ImageKey, TagKey, Usage
from mirror.content.protocols import StoreUnavailable
from mirror.domain.manifests import References

P = ParamSpec("P")
T = TypeVar("T")

PREFIX = "mirror:v1:"
GRAPH = f"{PREFIX}{{graph}}:"
POPULAR = f"{GRAPH}popular"
# The blob records of releases before they were scoped, taken over by reconcile.
UNSCOPED_BLOBS = f"{GRAPH}blob:*"
UNSCOPED = (f"{GRAPH}lru", f"{GRAPH}usage")

_STORED = """
local present = redis.call('HGET', KEYS[1], 'present')
local old = tonumber(redis.call('HGET', KEYS[1], 'size') or '0')
local last = tonumber(redis.call('HGET', KEYS[1], 'last_pulled') or '0')
local size, at = tonumber(ARGV[2]), tonumber(ARGV[3])
if at > last then last = at end
redis.call('HSET', KEYS[1], 'size', size, 'present', 1, 'last_pulled', tostring(last))
redis.call('ZADD', KEYS[2], last, ARGV[1])
if present == '1' then
    redis.call('HINCRBY', KEYS[3], 'bytes', size - old)
else
    redis.call('HINCRBY', KEYS[3], 'blobs', 1)
    redis.call('HINCRBY', KEYS[3], 'bytes', size)
end
return 1
"""
_REMOVED = """
if redis.call('HGET', KEYS[1], 'present') == '1' then
    local size = tonumber(redis.call('HGET', KEYS[1], 'size') or '0')
    redis.call('HSET', KEYS[1], 'present', 0)
    redis.call('ZREM', KEYS[2], ARGV[1])
    redis.call('HINCRBY', KEYS[3], 'blobs', -1)
    redis.call('HINCRBY', KEYS[3], 'bytes', -size)
end
return 1
"""
_PULLED = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local last = tonumber(redis.call('HGET', KEYS[1], 'last_pulled') or '0')
local at = tonumber(ARGV[2])
if at <= last then return 0 end
redis.call('HSET', KEYS[1], 'last_pulled', tostring(at))
if redis.call('HGET', KEYS[1], 'present') == '1' then
    redis.call('ZADD', KEYS[2], at, ARGV[1])
end
return 1
"""

# The page after (score, digest): members tied at a score sort by their bytes, so the first
# one past ``digest`` is found by bisecting the tied run of ranks (ZCOUNT gives its ends),
# and the page is read by rank. Bytes are compared one by one: Lua's ``<`` on strings
# follows the server's locale. One script, so the ranks do not move under the reads.
_AFTER = """
local function before(a, b)
    for i = 1, math.min(#a, #b) do
        local x, y = string.byte(a, i), string.byte(b, i)
        if x ~= y then return x < y end
    end
    return #a < #b
end
local lo = redis.call('ZCOUNT', KEYS[1], '-inf', '(' .. ARGV[1])
local hi = redis.call('ZCOUNT', KEYS[1], '-inf', ARGV[1])
while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if before(ARGV[2], redis.call('ZRANGE', KEYS[1], mid, mid)[1]) then
        hi = mid
    else
        lo = mid + 1
    end
end
return redis.call('ZRANGE', KEYS[1], lo, lo + tonumber(ARGV[3]) - 1, 'WITHSCORES')
"""


_LATER = """
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > old then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 1
"""


def _unavailable(method: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Redis failures raised as :class:`StoreUnavailable`, as the metadata store raises
    them: the store's outage mode then covers the graph too."""

    @functools.wraps(method)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except RedisError as error:
            name = method.__name__
            raise StoreUnavailable(f"redis {name}: {type(error).__name__}: {error}") from error

    return call


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _part(text: str) -> str:
    return quote(text, safe="")


def _repo_key(registry: str, repository: str, kind: str, name: str = "") -> str:
    key = f"{PREFIX}{{{_part(registry)}:{_part(repository)}}}:{kind}"
    return f"{key}:{_part(name)}" if name else key


def _holders_key(digest: str) -> str:
    return f"{GRAPH}holders:{_part(digest)}"


class RedisGraph:
    def __init__(self, client: Redis, scope: str = "default") -> None:
        """``scope`` names the storage whose blob records this graph keeps."""
        self._redis = client
        self._blobs = f"{PREFIX}{{graph:{_part(scope)}}}:"
        self._lru = f"{self._blobs}lru"
        self._usage = f"{self._blobs}usage"
        self._stored = client.register_script(_STORED)
        self._removed = client.register_script(_REMOVED)
        self._pulled = client.register_script(_PULLED)
        self._after = client.register_script(_AFTER)

    @_unavailable
    async def add_manifest(
        self, registry: str, repository: str, digest: str, refs: References
    ) -> None:
        edges = [
            (child.digest, json.dumps(["manifest", child.size, child.platform]))
            for child in refs.children
        ]
        edges += [(blob.digest, json.dumps(["blob", blob.size, None])) for blob in refs.blobs]
        if not edges:
            return
        holder = f"{_part(registry)}:{_part(repository)}"
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hset(
                _repo_key(registry, repository, "edges", digest),
                # A comprehension here takes redis-py's key type from the call; dict() would not.
                mapping={child: edge for child, edge in edges},  # noqa: C416
            )
            for child, _ in edges:
                pipe.sadd(_holders_key(child), holder)
            await pipe.execute()

    @_unavailable
    async def blob_stored(self, digest: str, size: int, at: float) -> None:
        await self._stored(
            keys=[self._blob_key(digest), self._lru, self._usage], args=[digest, size, repr(at)]
        )

    @_unavailable
    async def blobs_removed(self, digests: Sequence[str]) -> None:
        for digest in digests:
            await self._removed(
                keys=[self._blob_key(digest), self._lru, self._usage], args=[digest]
            )

    @_unavailable
    async def record_pulls(
        self,
        blobs: Mapping[str, float],
        images: Mapping[ImageKey, float],
        tags: Mapping[TagKey, int] | None = None,
    ) -> None:
        if tags:
            async with self._redis.pipeline(transaction=False) as pipe:
                for (registry, repository, tag), count in tags.items():
                    member = f"{_part(registry)}:{_part(repository)}:{_part(tag)}"
                    pipe.zincrby(POPULAR, count, member)
                await pipe.execute()
        for digest, at in blobs.items():
            await self._pulled(keys=[self._blob_key(digest), self._lru], args=[digest, repr(at)])
        async with self._redis.pipeline(transaction=False) as pipe:
            for (registry, repository, reference), at in images.items():
                # Newer than what another replica wrote? Then ours; HSET alone could go back.
                pipe.eval(_LATER, 1, _repo_key(registry, repository, "pulls"), reference, repr(at))
            await pipe.execute()

    @_unavailable
    async def most_pulled(self, limit: int) -> list[tuple[TagKey, int]]:
        found = await self._redis.zrevrange(POPULAR, 0, limit - 1, withscores=True)
        result = []
        for member, score in cast(list[tuple[bytes | str, float]], found):
            text = member.decode() if isinstance(member, bytes) else str(member)
            parts = [unquote(part) for part in text.split(":", 2)]
            result.append(((parts[0], parts[1], parts[2]), int(score)))
        return result

    @_unavailable
    async def last_pulls(self, registry: str, repository: str) -> dict[str, float]:
        raw = await self._redis.hgetall(_repo_key(registry, repository, "pulls"))
        return {
            (key.decode() if isinstance(key, bytes) else str(key)): float(value)
            for key, value in raw.items()
        }

    @_unavailable
    async def oldest_blobs(
        self, limit: int, after: tuple[float, str] | None = None
    ) -> list[BlobEntry]:
        if after is None:
            rows = await self._redis.zrange(self._lru, 0, limit - 1, withscores=True)
            flat = [value for row in rows for value in row]
        else:
            flat = await self._after(keys=[self._lru], args=[repr(after[0]), after[1], limit])
        entries = [(_text(flat[n]), float(flat[n + 1])) for n in range(0, len(flat), 2)]
        async with self._redis.pipeline(transaction=False) as pipe:
            for digest, _ in entries:
                pipe.hget(self._blob_key(digest), "size")
            sizes = await pipe.execute()
        return [
            BlobEntry(digest, int(size or 0), score)
            for (digest, score), size in zip(entries, sizes, strict=True)
        ]

    @_unavailable
    async def usage(self) -> Usage:
        values = await self._redis.hmget(self._usage, ["blobs", "bytes", "reconciled"])
        return Usage(int(values[0] or 0), int(values[1] or 0), values[2] is not None)

    @_unavailable
    async def holders(self, blob: str) -> set[tuple[str, str]]:
        members = await self._redis.smembers(_holders_key(blob))
        pairs = set()
        for member in members:
            text = member.decode() if isinstance(member, bytes) else str(member)
            registry, _, repository = text.partition(":")
            pairs.add((unquote(registry), unquote(repository)))
        return pairs

    @_unavailable
    async def unreferenced(self, digests: Sequence[str]) -> set[str]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for digest in digests:
                pipe.exists(_holders_key(digest))
            found = await pipe.execute()
        return {digest for digest, exists in zip(digests, found, strict=True) if not exists}

    @_unavailable
    async def reconcile(self, on_disk: Mapping[str, tuple[int, float]]) -> list[str]:
        pulled = await self._take_over_unscoped()
        present = await self._redis.zrange(self._lru, 0, -1)
        gone = [digest for digest in (_text(member) for member in present) if digest not in on_disk]
        await self.blobs_removed(gone)
        for digest, (size, mtime) in on_disk.items():
            await self.blob_stored(digest, size, max(mtime, pulled.get(digest, mtime)))
        await self._redis.hset(self._usage, "reconciled", "1")
        return gone

    async def _take_over_unscoped(self) -> dict[str, float]:
        """The last pulls in blob records written before records were scoped (digest ->
        time), their keys removed. Plain commands, not one script: the old keys and the
        scoped ones live in different Cluster slots."""
        pulled: dict[str, float] = {}
        async for key in self._redis.scan_iter(match=UNSCOPED_BLOBS, count=1000):
            name = _text(key)
            last = await self._redis.hget(name, "last_pulled")
            if last is not None:
                pulled[unquote(name.removeprefix(f"{GRAPH}blob:"))] = float(last)
            await self._redis.delete(name)
        await self._redis.delete(*UNSCOPED)
        return pulled

    def _blob_key(self, digest: str) -> str:
        return f"{self._blobs}blob:{_part(digest)}"
