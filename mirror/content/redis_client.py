"""The one place that turns the configured Redis URL into a client.

Every user of Redis (the metadata store, the leases, the shared upstream state) shares the
client made here, so ``serve``, ``--workers`` and the offline subcommands all reach Redis
the same way. The URL forms:

- ``redis://``, ``rediss://`` (TLS), ``unix://``: one Redis, as redis-py reads them.
- ``redis+sentinel://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]``: the master of
  ``SERVICE``, found through the listed Redis Sentinels. ``rediss+sentinel://`` speaks TLS
  to the sentinels and to the master. The credentials are the master's; the sentinels are
  asked without them.

Following the master is redis-py's own ``SentinelConnectionPool``: every new connection
asks the sentinels where the master is, and a connection that gets READONLY (a master
demoted to a replica) is dropped and raised as a connection error. The client retries a
command once after a connection error, so such a command lands on the new master; while
no master is known the error reaches the store, whose outage mode (one verdict shared with
the leases and the upstream state, see :mod:`mirror.health`) answers from what it holds and
probes, through the sentinels again, until a master answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelManagedConnection
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
TLS_SCHEMES = ("rediss", "rediss+sentinel")
SCHEMES = ("redis", "rediss", "unix", *SENTINEL_SCHEMES)


@dataclass(frozen=True, slots=True)
class SentinelURL:
    """A parsed ``redis+sentinel://`` URL."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False


def check_url(url: str) -> None:
    """Raise ``ValueError`` with a one-line reason unless ``url`` is a Redis URL we can use."""
    scheme = urlsplit(url).scheme
    if scheme not in SCHEMES:
        raise ValueError(
            "expected a redis://, rediss://, unix://, redis+sentinel:// or rediss+sentinel:// URL"
        )
    if scheme in SENTINEL_SCHEMES:
        parse_sentinel_url(url)
        return
    try:
        parse_url(url)
    except (TypeError, ValueError) as exc:
        raise ValueError(str(exc).splitlines()[0] if str(exc) else "not a Redis URL") from None
    path = urlsplit(url).path.strip("/")
    if scheme != "unix" and path:
        _db(unquote(path))  # redis-py would quietly take db 0 for a db it cannot read


def masked_url(url: str) -> str:
    """``url`` with its password, if any, as ``***``: for messages and logs."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.partition(":")[0]
    return parts._replace(netloc=f"{user}:***@{hosts}").geturl()


def parse_sentinel_url(url: str) -> SentinelURL:
    """``redis+sentinel://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]``."""
    parts = urlsplit(url)
    if parts.scheme not in SENTINEL_SCHEMES:
        raise ValueError("expected a redis+sentinel:// or rediss+sentinel:// URL")
    if parts.query or parts.fragment:
        raise ValueError("a sentinel URL takes no ?query or #fragment")
    username, password, hosts = _split_netloc(parts)
    path = [unquote(piece) for piece in parts.path.strip("/").split("/")] if parts.path else []
    if not path or not path[0]:
        raise ValueError("no service name: expected .../SERVICE[/DB] after the sentinels")
    if len(path) > 2:
        raise ValueError("expected /SERVICE[/DB] after the sentinels, got more")
    db = _db(path[1]) if len(path) == 2 else 0
    return SentinelURL(
        tuple(_address(host) for host in hosts),
        path[0],
        db,
        username,
        password,
        tls=parts.scheme == "rediss+sentinel",
    )


def connect(url: str, *, ca_file: Path | None = None, timeout: float = 2.0) -> Redis:
    """The client for ``url``; nothing is sent yet. ``ca_file`` is trusted for TLS."""
    options: dict[str, Any] = {
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
        "decode_responses": False,
    }
    tls = urlsplit(url).scheme in TLS_SCHEMES
    if tls and ca_file is not None:
        options["ssl_ca_certs"] = str(ca_file)
    # One immediate retry, and only for a dropped connection (a pooled one that Redis
    # closed on restart, or one to a master that was demoted); a timeout is not retried,
    # to bound the wait.
    retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    if urlsplit(url).scheme not in SENTINEL_SCHEMES:
        return Redis.from_url(url, retry=retry, **options)
    target = parse_sentinel_url(url)
    sentinel_options = {**options, "ssl": True} if tls else options
    # Master discovery already moves on to the next sentinel when one fails: no retry there.
    sentinel = Sentinel(target.sentinels, sentinel_kwargs=sentinel_options)
    client = sentinel.master_for(
        target.service,
        redis_class=_SentinelMaster,
        connection_class=_MasterSSLConnection if tls else _MasterConnection,
        db=target.db,
        username=target.username,
        password=target.password,
        retry=retry,
        **options,
    )
    assert isinstance(client, _SentinelMaster)
    client.sentinels = sentinel
    return client


class _SentinelMaster(Redis):
    """The master's client, which also closes the sentinel clients that find the master."""

    sentinels: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            if self.sentinels is not None:
                await self.sentinels.aclose()


class _MasterConnection(SentinelManagedConnection):
    """A connection to the master that asks the sentinels where it is on every connect.

    redis-py asks them only when a connection is taken from the pool; the reconnect it makes
    to retry a command goes back to the address the connection last had, which after a
    failover is the old master: refused while it is dead, READONLY once it is a replica,
    and while it is back but not yet demoted, writes that the new master never sees.
    """

    async def _connect_retry(self) -> None:
        await self.connect_check_health(
            check_health=self.connection_pool.check_connection, retry_socket_connect=False
        )

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if not self.is_connected:
            self.host, self.port = await self.connection_pool.get_master_address()
        await super().connect_check_health(check_health, retry_socket_connect)


class _MasterSSLConnection(_MasterConnection, SSLConnection):
    pass


def _split_netloc(parts: SplitResult) -> tuple[str | None, str | None, list[str]]:
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    hosts = [host.strip() for host in hostlist.split(",")]
    if not hostlist or not all(hosts):
        raise ValueError("no sentinel: expected HOST:PORT[,HOST:PORT...] after the scheme")
    return username, password, hosts


def _address(host: str) -> tuple[str, int]:
    name, colon, port = host.rpartition(":")
    if not colon or not name.strip("[]"):
        raise ValueError(f"sentinel {host!r}: expected HOST:PORT")
    if ":" in name and not (name.startswith("[") and name.endswith("]")):
        raise ValueError(f"sentinel {host!r}: an IPv6 address goes in brackets, [::1]:26379")
    if not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"sentinel {host!r}: the port must be a number from 1 to 65535")
    return name.strip("[]"), int(port)


def _db(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"database {text!r}: expected a number >= 0")
    return int(text)
