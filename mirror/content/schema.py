"""The embedded store's schema versions and the migrations between them.

``PRAGMA user_version`` says which version a ``metadata.sqlite3`` is at; opening it runs
every migration after that version, each in one transaction, so a data dir written by an
older mirror is upgraded in place (and a crash mid-upgrade leaves the old version whole).

- v0: manifests, tags, missing (the first releases; created by ``EmbeddedStore``).
- v1: the content graph: edges from manifests to what they reference, blobs with their
  size, presence and last pull, and the last pull of each image. Edges are backfilled
  from the manifests already held; blobs on disk are registered by the first
  reconciliation (``ContentGraph.reconcile``), which needs the blob directory.
- v2: pins: the images ``seed`` and ``import`` keep from eviction.
- v3: tag_pulls: how many times each tag was pulled (the status page's most pulled images).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from mirror.content.protocols import NewerSchema
from mirror.domain.manifests import ManifestParseError, References, parse

_V1 = """
CREATE TABLE IF NOT EXISTS edges (
    registry TEXT NOT NULL,
    repository TEXT NOT NULL,
    parent TEXT NOT NULL,          -- a manifest digest
    child TEXT NOT NULL,           -- a manifest (kind 'manifest') or blob digest
    kind TEXT NOT NULL,
    size INTEGER,
    platform TEXT,
    PRIMARY KEY (registry, repository, parent, child)
);
CREATE INDEX IF NOT EXISTS edges_child ON edges (child);
CREATE TABLE IF NOT EXISTS blobs (
    digest TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    present INTEGER NOT NULL,
    last_pulled REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS blobs_by_last_pull ON blobs (present, last_pulled, digest);
CREATE TABLE IF NOT EXISTS pulls (
    registry TEXT NOT NULL,
    repository TEXT NOT NULL,
    reference TEXT NOT NULL,       -- a tag or a manifest digest
    last_pulled REAL NOT NULL,
    PRIMARY KEY (registry, repository, reference)
);
"""


def _v1(db: sqlite3.Connection) -> None:
    db.executescript(_V1)
    rows = db.execute("SELECT registry, repository, digest, media_type, body FROM manifests")
    for registry, repository, digest, media_type, body in rows.fetchall():
        try:
            refs = parse(bytes(body), media_type)
        except ManifestParseError:
            continue
        db.executemany(
            "INSERT OR IGNORE INTO edges VALUES (?, ?, ?, ?, ?, ?, ?)",
            edge_rows(registry, repository, digest, refs),
        )


EdgeRow = tuple[str, str, str, str, str, int | None, str | None]


def edge_rows(registry: str, repository: str, digest: str, refs: References) -> list[EdgeRow]:
    """The rows of ``edges`` for one manifest: its children and its blobs."""
    rows: list[EdgeRow] = [
        (registry, repository, digest, child.digest, "manifest", child.size, child.platform)
        for child in refs.children
    ]
    rows += [
        (registry, repository, digest, blob.digest, "blob", blob.size, None)
        for blob in refs.blobs
    ]
    return rows


def _v2(db: sqlite3.Connection) -> None:
    db.execute(
        "CREATE TABLE IF NOT EXISTS pins (reference TEXT PRIMARY KEY, added_at REAL NOT NULL)"
    )


def _v3(db: sqlite3.Connection) -> None:
    db.execute(
        "CREATE TABLE IF NOT EXISTS tag_pulls (registry TEXT NOT NULL, repository TEXT NOT NULL,"
        " tag TEXT NOT NULL, pulls INTEGER NOT NULL, PRIMARY KEY (registry, repository, tag))"
    )


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_v1, _v2, _v3]
VERSION = len(MIGRATIONS)


def migrate(db: sqlite3.Connection) -> int:
    """Bring ``db`` to :data:`VERSION`; the version it was at."""
    (found,) = db.execute("PRAGMA user_version").fetchone()
    if found > VERSION:
        raise NewerSchema(
            f"the metadata store is at schema v{found}, newer than this mirror (v{VERSION})"
        )
    for version in range(found, VERSION):
        with db:
            MIGRATIONS[version](db)
            db.execute(f"PRAGMA user_version = {version + 1}")
    return int(found)
