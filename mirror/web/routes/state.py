"""Typed keys for what the app and each request carry."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import web

from mirror.config import Settings
from mirror.engine import Engine
from mirror.logs import LogThrottle
from mirror.metrics import Metrics
from mirror.services.clients import Htpasswd, LoginThrottle
from mirror.services.referrers import Referrers
from mirror.services.resolver import Resolver
from mirror.services.signatures import SignaturePolicy
from mirror.services.status import History
from mirror.web.routes.transfers import Transfers

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
ENGINE = web.AppKey("engine", Engine)
# The engine's resolver, kept under its own key: the request path reads it on every request.
RESOLVER = web.AppKey("resolver", Resolver)
# The referrers API over the resolver (``mirror.services.referrers``).
REFERRERS = web.AppKey("referrers", Referrers)
# The signature policy (absent without ``signatures``).
SIGNATURES = web.AppKey("signatures", SignaturePolicy)
# Lines the request path logs for events a client or a broken part can repeat endlessly.
LOG_THROTTLE = web.AppKey("log_throttle", LogThrottle)
# Blob downloads under way: their send deadline, and what the server sheds when descriptors
# run short.
TRANSFERS = web.AppKey("transfers", Transfers)

# Logins (absent: anonymous pulls) and the throttle on guessing them.
HTPASSWD = web.AppKey("htpasswd", Htpasswd)  # absent without ``auth``
LOGIN_THROTTLE = web.AppKey("login_throttle", LoginThrottle)

# The last hour of request totals, and when the service started (the status page).
HISTORY = web.AppKey("history", History)
STARTED = web.AppKey("started", float)
# Set when the process was told to stop (mirror.web.shutdown): /readyz answers 503 from then on.
STOPPING = web.AppKey("stopping", asyncio.Event)


@dataclass(slots=True)
class Exchange:
    """What the mirror learns about one request while answering it, for its access line and
    its metrics: one object read by attribute, where a key per field on the request's own
    mapping costs a method call per read on every request."""

    id: str | None
    started: float = 0.0  # time.perf_counter() when its handler began; 0.0 if none did
    route: str = "other"  # which API route it hit
    registry: str | None = None  # the upstream registry it is for (its ``ns``)
    cache: str | None = None  # the cache outcome: hit, miss, stale, ...
    user: str | None = None  # the user it logged in as (only the name, never the password)
    sent: int | None = None  # body bytes a handler streamed itself


# Set by ``middleware.answered`` on every request that reaches a handler (a request the HTTP
# parser refused has none).
EXCHANGE = web.RequestKey("exchange", Exchange)
