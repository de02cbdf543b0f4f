"""The offline subcommands: each opens the engine on the data dir, does its work, and
returns an exit code. Printing is here; the work is in the modules they call."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from mirror.config import Settings
from mirror.domain.pins import Pin, split_image
from mirror.engine import open_engine
from mirror.logs import configure
from mirror.services import bundle, inventory, maintenance
from mirror.services.inventory import human_size, image_size
from mirror.services.layout import DEFAULT_BOUNDS, Bounds, LayoutError
from mirror.services.progress import Board, amount, bar
from mirror.services.seed import Seeded, seed


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


async def seed_images(
    settings: Settings,
    references: Sequence[str],
    *,
    platforms: Sequence[str],
    jobs: int,
    pin: bool,
    referrers: bool = True,
) -> int:
    configure("warning", settings.log_format)
    # The operator names these images: the bound on lookups of unknown names is for clients.
    settings = dataclasses.replace(settings, cold_lookup_rate=0.0)
    display: _SeedDisplay = _SeedBars(len(references)) if sys.stderr.isatty() else _SeedLines()
    async with open_engine(settings) as engine:
        results = await seed(
            engine,
            references,
            platforms=platforms,
            jobs=jobs,
            pin=pin,
            referrers=referrers,
            progress=display,
        )
    display.close()
    failed = [r for r in results if not r.ok]
    fetched = sum(r.fetched for r in results)
    print(
        f"seeded {len(results) - len(failed)} of {len(results)} images,"
        f" {human_size(fetched)} fetched"
        + (" (pinned)" if pin and len(failed) < len(results) else "")
    )
    for result in failed:
        print(f"failed {result.reference}: {result.error}", file=sys.stderr)
    return 1 if failed else 0


def _seed_line(result: Seeded) -> str:
    if not result.ok:
        return f"{result.reference}  FAILED  {result.error}"
    return (
        f"{result.reference}  {result.digest}  {human_size(result.size)}"
        f"  fetched {human_size(result.fetched)}"
        + (f"  {result.referrers} referrers" if result.referrers else "")
    )


class _SeedDisplay:
    def image_started(self, seeded: Seeded) -> None:
        return None

    def bytes_known(self, seeded: Seeded, size: int) -> None:
        return None

    def bytes_done(self, seeded: Seeded, size: int) -> None:
        return None

    def image_done(self, seeded: Seeded) -> None:
        return None

    def close(self) -> None:
        return None


class _SeedLines(_SeedDisplay):
    """Off a terminal: one line per image as it finishes (reference, digest, size, fetched)."""

    def image_done(self, seeded: Seeded) -> None:
        print(_seed_line(seeded), flush=True)


class _SeedBars(_SeedDisplay):
    """On a terminal: bytes and images overall, and a bar per image in flight."""

    def __init__(self, images: int) -> None:
        self._board = Board()
        self._images = images
        self._finished = 0
        self._sizes: dict[int, tuple[int, int]] = {}  # id(seeded) -> (done, total)

    def image_started(self, seeded: Seeded) -> None:
        self._sizes[id(seeded)] = (0, 0)
        self._draw(seeded)

    def bytes_known(self, seeded: Seeded, size: int) -> None:
        done, _ = self._sizes[id(seeded)]
        self._sizes[id(seeded)] = (done, size)
        self._draw(seeded)

    def bytes_done(self, seeded: Seeded, size: int) -> None:
        done, total = self._sizes[id(seeded)]
        self._sizes[id(seeded)] = (done + size, total)
        self._draw(seeded)

    def image_done(self, seeded: Seeded) -> None:
        self._finished += 1
        self._board.drop(seeded.reference)
        self._board.print(_seed_line(seeded))
        self._draw(None)

    def close(self) -> None:
        self._board.close()

    def _draw(self, seeded: Seeded | None) -> None:
        if seeded is not None:
            done, total = self._sizes[id(seeded)]
            self._board.item(seeded.reference, done, total)
        done = sum(d for d, _ in self._sizes.values())
        total = sum(t for _, t in self._sizes.values())
        self._board.overall(
            f"seeding: {self._finished}/{self._images} images  {amount(done, total)}"
        )


def _byte_bar(verb: str) -> tuple[Callable[[int], None], Callable[[int], None], Board | None]:
    """(set the total, count bytes done, the board) for a progress bar on a terminal."""
    if not sys.stderr.isatty():
        return (lambda size: None), (lambda size: None), None
    board = Board()
    state = [0, 0]

    def show() -> None:
        board.overall(f"{verb} {bar(state[0], state[1])} {amount(state[0], state[1])}")

    def total(size: int) -> None:
        state[1] = size
        show()

    def done(size: int) -> None:
        state[0] += size
        show()

    return total, done, board


async def export_bundle(
    settings: Settings,
    output: Path,
    patterns: Sequence[Pin],
    *,
    since: Path | None,
    allow_missing: bool = False,
    referrers: bool = True,
) -> int:
    if _no_data(settings):
        return 1
    total, done, board = _byte_bar("exporting")
    # Nothing here talks to an upstream.
    async with open_engine(dataclasses.replace(settings, offline=True)) as engine:
        try:
            report = await bundle.export(
                engine,
                output,
                patterns,
                since=since,
                allow_missing=allow_missing,
                referrers=referrers,
                total=total,
                progress=done,
            )
        except (LayoutError, OSError) as exc:
            if board is not None:
                board.close()
            print(f"mirror: error: {exc}", file=sys.stderr)
            return 1
    if board is not None:
        board.close()
    if report.written:
        _print_export(report, output, since)
    # What is missing comes last, where it is read.
    for reference, why in report.missing:
        print(f"missing {reference}: {why}", file=sys.stderr)
    if report.written:
        return 0
    print(f"mirror: error: {_not_written(report, allow_missing)}", file=sys.stderr)
    return 1


def _not_written(report: bundle.ExportReport, allow_missing: bool) -> str:
    if not report.missing:
        return "no cached image to export"
    images = len(report.exported) + len(report.missing)
    if allow_missing or not report.exported:
        return "no image has all its blobs on disk, nothing written: seed them again"
    return (
        f"{len(report.missing)} of {images} images are missing blobs, nothing written:"
        " seed them again (mirror seed REF), or --allow-missing to export the rest"
    )


def _print_export(report: bundle.ExportReport, output: Path, since: Path | None) -> None:
    for content in report.exported:
        size = image_size(content.blobs)
        print(f"exported {content.reference}  {content.top.digest}  {human_size(size)}")
        if content.absent_children:
            print(
                f"note {content.reference}: not held, not exported: "
                + ", ".join(content.absent_children)
            )
    for note in report.notes:
        print(f"note {note}")
    delta = f", {report.held_before} left out (in {since})" if since is not None else ""
    print(
        f"wrote {output}: {len(report.exported)} images, {report.blobs} blobs"
        f" ({human_size(report.bytes)}){delta}; sha256 {report.sha256}"
    )


async def import_bundles(
    settings: Settings,
    paths: Sequence[Path],
    *,
    pin: bool,
    repository: str | None = None,
    trust_held_blobs: bool = False,
    bounds: Bounds = DEFAULT_BOUNDS,
) -> int:
    configure("warning", settings.log_format)
    failures = 0
    async with open_engine(dataclasses.replace(settings, offline=True)) as engine:
        for path in paths:
            total, done, board = _byte_bar(f"importing {path.name}")
            try:
                report = await bundle.import_layout(
                    engine,
                    path,
                    pin=pin,
                    repository=repository,
                    trust_held_blobs=trust_held_blobs,
                    bounds=bounds,
                    total=total,
                    progress=done,
                )
            except (LayoutError, OSError) as exc:
                if board is not None:
                    board.close()
                print(f"mirror: error: {exc}", file=sys.stderr)
                failures += 1
                continue
            if board is not None:
                board.close()
            failures += _print_import(path, report)
    return 1 if failures else 0


def _print_import(path: Path, report: bundle.ImportReport) -> int:
    failed = 0
    for image in report.images:
        if image.ok:
            print(
                f"imported {image.reference}  {image.digest}"
                f"  {image.blobs} blobs ({human_size(image.size)})"
            )
        else:
            failed += 1
            print(f"failed {image.reference}: {image.error}", file=sys.stderr)
        for note in image.notes:
            print(f"note {image.reference}: {note}")
    print(
        f"{path}: imported {len(report.images) - failed} of {len(report.images)} images;"
        f" {report.written} blobs copied in ({human_size(report.bytes)}),"
        f" {report.present} already held"
    )
    return failed


async def unpin(settings: Settings, references: Sequence[str]) -> int:
    """Take pins that ``seed`` and ``import`` stored off images (``docker pull`` names)."""
    if _no_data(settings):
        return 1
    missing = 0
    async with open_engine(dataclasses.replace(settings, offline=True)) as engine:
        stored = set(await engine.store.pins())
        for reference in references:
            name = str(split_image(reference))
            if name in stored and await engine.store.remove_pins([name]):
                print(f"unpinned {name}")
            elif any(pin.text == reference for pin in settings.pins):
                print(f"{reference} is pinned by the configuration (pins)", file=sys.stderr)
                missing += 1
            else:
                print(f"{name} is not pinned", file=sys.stderr)
                missing += 1
    return 1 if missing else 0
