"""Blobs in an S3-compatible bucket: ``<prefix>blobs/<algorithm>/<hex>``.

A blob being written is spooled to the data dir (its readers stream from there, as from a
local fill, so the first byte goes out as soon as with a local disk) while its parts go to a
multipart upload as they fill up. The upload is completed only at commit, which the writer
calls after it checked the digest; anything else aborts it. So an object under a blob's key
is always whole and verified, and a multipart upload left by a crash is never visible
(``gc`` aborts those older than an hour).

The calls of :class:`~mirror.content.storage.BlobStorage` block, and the content layer makes
them from threads; here they run as coroutines of the one aiobotocore client on the event
loop, and the thread waits for them. ``size`` (the hot path) never waits on the network: it
answers from what this process knows to be in the bucket (listed at start, landed, found);
:meth:`S3Blobs.locate` asks the bucket.
"""

from __future__ import annotations

import asyncio
import io
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import Future
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import aiohttp
import structlog
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from mirror.content.blobs import BlobStore, MemoryCopy, Partial
from mirror.content.hot import HotTier
from mirror.content.s3_client import CALL_TIMEOUT, client_options, count_requests, describe, missing
from mirror.content.s3_writer import S3Writer
from mirror.content.storage import BlobWriter, Copy, StorageError
from mirror.domain.reference import Digest
from mirror.metrics import Metrics
from mirror.storage_settings import S3Settings

log = structlog.get_logger(__name__)

T = TypeVar("T")

# A multipart upload older than this was left by a crashed writer: gc aborts it.
ABANDONED = 3600.0
# Bytes per read when an object is streamed.
READ_CHUNK = 1024 * 1024
# After a failure the bucket is left alone (blobs go from upstream to clients, unstored)
# and a probe asks it this often, this patiently, until it answers: an outage costs one
# request its timeouts, not every request.
PROBE_INTERVAL = 2.0
PROBE_TIMEOUT = 5.0


@asynccontextmanager
async def open_s3(
    settings: S3Settings,
    spool: Path,
    *,
    connect_timeout: float,
    read_timeout: float,
    metrics: Metrics | None = None,
    hot: Path | None = None,
) -> AsyncIterator[S3Blobs]:
    """The bucket, checked (and created when missing, if the credentials may); StorageError,
    saying which, when the credentials are refused or the bucket is missing for good."""
    session = get_session()
    options = client_options(
        settings, connect_timeout=connect_timeout, read_timeout=read_timeout
    )
    async with AsyncExitStack() as stack:
        endpoint = settings.endpoint or os.environ.get("AWS_ENDPOINT_URL") or None
        client = await stack.enter_async_context(
            session.create_client("s3", endpoint_url=endpoint, **options)
        )
        if metrics is not None:
            count_requests(client, metrics)
        signer = client
        if settings.public_endpoint is not None:  # presigning only: never connects
            signer = await stack.enter_async_context(
                session.create_client("s3", endpoint_url=settings.public_endpoint, **options)
            )
        blobs = S3Blobs(settings, client, signer, spool, asyncio.get_running_loop())
        if hot is not None and settings.local_cache_size > 0:
            blobs.hot = await asyncio.to_thread(HotTier, hot, settings.local_cache_size)
        stack.push_async_callback(blobs.close)
        await blobs.check_bucket(endpoint or "AWS S3")
        yield blobs


@dataclass(frozen=True, slots=True)
class _Object:
    key: str
    size: int
    etag: str
    modified: float


