"""OCI image layouts on disk: read from a directory, a tar or a zstd-compressed tar, and
written as a tar (optionally zstd-compressed) in constant memory.

    oci-layout              {"imageLayoutVersion": "1.0.0"}
    index.json              an image index: one descriptor per image, named by annotations
    blobs/<alg>/<hex>       manifests, configs and layers, by digest

Blocking file I/O throughout: the callers run it on a thread. Nothing here trusts a member's
name beyond ``blobs/<alg>/<hex>`` with a digest that parses, and nothing is extracted by name.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import tarfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, Literal, Protocol, cast

import zstandard

from mirror.domain.reference import Digest

CHUNK = 1024 * 1024
LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
LAYOUT_VERSION = b'{"imageLayoutVersion":"1.0.0"}'
ZSTD_SUFFIX = ".zst"
ZSTD_LEVEL = 3
ZSTD_THREADS = -1  # one compression thread per core: layers are mostly compressed already
HASH_QUEUE = 8  # chunks handed to the hashing thread and not yet hashed
KERNEL_CHUNK = 8 * 1024 * 1024
# copy_file_range refused: another filesystem (older kernels), or one that cannot.
_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})
# Names other tools read: skopeo and podman the first, containerd's ctr import the second.
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"


class LayoutError(Exception):
    """The file is not an OCI image layout this mirror can read: one line for the user."""


@dataclass(frozen=True, slots=True)
class Bounds:
    """What reading one layout may cost. A bundle is carried in from elsewhere and may be
    hostile: a few kilobytes of zstd can claim gigabytes, so each cost has a ceiling, and a
    layout past one is refused with a line naming it."""

    header: int = 64 * 1024  # one pax or long-name header (a path is at most 4 KiB)
    members: int = 200_000  # tar entries of any kind
    # Decompressed bytes per compressed byte past ``expansion_floor`` (0: no bound). Layers
    # are compressed already; zstd of zeros expands ten thousand times.
    expansion: float = 100.0
    expansion_floor: int = 64 * 1024 * 1024
    manifest_bytes: int = 128 * 1024 * 1024  # manifest bodies kept in memory, all together
    manifests: int = 100_000  # manifests looked up while walking the images, all together


DEFAULT_BOUNDS = Bounds()


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


@dataclass(slots=True)
class Member:
    """One file of a layout, read once, in order."""

    name: str  # normalised: "index.json", "blobs/sha256/<hex>", ...
    size: int
    content: Readable
    # Where the bytes lie in a file, when they lie whole in one (a plain tar, a directory):
    # the copy can then be the kernel's.
    fd: int | None = None
    offset: int = 0

    @property
    def digest(self) -> Digest | None:
        """The digest a ``blobs/<alg>/<hex>`` member claims to be; None for anything else."""
        parts = self.name.split("/")
        if len(parts) != 3 or parts[0] != "blobs":
            return None
        try:
            return Digest.parse(f"{parts[1]}:{parts[2]}")
        except Exception:
            return None


def members(path: Path, bounds: Bounds = DEFAULT_BOUNDS) -> Iterator[Member]:
    """Every regular file of the layout at ``path``, in the order it is stored."""
    if path.is_dir():
        yield from _directory_members(path)
        return
    try:
        with path.open("rb") as raw:
            if path.name.endswith(ZSTD_SUFFIX) or _zstd_magic(raw):
                reader = zstandard.ZstdDecompressor().stream_reader(raw, read_size=CHUNK)
                source: Any = _Expansion(reader, raw, bounds)
                with _open_tar(source, "r|", bounds) as tar:
                    yield from _tar_members(path, tar, bounds)
            else:
                with _open_tar(raw, "r:", bounds) as tar:
                    yield from _tar_members(path, tar, bounds, raw.fileno())
    except _UNREADABLE as exc:
        raise LayoutError(f"{path}: not a readable tar: {exc}") from None
    except LayoutError as exc:
        raise LayoutError(f"{path}: {exc}") from None


_UNREADABLE = (tarfile.TarError, zstandard.ZstdError, EOFError, RecursionError)


def _open_tar(source: Any, mode: Literal["r|", "r:"], bounds: Bounds) -> _BoundedTar:
    # tarfile reads the first header while it opens: the bounds must be there already.
    kind = cast(type[_BoundedTar], type("_BoundedTar", (_BoundedTar,), {"bounds": bounds}))
    tar: _BoundedTar = kind.open(fileobj=source, mode=mode)
    return tar


class _BoundedInfo(tarfile.TarInfo):
    """A tar header that refuses, before reading them, extension headers (pax, GNU long
    names) larger than ``Bounds.header`` or chained deeper than a few; and sparse files,
    which no image layout holds. tarfile itself reads any such header whole into memory."""

    # tarfile has no public hook between reading a header and reading what it extends:
    # ``_proc_member`` is where it dispatches on the header's type.
    def _proc_member(self, tar: _BoundedTar) -> tarfile.TarInfo:
        if self.type not in _EXTENSIONS:
            return super()._proc_member(tar)  # type: ignore[misc,no-any-return]
        bounds = tar.bounds
        if self.size > bounds.header:
            raise LayoutError(
                f"a tar header of {self.size} bytes (more than {bounds.header}):"
                " not an image layout"
            )
        if tar.depth >= _MAX_DEPTH:
            raise LayoutError(f"tar headers chained over {_MAX_DEPTH} deep: not an image layout")
        tar.depth += 1
        try:
            info: tarfile.TarInfo = super()._proc_member(tar)  # type: ignore[misc]
        finally:
            tar.depth -= 1
        if self.type == tarfile.XGLTYPE:
            kept = sum(len(k) + len(v) for k, v in tar.pax_headers.items())
            if kept > bounds.header:
                raise LayoutError(
                    f"global tar headers over {bounds.header} bytes: not an image layout"
                )
        return info

    def _proc_sparse(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        raise LayoutError("a sparse file: not an image layout")

    def _proc_gnusparse_00(self, *args: Any) -> None:
        raise LayoutError("a sparse file: not an image layout")

    _proc_gnusparse_01 = _proc_gnusparse_00
    _proc_gnusparse_10 = _proc_gnusparse_00


class _BoundedTar(tarfile.TarFile):
    tarinfo = _BoundedInfo
    bounds = DEFAULT_BOUNDS
    depth = 0  # extension headers being read, one inside the other
    members: list[tarfile.TarInfo]


_EXTENSIONS = frozenset(
    {
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
    }
)
_MAX_DEPTH = 8  # extension headers before one member: a pax header and long names need 3


class _Expansion(io.RawIOBase):
    """The decompressed stream, refused once it has grown more than ``Bounds.expansion``
    times the compressed bytes read (past a floor any real bundle's manifests fit under)."""

    def __init__(self, reader: Any, raw: BinaryIO, bounds: Bounds) -> None:
        self._reader = reader
        self._raw = raw
        self._bounds = bounds
        self._out = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data: bytes = self._reader.read(size)
        self._out += len(data)
        bounds = self._bounds
        if bounds.expansion and self._out > bounds.expansion_floor:
            compressed = self._raw.tell()
            if self._out > bounds.expansion * compressed:
                raise LayoutError(
                    f"{compressed} compressed bytes expand to more than {self._out}"
                    f" (over {bounds.expansion:g} times; --max-expansion raises the bound)"
                )
        return data


def _zstd_magic(raw: BinaryIO) -> bool:
    head = raw.read(4)
    raw.seek(0)
    return head == b"\x28\xb5\x2f\xfd"


def _normalise(name: str) -> str:
    return name.removeprefix("./").lstrip("/")


def _tar_members(
    path: Path, tar: _BoundedTar, bounds: Bounds, fd: int | None = None
) -> Iterator[Member]:
    count = 0
    while (info := tar.next()) is not None:
        # tarfile keeps every header it read (for extraction by name): not needed here.
        tar.members.clear()
        count += 1
        if count > bounds.members:
            raise LayoutError(f"more than {bounds.members} tar entries: not an image layout")
        if not info.isreg() or info.sparse is not None:
            continue
        content = tar.extractfile(info)
        if content is not None:
            yield Member(
                _normalise(info.name), info.size, _Content(path, content), fd, info.offset_data
            )


class _Content(io.RawIOBase):
    """A member's bytes, read by the caller: a damaged or refused stream found there is
    the same one line as one found between members."""

    def __init__(self, path: Path, content: IO[bytes]) -> None:
        self._path = path
        self._content = content

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        try:
            return self._content.read(size)
        except _UNREADABLE as exc:
            raise LayoutError(f"{self._path}: not a readable tar: {exc}") from None
        except LayoutError as exc:
            raise LayoutError(f"{self._path}: {exc}") from None


def _directory_members(root: Path) -> Iterator[Member]:
    names = [LAYOUT_FILE, INDEX_FILE]
    blobs = root / "blobs"
    if blobs.is_dir():
        names += [
            f"blobs/{algorithm.name}/{blob.name}"
            for algorithm in sorted(blobs.iterdir())
            if algorithm.is_dir()
            for blob in sorted(algorithm.iterdir())
        ]
    for name in names:
        path = root / name
        try:
            info = path.stat()
        except FileNotFoundError:
            continue
        if stat.S_ISREG(info.st_mode):
            with path.open("rb") as content:
                yield Member(name, info.st_size, content, content.fileno(), 0)


def read_all(member: Member, limit: int) -> bytes | None:
    """The member's bytes, or None when it holds more than ``limit``."""
    if member.size > limit:
        return None
    return member.content.read(limit + 1)


class BackgroundHash:
    """A hash computed on a thread of its own while the caller moves the bytes: hashlib
    lets go of the GIL on large buffers, so hashing and the disk overlap on two cores."""

    def __init__(self, algorithm: str = "sha256") -> None:
        self._hasher = hashlib.new(algorithm)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hash")
        self._pending: deque[Future[None]] = deque()

    def update(self, chunk: bytes) -> None:
        self._submit(self._hasher.update, chunk)

    def update_from(self, fd: int, offset: int, size: int) -> None:
        """Hash ``size`` bytes of a file from ``offset``, read on the hashing thread (from
        a descriptor of its own: the caller may close ``fd`` at once)."""
        self._submit(self._read_range, os.dup(fd), offset, size)

    def _read_range(self, fd: int, offset: int, size: int) -> None:
        try:
            end = offset + size
            while offset < end:
                chunk = os.pread(fd, min(CHUNK, end - offset), offset)
                if not chunk:
                    raise OSError("the file is shorter than expected")
                self._hasher.update(chunk)
                offset += len(chunk)
        finally:
            os.close(fd)

    def _submit(self, work: Callable[..., None], *args: Any) -> None:
        if len(self._pending) >= HASH_QUEUE:
            self._pending.popleft().result()
        self._pending.append(self._thread.submit(work, *args))

    def hexdigest(self) -> str:
        while self._pending:
            self._pending.popleft().result()
        self._thread.shutdown()
        return self._hasher.hexdigest()

    def close(self) -> None:
        self._thread.shutdown(cancel_futures=True)


def copy_verified(
    member: Member, digest: Digest, target: int, progress: Callable[[int], None]
) -> bool:
    """Copy the member to the file ``target`` (at its position); whether its bytes hash to
    ``digest``. The bytes are hashed on a thread of their own as they are copied."""
    hasher = BackgroundHash(digest.algorithm)
    try:
        if member.fd is not None:
            # The hashing thread reads the bytes as the kernel copies them.
            hasher.update_from(member.fd, member.offset, member.size)
            copy_range(member.fd, member.offset, target, member.size, progress)
        else:
            while chunk := member.content.read(CHUNK):
                hasher.update(chunk)
                write_all(target, chunk)
                progress(len(chunk))
        return hasher.hexdigest() == digest.hex
    finally:
        hasher.close()


def hash_matches(member: Member, digest: Digest, progress: Callable[[int], None]) -> bool:
    """Whether the member's bytes hash to ``digest`` (read, not kept)."""
    hasher = digest.hasher()
    while chunk := member.content.read(CHUNK):
        hasher.update(chunk)
        progress(len(chunk))
    return hasher.hexdigest() == digest.hex


def _is_file(blob: BinaryIO) -> bool:
    """Whether a blob is a file with a descriptor (not an object streamed from a bucket)."""
    try:
        blob.fileno()
    except OSError:  # io.UnsupportedOperation
        return False
    return True


def copy_range(
    source: int, offset: int, target: int, size: int, progress: Callable[[int], None]
) -> None:
    """``size`` bytes from ``offset`` of ``source`` to ``target`` at its position."""
    if kernel_copy(source, offset, target, size, progress):
        return
    end = offset + size
    while offset < end:
        chunk = os.pread(source, min(CHUNK, end - offset), offset)
        if not chunk:
            raise OSError(f"the source ended {end - offset} bytes early")
        write_all(target, chunk)
        offset += len(chunk)
        progress(len(chunk))


def kernel_copy(
    source: int, offset: int, target: int, size: int, progress: Callable[[int], None]
) -> bool:
    """``size`` bytes from ``offset`` of ``source`` to ``target`` at its position, copied by
    the kernel (copy_file_range); False, with nothing copied, where it cannot."""
    done = 0
    while done < size:
        try:
            copied = os.copy_file_range(
                source, target, min(KERNEL_CHUNK, size - done), offset + done
            )
        except OSError as exc:
            if done == 0 and exc.errno in _NO_KERNEL_COPY:
                return False
            raise
        if copied == 0:
            raise OSError(f"the source ended {size - done} bytes early")
        done += copied
        progress(copied)
    return True


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class TarWriter:
    """A tar archive written front to back (zstd-compressed for a ``.zst`` name), hashed as
    it goes; it appears at its name only once complete."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._partial = path.with_name(f".{path.name}.partial")
        self._file = self._partial.open("wb", buffering=0)
        self._hash = BackgroundHash()
        self._compressor: Any = None
        self._out: Callable[[bytes], Any] = self._write_raw
        if path.name.endswith(ZSTD_SUFFIX):
            hashing: Any = _Hashing(self._file, self._hash)
            compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=ZSTD_THREADS)
            self._compressor = compressor.stream_writer(hashing, closefd=False)
            self._out = self._compressor.write
        self._written = 0
        self._mtime = int(time.time())

    def directory(self, name: str) -> None:
        info = self._info(name.rstrip("/") + "/", 0)
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        self._write(info.tobuf(format=tarfile.PAX_FORMAT))

    def add_bytes(self, name: str, data: bytes) -> None:
        self._write(self._info(name, len(data)).tobuf(format=tarfile.PAX_FORMAT))
        self._write(data)
        self._pad(len(data))

    def add_file(
        self, name: str, blob: BinaryIO, size: int, progress: Callable[[int], None]
    ) -> None:
        """Copy an open file of ``size`` bytes (it must not change meanwhile: blobs never do)."""
        self._write(self._info(name, size).tobuf(format=tarfile.PAX_FORMAT))
        left = size
        if self._compressor is None and _is_file(blob):
            # The hashing thread reads the blob as the kernel copies it.
            self._hash.update_from(blob.fileno(), 0, size)
            copy_range(blob.fileno(), 0, self._file.fileno(), size, progress)
            self._written += size
            left = 0
        while left > 0:
            chunk = blob.read(min(CHUNK, left))
            if not chunk:
                raise OSError(f"{name} is shorter than its {size} bytes")
            self._write(chunk)
            left -= len(chunk)
            progress(len(chunk))
        self._pad(size)

    def close(self) -> str:
        """Finish the archive, make it visible; the sha256 of the file."""
        self._write(b"\0" * (2 * tarfile.BLOCKSIZE))
        tail = self._written % tarfile.RECORDSIZE
        if tail:
            self._write(b"\0" * (tarfile.RECORDSIZE - tail))
        if self._compressor is not None:
            self._compressor.close()
        os.fsync(self._file.fileno())
        self._file.close()
        os.rename(self._partial, self.path)
        return self._hash.hexdigest()

    def abort(self) -> None:
        self._hash.close()
        self._file.close()
        self._partial.unlink(missing_ok=True)

    def _info(self, name: str, size: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o644, self._mtime
        return info

    def _write_raw(self, data: bytes) -> None:
        write_all(self._file.fileno(), data)

    def _write(self, data: bytes) -> None:
        self._out(data)
        if self._compressor is None:
            self._hash.update(data)
        self._written += len(data)

    def _pad(self, size: int) -> None:
        tail = size % tarfile.BLOCKSIZE
        if tail:
            self._write(b"\0" * (tarfile.BLOCKSIZE - tail))


class _Hashing(io.RawIOBase):
    """The compressed stream on its way to the file, hashed as it passes."""

    def __init__(self, file: BinaryIO, hasher: BackgroundHash) -> None:
        self._file = file
        self._hasher = hasher

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)  # the compressor reuses its buffer once this returns
        self._hasher.update(chunk)
        return self._file.write(chunk)

    def flush(self) -> None:
        self._file.flush()
