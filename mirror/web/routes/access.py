"""Who may ask: logins (``auth: {htpasswd: FILE}``) and the client address a request is
charged to. Without ``auth``, pulls are anonymous and ``/v2/`` answers 200 with no challenge.

With it, ``/v2/`` and everything under it, the status page (``/``, ``/status.json``), and
``/metrics`` with ``auth: {metrics: true}``,
answers 401 ``UNAUTHORIZED`` with a Basic challenge unless the request carries valid
credentials; ``/healthz`` and ``/readyz`` stay open for probes. A login not verified before
is checked only when the throttle on guessing admits it (``mirror.services.clients.LoginThrottle``),
else answered 429 with no check; with the password file unreadable, 503.

What may be pulled (``repositories:``, :mod:`mirror.domain.rules`) is decided by :func:`screen`
for every ``/v2/`` route, before anything is looked up or asked upstream.
"""

from __future__ import annotations

from aiohttp import web

from mirror.domain.errors import Denied, TooManyRequests, Unauthorized, UpstreamError
from mirror.domain.reference import Digest, Reference
from mirror.domain.rules import Scope
from mirror.services.clients import CLIENT, Credentials
from mirror.web.routes.state import (
    EXCHANGE,
    HTPASSWD,
    LOGIN_THROTTLE,
    METRICS,
    RESOLVER,
    SETTINGS,
)


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
    auth = request.app[SETTINGS].auth
    assert auth is not None
    credentials = Credentials.from_header(request.headers.get("Authorization"))
    if credentials is not None:
        result = await _login(request, credentials)
        if result != "remembered":  # that is every request of a logged-in client: not counted
            request.app[METRICS].logins.labels(result).inc()
        if result in ("ok", "remembered"):
            request[EXCHANGE].user = credentials.user
            return
    raise Unauthorized(
        "authentication required" if credentials is None else "invalid username or password",
        headers={"WWW-Authenticate": f'Basic realm="{auth.realm}"'},
    )


async def _login(request: web.Request, credentials: Credentials) -> str:
    """How a login went: ok or failed (checked), remembered (verified before); or raise
    when it is not checked at all (the password file unreadable, too many attempts)."""
    htpasswd, throttle = request.app[HTPASSWD], request.app[LOGIN_THROTTLE]
    await htpasswd.refresh()
    if htpasswd.problem is not None:
        request.app[METRICS].logins.labels("unavailable").inc()
        raise UpstreamError("logins are unavailable: the mirror cannot read its password file")
    if htpasswd.remembered(credentials):
        return "remembered"
    if htpasswd.checking(credentials):  # the very same pair: its answer, at no cost
        return "ok" if await htpasswd.check(credentials) else "failed"
    address, user = request.remote or "unknown", credentials.user
    # Busy first: an attempt the throttle admits is counted, and must reach its check.
    wait = 1.0 if htpasswd.busy else throttle.admit(address, user)
    if wait > 0:
        request.app[METRICS].logins.labels("throttled").inc()
        raise TooManyRequests(
            "too many login attempts; retry later",
            headers={"Retry-After": str(max(int(wait + 0.999), 1))},
        )
    ok = False
    try:
        ok = await htpasswd.check(credentials)
    finally:
        throttle.done(address, user, ok)
    return "ok" if ok else "failed"


async def screen(
    request: web.Request,
    scope: Scope | None,
    registry: str,
    repository: str,
    reference: Reference | Digest | None,
) -> Scope:
    """Refuse with 403 ``DENIED`` what the access rules do not let through: the repository
    (``scope`` None), the tag or digest of a manifest, a blob by the manifests that hold it.
    The scope still decides a manifest pulled by tag once its digest is known
    (:func:`screen_resolved`). Called only for a scope that is not ``OPEN``."""
    if scope is None:
        raise _denied(registry, repository)
    if scope.open or reference is None:
        return scope
    if isinstance(reference, Reference) and reference.tag is not None:
        tag = reference.tag
        if scope.denies_tag(registry, repository, tag) or not scope.allows_tag(
            registry, repository, tag
        ):
            raise _denied(registry, repository, tag)
        return scope
    digest = reference.digest if isinstance(reference, Reference) else reference
    assert digest is not None
    blob = isinstance(reference, Digest)
    resolver = request.app[RESOLVER]
    denied = scope.deny and digest.text in await resolver.covered(
        registry, repository, scope.deny, blobs=blob
    )
    if denied or not (
        scope.allow_all
        or digest.text in await resolver.covered(registry, repository, scope.allow, blobs=blob)
    ):
        raise _denied(registry, repository, digest.text)
    return scope


def screen_resolved(scope: Scope, registry: str, repository: str, digest: str) -> None:
    """A manifest pulled by tag is refused when a deny rule names its digest."""
    if scope.denied_digest(digest):
        raise _denied(registry, repository, digest)


def _denied(registry: str, repository: str, reference: str | None = None) -> Denied:
    name = f"{registry}/{repository}"
    if reference is None:
        return Denied("this mirror does not serve that repository", detail={"repository": name})
    return Denied(
        "this mirror does not serve that image",
        detail={"repository": name, "reference": reference},
    )
