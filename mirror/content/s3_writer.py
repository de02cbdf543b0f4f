"""A blob being written to object storage: spooled to the data dir for its readers, and
uploaded part by part as the spool grows, on the event loop (the download never waits for
the bucket). The upload is completed only at commit, which the writer calls after it checked
the digest; anything else aborts it, a commit cut short too (a stop): no upload is left
behind for gc, and no object appears that was not completed whole."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from mirror.content.blobs import Partial
from mirror.content.s3_client import CALL_TIMEOUT, describe
from mirror.content.storage import StorageError
from mirror.domain.reference import Digest

if TYPE_CHECKING:
    from mirror.content.s3 import S3Blobs

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Bytes per part of a multipart upload (S3's minimum is 5 MiB, all but the last part).
PART_SIZE = 8 * 1024 * 1024
# Parts of one blob uploading at once; each holds its bytes in memory while it does.
UPLOADS_AT_ONCE = 4
# How long aborting an upload may take; when a stop cut its commit short, less (the stop
# waits for it, and gc aborts what is left after an hour).
ABORT_TIMEOUT = 30.0
ABANDON_TIMEOUT = 5.0


@dataclass(eq=False)
class S3Writer:
    """A blob being written: spooled locally for its readers, uploaded part by part."""

    blobs: S3Blobs
    digest: Digest
    partial: Partial
    written: int = 0
    _uploaded_to: int = 0  # bytes handed to part uploads
    _created: Future[str] | None = None  # the multipart upload's id, once it exists
    _parts: list[Future[dict[str, Any]]] = field(default_factory=list)
    _failed: BaseException | None = None
    _slots: asyncio.Semaphore | None = None

    @property
    def fd(self) -> int:
        return self.partial.fd

    @property
    def name(self) -> str:
        return self.partial.name

    def open_reader(self) -> int:
        return self.partial.open_reader()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.partial.write(data)
        self.written = self.partial.written
        while self._failed is None and self.written - self._uploaded_to >= PART_SIZE:
            self._start_part(self._uploaded_to, PART_SIZE)

    def _start_part(self, start: int, length: int) -> None:
        """Upload bytes ``start``..``start + length`` of the spool as the next part, on the
        loop: the download never waits for the bucket."""
        if self._created is None:
            self._created = self.blobs._submit(self._create())
        number = len(self._parts) + 1
        part = self.blobs._submit(self._part(number, start, length))
        part.add_done_callback(self._part_done)
        self._parts.append(part)
        self._uploaded_to = start + length

    async def _create(self) -> str:
        created = await self.blobs._client.create_multipart_upload(
            Bucket=self.blobs.bucket, Key=self.blobs.key(self.digest)
        )
        return str(created["UploadId"])

    async def _part(self, number: int, start: int, length: int) -> dict[str, Any]:
        assert self._created is not None
        upload_id = await asyncio.wrap_future(self._created)
        if self._slots is None:
            self._slots = asyncio.Semaphore(UPLOADS_AT_ONCE)
        async with self._slots:
            data = await asyncio.to_thread(os.pread, self.partial.fd, length, start)
            answer = await self.blobs._client.upload_part(
                Bucket=self.blobs.bucket,
                Key=self.blobs.key(self.digest),
                UploadId=upload_id,
                PartNumber=number,
                Body=data,
            )
        return {"PartNumber": number, "ETag": answer["ETag"]}

    def _part_done(self, part: Future[dict[str, Any]]) -> None:
        if not part.cancelled() and part.exception() is not None:
            self._fail(part.exception())  # type: ignore[arg-type]

    def _fail(self, exc: BaseException) -> None:
        if self._failed is None:
            self._failed = exc
            if not isinstance(exc, StorageError):
                self.blobs._failed(exc)
            log.warning(
                "blob_not_stored", digest=str(self.digest), error=describe(exc), bucket=True
            )

    def commit(self) -> bool:
        """:meth:`complete`, from a thread (never the loop's own)."""
        return self.blobs._wait(self.complete(), timeout=None)

    async def complete(self) -> bool:
        """Complete the upload (the writer checked the digest), on the loop: whether the blob
        is in the bucket now. When the bucket failed, its readers still finish from the
        spool, and nothing is stored. Cancelled, it aborts the upload before it ends."""
        try:
            if self._failed is None:
                await self._finish_upload()
        except asyncio.CancelledError:
            await asyncio.shield(self._abandon())
            raise
        except Exception as exc:
            self._fail(exc)
        stored = self._failed is None
        try:
            if stored:
                self.blobs._known[self.digest] = self.written
                await asyncio.to_thread(self._keep_hot)
            else:
                await self._abort_upload()
        finally:  # readers hold descriptors of their own on the spool
            await asyncio.to_thread(self.partial.discard)
        return stored

    def _keep_hot(self) -> None:
        """The spool is a verified copy: the hot tier keeps it, when it has room for it."""
        hot = self.blobs.hot
        if hot is not None and hot.fits(self.written):
            try:
                hot.take(self.partial, self.digest)
            except OSError as exc:
                log.info("hot_copy_not_kept", digest=str(self.digest), error=str(exc))

    async def _finish_upload(self) -> None:
        key = self.blobs.key(self.digest)
        client = self.blobs._client
        if self._created is None and self.written <= PART_SIZE:  # one PUT
            data = await asyncio.to_thread(os.pread, self.partial.fd, self.written, 0)
            await self._call(client.put_object(Bucket=self.blobs.bucket, Key=key, Body=data))
            return
        # Parts not started yet: a writer that wrote the spool's descriptor itself (import).
        while self.written - self._uploaded_to > PART_SIZE:
            self._start_part(self._uploaded_to, PART_SIZE)
        if self.written > self._uploaded_to:
            self._start_part(self._uploaded_to, self.written - self._uploaded_to)
        assert self._created is not None  # more than a part: started above if not before
        upload_id = await _within(self._created, CALL_TIMEOUT)
        parts = [await _within(part, CALL_TIMEOUT) for part in self._parts]
        if self._failed is not None:
            raise self._failed
        await self._call(
            client.complete_multipart_upload(
                Bucket=self.blobs.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        )

    async def _call(self, work: Coroutine[Any, Any, Any], seconds: float = CALL_TIMEOUT) -> None:
        """A call to the bucket, on the loop, as ``S3Blobs._wait`` makes one from a thread."""
        try:
            await asyncio.wait_for(work, seconds)
        except TimeoutError:
            late = TimeoutError("object storage did not answer in time")
            raise self.blobs._failed(late) from None

    async def _abort_upload(self, seconds: float = ABORT_TIMEOUT, *, cut: bool = False) -> None:
        """Abort the multipart upload, if one was created, once its parts ended (or, ``cut``
        short, cancelling those still running); its failure is left to gc."""
        created, self._created = self._created, None
        if created is None:
            return
        for part in self._parts:
            if cut:
                part.cancel()
            elif not part.done():
                with contextlib.suppress(Exception):
                    await _within(part, CALL_TIMEOUT)
        with contextlib.suppress(Exception):
            upload_id = await _within(created, seconds)
            await self._call(
                self.blobs._client.abort_multipart_upload(
                    Bucket=self.blobs.bucket, Key=self.blobs.key(self.digest), UploadId=upload_id
                ),
                seconds,
            )

    async def _abandon(self) -> None:
        """A commit cut short (a stop): nothing of the blob stays, and soon."""
        try:
            await self._abort_upload(ABANDON_TIMEOUT, cut=True)
        finally:
            await asyncio.to_thread(self.partial.discard)

    def discard(self) -> None:
        """The blob failed (or its digest did not match): nothing of it stays anywhere."""
        try:
            self.blobs._wait(self._abort_upload(), timeout=None)
        finally:
            self.partial.discard()


async def _within(future: Future[T], seconds: float) -> T:
    """The result of work submitted to the loop, awaited on the loop."""
    return await asyncio.wait_for(asyncio.wrap_future(future), seconds)
