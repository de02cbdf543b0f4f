"""Who the clients are and what each may cost: logins, and limits per client address.

- :class:`Htpasswd` checks HTTP Basic credentials against an htpasswd file of bcrypt
  entries (``htpasswd -B``, what the CNCF registry reads). bcrypt is slow on purpose, and
  clients send their credentials with every request, so a verified pair is remembered (as a
  keyed hash, never the password) until the file changes; the file is looked at again every
  few seconds and re-read when it changed.
  A missing or unreadable file refuses every login (``problem`` says why) until it is back.
  An unknown user name costs the same bcrypt check as a known one, against a stand-in hash.
- :class:`LoginThrottle` bounds guessing: an attempt is counted as a failure before its
  check runs, checks under way are bounded per address and per user name, and past a few
  failures in a minute a pair (address, user) waits longer and longer; an address or a user
  name past many more is refused except where that user logged in from that address
  before. A password already verified never meets the throttle.
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
import math
import os
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
# bcrypt runs on threads of its own, so guesses never queue behind blob opens (nor these
# behind guesses), on half the cores at most, so the event loop keeps one; checks running
# or waiting for them, all clients together, are bounded.
BCRYPT_THREADS = max(1, (os.cpu_count() or 2) // 2)
MAX_CHECKS = 16
# bcrypt reads at most 72 bytes; a longer password is refused rather than cut short.
MAX_PASSWORD_BYTES = 72
DEFAULT_COST = 10  # for the stand-in hash when the file has no entries
# The throttle on guessing, all per FAILURE_WINDOW: failures one address may make for one
# user name before each further check waits (a second, doubling, up to
# MAX_FAILURE_DELAY); failures from one address, or for one user name, over all the others;
# and checks one address or one user name may have under way at once.
FREE_FAILURES = 5
FAILURE_WINDOW = 60.0
MAX_FAILURE_DELAY = 30.0
ADDRESS_FAILURES = 30
USER_FAILURES = 30
CHECKS_PER_ADDRESS = 2
CHECKS_PER_USER = 2
TRACKED_ADDRESSES = 65536
GOOD_LOGIN_TTL = 86400.0  # an address a user logged in from stays trusted for a day


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
    def __init__(
        self,
        path: Path,
        *,
        threads: int = BCRYPT_THREADS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._clock = clock
        # Why logins are refused: the file is missing or unreadable (None: it is read).
        self.problem: str | None = None
        self._entries: dict[str, bytes] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._checked = -math.inf  # the first refresh looks at the file
        self._key = secrets.token_bytes(32)  # for the remembered pairs; per process
        self._verified: TTLCache[bytes, bool] = TTLCache(VERIFIED_ENTRIES, ttl=3600)
        self._lock = asyncio.Lock()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="bcrypt")
        self._running: dict[bytes, asyncio.Future[bool]] = {}  # checks, by pair
        self._stand_ins: dict[int, bytes] = {}  # a hash per cost, for unknown user names
        self._stand_in = b""
        self._load()

    def remembered(self, credentials: Credentials) -> bool:
        """Is the pair one this process verified since the file was last read? (No bcrypt.)"""
        return self.problem is None and self._remember_key(credentials) in self._verified

    def checking(self, credentials: Credentials) -> bool:
        """Is a check of this very pair under way? Another one joins it for free."""
        return self._remember_key(credentials) in self._running

    @property
    def busy(self) -> bool:
        return len(self._running) >= MAX_CHECKS

    async def check(self, credentials: Credentials) -> bool:
        """The bcrypt check, on the pool of its own, one per distinct pair at a time: an
        unknown user name is checked against a stand-in hash of the same cost, so its
        answer takes as long; a password bcrypt cannot read (over 72 bytes) fails."""
        key = self._remember_key(credentials)
        running = self._running.get(key)
        if running is not None:
            return await asyncio.shield(running)
        if self.problem is not None:
            return False
        if key in self._verified:
            return True
        password = credentials.password.encode()
        if len(password) > MAX_PASSWORD_BYTES:
            return False
        stored = self._entries.get(credentials.user)
        future = asyncio.get_running_loop().run_in_executor(
            self._pool, _checkpw, password, stored or self._stand_in
        )
        self._running[key] = future
        # Counted until the thread is done, even if the request that asked is not.
        future.add_done_callback(lambda _: self._running.pop(key, None))
        ok = await asyncio.shield(future) and stored is not None
        if ok and self.problem is None:
            self._verified[key] = True
        return ok

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _remember_key(self, credentials: Credentials) -> bytes:
        text = f"{credentials.user}\0{credentials.password}".encode()
        return hmac.new(self._key, text, hashlib.sha256).digest()

    async def refresh(self) -> None:
        """Look at the file every few seconds; re-read it when it changed, refuse every
        login while it is missing or unreadable."""
        now = self._clock()
        if now - self._checked < RECHECK_INTERVAL:
            return
        async with self._lock:
            if now - self._checked < RECHECK_INTERVAL:
                return
            self._checked = now
            try:
                stamp = _stamp(await asyncio.to_thread(os.stat, self.path))
            except OSError as exc:
                self._unreadable(exc)
                return
            if stamp != self._stamp:
                await asyncio.to_thread(self._load)

    def _unreadable(self, exc: OSError) -> None:
        problem = f"cannot read {self.path}: {exc.strerror}"
        if problem != self.problem:
            log.error("htpasswd_unreadable", path=str(self.path), error=exc.strerror)
        self.problem, self._entries, self._stamp = problem, {}, None
        self._verified.clear()

    def _load(self) -> None:
        """Read the file; entries that are not bcrypt are skipped with a warning."""
        try:
            stamp = _stamp(os.stat(self.path))
            text = self.path.read_text()
        except OSError as exc:
            self._unreadable(exc)
            return
        entries: dict[str, bytes] = {}
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, hashed = line.partition(":")
            if not sep or not _BCRYPT_RE.fullmatch(hashed):
                log.warning(
                    "htpasswd_entry_skipped",
                    path=str(self.path),
                    line=number,
                    reason="not a bcrypt entry (write it with htpasswd -B)",
                )
                continue
            entries[user] = hashed.encode()
        self._stand_in = self._stand_in_for(entries)
        self._entries, self._stamp, self.problem = entries, stamp, None
        self._verified.clear()
        log.info("htpasswd_loaded", path=str(self.path), users=len(entries))

    def _stand_in_for(self, entries: dict[str, bytes]) -> bytes:
        """A hash of the cost most entries have, checked for user names the file lacks."""
        costs = Counter(int(hashed[4:6]) for hashed in entries.values())
        cost = costs.most_common(1)[0][0] if costs else DEFAULT_COST
        if cost not in self._stand_ins:
            salt = bcrypt.gensalt(rounds=cost)
            self._stand_ins[cost] = bcrypt.hashpw(secrets.token_bytes(16), salt)
        return self._stand_ins[cost]


_BCRYPT_RE = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")


def _checkpw(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:  # a hash bcrypt cannot read after all
        return False


def _stamp(info: os.stat_result) -> tuple[int, int, int]:
    return (info.st_ino, info.st_mtime_ns, info.st_size)


class LoginThrottle:
    """Login checks admitted per address and user name (see the module's docstring)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # Failures (and checks under way, counted as failures until they succeed) by key:
        # ("pair", address, user), ("address", address), ("user", user).
        self._failures: TTLCache[tuple[str, ...], list[float]] = TTLCache(
            TRACKED_ADDRESSES, ttl=FAILURE_WINDOW
        )
        self._running: dict[tuple[str, ...], int] = {}
        self._good: TTLCache[tuple[str, str], bool] = TTLCache(
            TRACKED_ADDRESSES, ttl=GOOD_LOGIN_TTL
        )

    def admit(self, address: str, user: str) -> float:
        """0 when a check may run now, counted as a failure until ``done`` says otherwise;
        else the seconds to wait before asking again (nothing counted)."""
        now = self._clock()
        keys = (("pair", address, user), ("address", address), ("user", user))
        wait = self._backoff(keys[0], now)
        if (address, user) not in self._good:
            wait = max(
                wait,
                self._over(keys[1], ADDRESS_FAILURES, now),
                self._over(keys[2], USER_FAILURES, now),
            )
        if wait > 0:
            return wait
        if (
            self._running.get(keys[1], 0) >= CHECKS_PER_ADDRESS
            or self._running.get(keys[2], 0) >= CHECKS_PER_USER
        ):
            return 1.0
        for key in keys:
            self._failures[key] = [*self._recent(key, now), now][-(ADDRESS_FAILURES + 1) :]
            self._running[key] = self._running.get(key, 0) + 1
        return 0.0

    def done(self, address: str, user: str, ok: bool) -> None:
        """The check ``admit`` let through is over; a success is no failure, and the user
        may log in from this address past the limits aimed at guessing."""
        keys = (("pair", address, user), ("address", address), ("user", user))
        for key in keys:
            held = self._running.get(key, 0) - 1
            if held > 0:
                self._running[key] = held
            else:
                self._running.pop(key, None)
            if ok and self._failures.get(key):
                self._failures[key] = self._failures[key][:-1]
        if ok:
            self._failures.pop(keys[0], None)
            self._good[(address, user)] = True

    def _backoff(self, key: tuple[str, ...], now: float) -> float:
        recent = self._recent(key, now)
        over = len(recent) - FREE_FAILURES
        if over < 0:
            return 0.0
        return max(recent[-1] + min(2.0**over, MAX_FAILURE_DELAY) - now, 0.0)

    def _over(self, key: tuple[str, ...], limit: int, now: float) -> float:
        recent = self._recent(key, now)
        if len(recent) < limit:
            return 0.0
        return max(recent[-limit] + FAILURE_WINDOW - now, 0.0)

    def _recent(self, key: tuple[str, ...], now: float) -> list[float]:
        since = now - FAILURE_WINDOW
        return [at for at in self._failures.get(key, ()) if at > since]


class PerClient:
    """Transfers under way and upstream misses, counted per client address."""

    def __init__(
        self,
        *,
        max_transfers: int,
        miss_rate: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_transfers = max_transfers
        self._clock = clock
        self._transfers: dict[str, int] = {}
        self._miss_rate = miss_rate
        self._misses: TTLCache[str, TokenBucket] = TTLCache(
            TRACKED_ADDRESSES, ttl=3600, timer=clock
        )

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
            bucket = TokenBucket(
                self._miss_rate, max(self._miss_rate * 60, 1.0), clock=self._clock
            )
            self._misses[address] = bucket
        return bucket
