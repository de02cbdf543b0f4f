"""Who the clients are and what each may cost: logins, and limits per client address.

- :class:`Htpasswd` checks HTTP Basic credentials against an htpasswd file of bcrypt
  entries (``htpasswd -B``, what the CNCF registry reads). bcrypt is slow on purpose, and
  clients send their credentials with every request, so a verified pair is remembered (as a
  keyed hash, never the password) until the file changes; the file is looked at again every
  few seconds and re-read when it changed.
- :class:`FailedLogins` slows down an address that keeps failing: each failure past the
  first few in a minute doubles the wait before its next answer, up to half a minute.
- :class:`PerClient` bounds what one address may hold or spend: blob transfers under way at
  once, and cache misses that cost an upstream manifest GET (``client_miss_limit``).

The client address of the request being served is in :data:`CLIENT`, a context variable
the web face sets, so the resolver can charge a miss to whoever caused it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import os
import secrets
import time
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import structlog
from cachetools import TTLCache

from mirror.upstream.ratelimit import TokenBucket

log = structlog.get_logger(__name__)

CLIENT: ContextVar[str | None] = ContextVar("client", default=None)

RECHECK_INTERVAL = 2.0
VERIFIED_ENTRIES = 4096
FREE_FAILURES = 5  # failures a minute an address may make before it is slowed down
FAILURE_WINDOW = 60.0
MAX_FAILURE_DELAY = 30.0
TRACKED_ADDRESSES = 65536


@dataclass(frozen=True, slots=True)
class Credentials:
    user: str
    password: str

    @classmethod
    def from_header(cls, header: str | None) -> Credentials | None:
        """The pair an ``Authorization: Basic`` header carries, or None."""
        if header is None or header[:6].lower() != "basic ":
            return None
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        user, sep, password = decoded.partition(":")
        return cls(user, password) if sep else None


class Htpasswd:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, bytes] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._key = secrets.token_bytes(32)  # for the remembered pairs; per process
        self._verified: TTLCache[bytes, bool] = TTLCache(VERIFIED_ENTRIES, ttl=3600)
        self._lock = asyncio.Lock()
        self._load()

    async def verify(self, credentials: Credentials) -> bool:
        await self._reload_if_changed()
        stored = self._entries.get(credentials.user)
        if stored is None:
            return False
        remembered = hmac.new(
            self._key, f"{credentials.user}\0{credentials.password}".encode(), hashlib.sha256
        ).digest()
        if remembered in self._verified:
            return True
        ok = await asyncio.to_thread(bcrypt.checkpw, credentials.password.encode(), stored)
        if ok:
            self._verified[remembered] = True
        return ok

    async def _reload_if_changed(self) -> None:
        now = time.monotonic()
        if now - self._checked < RECHECK_INTERVAL:
            return
        async with self._lock:
            if now - self._checked < RECHECK_INTERVAL:
                return
            self._checked = now
            try:
                stamp = _stamp(await asyncio.to_thread(os.stat, self.path))
            except OSError as exc:
                log.warning("htpasswd_unreadable", path=str(self.path), error=exc.strerror)
                return
            if stamp != self._stamp:
                await asyncio.to_thread(self._load)

    def _load(self) -> None:
        """Read the file; entries that are not bcrypt are skipped with a warning."""
        try:
            stamp = _stamp(os.stat(self.path))
            text = self.path.read_text()
        except OSError as exc:
            log.warning("htpasswd_unreadable", path=str(self.path), error=exc.strerror)
            return
        entries: dict[str, bytes] = {}
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, hashed = line.partition(":")
            if not sep or not hashed.startswith(("$2y$", "$2b$", "$2a$")):
                log.warning(
                    "htpasswd_entry_skipped",
                    path=str(self.path),
                    line=number,
                    reason="not a bcrypt entry (write it with htpasswd -B)",
                )
                continue
            entries[user] = hashed.encode()
        self._entries, self._stamp = entries, stamp
        self._verified.clear()
        log.info("htpasswd_loaded", path=str(self.path), users=len(entries))


def _stamp(info: os.stat_result) -> tuple[int, int, int]:
    return (info.st_ino, info.st_mtime_ns, info.st_size)


class FailedLogins:
    def __init__(self) -> None:
        self._failures: TTLCache[str, list[float]] = TTLCache(
            TRACKED_ADDRESSES, ttl=FAILURE_WINDOW
        )

    def delay(self, address: str) -> float:
        """How long to hold this address's next answer."""
        recent = self._recent(address)
        over = len(recent) - FREE_FAILURES
        return 0.0 if over < 0 else min(2.0**over * 0.25, MAX_FAILURE_DELAY)

    def failed(self, address: str) -> None:
        recent = self._recent(address)
        recent.append(time.monotonic())
        self._failures[address] = recent[-(FREE_FAILURES + 16) :]

    def _recent(self, address: str) -> list[float]:
        since = time.monotonic() - FAILURE_WINDOW
        return [at for at in self._failures.get(address, ()) if at > since]


class PerClient:
    """Transfers under way and upstream misses, counted per client address."""

    def __init__(self, *, max_transfers: int, miss_rate: float) -> None:
        self._max_transfers = max_transfers
        self._transfers: dict[str, int] = {}
        self._miss_rate = miss_rate
        self._misses: TTLCache[str, TokenBucket] = TTLCache(TRACKED_ADDRESSES, ttl=3600)

    def start_transfer(self, address: str | None) -> bool:
        """Count a transfer for ``address``; False (nothing counted) when it has its fill."""
        if address is None:
            return True
        held = self._transfers.get(address, 0)
        if held >= self._max_transfers:
            return False
        self._transfers[address] = held + 1
        return True

    def end_transfer(self, address: str | None) -> None:
        if address is None:
            return
        held = self._transfers.get(address, 0) - 1
        if held > 0:
            self._transfers[address] = held
        else:
            self._transfers.pop(address, None)

    def miss(self, address: str | None) -> float:
        """Charge a miss to ``address``: 0 if allowed, else seconds until it would be."""
        bucket = self.misses_of(address)
        return 0.0 if bucket is None else bucket.take()

    def misses_of(self, address: str | None) -> TokenBucket | None:
        """The misses ``address`` may still cause; None when they are not limited."""
        if self._miss_rate <= 0 or address is None:
            return None
        bucket = self._misses.get(address)
        if bucket is None:
            # A minute's worth at once, at least one: a pull of a fresh image is several.
            bucket = TokenBucket(self._miss_rate, max(self._miss_rate * 60, 1.0))
            self._misses[address] = bucket
        return bucket