class S3Blobs:
    """:class:`~mirror.content.storage.BlobStorage` on a bucket."""

    local = False

    def __init__(
        self,
        settings: S3Settings,
        client: Any,
        signer: Any,
        spool: Path,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self.prefix = f"{settings.prefix}blobs/"
        self._client = client
        self._signer = signer
        self._loop = loop
        spool.mkdir(parents=True, exist_ok=True)
        self.spool = BlobStore(spool)  # partial files, locked by their writers, swept
        self._known: dict[Digest, int] = {}  # in the bucket, as far as this process knows
        self._down_since: float | None = None  # monotonic; None: in use
        self._probe: asyncio.Task[None] | None = None
        self.hot: HotTier | None = None  # local_cache_size: copies sent with sendfile
        self._warming: dict[Digest, asyncio.Task[None]] = {}

    @property
    def degraded(self) -> bool:
        return self._down_since is not None

    def _failed(self, exc: BaseException) -> StorageError:
        """A failure to raise; one that is no answer about an object (the bucket down,
        hanging, 5xx after the retries) takes the bucket out of use until a probe finds it
        back. Called on the loop or from a thread."""
        status = 0
        if isinstance(exc, ClientError):
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if not 400 <= status < 500 and self._down_since is None:
            self._down_since = time.monotonic()
            log.warning(
                "object_storage_unavailable", error=describe(exc), retry_interval=PROBE_INTERVAL
            )
            self._loop.call_soon_threadsafe(self._start_probe)
        return StorageError(f"object storage: {describe(exc)}")

    def _start_probe(self) -> None:
        if self._probe is None or self._probe.done():
            self._probe = self._loop.create_task(self._probe_until_back())

    async def _probe_until_back(self) -> None:
        while True:  # a remote service: nothing to wait on but time
            if await self._answers():
                break
            await asyncio.sleep(PROBE_INTERVAL)
        if self._down_since is not None:
            down_for = round(time.monotonic() - self._down_since, 1)
            log.info("object_storage_available", down_for=down_for)
        self._down_since = None

    async def _answers(self) -> bool:
        try:
            await asyncio.wait_for(self._client.head_bucket(Bucket=self.bucket), PROBE_TIMEOUT)
        except (TimeoutError, BotoCoreError, ClientError, OSError):
            return False
        return True

    async def close(self) -> None:
        tasks = [*self._warming.values(), *([self._probe] if self._probe else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def identity(self) -> str:
        """What the records and leases of every replica on this bucket are scoped by."""
        endpoint = self.settings.endpoint or os.environ.get("AWS_ENDPOINT_URL") or "aws"
        return f"s3:{endpoint}/{self.bucket}/{self.settings.prefix}"

    def key(self, digest: Digest) -> str:
        return f"{self.prefix}{digest.algorithm}/{digest.hex}"

    def _digest(self, key: str) -> Digest | None:
        algorithm, _, hex_ = key.removeprefix(self.prefix).partition("/")
        try:
            return Digest.parse(f"{algorithm}:{hex_}")
        except ValueError:
            return None  # not ours

    # -- start -------------------------------------------------------------------------

    async def check_bucket(self, where: str) -> None:
        try:
            await self._client.head_bucket(Bucket=self.bucket)
            return
        except NoCredentialsError:
            raise StorageError(
                "object storage: no credentials (set s3.access_key_id_file and "
                "s3.secret_access_key_file, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
            ) from None
        except ClientError as exc:
            if not missing(exc):
                raise StorageError(
                    f"object storage at {where} refused the credentials for bucket "
                    f"{self.bucket!r}: {describe(exc)}"
                ) from None
        except (BotoCoreError, OSError) as exc:
            raise StorageError(f"object storage at {where} unreachable: {describe(exc)}") from None
        await self._create_bucket(where)

    async def _create_bucket(self, where: str) -> None:
        options: dict[str, Any] = {"Bucket": self.bucket}
        region = self._client.meta.region_name
        if region and region != "us-east-1":
            options["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            await self._client.create_bucket(**options)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return  # another replica made it meanwhile
            raise StorageError(
                f"object storage at {where}: bucket {self.bucket!r} is missing and could "
                f"not be created: {describe(exc)}"
            ) from None
        log.info("bucket_created", bucket=self.bucket)

    # -- bridging the blocking protocol onto the loop ----------------------------------

    def _wait(self, work: Coroutine[Any, Any, T], timeout: float | None = CALL_TIMEOUT) -> T:
        """Run ``work`` on the loop and wait for it, from a thread (never the loop's own)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            work.close()
            raise RuntimeError("a blocking storage call on the event loop")
        future = asyncio.run_coroutine_threadsafe(work, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise self._failed(TimeoutError("object storage did not answer in time")) from None

    def _submit(self, work: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(work, self._loop)

    async def _head(self, digest: Digest) -> _Object | None:
        try:
            found = await self._client.head_object(Bucket=self.bucket, Key=self.key(digest))
        except ClientError as exc:
            if missing(exc):
                self._known.pop(digest, None)
                return None
            raise self._failed(exc) from None
        except (BotoCoreError, OSError) as exc:
            raise self._failed(exc) from None
        size = int(found["ContentLength"])
        self._known[digest] = size
        return _Object(
            self.key(digest), size, str(found["ETag"]), found["LastModified"].timestamp()
        )

    # -- BlobStorage -------------------------------------------------------------------

    def size(self, digest: Digest) -> int | None:
        return None if self.degraded else self._known.get(digest)

    def locate(self, digest: Digest) -> int | None:
        """The size of a blob in the bucket, asking it when this process does not know."""
        if self.degraded:
            return None
        known = self._known.get(digest)
        if known is not None:
            return known
        found = self._wait(self._head(digest))
        return None if found is None else found.size

    def stat(self, digest: Digest) -> Copy | None:
        found = self._wait(self._head(digest))
        if found is None:
            return None
        return Copy(found.size, found.modified, (found.etag, found.size, found.modified))

    def open(self, digest: Digest) -> BinaryIO:
        """The object's bytes as a file (for the blocking readers: verify, export)."""
        body, copy = self._wait(self._get(digest, 0, None))
        return io.BufferedReader(_ObjectFile(self, body, copy), READ_CHUNK)

    def has_local(self, digest: Digest) -> bool:
        return self.hot is not None and self.hot.has(digest)

    def open_local(self, digest: Digest) -> BinaryIO:
        if self.hot is None:
            raise FileNotFoundError(self.key(digest))
        return self.hot.open(digest)

    def warm(self, digest: Digest, size: int) -> None:
        hot = self.hot
        if hot is None or not hot.fits(size) or digest in self._warming or self.degraded:
            return
        task = self._loop.create_task(self._warm(hot, digest))
        self._warming[digest] = task
        task.add_done_callback(lambda _: self._warming.pop(digest, None))

    async def _warm(self, hot: HotTier, digest: Digest) -> None:
        """Read the object back into the hot tier, hashed on the way: only bytes that match
        their digest are kept."""
        partial = await asyncio.to_thread(hot.new_partial, digest)
        try:
            hasher = digest.hasher()
            body, _ = await self._get(digest, 0, None)
            try:
                while chunk := await body.read(READ_CHUNK):
                    hasher.update(chunk)
                    await asyncio.to_thread(partial.write, chunk)
            finally:
                body.close()
            if hasher.hexdigest() != digest.hex:
                raise StorageError(f"object storage: {self.key(digest)} does not match it")
            await asyncio.to_thread(hot.take, partial, digest)
        except (OSError, BotoCoreError) as exc:
            log.info("hot_copy_not_kept", digest=str(digest), error=str(exc))
        finally:
            await asyncio.to_thread(partial.discard)

    def copy_of(self, file: BinaryIO) -> Copy:
        raw = getattr(file, "raw", file)
        assert isinstance(raw, _ObjectFile)
        return raw.copy

    async def _get(self, digest: Digest, start: int, stop: int | None) -> tuple[Any, Copy]:
        options: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key(digest)}
        if start or stop is not None:
            options["Range"] = f"bytes={start}-{'' if stop is None else stop - 1}"
        try:
            found = await self._client.get_object(**options)
        except ClientError as exc:
            if missing(exc):
                self._known.pop(digest, None)
                raise FileNotFoundError(self.key(digest)) from None
            raise self._failed(exc) from None
        except (BotoCoreError, OSError) as exc:
            raise self._failed(exc) from None
        modified = found["LastModified"].timestamp()
        size = int(found.get("ContentLength", 0))
        return found["Body"], Copy(size, modified, (str(found["ETag"]), size, modified))

    def chunks(self, digest: Digest, start: int, stop: int) -> ObjectBody:
        """Bytes ``start``..``stop`` of the object, as they arrive (the Range goes to the
        bucket); FileNotFoundError before the first when it is gone."""
        return ObjectBody(self, digest, start, stop)

    async def presign(self, digest: Digest) -> str | None:
        if not self.settings.redirect:
            return None
        url: str = await self._signer.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self.key(digest)},
            ExpiresIn=int(self.settings.redirect_expiry),
        )
        return url

    def open_landed(self, digest: Digest) -> int | None:
        return None  # no descriptor on an object: a follower reads the bucket once landed

    def open_partial(self, digest: Digest, name: str) -> int | None:
        return self.spool.open_partial(digest, name)  # a writer on this host only

    def read(self, digest: Digest) -> MemoryCopy | None:
        return None  # no copy in memory: it could not tell when the object goes

    def new_partial(self, digest: Digest, spool: BlobWriter | None = None) -> S3Writer:
        if spool is None:
            spool = self.spool.new_partial(digest)
        assert isinstance(spool, Partial), "a spool of this storage's own"
        writer = S3Writer(self, digest, spool)
        if self.degraded:  # its clients get it from the spool; nothing waits on the bucket
            writer._fail(StorageError("object storage is unavailable"))
        return writer

    def new_spool(self, digest: Digest) -> Partial:
        return self.spool.new_partial(digest)  # locked like a writer's, so swept after a crash

    def remove(self, digest: Digest, inspected: Copy) -> bool:
        found = self.stat(digest)
        if found is None or found.identity != inspected.identity:
            return False
        self._wait(self._delete(digest))
        return True

    def quarantine(self, digest: Digest, opened: Copy | None = None) -> bool:
        if opened is not None and self.hot is not None:
            try:
                held = Copy.of(self.hot.files.path(digest).stat())
            except FileNotFoundError:
                held = None
            if held is not None and held.identity == opened.identity:
                self.hot.drop(digest)  # the damaged copy was the local one: the object stays
                return True
        if opened is not None:
            return self.remove(digest, opened)
        if self.stat(digest) is None:
            return False
        self._wait(self._delete(digest))
        return True

    async def _delete(self, digest: Digest) -> None:
        self._known.pop(digest, None)
        if self.hot is not None:
            self.hot.drop(digest)
        try:
            await self._client.delete_object(Bucket=self.bucket, Key=self.key(digest))
        except (BotoCoreError, ClientError, OSError) as exc:
            raise self._failed(exc) from None

    def on_disk(self) -> dict[str, tuple[int, float]]:
        found = self._wait(self._list())
        self._known = {digest: size for digest, (size, _) in found.items()}
        return {str(digest): entry for digest, entry in found.items()}

    async def _list(self) -> dict[Digest, tuple[int, float]]:
        found: dict[Digest, tuple[int, float]] = {}
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                for item in page.get("Contents", ()):
                    digest = self._digest(item["Key"])
                    if digest is not None:
                        found[digest] = (int(item["Size"]), item["LastModified"].timestamp())
        except (BotoCoreError, ClientError, OSError) as exc:
            raise self._failed(exc) from None
        return found

    def sweep(self, *, dry_run: bool = False, now: float | None = None) -> int:
        """Spool files of crashed writers, and multipart uploads abandoned over an hour
        (before ``now``)."""
        now = time.time() if now is None else now
        swept = self.spool.sweep(dry_run=dry_run)
        if self.hot is not None:
            swept += self.hot.sweep(dry_run=dry_run)
        return swept + self._wait(self._abort_abandoned(dry_run, now))

    async def _abort_abandoned(self, dry_run: bool, now: float) -> int:
        aborted = 0
        paginator = self._client.get_paginator("list_multipart_uploads")
        try:
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                for upload in page.get("Uploads", ()):
                    if now - upload["Initiated"].timestamp() <= ABANDONED:
                        continue
                    if not dry_run:
                        await self._client.abort_multipart_upload(
                            Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                        )
                    aborted += 1
        except (BotoCoreError, ClientError, OSError) as exc:
            raise self._failed(exc) from None
        if aborted and not dry_run:
            log.info("multipart_uploads_aborted", count=aborted)
        return aborted

    def writable(self) -> bool:
        return os.access(self.spool.root, os.W_OK)

    async def reachable(self) -> bool:
        """Whether the bucket answers now (readiness: degraded when not)."""
        if self.degraded:
            return False  # the probe is on it
        try:
            await asyncio.wait_for(self._client.head_bucket(Bucket=self.bucket), PROBE_TIMEOUT)
        except (TimeoutError, BotoCoreError, ClientError, OSError) as exc:
            self._failed(exc)
            return False
        return True


class _ObjectFile(io.RawIOBase):
    """An object's body read from a thread, each read a coroutine on the loop."""

    def __init__(self, blobs: S3Blobs, body: Any, copy: Copy) -> None:
        self._blobs, self._body, self.copy = blobs, body, copy

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data: bytes = self._blobs._wait(self._body.read(len(buffer)))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._blobs._loop.call_soon_threadsafe(self._body.close)
        super().close()


@dataclass(frozen=True, slots=True)
class Passthrough:
    """An object's body as it arrives on its connection, for a relay that moves the bytes
    socket to socket (splice(2)) instead of through Python: ``head``, what the HTTP client
    already read, then ``remaining`` bytes on ``fd`` (a duplicate of the connection's
    socket, which the body closes)."""

    head: bytes
    fd: int
    remaining: int
    read_timeout: float  # how long the bucket may leave the socket without a byte
    failed: Callable[[BaseException], StorageError]  # the error to raise when it fails


class ObjectBody:
    """Bytes ``start``..``stop`` of an object: chunks read through the HTTP client, or,
    before the first is read, the connection they arrive on (:meth:`passthrough`). The GET
    is sent at the first of either, so a missing object or a failing bucket raises before
    a response to a client begins."""

    def __init__(self, blobs: S3Blobs, digest: Digest, start: int, stop: int) -> None:
        self._blobs, self._digest, self._start, self._stop = blobs, digest, start, stop
        self._body: Any = None
        self._read = False
        self._fd: int | None = None

    def __aiter__(self) -> ObjectBody:
        return self

    async def _opened(self) -> Any:
        if self._body is None:
            self._body, _ = await self._blobs._get(self._digest, self._start, self._stop)
        return self._body

    async def __anext__(self) -> bytes:
        body = await self._opened()
        self._read = True
        try:
            chunk: bytes = await body.read(READ_CHUNK)
        except (BotoCoreError, OSError) as exc:
            await self.aclose()
            raise self._blobs._failed(exc) from None
        if not chunk:
            await self.aclose()
            raise StopAsyncIteration
        return chunk

    async def passthrough(self) -> Passthrough | None:
        """The rest of the body on its connection, taken from the HTTP client (which never
        reads it again: the connection is closed with the body, not reused); None where
        the bytes must go through it: TLS, a chunked or encoded body, one already read or
        already whole in memory."""
        response = (await self._opened()).raw_stream
        if self._read or not isinstance(response, aiohttp.ClientResponse):
            return None
        connection = response.connection
        if connection is None or connection.transport is None or connection.protocol is None:
            return None
        transport = connection.transport
        sock = transport.get_extra_info("socket")
        length = response.content_length
        if (
            sock is None
            or transport.get_extra_info("sslcontext") is not None
            or length is None
            or {"Transfer-Encoding", "Content-Encoding"} & response.headers.keys()
        ):
            return None
        content = response.content
        if content.is_eof() or content.total_bytes >= length:
            return None  # all of it is read: nothing to pass through
        # Nothing runs on the loop between these two: aiohttp can read no further.
        try:
            head = content.read_nowait()
        except aiohttp.ClientError as exc:  # the connection failed after the headers
            raise self._blobs._failed(exc) from None
        connection.protocol.pause_reading()
        self._read = True
        self._fd = os.dup(sock.fileno())
        return Passthrough(
            head,
            self._fd,
            length - content.total_bytes,
            float(self._blobs._client.meta.config.read_timeout),
            self._blobs._failed,
        )

    async def aclose(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        if self._body is not None:
            self._body.close()
