"""Blob fills: one upstream download written to disk, read by any number of clients.

A fill runs as its own task, so a client that disconnects does not stop it. Readers
stream from the partial file as it grows, through a file descriptor the fill shares
with them (``os.pread`` needs no seek, so one descriptor serves every reader). The last
byte of the blob is held back from every reader until the digest is verified: a client
that was sent bad bytes sees its transfer cut short, never a clean end.

Across processes (workers on one host, replicas sharing a data dir volume) a lease per
digest elects one filler. It publishes the name of its partial file and the blob size;
the other processes follow it: they open that file and stream it as it grows, and know
it is whole when the blob appears at its final path, which only happens after
verification. If the filler dies before a follower has sent anything, the follower
hands over (``FillHandover``) and the caller starts again, taking the lease itself.

A replica that shares no disk with the filler (object storage) cannot read its partial
file: it answers its readers as soon as the filler published the size, and streams the
object from the bucket through a spool file of its own once it landed (``_relay``).

In object storage a verified blob still has to land: its upload is completed, which takes
as long as the bucket needs for the parts it has not taken yet. Its readers do not wait for
that: once the digest matched they get the last byte, and until the object is complete the
fill stays, *landing*, and answers this process's new readers (and HEADs) from its spool.
Its lease is held until then, so other replicas keep following it rather than fetch the
blob; if the upload fails the blob is simply not stored, as when the bucket fails mid-fill.
"""

from __future__ import annotations

import asyncio
import enum
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import aiohttp
import structlog

from mirror.content.layer import Content
from mirror.content.storage import BlobWriter, StorageError
from mirror.domain.errors import IntegrityError, RegistryError, UpstreamError
from mirror.domain.reference import Digest
from mirror.logs import LogThrottle
from mirror.services.coordination import Coordinator, Lease
from mirror.upstream.protocol import Upstream

log = structlog.get_logger(__name__)

# Bytes handed to the writer thread at once: large enough to keep thread hops rare.
WRITE_BATCH = 1024 * 1024
# How often a follower looks at another process's partial file.
FOLLOW_POLL = 0.02
# How often a follower asks object storage whether another replica's fill landed there.
REMOTE_POLL = 0.2
# How long closing waits for fills whose bytes are verified to land and be recorded.
LANDING_WAIT = 5.0


def blob_lease(digest: Digest) -> str:
    """The lease whoever writes a blob holds: a fill, or an import."""
    return f"blob:{digest}"


async def writer_lease(
    coordinator: Coordinator, content: Content, digest: Digest
) -> Lease | None:
    """The blob's writer lease, for a writer other than a fill (``import``): taken once
    whoever holds it is done; None when the blob is on disk by then. While it is held, a
    fill of the blob follows the writer, as it follows another process's fill, if the
    writer publishes its partial file and the size."""
    while content.present(digest) is None:
        lease = await coordinator.acquire(blob_lease(digest))
        if lease is not None:
            if content.present(digest) is None:
                return lease
            await lease.release()
            break
        await asyncio.sleep(FOLLOW_POLL)
    return None


