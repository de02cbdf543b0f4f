"""Who may ask: logins (``auth: {htpasswd: FILE}``) and the client address a request is
charged to. Without ``auth``, pulls are anonymous and ``/v2/`` answers 200 with no challenge.

With it, ``/v2/`` and everything under it, the status page (``/``, ``/status.json``), and
``/metrics`` with ``auth: {metrics: true}``,
answers 401 ``UNAUTHORIZED`` with a Basic challenge unless the request carries valid
credentials; ``/healthz`` and ``/readyz`` stay open for probes. An address whose logins keep
failing waits longer and longer for its answers (``mirror.clients.FailedLogins``).
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from mirror.clients import CLIENT, Credentials
from mirror.errors import Unauthorized
from mirror.routes.state import EXCHANGE, FAILED_LOGINS, HTPASSWD, SETTINGS


async def admit(request: web.Request) -> None:
    """Called by ``middleware.answered`` before every handler: charge the request to its
    client address, and ask for a login where one is needed."""
    CLIENT.set(request.remote)
    if request.app[SETTINGS].auth is not None and _protected(request):
        await _authenticate(request)


def _protected(request: web.Request) -> bool:
    path = request.path
    if path == "/v2" or path.startswith("/v2/") or path in ("/", "/status.json"):
        return True  # the status page names the images: it is for the same people
    auth = request.app[SETTINGS].auth
    return path == "/metrics" and auth is not None and auth.metrics


async def _authenticate(request: web.Request) -> None:
    htpasswd, failed = request.app[HTPASSWD], request.app[FAILED_LOGINS]
    auth = request.app[SETTINGS].auth
    assert auth is not None
    address = request.remote or "unknown"
    credentials = Credentials.from_header(request.headers.get("Authorization"))
    if credentials is not None:
        delay = failed.delay(address)
        if delay > 0:
            await asyncio.sleep(delay)
        if await htpasswd.verify(credentials):
            request[EXCHANGE].user = credentials.user
            return
        failed.failed(address)
    raise Unauthorized(
        "authentication required" if credentials is None else "invalid username or password",
        headers={"WWW-Authenticate": f'Basic realm="{auth.realm}"'},
    )
