"""The shared metadata store: Redis, so that several mirror processes act as one cache.

Key schema (version 1)
----------------------
Every key starts with ``mirror:v1:``; a later, incompatible layout takes ``mirror:v2:`` and
simply ignores the old keys. Each name component is percent-encoded (``quote(s, safe="")``:
only letters, digits and ``-._~`` stay as they are), so an encoded component never holds
``:``, ``/``, ``{``, ``}`` or ``%``. Different (registry, repository, digest or tag) triples
therefore always give different keys: registry ``a:b`` with repository ``c`` and registry
``a`` with repository ``b:c`` do not meet. With R, P, D and T the encoded registry,
repository, digest and tag::

    mirror:v1:{R:P}:manifest:D   hash  media_type, body (raw bytes)      no expiry
    mirror:v1:{R:P}:tag:T        hash  digest, media_type, checked_at    no expiry
    mirror:v1:{R:P}:missing:T    string "1"                              expires after the ttl
    mirror:v1:pins               set   the images seed and import pinned

Besides them, ``mirror:schema`` (a string, outside every versioned prefix so that every
release finds it) holds the newest key schema a release has used on this Redis. Each
release raises it to its own :data:`SCHEMA` when it opens the store, and refuses to start
when it is already higher: keys a newer release laid out are never rewritten by an older
one during a rolling upgrade. A release that only adds keys keeps the number; one that
changes what existing keys mean raises it.

``{R:P}`` is the Redis Cluster hash tag: all keys of one repository live in one slot, so the
tag, its manifest and its negative entry can be used together (MULTI, Lua) on a cluster,
while different repositories still spread over the slots. Manifests are immutable (keyed by
digest) and get no TTL; evicting them is a later concern. ``checked_at`` is ``repr()`` of
the float, so it reads back exactly.

The client must return bytes (``decode_responses=False``): manifest bodies come back byte
for byte, whatever they hold.

Errors
------
Every Redis failure (connection refused or lost, timeout, authentication, an error reply)
is raised as :class:`StoreUnavailable`, with the redis-py exception as its ``__cause__``, so
the caller has one exception to catch to degrade (serve from its in-process cache or the
upstream). :meth:`RedisStore.open` sets socket connect and read timeouts and retries a
command at most once, only after a dropped connection, so a dead Redis costs a request at
most about ``timeout`` seconds. A lost connection is re-established on the next call:
when Redis comes back, the store works again without being reopened.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from urllib.parse import quote, unquote

import structlog
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from mirror.content.graph_redis import RedisGraph
from mirror.content.protocols import NewerSchema, StoreUnavailable, is_tag
from mirror.domain.manifests import Manifest, TaggedRecord, TagRecord

__all__ = ["PREFIX", "SCHEMA", "RedisStore", "StoreUnavailable"]

log = structlog.get_logger(__name__)

PREFIX = "mirror:v1:"
PINS = f"{PREFIX}pins"
SCHEMA = 1  # the key schema above; see the module's docstring for when it changes
SCHEMA_KEY = "mirror:schema"
# Raise the record to this release's schema, never lower it; the number found before.
_CLAIM_SCHEMA = """
local found = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if found < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
return found
"""


class RedisStore:
    """The :class:`~mirror.content.protocols.MetadataStore` on Redis; it owns its client."""

    def __init__(self, client: Redis, *, scope: str = "default") -> None:
        """``scope`` names the storage (the data dir) whose blob records the graph keeps."""
        if client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError("RedisStore needs a client with decode_responses=False")
        self._redis = client
        self.graph = RedisGraph(client, scope)

    @property
    def client(self) -> Redis:
        """The store's client, for the lease coordinator to share (the store closes it)."""
        return self._redis

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        timeout: float = 2.0,  # noqa: ASYNC109 - the client's socket timeouts, not a deadline
        scope: str = "default",
    ) -> RedisStore:
        """A store on ``redis://``, ``rediss://`` or ``unix://`` ``url`` (password, db in it).

        Only the schema record is read and raised (``NewerSchema`` when a newer release
        wrote it): an unreachable Redis does not stop the mirror from starting
        (:meth:`ping` tells readiness) and costs at most ``timeout`` seconds here, but a
        malformed URL raises ``ValueError``.
        """
        client = Redis.from_url(
            url,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            # One immediate retry, and only for a dropped connection (a pooled one that
            # Redis closed on restart); a timeout is not retried, to bound the wait.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            decode_responses=False,
        )
        store = cls(client, scope=scope)
        try:
            await store._claim_schema(timeout)
        except NewerSchema:
            await client.aclose()
            raise
        return store

    async def _claim_schema(self, timeout: float) -> None:  # noqa: ASYNC109 - as open's
        try:
            async with asyncio.timeout(timeout):
                found = int(await self._redis.eval(_CLAIM_SCHEMA, 1, SCHEMA_KEY, SCHEMA))
        except (RedisError, TimeoutError, ValueError) as error:
            # Redis down at start must not keep the mirror down; the check waits for the next
            # start (a mirror started so writes v1 keys unchecked, as releases before it did).
            log.warning("redis_schema_unchecked", error=f"{type(error).__name__}: {error}")
            return
        if found > SCHEMA:
            raise NewerSchema(
                f"Redis at {_where(self._redis)} holds keys of schema v{found}, newer than this"
                f" mirror's v{SCHEMA}: run the newer release, or give this one a Redis"
                " (or db) of its own"
            )

    async def ping(self) -> bool:
        """Does Redis answer? For readiness; never raises."""
        try:
            with _unavailable("ping"):
                return bool(await self._redis.ping())
        except StoreUnavailable:
            return False

    async def get_manifest(self, registry: str, repository: str, digest: str) -> Manifest | None:
        key = _key(registry, repository, "manifest", digest)
        with _unavailable("get_manifest"):
            media_type, body = await self._redis.hmget(key, ["media_type", "body"])
        if media_type is None or body is None:
            return None
        return Manifest(_bytes(body), _bytes(media_type).decode(), digest)

    async def put_manifest(self, registry: str, repository: str, manifest: Manifest) -> None:
        key = _key(registry, repository, "manifest", manifest.digest)
        with _unavailable("put_manifest"):
            await self._redis.hset(
                key, mapping={"media_type": manifest.media_type, "body": manifest.body}
            )

    async def get_tag(self, registry: str, repository: str, tag: str) -> TagRecord | None:
        key = _key(registry, repository, "tag", tag)
        with _unavailable("get_tag"):
            values = await self._redis.hmget(key, ["digest", "media_type", "checked_at"])
        if any(value is None for value in values):
            return None
        digest, media_type, checked_at = (_bytes(value).decode() for value in values)
        return TagRecord(digest, media_type, float(checked_at))

    async def put_tag(self, registry: str, repository: str, tag: str, record: TagRecord) -> None:
        key = _key(registry, repository, "tag", tag)
        # Every field is written in the one HSET, so an overwrite never leaves a mix.
        with _unavailable("put_tag"):
            await self._redis.hset(
                key,
                mapping={
                    "digest": record.digest,
                    "media_type": record.media_type,
                    "checked_at": repr(record.checked_at),
                },
            )

    async def get_missing(self, registry: str, repository: str, tag: str) -> bool:
        key = _key(registry, repository, "missing", tag)
        with _unavailable("get_missing"):
            return bool(await self._redis.exists(key))

    async def put_missing(self, registry: str, repository: str, tag: str, ttl: float) -> None:
        key = _key(registry, repository, "missing", tag)
        milliseconds = round(ttl * 1000)
        with _unavailable("put_missing"):
            if milliseconds > 0:
                await self._redis.set(key, b"1", px=milliseconds)
            else:
                # Already expired: Redis refuses PX 0, and the embedded store forgets it too.
                await self._redis.delete(key)

    async def list_tags(
        self, registry: str | None = None, repository: str | None = None
    ) -> list[TaggedRecord]:
        """SCANs the tag keys: for listing, never on the request path. (Encoded names hold
        no glob character, so one repository's keys are matched exactly.)"""
        scope = "*"
        if registry is not None and repository is not None:
            scope = f"{_part(registry)}:{_part(repository)}"
        found: list[TaggedRecord] = []
        with _unavailable("list_tags"):
            pattern = f"{PREFIX}{{{scope}}}:tag:*"
            async for key in self._redis.scan_iter(match=pattern, count=1000):
                name = _bytes(key).decode() if isinstance(key, bytes) else str(key)
                parsed = _parse_key(name, "tag")
                if parsed is None:
                    continue
                registry, repository, tag = parsed
                if not is_tag(tag):
                    continue
                record = await self.get_tag(registry, repository, tag)
                if record is not None:
                    found.append(TaggedRecord(registry, repository, tag, record))
        return sorted(found, key=lambda t: (t.registry, t.repository, t.tag))

    async def pins(self) -> list[str]:
        with _unavailable("pins"):
            members = await self._redis.smembers(PINS)
        return sorted(_bytes(m).decode() for m in members)

    async def add_pins(self, references: Sequence[str]) -> None:
        if references:
            with _unavailable("add_pins"):
                await self._redis.sadd(PINS, *references)

    async def remove_pins(self, references: Sequence[str]) -> int:
        if not references:
            return 0
        with _unavailable("remove_pins"):
            return int(await self._redis.srem(PINS, *references))

    async def close(self) -> None:
        with _unavailable("close"):
            await self._redis.aclose()


