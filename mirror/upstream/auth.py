"""Registry authentication: parsing challenges and caching bearer tokens per scope.

A registry answers an unauthenticated request with 401 and a ``WWW-Authenticate``
challenge naming a token realm; the realm is always taken from the challenge, never
assumed. Tokens are cached per (realm, service, scope) until ``expires_in`` runs out,
and concurrent requests for one scope share one token fetch.
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import structlog
from cachetools import LRUCache

from mirror.clock import SYSTEM, Clock
from mirror.domain.errors import UpstreamError

log = structlog.get_logger(__name__)

_PARAM_RE = re.compile(r'([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')
# Token lifetime assumed when the token server does not say (the distribution spec's value).
DEFAULT_TOKEN_TTL = 60.0
# Renew a little before expiry so a token does not run out between check and use.
EXPIRY_MARGIN = 10.0
# Tokens kept, one per repository scope.
MAX_TOKENS = 1024


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str
    realm: str
    service: str | None = None
    scope: str | None = None


def parse_challenge(header: str) -> Challenge | None:
    scheme, _, rest = header.strip().partition(" ")
    params = {m[1].lower(): m[2] if m[2] else m[3] for m in _PARAM_RE.finditer(rest)}
    scheme = scheme.lower()
    if scheme == "basic":
        return Challenge("basic", params.get("realm", ""))
    if scheme != "bearer" or not params.get("realm"):
        return None
    return Challenge("bearer", params["realm"], params.get("service"), params.get("scope"))


def pull_scope(repository: str) -> str:
    return f"repository:{repository}:pull"


class TokenAuth:
    """Answers "which Authorization header for this scope?" for one upstream registry."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        username: str | None = None,
        password: str | None = None,
        clock: Clock = SYSTEM,
    ) -> None:
        self._session = session
        self._clock = clock
        self._basic = _basic(username, password)
        self._challenge: Challenge | None = None
        # Scopes are repository names a client chose: bounded, least recently used first out.
        self._tokens: LRUCache[str, tuple[str, float]] = LRUCache(MAX_TOKENS)
        self._pending: dict[str, asyncio.Future[str]] = {}
        # Told the status of every token request ("error" when none came back): for metrics.
        self.on_token_response: Callable[[str], None] = lambda status: None

    @property
    def has_credentials(self) -> bool:
        return self._basic is not None

    def header(self, scope: str) -> str | None:
        """The header to send without asking anyone, or None if a token must be fetched first."""
        if self._challenge is None:
            return None
        if self._challenge.scheme == "basic":
            return self._basic
        cached = self._tokens.get(scope)
        if cached is None:
            return None
        if cached[1] <= self._clock.monotonic():
            del self._tokens[scope]  # expired: no use keeping it
            return None
        return f"Bearer {cached[0]}"

    @property
    def cached_tokens(self) -> int:
        return len(self._tokens)

    @property
    def knows_challenge(self) -> bool:
        return self._challenge is not None

    async def authorize(self, scope: str, challenge: Challenge | None = None) -> str | None:
        """Learn ``challenge`` (if given), drop any cached token, and get a fresh header."""
        if challenge is not None:
            self._challenge = challenge
        if self._challenge is None:
            return None
        if self._challenge.scheme == "basic":
            return self._basic
        if challenge is not None:
            self._tokens.pop(scope, None)
        cached = self.header(scope)
        if cached is not None:
            return cached
        pending = self._pending.get(scope)
        if pending is None:
            pending = asyncio.ensure_future(self._fetch(scope, self._challenge))
            self._pending[scope] = pending
            pending.add_done_callback(lambda _: self._pending.pop(scope, None))
        return f"Bearer {await asyncio.shield(pending)}"

    async def _fetch(self, scope: str, challenge: Challenge) -> str:
        params = {"scope": scope}
        if challenge.service:
            params["service"] = challenge.service
        headers = {"Authorization": self._basic} if self._basic else {}
        try:
            async with self._session.get(
                challenge.realm, params=params, headers=headers, allow_redirects=False
            ) as response:
                self.on_token_response(str(response.status))
                if response.status != 200:
                    raise UpstreamError(
                        "the upstream token server refused the request",
                        detail={"status": response.status, "scope": scope},
                    )
                data = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self.on_token_response("error")
            raise UpstreamError(
                "the upstream token server is unavailable", detail={"error": type(exc).__name__}
            ) from exc
        token = data.get("token") or data.get("access_token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            raise UpstreamError("the upstream token server sent no token", detail={"scope": scope})
        ttl = data.get("expires_in")
        lifetime = float(ttl) if isinstance(ttl, int | float) and ttl > 0 else DEFAULT_TOKEN_TTL
        expires = self._clock.monotonic() + max(lifetime - EXPIRY_MARGIN, lifetime / 2)
        self._tokens[scope] = (token, expires)
        log.debug("token_fetched", scope=scope, expires_in=lifetime)
        return token


def _basic(username: str | None, password: str | None) -> str | None:
    if username is None or password is None:
        return None
    encoded = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    return f"Basic {encoded}"
