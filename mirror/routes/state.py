"""Typed keys for what the app and each request carry."""

from __future__ import annotations

from aiohttp import web

from mirror.clients import FailedLogins, Htpasswd
from mirror.config import Settings
from mirror.engine import Engine
from mirror.logs import LogThrottle
from mirror.metrics import Metrics
from mirror.resolver import Resolver
from mirror.status import History

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
ENGINE = web.AppKey("engine", Engine)
# The engine's resolver, kept under its own key: the request path reads it on every request.
RESOLVER = web.AppKey("resolver", Resolver)
# Lines the request path logs for events a client or a broken part can repeat endlessly.
LOG_THROTTLE = web.AppKey("log_throttle", LogThrottle)

# Logins (absent: anonymous pulls) and failed logins per address.
HTPASSWD = web.AppKey("htpasswd", Htpasswd)  # absent without ``auth``
FAILED_LOGINS = web.AppKey("failed_logins", FailedLogins)

# The last hour of request totals, and when the service started (the status page).
HISTORY = web.AppKey("history", History)
STARTED = web.AppKey("started", float)

# Per request: which API route it hit, the cache outcome, body bytes a handler streamed.
ROUTE = web.RequestKey("route", str)
CACHE_OUTCOME = web.RequestKey("cache_outcome", str)
BYTES_SENT = web.RequestKey("bytes_sent", int)
REQUEST_ID = web.RequestKey("request_id", str)
# The upstream registry an API request is for (its ``ns``), for the access log.
REGISTRY = web.RequestKey("registry", str)
# The user a request logged in as (only the name: never the password).
USER = web.RequestKey("user", str)
