"""The default metadata store: SQLite in the data dir, needing no server.

SQLite gives atomic, crash-safe writes and lets several worker processes on one host
share the file (WAL mode). Every call runs on one dedicated thread so the event loop
never waits on the disk. A call that fails (a full disk, a database another process keeps
locked past ``BUSY_TIMEOUT``) raises ``StoreUnavailable``, as a Redis outage does, so the
caller degrades the same way: it answers from memory, and nothing already fetched is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from mirror.content import schema
from mirror.content.graph_embedded import EmbeddedGraph
from mirror.content.protocols import StoreUnavailable, is_tag
from mirror.domain.manifests import Manifest, TaggedRecord, TagRecord

T = TypeVar("T")

# How long a call waits for another process's write lock before it counts as a failure.
BUSY_TIMEOUT = 1.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS manifests (
    registry TEXT NOT NULL,
    repository TEXT NOT NULL,
    digest TEXT NOT NULL,
    media_type TEXT NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (registry, repository, digest)
);
CREATE TABLE IF NOT EXISTS missing (
    registry TEXT NOT NULL,
    repository TEXT NOT NULL,
    tag TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (registry, repository, tag)
);
CREATE INDEX IF NOT EXISTS missing_expiry ON missing (expires_at);
CREATE TABLE IF NOT EXISTS tags (
    registry TEXT NOT NULL,
    repository TEXT NOT NULL,
    tag TEXT NOT NULL,
    digest TEXT NOT NULL,
    media_type TEXT NOT NULL,
    checked_at REAL NOT NULL,
    PRIMARY KEY (registry, repository, tag)
);
"""


@contextlib.contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class EmbeddedStore:
    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        """``clock`` is the wall time negative answers expire by and pins are dated with."""
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedded-store")
        self._db = sqlite3.connect(path, check_same_thread=False, timeout=BUSY_TIMEOUT)
        # Workers starting together on a new data dir would race to create and migrate the
        # schema, and the loser could wait past the busy timeout: one at a time.
        with _exclusive(path.with_name(path.name + ".lock")):
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            schema.migrate(self._db)
        self.graph = EmbeddedGraph(self._db, self._run)

    @classmethod
    async def open(
        cls, data_dir: Path, *, clock: Callable[[], float] = time.time
    ) -> EmbeddedStore:
        return await asyncio.to_thread(lambda: cls(data_dir / "metadata.sqlite3", clock=clock))

    async def get_manifest(self, registry: str, repository: str, digest: str) -> Manifest | None:
        row = await self._fetchone(
            "SELECT body, media_type FROM manifests"
            " WHERE registry = ? AND repository = ? AND digest = ?",
            (registry, repository, digest),
        )
        return None if row is None else Manifest(bytes(row[0]), row[1], digest)

    async def put_manifest(self, registry: str, repository: str, manifest: Manifest) -> None:
        await self._write(
            "INSERT OR REPLACE INTO manifests VALUES (?, ?, ?, ?, ?)",
            (registry, repository, manifest.digest, manifest.media_type, manifest.body),
        )

    async def get_tag(self, registry: str, repository: str, tag: str) -> TagRecord | None:
        row = await self._fetchone(
            "SELECT digest, media_type, checked_at FROM tags"
            " WHERE registry = ? AND repository = ? AND tag = ?",
            (registry, repository, tag),
        )
        return None if row is None else TagRecord(row[0], row[1], row[2])

    async def put_tag(self, registry: str, repository: str, tag: str, record: TagRecord) -> None:
        await self._write(
            "INSERT OR REPLACE INTO tags VALUES (?, ?, ?, ?, ?, ?)",
            (registry, repository, tag, record.digest, record.media_type, record.checked_at),
        )

    async def get_missing(self, registry: str, repository: str, tag: str) -> bool:
        row = await self._fetchone(
            "SELECT expires_at FROM missing WHERE registry = ? AND repository = ? AND tag = ?",
            (registry, repository, tag),
        )
        return row is not None and row[0] > self._clock()

    async def put_missing(self, registry: str, repository: str, tag: str, ttl: float) -> None:
        now = self._clock()

        def write() -> None:
            with self._db:
                # What has expired goes as new answers come: clients inventing names
                # cannot grow the table beyond what one negative_ttl holds.
                self._db.execute("DELETE FROM missing WHERE expires_at <= ?", (now,))
                self._db.execute(
                    "INSERT OR REPLACE INTO missing VALUES (?, ?, ?, ?)",
                    (registry, repository, tag, now + ttl),
                )

        await self._run(write)

    async def list_tags(
        self, registry: str | None = None, repository: str | None = None
    ) -> list[TaggedRecord]:
        where, params = "", tuple[str, ...]()
        if registry is not None and repository is not None:
            where, params = " WHERE registry = ? AND repository = ?", (registry, repository)
        rows = await self._run(
            lambda: self._db.execute(
                "SELECT registry, repository, tag, digest, media_type, checked_at FROM tags"
                f"{where} ORDER BY registry, repository, tag",
                params,
            ).fetchall()
        )
        return [
            TaggedRecord(r[0], r[1], r[2], TagRecord(r[3], r[4], r[5]))
            for r in rows
            if is_tag(r[2])
        ]

    async def pins(self) -> list[str]:
        rows = await self._run(
            lambda: self._db.execute("SELECT reference FROM pins ORDER BY reference").fetchall()
        )
        return [row[0] for row in rows]

    async def add_pins(self, references: Sequence[str]) -> None:
        now = self._clock()

        def write() -> None:
            with self._db:
                self._db.executemany(
                    "INSERT OR IGNORE INTO pins VALUES (?, ?)", [(r, now) for r in references]
                )

        await self._run(write)

    async def remove_pins(self, references: Sequence[str]) -> int:
        def write() -> int:
            with self._db:
                return sum(
                    self._db.execute("DELETE FROM pins WHERE reference = ?", (r,)).rowcount
                    for r in references
                )

        return int(await self._run(write))

    async def ping(self) -> bool:
        try:
            await self._fetchone("SELECT 1", ())
        except StoreUnavailable:
            return False
        return True

    async def close(self) -> None:
        await self._run(self._db.close)
        self._executor.shutdown(wait=True)

    async def _fetchone(self, sql: str, params: tuple[Any, ...]) -> Any:
        return await self._run(lambda: self._db.execute(sql, params).fetchone())

    async def _write(self, sql: str, params: tuple[Any, ...]) -> None:
        def write() -> None:
            with self._db:
                self._db.execute(sql, params)

        await self._run(write)

    async def _run(self, call: Any) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"sqlite: {type(exc).__name__}: {exc}") from exc
