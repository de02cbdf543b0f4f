"""Loopback proxies in front of an S3 server, forwarding every request untouched (the Host
header too, which the signature covers): :class:`S3Proxy`, and the one that holds back the
completion of multipart uploads, what a bucket slower than the upstream looks like to a
fill at the moment its last parts are still going in."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp
from aiohttp import web

# A held completion is let through after this long in any case: a mirror that waits for it
# (the behaviour under test broken) makes its test fail, not hang.
HOLD_LIMIT = 30.0
INTERNAL_ERROR = (
    b"<Error><Code>InternalError</Code><Message>We encountered an internal error."
    b"</Message></Error>"
)


@dataclass(frozen=True, slots=True)
class Seen:
    method: str
    path: str
    query: str


class S3Proxy:
    """Forwards each request to ``target``; subclasses answer some themselves."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        self._session = aiohttp.ClientSession(auto_decompress=False)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        return await self._forward(request, await request.read())

    async def _forward(self, request: web.Request, body: bytes) -> web.Response:
        assert self._session is not None
        async with self._session.request(
            request.method,
            self.target + request.path_qs,
            headers={k: v for k, v in request.headers.items() if k.lower() != "transfer-encoding"},
            data=body,
            allow_redirects=False,
        ) as answer:
            data = await answer.read()
            # A HEAD's length is the object's: kept, where a body's is aiohttp's to set.
            dropped: tuple[str, ...] = ("transfer-encoding", "content-encoding")
            if request.method != "HEAD":
                dropped += ("content-length",)
            headers = {k: v for k, v in answer.headers.items() if k.lower() not in dropped}
            return web.Response(status=answer.status, body=data, headers=headers)


class CompletionHoldingProxy(S3Proxy):
    """``holding`` set, each CompleteMultipartUpload waits until :meth:`release` (``held``
    counts those waiting, ``completed`` those the bucket or the proxy answered); released
    with ``fail``, they are answered 500 InternalError, as a bucket that went down answers,
    and the retries too. Every request is logged (``seen``)."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.holding = False
        self.held = 0
        self.completed = 0
        self.failing = False
        self.seen: list[Seen] = []
        self._released = asyncio.Event()

    async def close(self) -> None:
        self.release()
        await super().close()

    def release(self, *, fail: bool = False) -> None:
        self.failing = fail
        self.holding = False
        self._released.set()

    def reads(self, key: str) -> list[Seen]:
        """The GETs and HEADs seen of the object ``key``."""
        return [
            seen
            for seen in self.seen
            if seen.path.endswith(f"/{key}") and seen.method in ("GET", "HEAD")
        ]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(Seen(request.method, request.path, request.query_string))
        body = await request.read()
        completing = request.method == "POST" and "uploadId" in request.query
        if completing and self.holding:
            self.held += 1
            try:
                await asyncio.wait_for(self._released.wait(), HOLD_LIMIT)
            except TimeoutError:
                pass
            finally:
                self.held -= 1
        if completing and self.failing:
            self.completed += 1
            return web.Response(status=500, body=INTERNAL_ERROR, content_type="application/xml")
        answer = await self._forward(request, body)
        self.completed += completing
        return answer
