"""The OCI distribution pull API (``/v2/``), read-only.

Handlers parse and validate the request, ask the resolver, and write the answer; they
never build error responses themselves (``mirror.web.routes.middleware`` does).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping

import structlog
import yarl
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from mirror.domain.errors import (
    BlobUnknown,
    PaginationNumberInvalid,
    RangeInvalid,
    RegistryError,
    TooManyRequests,
    Unsupported,
)
from mirror.domain.manifests import Manifest
from mirror.domain.mediatypes import BLOB_TYPE, OCI_INDEX, parse_accept, served_manifest_type
from mirror.domain.reference import DOCKER_HUB, Digest, Reference, normalize_name
from mirror.domain.rules import OPEN, Scope
from mirror.services.fills import Fill, FillState
from mirror.services.referrers import FILTERS_HEADER, filtered
from mirror.services.resolver import CachedBlob, StorageError
from mirror.web.routes.access import screen, screen_resolved
from mirror.web.routes.middleware import (
    API_VERSION,
    API_VERSION_HEADER,
    NOSNIFF,
    NOSNIFF_HEADER,
    add_route,
)
from mirror.web.routes.sending import SourceShrank, send_blob, send_stream, sending
from mirror.web.routes.state import EXCHANGE, REFERRERS, RESOLVER, SETTINGS, SIGNATURES, TRANSFERS

log = structlog.get_logger(__name__)

_PATH_RE = re.compile(
    r"(?P<name>.+)/(?:(?P<kind>manifests|blobs|referrers)/(?P<ref>[^/]+)|tags/list)"
)
_UPLOADS_RE = re.compile(r".+/blobs/uploads(?:/.*)?")
# At most 18 digits: more is beyond any blob, and int() refuses over 4,300 of them.
_RANGE_RE = re.compile(r"bytes=(\d{0,18})-(\d{0,18})")
_READ_METHODS = ("GET", "HEAD")
_TAGS_QUERY = ("n", "last")
_PAGE_SIZE_RE = re.compile(r"\d{1,9}")
_LINK_RE = re.compile(r'<(?P<url>[^>]*)>\s*;[^,]*rel="?next"?')


def add_routes(app: web.Application) -> None:
    # The busy route first: aiohttp tries resources in the order they were added.
    add_route(app, "/v2/{path:.+}", dispatch)
    add_route(app, "/v2", base)
    add_route(app, "/v2/", base)


async def base(request: web.Request) -> web.Response:
    check_method(request)
    return web.json_response({}, headers={API_VERSION_HEADER: API_VERSION, NOSNIFF_HEADER: NOSNIFF})


async def dispatch(request: web.Request) -> web.StreamResponse:
    path = request.match_info["path"]
    if _UPLOADS_RE.fullmatch(path):
        raise Unsupported("pushing is not supported: this registry is a read-only mirror")
    check_method(request)
    if request.protocol.writing_paused:
        # Earlier answers on this connection the client has not read come first:
        # pipelined requests must not pile answers up in memory.
        await request.app[TRANSFERS].drained(request)
    # Most requests carry no query: parsing an empty one still costs a mapping.
    registry = (request.query_string and request.query.get("ns")) or DOCKER_HUB
    exchange = request[EXCHANGE]
    exchange.registry = registry
    route, repository, reference = _parse_path(path, registry)
    exchange.route = route
    scope = request.app[SETTINGS].repositories.scope(registry, repository)
    if route == "referrers":
        assert isinstance(reference, Digest)
        if scope is not OPEN:  # the subject is screened as a manifest pulled by digest
            await screen(request, scope, registry, repository, Reference(digest=reference))
        return await referrers(request, registry, repository, reference)
    if scope is not OPEN:  # rules that name this repository: the slow path
        scope = await screen(request, scope, registry, repository, reference)
    if isinstance(reference, Reference):
        return await manifest(request, registry, repository, reference, scope)
    if isinstance(reference, Digest):
        return await blob(request, registry, repository, reference)
    return await tags(request, registry, repository)


@functools.lru_cache(maxsize=4096)
def _parse_path(path: str, registry: str) -> tuple[str, str, Reference | Digest | None]:
    """(route, repository, reference) of an API path, validated; memoized since clients
    ask for the same few paths over and over, and the answers never change."""
    match = _PATH_RE.fullmatch(path)
    if match is None:
        raise web.HTTPNotFound()
    repository = normalize_name(match["name"], registry)
    kind = match["kind"]
    if kind == "manifests":
        return "manifest", repository, Reference.parse(match["ref"])
    if kind == "blobs":
        return "blob", repository, Digest.parse(match["ref"])
    if kind == "referrers":
        return "referrers", repository, Digest.parse(match["ref"])
    return "tags", repository, None


def check_method(request: web.Request) -> None:
    if request.method not in _READ_METHODS:
        raise Unsupported(f"{request.method} is not supported: this registry is a read-only mirror")


async def manifest(
    request: web.Request, registry: str, repository: str, reference: Reference, scope: Scope = OPEN
) -> web.Response:
    accept = parse_accept(tuple(request.headers.getall("Accept", ())))
    found, outcome = await request.app[RESOLVER].manifest(registry, repository, reference, accept)
    if scope.deny:
        screen_resolved(scope, registry, repository, found.digest)
    request[EXCHANGE].cache = outcome.value
    policy = request.app.get(SIGNATURES)
    if policy is not None:
        await policy.check(registry, repository, found, reference.tag)
    return _manifest_response(request, found)


def _manifest_response(request: web.Request, found: Manifest) -> web.Response:
    headers = _manifest_headers(found.digest, found.media_type)
    exchange = request[EXCHANGE]
    if request.headers.get("If-None-Match") == headers["ETag"]:
        exchange.sent = 0
        return web.Response(status=304, headers=headers)
    exchange.sent = 0 if request.method == "HEAD" else len(found.body)
    return web.Response(body=found.body, headers=headers)


@functools.lru_cache(maxsize=4096)
def _manifest_headers(digest: str, media_type: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(
        CIMultiDict(
            {
                "Content-Type": served_manifest_type(media_type),
                "Docker-Content-Digest": digest,
                "ETag": f'"{digest}"',
                API_VERSION_HEADER: API_VERSION,
                NOSNIFF_HEADER: NOSNIFF,
            }
        )
    )


@functools.lru_cache(maxsize=4096)
def _blob_headers(digest: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(
        CIMultiDict(
            {
                "Docker-Content-Digest": digest,
                "Content-Type": BLOB_TYPE,
                "ETag": f'"{digest}"',
                "Accept-Ranges": "bytes",
                API_VERSION_HEADER: API_VERSION,
                NOSNIFF_HEADER: NOSNIFF,
                "Cache-Control": "max-age=31536000",
            }
        )
    )


async def blob(
    request: web.Request, registry: str, repository: str, digest: Digest
) -> web.StreamResponse:
    resolver = request.app[RESOLVER]
    headers = _blob_headers(digest.text)
    if request.method == "HEAD":
        size = await resolver.blob_size(registry, repository, digest)
        request[EXCHANGE].cache = "hit" if resolver.holds(digest) else "miss"
        response = web.Response(headers=headers)
        if size is not None:
            response.headers["Content-Length"] = str(size)
        return response
    per_client = request.app[RESOLVER].clients
    if not per_client.start_transfer(request.remote):
        raise TooManyRequests(
            "too many blob transfers from this address at once",
            headers={"Retry-After": "1"},
        )
    try:
        return await _blob_body(request, registry, repository, digest, headers)
    finally:
        per_client.end_transfer(request.remote)


async def _blob_body(
    request: web.Request,
    registry: str,
    repository: str,
    digest: Digest,
    headers: Mapping[str, str],
) -> web.StreamResponse:
    resolver = request.app[RESOLVER]
    for _ in range(2):
        source = await resolver.blob(registry, repository, digest)
        if not isinstance(source, CachedBlob):
            break
        try:
            return await _send_cached(request, digest, source, headers)
        except FileNotFoundError:
            continue  # deleted since it was found (by hand, say): fetch it again
        except StorageError:
            continue  # object storage failed before the answer: from upstream, unstored
    if isinstance(source, CachedBlob):
        raise BlobUnknown(detail={"digest": str(digest)})
    try:
        request[EXCHANGE].cache = "hit" if source.landing else "miss"  # landing: verified here
        return await _stream_fill(request, source, headers)
    finally:
        source.detach()


def _ranged(
    request: web.Request, headers: Mapping[str, str], size: int
) -> tuple[web.StreamResponse, int, int]:
    """The response for the part of a blob the request asks for, with its (start, stop)."""
    response = web.StreamResponse(headers=headers)
    start, stop = 0, size
    byte_range = _parse_range(request.headers.get("Range"), size)
    if byte_range is not None:
        start, stop = byte_range
        response.set_status(206)
        response.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    response.content_length = stop - start
    return response, start, stop


async def _send_cached(
    request: web.Request, digest: Digest, blob: CachedBlob, headers: Mapping[str, str]
) -> web.StreamResponse:
    if blob.data is not None:  # a small blob, from memory: one write
        request[EXCHANGE].cache = "hit"
        return _from_memory(request, headers, blob.data)
    if blob.stream is not None:
        return await _send_stored(request, blob, headers)
    assert blob.open is not None, "a blob not in memory has landed"
    response, start, stop = _ranged(request, headers, blob.size)
    try:
        await send_blob(request, response, blob.open, start, stop)
    except SourceShrank as shrank:
        request[EXCHANGE].cache = "hit"
        await _quarantine(request, digest, blob, shrank.copy)
        return response
    request[EXCHANGE].cache = "hit"
    return response


async def _send_stored(
    request: web.Request, blob: CachedBlob, headers: Mapping[str, str]
) -> web.StreamResponse:
    """A blob in object storage: a redirect to it (a presigned URL), or its bytes streamed
    from the bucket, the range passed on."""
    request[EXCHANGE].cache = "hit"
    if blob.location is not None:
        redirect = web.Response(status=307, headers={**headers, "Location": blob.location})
        redirect.headers.pop("Content-Type", None)
        return redirect
    assert blob.stream is not None
    response, start, stop = _ranged(request, headers, blob.size)
    try:
        await send_stream(request, response, blob.stream(start, stop))
    except StorageError as exc:
        if not response.prepared:
            raise
        log.warning("blob_transfer_aborted", error=str(exc), sent=request[EXCHANGE].sent or 0)
    return response


def _from_memory(request: web.Request, headers: Mapping[str, str], data: bytes) -> web.Response:
    status, start, stop = 200, 0, len(data)
    byte_range = _parse_range(request.headers.get("Range"), len(data))
    if byte_range is not None:
        status, (start, stop) = 206, byte_range
        headers = {**headers, "Content-Range": f"bytes {start}-{stop - 1}/{len(data)}"}
    request[EXCHANGE].sent = stop - start
    return web.Response(body=data[start:stop], status=status, headers=headers)


async def _stream_fill(
    request: web.Request, fill: Fill, headers: Mapping[str, str]
) -> web.StreamResponse:
    """Stream a blob that is still arriving from upstream, from the bytes already on disk."""
    if fill.size is None:
        # No length from upstream: aiohttp answers chunked (or, to HTTP/1.0, until close).
        response, start, stop = web.StreamResponse(headers=headers), 0, None
    else:
        response, start, stop = _ranged(request, headers, fill.size)
    position = start
    with sending(request, response, fill.open_file, start) as body:
        await response.prepare(request)  # a StreamResponse sends its headers here
        send = body.write if stop is None else body.sendfile
        while stop is None or position < stop:
            if fill.state is FillState.FAILED:
                _abort(request, fill)
                return response
            end = fill.available() if stop is None else min(fill.available(), stop)
            if end <= position:
                if fill.state is FillState.DONE and stop is None:
                    break
                await fill.changed()
                body.transfer.moved()  # waiting for the upstream is no stall of the client's
                continue
            # The bytes already on disk go out as cached blobs do.
            try:
                position = await send(position, end)
            except ConnectionError:
                return response  # the client hung up; the fill goes on without it
            except SourceShrank:
                _abort(request, fill)
                return response
    await response.write_eof()
    return response


async def _quarantine(
    request: web.Request, digest: Digest, blob: CachedBlob, copy: os.stat_result | None
) -> None:
    """A cached blob shorter than when it was found: fail this transfer and take the file
    out of service, so the next pull fetches the blob again."""
    removed = copy is not None and await request.app[RESOLVER].quarantine(digest, copy)
    log.error(
        "blob_shrank_while_served",
        digest=str(digest),
        expected_size=blob.size,
        sent=request[EXCHANGE].sent or 0,
        removed=removed,
    )
    if request.transport is not None:
        request.transport.abort()


def _abort(request: web.Request, fill: Fill) -> None:
    """Cut the connection: the client must see a failed transfer, not a clean end."""
    log.warning(
        "blob_transfer_aborted",
        digest=str(fill.digest),
        error=str(fill.error),
        sent=request[EXCHANGE].sent or 0,
    )
    if request.transport is not None:
        request.transport.abort()


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """A single ``bytes=`` range as (start, stop); None means the whole blob."""
    if header is None:
        return None
    match = _RANGE_RE.fullmatch(header.strip())
    first, last = match.groups() if match is not None else ("", "")
    if not first and not last:
        # Several ranges, or none we understand: refused.
        raise RangeInvalid(headers={"Content-Range": f"bytes */{size}"})
    if not first:
        start, stop = max(size - int(last), 0), size
    else:
        start = int(first)
        stop = min(int(last) + 1, size) if last else size
    if start >= size or start >= stop:
        raise RangeInvalid(headers={"Content-Range": f"bytes */{size}"})
    return start, stop


async def referrers(
    request: web.Request, registry: str, repository: str, digest: Digest
) -> web.Response:
    """The OCI 1.1 referrers API: always an image index, empty when nothing refers."""
    answer, outcome = await request.app[REFERRERS].answer(registry, repository, digest)
    request[EXCHANGE].cache = outcome.value
    headers = {"Content-Type": OCI_INDEX, API_VERSION_HEADER: API_VERSION, NOSNIFF_HEADER: NOSNIFF}
    artifact_type = request.query.get("artifactType") if request.query_string else None
    if artifact_type is not None:
        headers[FILTERS_HEADER] = "artifactType"
    body = filtered(answer.body, artifact_type)
    request[EXCHANGE].sent = 0 if request.method == "HEAD" else len(body)
    return web.Response(body=body, headers=headers)


async def tags(request: web.Request, registry: str, repository: str) -> web.Response:
    query = {key: request.query[key] for key in _TAGS_QUERY if key in request.query}
    if "n" in query and _PAGE_SIZE_RE.fullmatch(query["n"]) is None:
        # Refused here: the upstream would refuse it too, and that answer is no outage.
        raise PaginationNumberInvalid(detail={"n": query["n"][:40]})
    page = await request.app[RESOLVER].tags(registry, repository, query)
    headers = {API_VERSION_HEADER: API_VERSION, NOSNIFF_HEADER: NOSNIFF}
    if page.link is not None and (link := _next_page_link(request, page.link)) is not None:
        headers["Link"] = link
    response = web.Response(body=page.body, headers=headers)
    response.content_type = page.content_type
    return response


def _next_page_link(request: web.Request, upstream_link: str) -> str | None:
    """The upstream's link to the next page, pointing at the mirror: the name as the client
    wrote it, the same ``ns``, and only the paging parameters of the upstream's link."""
    match = _LINK_RE.search(upstream_link)
    if match is None:
        return None
    upstream_query = yarl.URL(match["url"]).query
    query = {key: upstream_query[key] for key in _TAGS_QUERY if key in upstream_query}
    if "ns" in request.query:
        query["ns"] = request.query["ns"]
    path = yarl.URL.build(path=f"/v2/{request.match_info['path']}", query=query)
    return f'<{path}>; rel="next"'


__all__ = ["RegistryError", "add_routes"]
