"""The disk budget: least recently pulled blobs go when the cache outgrows its room.

A pass runs in the background, in one process at a time across workers and replicas
sharing the data dir (a lease), and never holds up a request:

- Over ``max_cache_size``, or with less than ``min_free_space`` free on the data dir's
  filesystem, blobs are removed oldest-pull first (from the content graph's index, never by
  walking the disk) until usage is back under 90% of the budget and free space above the
  floor.
- With ``evict_unused_after``, blobs nobody pulled for that long go even under budget.
- Blobs that a pinned image needs stay, whatever happens; when pins alone exceed the budget
  the log and ``mirror_pins_over_budget`` say so.
- A client reading a blob while it is removed keeps reading it: it holds the file open,
  and removing a name does not take the data from an open file. A blob being filled is not
  yet a blob on disk, so it is never a candidate; nor is one that lands or is pulled
  while the pass runs (the pass takes only blobs last pulled before it began).
- Each removal goes through :class:`~mirror.content.layer.Content`: only the copy the
  pass looked at goes, and its record changes at once, so a fill that lands the blob again
  meanwhile leaves it recorded present.
- The graph is aligned with the disk (a walk of it) on the first pass, on the first pass
  after Redis came back from an outage (the records of blobs that landed meanwhile were
  never written), and on any pass that finds the graph lost the mark of its last
  alignment (a Redis restarted empty or flushed unnoticed): what the graph does not know
  is never evicted, so the disk would outgrow the budget.

Manifests and tags stay (they are small); a later pull fetches only the missing blobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from mirror.content.graph import BlobEntry
from mirror.content.layer import Content
from mirror.content.protocols import MetadataStore
from mirror.domain.pins import Pin, pinned, with_stored
from mirror.domain.reference import Digest
from mirror.domain.units import SizeOrShare
from mirror.logs import LogThrottle
from mirror.metrics import Metrics
from mirror.services.closure import blobs_needed
from mirror.services.coordination import Coordinator

log = structlog.get_logger(__name__)

LOW_WATER = 0.9
PAGE = 500
INTERVAL = 10.0
LEASE = "evictor"


@dataclass(frozen=True, slots=True)
class Budget:
    max_bytes: int | None = None
    min_free: SizeOrShare = field(default_factory=lambda: SizeOrShare(percent=5.0))
    unused_after: float | None = None
    pins: tuple[Pin, ...] = ()

    def keeps(self, size: int) -> bool:
        """May a blob of ``size`` bytes stay on disk at all?"""
        return self.max_bytes is None or size <= self.max_bytes


@dataclass(slots=True)
class Pass:
    ran: bool = False
    removed: int = 0
    freed: int = 0
    short: int = 0  # bytes still to free that pins kept


class Evictor:
    def __init__(
        self,
        *,
        store: MetadataStore,
        content: Content,
        coordinator: Coordinator,
        budget: Budget,
        metrics: Metrics,
        data_dir: Path,
        clock: Callable[[], float] = time.time,
        interval: float = INTERVAL,
        before_pass: Callable[[], Awaitable[None]] | None = None,
        reconciled: bool = False,
    ) -> None:
        self._store = store
        self._content = content
        # Writes the pull times gathered so far (PullRecorder.flush): a pass must not take
        # a blob pulled a moment ago for an old one.
        self._before_pass = before_pass
        self._coordinator = coordinator
        self._budget = budget
        self._metrics = metrics
        self._data_dir = data_dir
        self._clock = clock
        self._interval = interval
        # Why the next pass must align the graph with the disk (a walk of the blob
        # directory) first, if it must: the first pass after start does, unless
        # ``reconciled`` says it is done already.
        self._realign: str | None = None if reconciled else "start"
        self._closed = False
        self._wake = asyncio.Event()
        self._throttle = LogThrottle()
        self._pinning = False  # did the last pass find any pin?
        if budget.max_bytes is not None:
            metrics.cache_budget.set(budget.max_bytes)

    def poke(self) -> None:
        """Something landed on disk: look again now rather than at the next interval."""
        self._wake.set()

    async def make_room(self) -> None:
        """A pass now, for a writer that does not wait for the interval (``import``); it
        fails as a background pass does, with a line in the log."""
        self.poke()
        try:
            await self.run_once()
        except Exception as exc:  # the writer's work is done; the next pass tries again
            log.warning("eviction_failed", error=str(exc))

    def realign(self) -> None:
        """The store is back from an outage, during which landings were not recorded:
        align the graph with the disk in a pass now."""
        self._realign = self._realign or "store_back"
        self.poke()

    def stop(self) -> None:
        """No pass after the one under way (the engine cancels that one)."""
        self._closed = True

    async def run_forever(self) -> None:
        """Passes at the interval, or when poked, until stopped (the engine's background)."""
        # asyncio.timeout rather than wait_for: wait_for can swallow the cancellation that
        # the engine sends when the wake-up lands at the same moment, and then never ends.
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.run_once()
            except Exception as exc:  # a pass that failed is tried again at the next one
                suppressed = self._throttle.admit(type(exc).__name__)
                if suppressed is not None:
                    log.warning("eviction_failed", error=str(exc), suppressed=suppressed)

    async def run_once(self) -> Pass:
        """One pass, if no other process is running one."""
        lease = await self._coordinator.acquire(LEASE)
        if lease is None:
            return Pass()
        try:
            return await self._pass()
        finally:
            await lease.release()

    async def _pass(self) -> Pass:
        if self._before_pass is not None:
            await self._before_pass()
        await self._align()
        result = Pass(ran=True)
        began = self._clock()
        need, reason = await self._bytes_to_free()
        idle_before = (
            self._clock() - self._budget.unused_after if self._budget.unused_after else None
        )
        if need <= 0 and idle_before is None:
            await self._report(result)
            return result
        protected = await self._pinned_blobs()
        async for entry in self._candidates(protected, began):
            if need > 0:
                why = reason
            elif idle_before is not None and entry.last_pulled < idle_before:
                why = "unused"
            else:
                break  # the rest were pulled more recently still
            if await self._remove(Digest.parse(entry.digest)):
                need -= entry.size
                result.removed += 1
                result.freed += entry.size
                self._metrics.evictions.labels(why).inc()
                self._metrics.evicted_bytes.inc(entry.size)
        if result.removed:
            log.info("blobs_evicted", count=result.removed, bytes=result.freed)
        result.short = max(need, 0)
        await self._report(result)
        return result

    async def _align(self) -> None:
        if self._realign is None and not (await self._store.graph.usage()).reconciled:
            self._realign = "records_lost"
        reason = self._realign
        if reason is None:
            return
        if reason != "start":
            log.info("graph_reconciled", reason=reason)
        await self._content.reconcile()
        if self._realign == reason:  # not asked again meanwhile
            self._realign = None

    async def _candidates(self, protected: set[str], began: float) -> AsyncIterator[BlobEntry]:
        """Blobs on disk that no pin needs, least recently pulled first, a page at a time;
        up to those pulled (or landed) since the pass ``began``, which it never takes: the
        need was measured without them, and their landing starts a pass of its own."""
        after: tuple[float, str] | None = None
        while page := await self._store.graph.oldest_blobs(PAGE, after):
            for entry in page:
                if entry.last_pulled > began:
                    return
                if entry.digest not in protected:
                    yield entry
            after = (page[-1].last_pulled, page[-1].digest)

    async def _remove(self, digest: Digest) -> bool:
        """Remove the blob's file as it is now; a record whose file is gone is put right."""
        inspected = await self._content.inspect(digest)
        if inspected is None:
            await self._content.gone(digest)
            return False
        return await self._content.remove(digest, inspected)

    async def _bytes_to_free(self) -> tuple[int, str]:
        usage = await self._store.graph.usage()
        over = 0
        if self._budget.max_bytes is not None and usage.bytes > self._budget.max_bytes:
            over = usage.bytes - int(self._budget.max_bytes * LOW_WATER)
        disk = await asyncio.to_thread(shutil.disk_usage, self._data_dir)
        floor = self._budget.min_free.of(disk.total)
        short = int(floor / LOW_WATER) - disk.free if disk.free < floor else 0
        if short > over:
            return short, "free_space"
        return over, "budget"

    async def _pinned_blobs(self) -> set[str]:
        return set(await self.pinned())

    async def pinned(self) -> dict[str, int]:
        """Every blob a pinned image needs, with its size: what eviction never removes."""
        pins = with_stored(self._budget.pins, await self._store.pins())
        self._pinning = bool(pins)
        needed: dict[str, int] = {}
        store = self._store
        for pin in pins:
            name = pin.pattern
            if name.digest is not None:  # one manifest, named exactly
                needed.update(
                    await blobs_needed(store, name.registry, name.repository, name.digest)
                )
        by_tag = [pin for pin in pins if pin.pattern.digest is None]
        for tagged in await self._store.list_tags() if by_tag else []:
            if pinned(by_tag, tagged.registry, tagged.repository, tagged.tag):
                digest = tagged.record.digest
                needed.update(await blobs_needed(store, tagged.registry, tagged.repository, digest))
        self._metrics.pinned_bytes.set(sum(needed.values()))
        return needed

    async def _report(self, result: Pass) -> None:
        usage = await self._store.graph.usage()
        self._metrics.cache_bytes.set(usage.bytes)
        self._metrics.cache_blobs.set(usage.blobs)
        self._metrics.pins_over_budget.set(1 if result.short > 0 and self._pinning else 0)
        if result.short > 0:
            suppressed = self._throttle.admit("short")
            if suppressed is not None:
                log.warning(
                    "budget_exceeded_by_pins",
                    usage=usage.bytes,
                    budget=self._budget.max_bytes,
                    still_to_free=result.short,
                    suppressed=suppressed,
                )
