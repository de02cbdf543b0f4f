"""The offline subcommands: each opens the engine on the data dir, does its work, and
returns an exit code. Printing is here; the work is in the modules they call."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from mirror import inventory, maintenance
from mirror.config import Settings
from mirror.engine import open_engine
from mirror.logs import configure
from mirror.pins import Pin


def _no_data(settings: Settings) -> bool:
    configure("warning", settings.log_format)  # the command's output, not the log
    if settings.redis_url is None and not (settings.data_dir / "metadata.sqlite3").exists():
        print(f"mirror: error: no mirror data in {settings.data_dir}", file=sys.stderr)
        return True
    return False


async def ls(settings: Settings, pattern: Pin | None, *, as_json: bool) -> int:
    if _no_data(settings):
        return 1
    async with open_engine(settings) as engine:
        rows = await inventory.list_images(engine, pattern)
    if as_json:
        print(inventory.as_json(rows))
    elif rows:
        print(inventory.as_table(rows))
    else:
        print("no cached images" + (f" match {pattern.text}" if pattern else ""), file=sys.stderr)
    return 0


async def gc(settings: Settings, *, dry_run: bool) -> int:
    if _no_data(settings):
        return 1
    async with open_engine(settings) as engine:
        report = await maintenance.gc(engine, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for digest, size in report.blobs:
        print(f"{verb} {digest} ({inventory.human_size(size)}): no cached image needs it")
    print(
        f"{verb} {len(report.blobs)} unreferenced blobs ({inventory.human_size(report.freed)})"
        f" and {report.partials} partial files of interrupted downloads"
    )
    return 0


async def verify(settings: Settings, *, repair: bool) -> int:
    if _no_data(settings):
        return 1
    async with open_engine(settings) as engine:
        report = await maintenance.verify(engine, repair=repair, progress=_progress_line())
    if sys.stderr.isatty():
        print(file=sys.stderr)
    for digest, holders in sorted(report.corrupt.items()):
        needed = ", ".join(sorted(f"{r}/{p}" for r, p in holders)) or "no cached image"
        print(f"corrupt {digest}: needed by {needed}")
    for digest in report.missing:
        print(f"missing {digest}: recorded but not on disk")
    print(
        f"checked {report.checked} blobs ({inventory.human_size(report.bytes)}):"
        f" {len(report.corrupt)} corrupt, {len(report.missing)} missing"
        + (f", {report.repaired} taken out of service" if repair else "")
    )
    return 1 if report.corrupt else 0


def _progress_line() -> Callable[[int, int, int], None]:
    """A progress line on a terminal (stderr), redrawn at most ten times a second."""
    if not sys.stderr.isatty():
        return lambda done, total, size: None
    shown = 0.0

    def show(done: int, total: int, size: int) -> None:
        nonlocal shown
        now = time.monotonic()
        if now - shown < 0.1 and done != total:
            return
        shown = now
        width = 30
        filled = width * done // max(total, 1)
        bar = "#" * filled + "-" * (width - filled)
        line = f"\rverifying [{bar}] {done}/{total} blobs, {inventory.human_size(size)}"
        print(line, end="", file=sys.stderr, flush=True)

    return show