class FillState(enum.Enum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class FillHandover(UpstreamError):
    """The process we followed went away before sending anything: start over."""


class FillLandedElsewhere(FillHandover):
    """Another replica's fill landed in object storage: start over, and read it there."""


@dataclass(eq=False)
class Fill:
    digest: Digest
    ready: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    size: int | None = None
    written: int = 0
    state: FillState = FillState.RUNNING
    error: RegistryError | None = None
    verified: bool = False  # every byte is in and matches the digest: only landing is left
    # Verified and sent whole, while its storage completes it (object storage): the spool
    # answers new readers of this process until it has landed (or failed to).
    landing: bool = False
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

    def attach(self) -> None:
        self._readers += 1

    def detach(self) -> None:
        self._readers -= 1
        self._close_if_unused()

    def open_file(self) -> BinaryIO:
        """A file object of the reader's own on the fill's data, for ``loop.sendfile``."""
        if self._fd is None:
            raise RuntimeError("fill has no data yet")
        return os.fdopen(os.dup(self._fd), "rb", buffering=0)

    def _progress(self, written: int) -> None:
        self.written = written
        self._notify()

    def _started(self, fd: int, size: int | None) -> None:
        self._fd, self.size = fd, size
        self.ready.set_result(None)

    def _finish(self, error: RegistryError | None = None) -> None:
        if self.state is not FillState.RUNNING:
            return  # ended already (a follower's own fill, taken over, ended it)
        if error is None:
            self.state = FillState.DONE
        else:
            self.state, self.error = FillState.FAILED, error
            if not self.ready.done():
                self.ready.set_exception(error)
                self.ready.exception()  # readers may all be gone; nobody must retrieve it
        self._notify()
        self._close_if_unused()

    def _land(self) -> None:
        """Verified: every reader may have the last byte now, while the blob lands."""
        self.landing = True
        self._finish()

    def _landed(self) -> None:
        """Landed, or failed to: new readers go to the storage (or upstream) now."""
        if self.landing:
            self.landing = False
            self._notify()
            self._close_if_unused()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _close_if_unused(self) -> None:
        if (
            self._readers == 0
            and self.state is not FillState.RUNNING
            and not self.landing
            and self._fd is not None
        ):
            os.close(self._fd)
            self._fd = None


class Fills:
    """Starts fills, or follows the one already running here or in another process."""

    def __init__(
        self,
        content: Content,
        coordinator: Coordinator,
        *,
        stall_timeout: float = 60.0,
        on_change: Callable[[int], None] | None = None,
        on_stored: Callable[[Digest, int], Awaitable[None]] | None = None,
        keep: Callable[[int], bool] = lambda size: True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._content = content
        self._coordinator = coordinator
        self._stall_timeout = stall_timeout
        self._clock = clock  # measures stalls of another process's fill
        self._active: dict[Digest, Fill] = {}
        self._tasks: dict[asyncio.Task[None], Fill] = {}
        # One line per kind of failure a minute: a client asking for missing blobs or an
        # upstream outage must not flood the log.
        self._log_throttle = LogThrottle()
        # Told how many fills are in flight whenever that changes (a metrics gauge).
        self._on_change = on_change or (lambda count: None)
        # Told of each blob that lands and stays (the evictor), after its readers are.
        self._on_stored = on_stored
        # Whether a blob of this size may stay on disk (no larger than the disk budget).
        self._keep = keep

    @property
    def in_flight(self) -> int:
        """Blobs being downloaded, followed or landed now."""
        return len(self._active)

    def landing(self, digest: Digest) -> Fill | None:
        """The fill of a blob verified here that its storage is still completing (object
        storage): its spool answers this process's readers until the blob has landed."""
        fill = self._active.get(digest)
        return fill if fill is not None and fill.landing else None

    def landings(self) -> int:
        """Blobs verified here that their storage is still completing (a stop waits)."""
        return sum(fill.landing for fill in self._active.values())

    async def open(self, client: Upstream, repository: str, digest: Digest) -> Fill | None:
        """The fill to read ``digest`` from, attached; None when the blob is on disk now.

        The caller must ``detach()`` the fill when done with it. Nothing here waits while
        the fill is registered, so concurrent openers of one digest always meet, and the
        lease (perhaps a Redis call) is taken by the fill's own task, holding up nobody.
        """
        fill = self._active.get(digest)
        if fill is None:
            if self._content.present(digest) is not None:
                return None
            fill = Fill(digest)
            self._active[digest] = fill
            self._on_change(len(self._active))
            self._spawn(fill, self._start(fill, client, repository))
        fill.attach()
        return fill

    async def _start(self, fill: Fill, client: Upstream, repository: str) -> None:
        """Fill the blob under its lease, or follow whoever holds the lease."""
        key = blob_lease(fill.digest)
        try:
            lease = await self._coordinator.acquire(key)
        except BaseException as exc:
            self._done(fill)
            fill._finish(_as_registry_error(exc))
            raise
        if lease is not None and await self._content.find(fill.digest) is not None:
            await lease.release()  # finished elsewhere while we asked: read the blob
            lease = None
        if lease is not None:
            await self._fill(fill, client, repository, lease)
        else:
            await self._follow(fill, key, TakeOver(self, fill, client, repository))

    async def close(self) -> None:
        """Stop the fills still downloading. One whose bytes are verified is let land and be
        recorded in the content graph (up to LANDING_WAIT): stopping right after a pull
        must not lose, nor report as failed, a blob that was fetched whole. A landing in
        object storage cut short then aborts its upload: nothing of it stays."""
        for task, fill in list(self._tasks.items()):
            if not fill.verified:
                task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=LANDING_WAIT)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, fill: Fill, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks[task] = fill
        task.add_done_callback(lambda done: self._tasks.pop(done, None))

    def _done(self, fill: Fill) -> None:
        if self._active.get(fill.digest) is fill:  # not a later fill of the same blob
            del self._active[fill.digest]
        self._on_change(len(self._active))

    async def _fill(
        self,
        fill: Fill,
        client: Upstream,
        repository: str,
        lease: Lease,
        spool: BlobWriter | None = None,
    ) -> None:
        try:
            if await self._download(fill, client, repository, lease, spool):
                await self._landed(fill)
        finally:
            await asyncio.shield(lease.release())

    def _committed(self, fill: Fill) -> None:
        """The blob is in place, verified (or, landing, failed to land): whatever happens
        now, it did not fail."""
        self._done(fill)
        fill._finish()
        fill._landed()

    async def _landed(self, fill: Fill) -> None:
        log.info("blob_stored", digest=str(fill.digest), size=fill.written)
        if self._on_stored is not None:
            await self._on_stored(fill.digest, fill.written)

    async def _download(
        self,
        fill: Fill,
        client: Upstream,
        repository: str,
        lease: Lease,
        spool: BlobWriter | None = None,
    ) -> bool:
        """Fetch, verify and commit the blob (written to ``spool`` when a relay's readers
        already read that): whether it landed (and was stored). A failure is reported here,
        and ends the fill."""
        partial: BlobWriter | None = None
        try:
            async with client.open_blob(repository, fill.digest) as response:
                partial = await asyncio.to_thread(self._content.new_partial, fill.digest, spool)
                if not fill.ready.done():
                    fill._started(partial.open_reader(), response.size)
                await lease.publish({"partial": partial.name, "size": response.size})
                await _copy(fill, partial, _batches(response.content))
            fill.verified = True
            if not self._keep(fill.written):
                # Larger than the whole budget: its readers finish from the spool file, and
                # it never lands, so nothing stays behind.
                self._committed(fill)
                await asyncio.to_thread(partial.discard)
                log.info("blob_not_kept", digest=str(fill.digest), size=fill.written)
                return False
            if not self._content.local:
                # Its readers need not wait for the bucket to take the last parts; the lease,
                # held until it has, keeps the other replicas from fetching it meanwhile.
                fill._land()
            # False: object storage refused it, and its readers had it from the spool.
            return await self._content.land(
                partial, fill.digest, committed=lambda: self._committed(fill)
            )
        except BaseException as exc:
            if fill.state is FillState.DONE:  # landed, or landing: its readers had it all
                self._committed(fill)
                raise
            error = _as_registry_error(exc)
            if partial is not None:
                # Gone before any reader learns of the failure: nothing partial stays behind.
                await asyncio.shield(asyncio.to_thread(partial.discard))
            self._done(fill)
            fill._finish(error)
            suppressed = self._log_throttle.admit((type(error), error.message))
            if suppressed is not None:
                log.warning(
                    "blob_fill_failed",
                    digest=str(fill.digest),
                    error=str(error),
                    written=fill.written,
                    suppressed=suppressed,
                )
            if not isinstance(exc, Exception):
                raise
            return False

    async def _follow(self, fill: Fill, key: str, take_over: TakeOver) -> None:
        """Stream another process's fill from its partial file, by polling its size. A
        replica that shares no disk with it relays the object once it lands in object
        storage, or, not knowing the size, waits for it to land."""
        progress_at = self._clock()
        try:
            while True:
                holder = await self._open_source(fill, key)
                if fill._fd is None and not self._content.local:
                    if await self._content.find(fill.digest) is not None:
                        raise FillLandedElsewhere("the blob landed in object storage")
                    if holder is not None and holder.get("size") is not None:
                        await self._relay(fill, key, int(holder["size"]), take_over)
                        return
                    if holder is not None:
                        progress_at = self._clock()  # its holder keeps its lease alive
                if fill._fd is not None:
                    written = os.fstat(fill._fd).st_size
                    if written > fill.written:
                        fill._progress(written)
                        progress_at = self._clock()
                    if written == (fill.size or written) and await self._landed_yet(fill):
                        fill.size = written
                        break
                if holder is None and await self._content.find(fill.digest) is None:
                    raise FillHandover("the process filling this blob went away")
                if self._clock() - progress_at > self._stall_timeout:
                    raise UpstreamError("the process filling this blob stalled")
                await asyncio.sleep(
                    FOLLOW_POLL if fill._fd is not None or self._content.local else REMOTE_POLL
                )
            self._done(fill)
            fill._finish()
        except BaseException as exc:
            self._done(fill)
            fill._finish(_as_registry_error(exc))
            if not isinstance(exc, Exception):
                raise

    async def _relay(self, fill: Fill, key: str, size: int, take_over: TakeOver) -> None:
        """Follow a fill in another replica that shares no disk with this one: answer the
        readers at once (the size is known, so their headers go out now, within any
        client's deadline for them), then copy the object into a spool file of our own as
        it is read from the bucket, once it landed there. When the holder goes away first,
        this replica fetches the blob itself, into that spool (its readers never notice).
        Either way the fill is ended here."""
        spool = await asyncio.to_thread(self._content.new_spool, fill.digest)
        try:
            fill._started(spool.open_reader(), size)
            lease = await self._landing(fill, key)
            if lease is not None:
                await take_over(lease, spool)
                return
            try:
                await _copy(fill, spool, self._content.chunks(fill.digest, 0, size))
            except (StorageError, FileNotFoundError) as exc:  # the bucket failed, or it went
                raise UpstreamError(
                    "the blob could not be read from object storage", detail={"error": str(exc)}
                ) from None
            log.info("blob_relayed_from_storage", digest=str(fill.digest), size=size)
            self._done(fill)
            fill._finish()
        finally:
            await asyncio.shield(asyncio.to_thread(spool.discard))

    async def _landing(self, fill: Fill, key: str) -> Lease | None:
        """Wait for another replica's fill to land in object storage; the lease when its
        holder let go first (failed, or died) and this replica is to fetch the blob."""
        while await self._content.find(fill.digest) is None:
            if await self._coordinator.holder(key) is None:
                lease = await self._coordinator.acquire(key)
                if await self._content.find(fill.digest) is None and lease is not None:
                    return lease
                if lease is not None:
                    await lease.release()  # landed as its holder let go
                    return None
                # Another replica took it over: follow that one.
            await asyncio.sleep(REMOTE_POLL)
        return None

    async def _open_source(self, fill: Fill, key: str) -> Mapping[str, Any] | None:
        """Open the landed blob, or else the holder's partial file, when there is none yet;
        the lease's holder (None: nobody holds it)."""
        if fill._fd is None:
            landed = self._content.open_landed(fill.digest)
            if landed is not None:
                fill._started(landed, os.fstat(landed).st_size)
        holder = await self._coordinator.holder(key)
        if fill._fd is None and holder and holder.get("partial"):
            fd = self._content.open_partial(fill.digest, str(holder["partial"]))
            if fd is not None:
                fill._started(fd, holder.get("size"))
        return holder

    async def _landed_yet(self, fill: Fill) -> bool:
        return await self._content.find(fill.digest) is not None


@dataclass(frozen=True)
class TakeOver:
    """A follower's way to fetch the blob itself, into the spool its readers read, when the
    fill it followed went away: a fill of its own under the lease it took."""

    fills: Fills
    fill: Fill
    client: Upstream
    repository: str

    async def __call__(self, lease: Lease, spool: BlobWriter) -> None:
        await self.fills._fill(self.fill, self.client, self.repository, lease, spool)


async def _batches(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """The upstream body in batches of up to WRITE_BATCH, as they arrive."""
    while True:
        batch = await content.read(WRITE_BATCH)
        if not batch:
            return
        while len(batch) < WRITE_BATCH and (more := content.read_nowait(WRITE_BATCH)):
            batch += more
        yield batch


async def _copy(fill: Fill, partial: BlobWriter, batches: AsyncIterator[bytes]) -> None:
    """Write a blob's bytes where its readers read them, hashed on the way; IntegrityError
    unless they are the whole blob."""
    hasher = fill.digest.hasher()

    def write(batch: bytes) -> None:
        hasher.update(batch)
        partial.write(batch)

    written = 0
    async for batch in batches:
        await asyncio.to_thread(write, batch)
        written += len(batch)
        fill._progress(written)
    if fill.size is not None and written != fill.size:
        raise IntegrityError(
            "the blob transfer ended early",
            detail={"expected_size": fill.size, "received": written},
        )
    if hasher.hexdigest() != fill.digest.hex:
        raise IntegrityError(detail={"digest": str(fill.digest)})
    fill.size = written


def _as_registry_error(exc: BaseException) -> RegistryError:
    if isinstance(exc, RegistryError):
        return exc
    if isinstance(exc, asyncio.CancelledError):
        return UpstreamError("the blob fill was cancelled")
    if isinstance(exc, OSError):
        return UpstreamError("the blob could not be written to disk", detail={"error": str(exc)})
    return UpstreamError(detail={"error": type(exc).__name__})
