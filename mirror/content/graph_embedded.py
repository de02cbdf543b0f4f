"""The content graph in the embedded store's SQLite file (schema v1, ``mirror.content.schema``).

It shares the store's connection and its one thread, so graph writes and metadata writes
never contend inside a process; across worker processes SQLite's WAL serialises them.
Eviction's query walks the ``blobs_by_last_pull`` index, so its cost does not grow with
the number of blobs it does not pick.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from mirror.content.graph import BlobEntry, ImageKey, TagKey, Usage
from mirror.content.schema import edge_rows
from mirror.domain.manifests import References

T = TypeVar("T")
# SQLite's default limit on the variables of one statement is 32766; stay well under it.
_CHUNK = 500


class EmbeddedGraph:
    def __init__(
        self, db: sqlite3.Connection, run: Callable[[Callable[[], Any]], Awaitable[Any]]
    ) -> None:
        self._db = db
        self._run = run

    async def add_manifest(
        self, registry: str, repository: str, digest: str, refs: References
    ) -> None:
        rows = edge_rows(registry, repository, digest, refs)
        await self._write(
            lambda: self._db.executemany(
                "INSERT OR REPLACE INTO edges VALUES (?, ?, ?, ?, ?, ?, ?)", rows
            )
        )

    async def blob_stored(self, digest: str, size: int, at: float) -> None:
        await self._write(
            lambda: self._db.execute(
                "INSERT INTO blobs VALUES (?, ?, 1, ?) ON CONFLICT (digest) DO UPDATE SET"
                " size = excluded.size, present = 1,"
                " last_pulled = max(last_pulled, excluded.last_pulled)",
                (digest, size, at),
            )
        )

    async def blobs_removed(self, digests: Sequence[str]) -> None:
        await self._write(
            lambda: self._db.executemany(
                "UPDATE blobs SET present = 0 WHERE digest = ?", [(d,) for d in digests]
            )
        )

    async def record_pulls(
        self,
        blobs: Mapping[str, float],
        images: Mapping[ImageKey, float],
        tags: Mapping[TagKey, int] | None = None,
    ) -> None:
        def write() -> None:
            self._db.executemany(
                "INSERT INTO tag_pulls VALUES (?, ?, ?, ?) ON CONFLICT DO UPDATE SET"
                " pulls = pulls + excluded.pulls",
                [(*key, count) for key, count in (tags or {}).items()],
            )
            self._db.executemany(
                "UPDATE blobs SET last_pulled = max(last_pulled, ?) WHERE digest = ?",
                [(at, digest) for digest, at in blobs.items()],
            )
            self._db.executemany(
                "INSERT INTO pulls VALUES (?, ?, ?, ?) ON CONFLICT DO UPDATE SET"
                " last_pulled = max(last_pulled, excluded.last_pulled)",
                [(*key, at) for key, at in images.items()],
            )

        await self._write(write)

    async def most_pulled(self, limit: int) -> list[tuple[TagKey, int]]:
        rows = await self._run(
            lambda: self._db.execute(
                "SELECT registry, repository, tag, pulls FROM tag_pulls"
                " ORDER BY pulls DESC, registry, repository, tag LIMIT ?",
                (limit,),
            ).fetchall()
        )
        return [((r[0], r[1], r[2]), int(r[3])) for r in rows]

    async def last_pulls(self, registry: str, repository: str) -> dict[str, float]:
        rows = await self._run(
            lambda: self._db.execute(
                "SELECT reference, last_pulled FROM pulls WHERE registry = ? AND repository = ?",
                (registry, repository),
            ).fetchall()
        )
        return dict(rows)

    async def oldest_blobs(
        self, limit: int, after: tuple[float, str] | None = None
    ) -> list[BlobEntry]:
        since, digest = after if after is not None else (float("-inf"), "")
        rows = await self._run(
            lambda: self._db.execute(
                "SELECT digest, size, last_pulled FROM blobs WHERE present = 1"
                " AND (last_pulled, digest) > (?, ?) ORDER BY last_pulled, digest LIMIT ?",
                (since, digest, limit),
            ).fetchall()
        )
        return [BlobEntry(*row) for row in rows]

    async def usage(self) -> Usage:
        count, total = await self._run(
            lambda: self._db.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM blobs WHERE present = 1"
            ).fetchone()
        )
        return Usage(count, total)

    async def holders(self, blob: str) -> set[tuple[str, str]]:
        rows = await self._run(
            lambda: self._db.execute(
                "SELECT DISTINCT registry, repository FROM edges WHERE child = ?", (blob,)
            ).fetchall()
        )
        return {(registry, repository) for registry, repository in rows}

    async def unreferenced(self, digests: Sequence[str]) -> set[str]:
        def query() -> set[str]:
            found: set[str] = set()
            for start in range(0, len(digests), _CHUNK):
                chunk = list(digests[start : start + _CHUNK])
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT DISTINCT child FROM edges WHERE child IN ({marks})", chunk
                ).fetchall()
                found.update(chunk)
                found.difference_update(row[0] for row in rows)
            return found

        result: set[str] = await self._run(query)
        return result

    async def reconcile(self, on_disk: Mapping[str, tuple[int, float]]) -> list[str]:
        gone: list[str] = []

        def write() -> None:
            known = {row[0] for row in self._db.execute("SELECT digest FROM blobs WHERE present")}
            gone.extend(known - on_disk.keys())
            self._db.executemany(
                "UPDATE blobs SET present = 0 WHERE digest = ?", [(digest,) for digest in gone]
            )
            self._db.executemany(
                "INSERT INTO blobs VALUES (?, ?, 1, ?) ON CONFLICT (digest) DO UPDATE SET"
                " size = excluded.size, present = 1",
                [(digest, size, mtime) for digest, (size, mtime) in on_disk.items()],
            )

        await self._write(write)
        return gone

    async def _write(self, work: Callable[[], object]) -> None:
        def write() -> None:
            with self._db:
                work()

        await self._run(write)