def _where(client: Redis) -> str:
    """The server and db, without credentials."""
    kwargs = client.connection_pool.connection_kwargs
    place = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
    return f"{place} db {kwargs.get('db', 0)}"


def _key(registry: str, repository: str, kind: str, name: str) -> str:
    return f"{PREFIX}{{{_part(registry)}:{_part(repository)}}}:{kind}:{_part(name)}"


def _parse_key(key: str, kind: str) -> tuple[str, str, str] | None:
    """(registry, repository, name) of a key made by :func:`_key`, or None."""
    rest = key.removeprefix(PREFIX)
    if not rest.startswith("{") or "}" not in rest:
        return None
    scope, _, tail = rest[1:].partition("}")
    registry, sep, repository = scope.partition(":")
    marker = f":{kind}:"
    if not sep or not tail.startswith(marker):
        return None
    return unquote(registry), unquote(repository), unquote(tail.removeprefix(marker))


def _part(component: str) -> str:
    return quote(component, safe="")


def _bytes(value: bytes | str | None) -> bytes:
    if isinstance(value, bytes):
        return value
    raise TypeError(f"expected bytes from Redis, got {type(value).__name__}")


@contextmanager
def _unavailable(operation: str) -> Iterator[None]:
    try:
        yield
    except RedisError as error:
        raise StoreUnavailable(f"redis {operation}: {type(error).__name__}: {error}") from error
