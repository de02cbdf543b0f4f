"""Sending a blob's bytes to a client: the one place that knows the transfer tricks.

Routes hand over what the content layer gave them (a way to open a landed blob, or a
fill's file) and the response; the bytes go out with sendfile(2) on a duplicate of the
connection's socket, waiting for the socket with the loop and within the send deadline
(``mirror.web.routes.transfers``), or are read and written where sendfile(2) cannot go (TLS,
a chunked body, small pieces).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol, runtime_checkable

from aiohttp import web

from mirror.web.routes.state import EXCHANGE, TRANSFERS
from mirror.web.routes.transfers import RELAY_DESCRIPTORS, Transfer

# Bytes per sendfile(2) call. One call for a whole blob is what FileResponse makes; calls of
# a few MiB send a cached 1 GiB blob faster on loopback (see the README's Performance).
SENDFILE_CHUNK = 8 * 1024 * 1024
# Under uvloop, which has no loop.sendfile: pieces smaller than this are read and written.
ZERO_COPY_FROM = 1024 * 1024
# Bytes per read when a body must go through response.write (a chunked answer).
WRITE_CHUNK = 1024 * 1024


async def send_blob(
    request: web.Request,
    response: web.StreamResponse,
    source: Callable[[], BinaryIO],
    start: int,
    stop: int,
) -> None:
    """Answer with bytes ``start``..``stop`` of a landed blob, which ``source`` opens (off
    the loop), and end the answer. Returns once sent, or when the client hung up (aiohttp
    closes the connection quietly); FileNotFoundError, before the answer begins, when the
    blob is gone; SourceShrank when the file ended early (the answer is cut short)."""
    with (
        request.app[TRANSFERS].running(request.transport) as transfer,
        await asyncio.to_thread(source) as file,
        socket_copy(request) as sock,
    ):
        await response.prepare(request)
        try:
            await Body(request, response, file, start, transfer, sock).sendfile(start, stop)
        except ConnectionError:
            return
        except SourceShrank:
            raise SourceShrank(os.fstat(file.fileno())) from None
    await response.write_eof()


async def send_stream(
    request: web.Request, response: web.StreamResponse, chunks: AsyncIterator[bytes]
) -> None:
    """Answer with the bytes ``chunks`` yields (a blob in object storage), and end the
    answer: socket to socket with splice(2) where both connections allow it, else read and
    written. The source is opened before the answer begins, so a blob that is gone
    (FileNotFoundError) or storage that fails (StorageError) is raised while another answer
    can still be given; a failure later cuts the connection, as a shrunk file does."""
    with (
        request.app[TRANSFERS].running(request.transport, RELAY_DESCRIPTORS) as transfer,
        socket_copy(request) as sock,
    ):
        try:
            source = None
            if sock is not None and isinstance(chunks, Relayable):
                source = await chunks.passthrough()
            if source is not None and sock is not None:
                await response.prepare(request)
                await Relay(request, response, transfer, sock, source).run()
            else:
                await _write_chunks(request, response, transfer, chunks)
        except ConnectionError:
            return
        except OSError:
            if not response.prepared:
                raise
            if request.transport is not None:
                request.transport.abort()  # the client must see a failed transfer
            raise
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]
    await response.write_eof()


async def _write_chunks(
    request: web.Request,
    response: web.StreamResponse,
    transfer: Transfer,
    chunks: AsyncIterator[bytes],
) -> None:
    data = await anext(chunks, b"")
    await response.prepare(request)
    sent = 0
    while data:
        await transfer.wait(response.write(data))
        sent += len(data)
        request[EXCHANGE].sent = sent
        transfer.moved()
        data = await anext(chunks, b"")


class Passthrough(Protocol):
    """A body arriving on a connection of its own: ``head``, then ``remaining`` bytes on
    ``fd`` (the content layer's object bodies)."""

    @property
    def head(self) -> bytes: ...
    @property
    def fd(self) -> int: ...
    @property
    def remaining(self) -> int: ...
    @property
    def read_timeout(self) -> float: ...
    def failed(self, exc: BaseException) -> OSError: ...


@runtime_checkable
class Relayable(Protocol):
    async def passthrough(self) -> Passthrough | None: ...


# Bytes the pipe between the two sockets holds (Linux's limit for a process without
# CAP_SYS_RESOURCE, /proc/sys/fs/pipe-max-size; the default of 64 KiB where it is lower).
PIPE_SIZE = 1024 * 1024
_SPLICE = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK if hasattr(os, "splice") else 0


@dataclass(slots=True)
class Relay:
    """A response body moved from the source's socket to the client's with splice(2),
    through a pipe: the bytes never enter Python (a relay through the HTTP client copies
    each byte three times there, and costs more CPU than the bucket's own GET)."""

    request: web.Request
    response: web.StreamResponse
    transfer: Transfer
    socket: int  # the client's connection (a copy)
    source: Passthrough

    async def run(self) -> None:
        source = self.source
        declared = self.response.content_length
        head = source.head
        left = source.remaining
        if declared is not None:  # never more than the answer said: the connection goes on
            head = head[:declared]
            left = min(left, declared - len(head))
        if head:
            await self.transfer.wait(self.response.write(head))
        sent = len(head)
        transport = self.request.transport
        loop = asyncio.get_running_loop()
        while transport is not None and transport.get_write_buffer_size():
            await self.transfer.wait(_writable(loop, self.socket))
        out, into = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            with contextlib.suppress(OSError):
                fcntl.fcntl(into, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            capacity = fcntl.fcntl(into, fcntl.F_GETPIPE_SZ)
            held = 0  # bytes in the pipe
            while left or held:
                if transport is None or transport.is_closing():
                    raise ConnectionResetError("the client went away")
                room = min(left, capacity - held)
                taken = self._take(into, room) if room else 0
                left -= taken
                held += taken
                given = self._give(out, held) if held else 0
                held -= given
                sent += given
                if given:
                    self.request[EXCHANGE].sent = sent
                    self.transfer.moved()
                elif not taken:
                    await self._either(loop, room > 0, held > 0)
        finally:
            os.close(out)
            os.close(into)

    def _take(self, into: int, room: int) -> int:
        """Bytes moved from the source into the pipe; 0 when none are there yet."""
        try:
            taken = os.splice(self.source.fd, into, room, flags=_SPLICE)
        except BlockingIOError:  # nothing arrived yet
            return 0
        except OSError as exc:
            raise self.source.failed(exc) from None
        if taken == 0:
            raise self.source.failed(ConnectionResetError("the body ended early"))
        return taken

    def _give(self, out: int, held: int) -> int:
        try:
            return os.splice(out, self.socket, held, flags=_SPLICE)
        except BlockingIOError:  # the client's socket is full
            return 0

    async def _either(self, loop: asyncio.AbstractEventLoop, take: bool, give: bool) -> None:
        """Wait until the source has bytes or the client's socket takes more: within the
        send deadline while bytes wait for the client, else within the source's read
        timeout."""
        ready: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        if take:
            loop.add_reader(self.source.fd, wake)
        if give:
            loop.add_writer(self.socket, wake)
        try:
            if give:
                await self.transfer.wait(ready)
            else:
                try:
                    await asyncio.wait_for(ready, self.source.read_timeout)
                except TimeoutError:
                    raise self.source.failed(
                        TimeoutError("object storage sent nothing in time")
                    ) from None
        finally:
            if take:
                loop.remove_reader(self.source.fd)
            if give:
                loop.remove_writer(self.socket)


@contextlib.contextmanager
def sending(
    request: web.Request, response: web.StreamResponse, source: Callable[[], BinaryIO], first: int
) -> Iterator[Body]:
    """A body sent piece by piece as its bytes arrive (a fill's file, opened by ``source``),
    counted as a download while it runs."""
    with (
        request.app[TRANSFERS].running(request.transport) as transfer,
        source() as file,
        socket_copy(request) as sock,
    ):
        yield Body(request, response, file, first, transfer, sock)


@contextlib.contextmanager
def socket_copy(request: web.Request) -> Iterator[int | None]:
    """A descriptor of our own for the connection's socket, for sendfile(2) and to wait on
    until the socket takes more (uvloop shares its own with no one); taken before the answer
    begins, so that running out of descriptors is a 503, not a cut connection. None through
    TLS, which sendfile(2) would bypass."""
    transport = request.transport
    raw = None if transport is None else transport.get_extra_info("socket")
    if raw is None or transport is None or transport.get_extra_info("sslcontext") is not None:
        yield None
        return
    fd = os.dup(raw.fileno())
    try:
        yield fd
    finally:
        os.close(fd)


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(fd, wake)
    try:
        await ready
    finally:
        loop.remove_writer(fd)


class SourceShrank(Exception):
    """The file being sent ended before the bytes it was expected to hold; ``copy`` is the
    file that did (its fstat), for taking it out of service."""

    def __init__(self, copy: os.stat_result | None = None) -> None:
        super().__init__("the file being sent shrank")
        self.copy = copy


@dataclass(slots=True)
class Body:
    """A response body sent from a file: bytes ``first``.. of the file are its bytes 0.."""

    request: web.Request
    response: web.StreamResponse
    file: BinaryIO
    first: int
    transfer: Transfer  # its deadline, and the progress the server sheds by
    socket: int | None  # the connection's socket for sendfile(2); None: read and write

    async def sendfile(self, position: int, stop: int) -> int:
        """Send bytes ``position``..``stop`` with sendfile(2), SENDFILE_CHUNK at a time;
        returns ``stop``. Only for a body of declared length: sendfile(2) bypasses any chunk
        framing."""
        transport = self.request.transport
        loop = asyncio.get_running_loop()
        while position < stop:
            if transport is None or transport.is_closing():
                raise ConnectionResetError("the client went away")
            count = min(stop - position, SENDFILE_CHUNK)
            sent = await self._chunk(loop, transport, position, count)
            if sent == 0:
                # sendfile(2) at the end of the file: it shrank under us, and asking again
                # would spin forever.
                raise SourceShrank
            position += sent
            self.request[EXCHANGE].sent = position - self.first
            self.transfer.moved()
        return position

    async def _chunk(
        self,
        loop: asyncio.AbstractEventLoop,
        transport: asyncio.Transport,
        position: int,
        count: int,
    ) -> int:
        """Zero-copy sendfile(2) on the socket's copy, waiting for the socket to take more
        with the loop (never polling) and within the send deadline (``loop.sendfile`` would
        wait without one, and uvloop has none); without a copy (TLS, which sendfile(2) would
        bypass), the bytes are read and written."""
        fd = self.socket
        if fd is None or count < ZERO_COPY_FROM:
            # A small piece (a fill handing on what just arrived) costs less to copy than to
            # hand to the kernel.
            data = await asyncio.to_thread(os.pread, self.file.fileno(), count, position)
            # Waits while the client is slower than the disk.
            await self.transfer.wait(self.response.write(data))
            return len(data)
        while transport.get_write_buffer_size():  # what the transport holds goes first
            await self._writable(loop, transport, fd)
        sent = 0
        while sent < count:
            try:
                done = os.sendfile(fd, self.file.fileno(), position + sent, count - sent)
            except BlockingIOError:
                await self._writable(loop, transport, fd)
                continue
            if done == 0:
                break
            sent += done
            self.transfer.moved()
        return sent

    async def _writable(
        self, loop: asyncio.AbstractEventLoop, transport: asyncio.Transport, fd: int
    ) -> None:
        await self.transfer.wait(_writable(loop, fd))
        if transport.is_closing():
            # Our copy keeps the socket open after the transport let it go: stop here.
            raise ConnectionResetError("the client went away")

    async def write(self, position: int, stop: int) -> int:
        """As ``sendfile``, through ``response.write`` so aiohttp frames the chunks of a body
        of unknown length; the file is read off the event loop."""
        fd = self.file.fileno()
        while position < stop:
            count = min(stop - position, WRITE_CHUNK)
            data = await asyncio.to_thread(os.pread, fd, count, position)
            if not data:
                raise SourceShrank
            await self.transfer.wait(self.response.write(data))
            position += len(data)
            self.request[EXCHANGE].sent = position - self.first
        return position
