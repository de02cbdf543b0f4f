"""A fake Docker Hub: registry, token server and blob CDN as three real aiohttp servers.

It reproduces the parts of Docker Hub a pull-through cache depends on: the bearer-token
challenge with per-repository scopes and expiring tokens, Accept-driven manifest selection,
rate-limit headers, blob redirects to a CDN that rejects Authorization headers, Range requests,
and tag-list pagination. Tests inject faults through plain attributes and assert on `log`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import math
import secrets
import ssl
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from tests.support.oci import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, Image, Index

SERVICE = "fake-registry"
CHUNK_SIZE = 64 * 1024
RATELIMIT_WINDOW = 21600

_logger = logging.getLogger(__name__)


@dataclass
class Repo:
    manifests: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # digest -> (bytes, type)
    tags: dict[str, str] = field(default_factory=dict)  # tag -> digest
    blobs: dict[str, bytes] = field(default_factory=dict)  # digest -> bytes


@dataclass
class LoggedRequest:
    server: str  # "registry", "token" or "cdn"
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, list[str]]  # names lower-cased
    status: int | None = None  # None while the handler runs
    bytes_sent: int = 0  # body bytes the CDN wrote before finishing or losing the client

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


@dataclass(frozen=True)
class IssuedToken:
    token: str
    granted: frozenset[str]  # "repository:<name>:pull" entries
    requested: tuple[str, ...]  # the scope parameters as sent
    service: str | None
    account: str | None
    expires_at: float  # time.monotonic() clock

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.expires_at


def _multidict(items: Any) -> dict[str, list[str]]:
    result: dict[str, list[str]] = {}
    for key, value in items:
        result.setdefault(key.lower(), []).append(value)
    return result


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    body = {"errors": [{"code": code, "message": message, "detail": None}]}
    return web.json_response(body, status=status, headers=headers)


def _accepted_types(request: web.Request) -> set[str]:
    # Clients send either several Accept lines (skopeo, dockerd) or one comma-joined line.
    lines = request.headers.getall("Accept", [])
    types = {part.split(";")[0].strip() for line in lines for part in line.split(",")}
    return types - {""}


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class FakeHub:
    """Three servers on 127.0.0.1 sharing one in-memory content store.

    `async with FakeHub() as hub:` starts them; `hub.url` is the registry base URL.
    """

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.ssl_context = ssl_context  # all three servers speak HTTPS with it
        self.repositories: dict[str, Repo] = {}
        # Repositories only an account (`credentials`) is granted: a private repository.
        self.private: set[str] = set()
        self.credentials: tuple[str, str] | None = None  # require basic auth at /token
        self.token_ttl = 300
        self.tokens: dict[str, IssuedToken] = {}
        # Docker Hub grants no access to repositories that do not exist, so a pull of an
        # unknown name ends in 401 rather than 404; set False to get NAME_UNKNOWN instead.
        self.deny_unknown_repos = True
        self.ratelimit_limit = 100
        self.ratelimit_remaining = 100
        self.corrupt_next_blob = False
        self.truncate_next_blob_at: int | None = None
        self.blob_delay_per_chunk = 0.0
        self.down = False
        self.status_override: int | None = None
        self.retry_after = "60"  # sent with every 429
        self.stall_next_blob_at: int | None = None  # send this many bytes, then nothing
        self.cdn_authorization_rejections = 0
        # The CDN sends blobs with Transfer-Encoding: chunked and no Content-Length.
        self.cdn_chunked = False
        # A manifest's headers as an untrustworthy upstream sends them: any digest, any type.
        self.claimed_digest: str | None = None
        self.cdn_challenge: str | None = None  # the CDN answers 401 with this challenge
        self.fail_names: str | None = None  # 500 for paths with this in them, all else fine
        self.token_hangs = False  # the token server takes requests and never answers
        self.manifest_content_type: str | None = None
        # False: no referrers API, a 404 as the CNCF registry 2.8 gives (the fallback tag).
        self.referrers_api = True
        self.log: list[LoggedRequest] = []
        self.url = self.token_url = self.cdn_url = ""
        self._signatures: dict[str, str] = {}  # CDN URL signature -> digest
        self._runners: list[web.AppRunner] = []
        self._live_entries: dict[int, LoggedRequest] = {}  # id(request) -> its log entry
        self._stall_at: int | None = None

    # -- content -------------------------------------------------------------------------

    def repo(self, name: str) -> Repo:
        return self.repositories.setdefault(name, Repo())

    def add_image(self, repo: str, tag: str | None, image: Image) -> None:
        target = self.repo(repo)
        target.manifests[image.digest] = (image.manifest, image.media_type)
        for blob in image.blobs:
            target.blobs[blob.digest] = blob.data
        if tag is not None:
            target.tags[tag] = image.digest

    def add_index(self, repo: str, tag: str | None, index: Index) -> None:
        for image in index.images:
            self.add_image(repo, None, image)
        self.repo(repo).manifests[index.digest] = (index.index, index.media_type)
        if tag is not None:
            self.set_tag(repo, tag, index.digest)

    def set_tag(self, repo: str, tag: str, digest: str) -> None:
        target = self.repositories[repo]
        if digest not in target.manifests:
            raise KeyError(f"{repo} has no manifest {digest}")
        target.tags[tag] = digest

    # -- request log ---------------------------------------------------------------------

    def requests(
        self,
        method: str | None = None,
        server: str | None = None,
        path_contains: str | None = None,
    ) -> list[LoggedRequest]:
        return [
            entry
            for entry in self.log
            if (method is None or entry.method == method)
            and (server is None or entry.server == server)
            and (path_contains is None or path_contains in entry.path)
        ]

    def count(
        self,
        method: str | None = None,
        server: str | None = None,
        path_contains: str | None = None,
    ) -> int:
        return len(self.requests(method, server, path_contains))

    def clear_log(self) -> None:
        self.log.clear()

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def realm(self) -> str:
        return self.token_url

    @property
    def host(self) -> str:
        """The registry as host:port, the form image references and skopeo want."""
        return self.url.partition("://")[2]

    async def start(self) -> None:
        self.token_url = await self._serve(self._token_app()) + "/token"
        self.cdn_url = await self._serve(self._cdn_app())
        self.url = await self._serve(self._registry_app())

    async def close(self) -> None:
        while self._runners:
            await self._runners.pop().cleanup()

    async def __aenter__(self) -> FakeHub:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def _serve(self, app: web.Application) -> str:
        # A short shutdown timeout: a deliberately slow blob stream must not stall teardown.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
        await site.start()
        port = runner.addresses[0][1]
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{port}"

    def _logging(self, server: str) -> Middleware:
        @web.middleware
        async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            entry = LoggedRequest(
                server,
                request.method,
                request.path,
                _multidict(request.query.items()),
                _multidict(request.headers.items()),
            )
            self.log.append(entry)
            # Keyed by id() rather than request storage, whose typed keys need aiohttp 3.12+.
            self._live_entries[id(request)] = entry
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                entry.status = exc.status
                raise
            finally:
                del self._live_entries[id(request)]
            entry.status = response.status
            return response

        return middleware

    # -- token server --------------------------------------------------------------------

    def _token_app(self) -> web.Application:
        app = web.Application(middlewares=[self._logging("token")])
        app.router.add_get("/token", self._token)
        return app

    async def _token(self, request: web.Request) -> web.Response:
        if self.token_hangs:
            await asyncio.sleep(3600)  # accepts the request, never answers
        account = self._basic_account(request)
        if self.credentials is not None and account is None:
            return web.json_response({"details": "incorrect username or password"}, status=401)
        requested = tuple(request.query.getall("scope", []))
        token = "fake-" + secrets.token_hex(16)
        self.tokens[token] = IssuedToken(
            token=token,
            granted=self._grant(requested, account),
            requested=requested,
            service=request.query.get("service"),
            account=account,
            expires_at=time.monotonic() + self.token_ttl,
        )
        issued_at = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        return web.json_response(
            {
                "token": token,
                "access_token": token,
                "expires_in": self.token_ttl,
                "issued_at": issued_at,
            }
        )

    def expire_tokens(self) -> None:
        """Every token issued so far is past its lifetime now (no test waits for it)."""
        for token, issued in self.tokens.items():
            self.tokens[token] = replace(issued, expires_at=-math.inf)

    def _basic_account(self, request: web.Request) -> str | None:
        """The user name if the request carries the expected credentials."""
        header = request.headers.get("Authorization", "")
        if self.credentials is None or not header.startswith("Basic "):
            return None
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return user if (user, password) == self.credentials else None

    def _grant(self, requested: tuple[str, ...], account: str | None) -> frozenset[str]:
        granted: set[str] = set()
        # Several scopes may arrive as repeated parameters or space-separated in one.
        for scope in (s for param in requested for s in param.split()):
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            wanted = set(actions.split(","))
            if kind != "repository" or not wanted & {"pull", "*"}:
                continue
            if self.deny_unknown_repos and name not in self.repositories:
                continue
            if name in self.private and account is None:
                continue
            granted.add(f"repository:{name}:pull")
        return frozenset(granted)

    # -- registry ------------------------------------------------------------------------

    def _registry_app(self) -> web.Application:
        app = web.Application(middlewares=[self._logging("registry"), self._registry_faults])
        app.router.add_get("/v2/", self._ping)
        app.router.add_get("/v2/{name:.+}/manifests/{reference}", self._manifest)
        app.router.add_get("/v2/{name:.+}/blobs/{digest}", self._blob)
        app.router.add_get("/v2/{name:.+}/tags/list", self._tags)
        app.router.add_get("/v2/{name:.+}/referrers/{digest}", self._referrers)
        return app

    @web.middleware
    async def _registry_faults(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.down:
            response: web.StreamResponse = _error(503, "UNAVAILABLE", "service unavailable")
        elif self.fail_names is not None and self.fail_names in request.path:
            response = _error(500, "UNKNOWN", "a name this registry chokes on")
        elif self.status_override is not None:
            response = _error(self.status_override, "UNKNOWN", "injected failure")
            if self.status_override == 429:
                response.headers["Retry-After"] = self.retry_after
        else:
            response = await handler(request)
        response.headers["Docker-Distribution-API-Version"] = "registry/2.0"
        return response

    def _challenge(self, scope: str | None = None, error: str | None = None) -> str:
        value = f'Bearer realm="{self.realm}",service="{SERVICE}"'
        if scope is not None:
            value += f',scope="{scope}"'
        if error is not None:
            value += f',error="{error}"'
        return value

    def _presented_token(self, request: web.Request) -> IssuedToken | None:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            return None
        return self.tokens.get(header[7:].strip())

    def _authorize(self, request: web.Request, name: str) -> web.Response | None:
        """None when the request may read `name`, else the 401 to send."""
        scope = f"repository:{name}:pull"
        token = self._presented_token(request)
        if token is not None and not token.expired and scope in token.granted:
            return None
        error = None
        if token is not None:
            error = "invalid_token" if token.expired else "insufficient_scope"
        elif "Authorization" in request.headers:
            error = "invalid_token"
        headers = {"WWW-Authenticate": self._challenge(scope, error)}
        return _error(401, "UNAUTHORIZED", "authentication required", headers)

    async def _ping(self, request: web.Request) -> web.Response:
        token = self._presented_token(request)
        if token is not None and not token.expired:
            return web.json_response({})
        headers = {"WWW-Authenticate": self._challenge()}
        return _error(401, "UNAUTHORIZED", "authentication required", headers)

    def _lookup(self, request: web.Request) -> tuple[str, Repo | web.Response]:
        name = request.match_info["name"]
        denied = self._authorize(request, name)
        if denied is not None:
            return name, denied
        repo = self.repositories.get(name)
        if repo is None:
            return name, _error(404, "NAME_UNKNOWN", "repository name not known to registry")
        return name, repo

    async def _manifest(self, request: web.Request) -> web.Response:
        _, repo = self._lookup(request)
        if isinstance(repo, web.Response):
            return repo
        # Docker Hub counts manifest GETs, not HEADs, against the pull limit, and reports
        # the quota on both.
        if request.method != "GET":
            response = self._manifest_response(repo, request)
        elif self.ratelimit_remaining <= 0:
            response = _error(429, "TOOMANYREQUESTS", "You have reached your pull rate limit.")
            response.headers["Retry-After"] = self.retry_after
        else:
            self.ratelimit_remaining -= 1
            response = self._manifest_response(repo, request)
        response.headers["ratelimit-limit"] = f"{self.ratelimit_limit};w={RATELIMIT_WINDOW}"
        response.headers["ratelimit-remaining"] = f"{self.ratelimit_remaining};w={RATELIMIT_WINDOW}"
        return response

    def _manifest_response(self, repo: Repo, request: web.Request) -> web.Response:
        found = self._select(repo, request.match_info["reference"], _accepted_types(request))
        if found is None:
            return _error(404, "MANIFEST_UNKNOWN", "manifest unknown")
        data, media_type = found
        digest = _digest(data)
        headers = {"Docker-Content-Digest": self.claimed_digest or digest, "Etag": f'"{digest}"'}
        media_type = self.manifest_content_type or media_type
        # aiohttp keeps Content-Length but drops the body for HEAD.
        return web.Response(body=data, content_type=media_type, headers=headers)

    def _select(self, repo: Repo, reference: str, accepted: set[str]) -> tuple[bytes, str] | None:
        """Choose what to serve the way the distribution registry does."""
        by_tag = ":" not in reference
        digest = repo.tags.get(reference) if by_tag else reference
        found = repo.manifests.get(digest) if digest is not None else None
        if found is None:
            return None
        media_type = found[1]
        # Schema 1 is gone, so a schema2 image is served whatever the client accepts.
        if media_type in accepted or media_type == DOCKER_MANIFEST:
            return found
        # Old clients asking for a list by tag get the linux/amd64 image; by digest, the list.
        if media_type == DOCKER_LIST:
            return self._default_platform(repo, found[0]) if by_tag else found
        # An OCI manifest or index the client cannot read is reported as unknown.
        return None

    def _default_platform(self, repo: Repo, manifest_list: bytes) -> tuple[bytes, str] | None:
        for entry in json.loads(manifest_list)["manifests"]:
            platform = entry.get("platform", {})
            if platform.get("architecture") == "amd64" and platform.get("os") == "linux":
                return repo.manifests.get(entry["digest"])
        return None

    async def _blob(self, request: web.Request) -> web.Response:
        _, repo = self._lookup(request)
        if isinstance(repo, web.Response):
            return repo
        digest = request.match_info["digest"]
        data = repo.blobs.get(digest)
        if data is None:
            return _error(404, "BLOB_UNKNOWN", "blob unknown to registry")
        headers = {"Docker-Content-Digest": digest}
        if request.method == "HEAD":
            return web.Response(body=data, content_type="application/octet-stream", headers=headers)
        signature = secrets.token_hex(16)
        self._signatures[signature] = digest
        location = f"{self.cdn_url}/blobs/{digest}?{urlencode({'sig': signature})}"
        return web.Response(status=307, headers={**headers, "Location": location})

    async def _tags(self, request: web.Request) -> web.Response:
        name, repo = self._lookup(request)
        if isinstance(repo, web.Response):
            return repo
        tags = sorted(repo.tags)
        if "last" in request.query:
            tags = [tag for tag in tags if tag > request.query["last"]]
        try:
            limit = int(request.query.get("n", len(tags)))
        except ValueError:
            limit = -1
        if limit < 0:
            return _error(400, "PAGINATION_NUMBER_INVALID", "invalid number of results requested")
        page = tags[:limit]
        headers = {}
        if len(tags) > limit and page:
            query = urlencode({"last": page[-1], "n": limit})
            headers["Link"] = f'</v2/{name}/tags/list?{query}>; rel="next"'
        return web.json_response({"name": name, "tags": page}, headers=headers)

    def referrers_of(
        self, repo: Repo, digest: str, artifact_type: str | None = None
    ) -> list[dict[str, Any]]:
        """The descriptors the referrers API lists for ``digest``."""
        found = [_referrer_descriptor(data, kind) for data, kind in repo.manifests.values()]
        return [
            entry
            for entry, subject in found
            if subject == digest
            and (artifact_type is None or entry.get("artifactType") == artifact_type)
        ]

    async def _referrers(self, request: web.Request) -> web.Response:
        """The OCI 1.1 referrers API, from the manifests whose ``subject`` names the digest."""
        if not self.referrers_api:
            return web.Response(status=404, text="404 page not found")
        _, repo = self._lookup(request)
        if isinstance(repo, web.Response):
            return repo
        wanted = request.query.get("artifactType")
        manifests = self.referrers_of(repo, request.match_info["digest"], wanted)
        headers = {"OCI-Filters-Applied": "artifactType"} if wanted is not None else {}
        body = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
        return web.json_response(body, content_type=OCI_INDEX, headers=headers)

    # -- CDN -----------------------------------------------------------------------------

    def _cdn_app(self) -> web.Application:
        app = web.Application(middlewares=[self._logging("cdn")])
        app.router.add_get("/blobs/{digest}", self._cdn_blob)
        return app

    def _find_blob(self, digest: str) -> bytes | None:
        for repo in self.repositories.values():
            if digest in repo.blobs:
                return repo.blobs[digest]
        return None

    async def _cdn_blob(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        if self.cdn_challenge is not None:
            # A CDN (or anything a redirect leads to) asking for credentials of its own.
            return web.Response(status=401, headers={"WWW-Authenticate": self.cdn_challenge})
        if "Authorization" in request.headers:
            # Like S3 behind Docker Hub: a forwarded registry token breaks the signed URL.
            self.cdn_authorization_rejections += 1
            _logger.warning("fake CDN rejected a request carrying Authorization: %s", digest)
            return web.Response(status=400, text="Only one auth mechanism allowed")
        if self._signatures.get(request.query.get("sig", "")) != digest:
            return web.Response(status=403, text="bad signature")
        data = self._find_blob(digest)
        if data is None:
            return web.Response(status=404, text="no such blob")
        return await self._send_blob(request, data, digest)

    async def _send_blob(
        self, request: web.Request, data: bytes, digest: str
    ) -> web.StreamResponse:
        span = _byte_range(request, len(data))
        if span is None:
            headers = {"Content-Range": f"bytes */{len(data)}"}
            return web.Response(status=416, headers=headers)
        start, stop = span
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "Etag": f'"{digest}"',
        }
        status = 200
        if "Range" in request.headers:
            status = 206
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
        response = web.StreamResponse(status=status, headers=headers)
        if self.cdn_chunked:
            response.enable_chunked_encoding()
        else:
            response.content_length = stop - start
        await response.prepare(request)
        if request.method == "HEAD":
            await response.write_eof()
            return response
        await self._stream(request, response, self._faulty(data[start:stop]))
        return response

    def _faulty(self, body: bytes) -> tuple[bytes, int]:
        """Apply one-shot faults: returns the body and how many bytes of it to send."""
        if self.corrupt_next_blob and body:
            self.corrupt_next_blob = False
            middle = len(body) // 2
            body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]
        limit = len(body)
        if self.stall_next_blob_at is not None:
            self._stall_at = self.stall_next_blob_at
            self.stall_next_blob_at = None
        if self.truncate_next_blob_at is not None:
            limit = min(limit, self.truncate_next_blob_at)
            self.truncate_next_blob_at = None
        return body, limit

    async def _stream(
        self, request: web.Request, response: web.StreamResponse, faulty: tuple[bytes, int]
    ) -> None:
        body, limit = faulty
        entry = self._live_entries[id(request)]
        view = memoryview(body)
        try:
            for offset in range(0, limit, CHUNK_SIZE):
                chunk = view[offset : min(offset + CHUNK_SIZE, limit)]
                if self._stall_at is not None and offset >= self._stall_at:
                    self._stall_at = None
                    await asyncio.sleep(3600)  # a stalled transfer: the reader must time out
                await response.write(chunk)
                entry.bytes_sent += len(chunk)
                if self.blob_delay_per_chunk:
                    await asyncio.sleep(self.blob_delay_per_chunk)
            if limit < len(body):
                # Closing mid-body is how a truncated transfer looks to the client.
                if request.transport is not None:
                    request.transport.close()
                return
            await response.write_eof()
        except ConnectionError:
            # The client went away mid-transfer; bytes_sent tells the test how far it got.
            return


def _referrer_descriptor(data: bytes, media_type: str) -> tuple[dict[str, Any], str | None]:
    """A manifest's descriptor as the referrers API lists it, and the digest it refers to."""
    document = json.loads(data)
    subject = document.get("subject") if isinstance(document, dict) else None
    if not isinstance(subject, dict):
        return {}, None
    entry: dict[str, Any] = {"mediaType": media_type, "digest": _digest(data), "size": len(data)}
    artifact_type = document.get("artifactType") or document.get("config", {}).get("mediaType")
    if artifact_type:
        entry["artifactType"] = artifact_type
    if document.get("annotations"):
        entry["annotations"] = document["annotations"]
    return entry, subject.get("digest")


def _byte_range(request: web.Request, size: int) -> tuple[int, int] | None:
    """The [start, stop) span to serve, or None if the Range cannot be satisfied."""
    if "Range" not in request.headers:
        return 0, size
    try:
        requested = request.http_range
    except ValueError:
        return None
    start, stop, _ = requested.indices(size)
    if start >= stop:
        return None
    return start, stop
