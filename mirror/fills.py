"""In-flight blob fills: one upstream download written to disk, read by any number of clients.

A fill runs as its own task, so a client that disconnects does not stop it. Readers
stream from the partial file as it grows, through a file descriptor the fill shares
with them (``os.pread`` needs no seek, so one descriptor serves every reader). The last
byte of the blob is held back from every reader until the digest is verified: a client
that was sent bad bytes sees its transfer cut short, never a clean end.
"""

from __future__ import annotations

import asyncio
import enum
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import structlog

from mirror.errors import IntegrityError, RegistryError, UpstreamError
from mirror.reference import Digest
from mirror.store.blobs import BlobStore, Partial
from mirror.upstream.client import UpstreamClient

log = structlog.get_logger(__name__)

# Bytes handed to the writer thread at once: large enough to keep thread hops rare.
WRITE_BATCH = 1024 * 1024
READ_CHUNK = 1024 * 1024


class FillState(enum.Enum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass(eq=False)
class Fill:
    digest: Digest
    ready: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    size: int | None = None
    written: int = 0
    state: FillState = FillState.RUNNING
    error: BaseException | None = None
    _fd: int | None = None
    _readers: int = 0
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def available(self) -> int:
        """How many bytes a reader may send now: all of them only once verified."""
        if self.state is FillState.DONE:
            return self.written
        return max(self.written - 1, 0)

    async def changed(self) -> None:
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def attach(self) -> None:
        self._readers += 1

    def detach(self) -> None:
        self._readers -= 1
        self._close_if_unused()

    def pread(self, size: int, offset: int) -> bytes:
        if self._fd is None:
            raise RuntimeError("fill has no data yet")
        return os.pread(self._fd, size, offset)

    def _close_if_unused(self) -> None:
        if self._readers == 0 and self.state is not FillState.RUNNING and self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Fills:
    """Starts fills and lets concurrent requests for one digest join the running one."""

    def __init__(self, blobs: BlobStore, *, on_change: Callable[[int], None] | None = None) -> None:
        self._blobs = blobs
        self._active: dict[Digest, Fill] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Told how many fills are in flight whenever that changes (a metrics gauge).
        self._on_change = on_change or (lambda count: None)

    @property
    def in_flight(self) -> int:
        return len(self._active)

    def join(self, client: UpstreamClient, repository: str, digest: Digest) -> tuple[Fill, bool]:
        """The running fill for ``digest``, started if there is none; and whether it was joined.

        The caller is attached as a reader and must ``detach()`` when done.
        """
        fill = self._active.get(digest)
        joined = fill is not None
        if fill is None:
            fill = Fill(digest)
            self._active[digest] = fill
            task = asyncio.create_task(self._run(fill, client, repository))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            self._on_change(len(self._active))
        fill.attach()
        return fill, joined

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self, fill: Fill, client: UpstreamClient, repository: str) -> None:
        partial: Partial | None = None
        try:
            async with client.open_blob(repository, fill.digest) as response:
                partial = await asyncio.to_thread(self._blobs.new_partial, fill.digest)
                fill._fd = os.open(partial.path, os.O_RDONLY | os.O_CLOEXEC)
                fill.size = response.size
                fill.ready.set_result(None)
                await self._copy(fill, partial, response.content)
            await asyncio.to_thread(partial.commit)
            fill.state = FillState.DONE
            log.info("blob_stored", digest=str(fill.digest), size=fill.written)
        except BaseException as exc:
            fill.state, fill.error = FillState.FAILED, _as_registry_error(exc)
            if not fill.ready.done():
                fill.ready.set_exception(fill.error)
                fill.ready.exception()  # readers may all be gone; nobody must retrieve it
            if partial is not None:
                await asyncio.shield(asyncio.to_thread(partial.discard))
            log.warning(
                "blob_fill_failed",
                digest=str(fill.digest),
                error=str(fill.error),
                written=fill.written,
            )
            if not isinstance(exc, Exception):
                raise
        finally:
            self._active.pop(fill.digest, None)
            fill._notify()
            fill._close_if_unused()
            self._on_change(len(self._active))

    async def _copy(self, fill: Fill, partial: Partial, content: aiohttp.StreamReader) -> None:
        hasher = fill.digest.hasher()

        def write(batch: bytes) -> None:
            hasher.update(batch)
            partial.write(batch)

        while True:
            batch = await content.read(WRITE_BATCH)
            if not batch:
                break
            while len(batch) < WRITE_BATCH and (more := content.read_nowait(WRITE_BATCH)):
                batch += more
            await asyncio.to_thread(write, batch)
            fill.written += len(batch)
            fill._notify()
        if fill.size is not None and fill.written != fill.size:
            raise IntegrityError(
                "the upstream blob transfer ended early",
                detail={"expected_size": fill.size, "received": fill.written},
            )
        if hasher.hexdigest() != fill.digest.hex:
            raise IntegrityError(detail={"digest": str(fill.digest)})
        fill.size = fill.written


def _as_registry_error(exc: BaseException) -> RegistryError:
    if isinstance(exc, RegistryError):
        return exc
    if isinstance(exc, asyncio.CancelledError):
        return UpstreamError("the blob fill was cancelled")
    if isinstance(exc, OSError):
        return UpstreamError("the blob could not be written to disk", detail={"error": str(exc)})
    return UpstreamError(detail={"error": type(exc).__name__})
