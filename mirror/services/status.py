"""What the status page (``GET /``) and ``GET /status.json`` say, for all workers at once.

- Request and byte totals come from the metrics, which ``--workers`` already sums across
  processes (``mirror.metrics``): whichever worker answers reads the same totals.
- The last hour is a sample of those totals every minute, kept in memory: the page shows
  requests and the hit ratio per minute, and the hour's totals are the difference between
  the oldest sample and now. A worker that starts later knows a shorter hour.
- The most pulled images come from the content graph (pull counts per tag, written in
  batches like the last-pull times); the disk from the graph and the filesystem.
- The last upstream errors are lines in ``<data_dir>/run/upstream-errors.jsonl`` that every
  process of the host appends to (:class:`RecentErrors`), at most one per kind and cause
  every few seconds, and which is cut back to its last lines as it grows.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import structlog
from prometheus_client.parser import text_string_to_metric_families

from mirror import __version__
from mirror.logs import LogThrottle

if TYPE_CHECKING:
    from mirror.engine import Engine

SAMPLE_INTERVAL = 60.0
HOUR = 3600.0
ERRORS_KEPT = 50
ERRORS_FILE_LINES = 200
TOP_IMAGES = 10

log = structlog.get_logger(__name__)
# Cache outcomes that answered without a fetch from upstream.
SERVED_FROM_CACHE = frozenset({"hit", "revalidated", "coalesced", "stale"})
STARTED_FILE = "started_at"


@dataclass(frozen=True, slots=True)
class Totals:
    at: float
    requests: float  # manifest and blob requests answered
    hits: float  # ... of which from the cache
    cache_bytes: float
    upstream_bytes: float
    pulls_saved: float  # manifest GETs answered with no upstream GET

    def minus(self, earlier: Totals) -> Totals:
        return Totals(
            self.at,
            self.requests - earlier.requests,
            self.hits - earlier.hits,
            self.cache_bytes - earlier.cache_bytes,
            self.upstream_bytes - earlier.upstream_bytes,
            self.pulls_saved - earlier.pulls_saved,
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "requests": int(self.requests),
            "hits": int(self.hits),
            "hit_ratio": round(self.hits / self.requests, 4) if self.requests else None,
            "bytes_from_cache": int(self.cache_bytes),
            "bytes_from_upstream": int(self.upstream_bytes),
            "upstream_pulls_saved": int(self.pulls_saved),
        }


def totals(exposition: bytes, at: float) -> Totals:
    """The totals in a Prometheus text exposition of the mirror's metrics."""
    requests = hits = cache_bytes = upstream_bytes = saved = 0.0
    for family in text_string_to_metric_families(exposition.decode()):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "mirror_requests_total":
                if labels.get("route") not in ("manifest", "blob"):
                    continue
                if not labels.get("status", "").startswith("2"):
                    continue
                requests += sample.value
                if labels.get("cache") in SERVED_FROM_CACHE:
                    hits += sample.value
                    if labels.get("route") == "manifest" and labels.get("method") == "GET":
                        saved += sample.value
            elif sample.name == "mirror_blob_bytes_served_total":
                if labels.get("source") == "cache":
                    cache_bytes += sample.value
                else:
                    upstream_bytes += sample.value
    return Totals(at, requests, hits, cache_bytes, upstream_bytes, saved)


class History:
    """Samples of the totals, a minute apart, for the last hour."""

    def __init__(
        self, read: Callable[[], Totals], started: float, interval: float = SAMPLE_INTERVAL
    ) -> None:
        self._read = read
        self._started = started  # the service's start: every total was zero then
        self._interval = interval
        self._samples: deque[Totals] = deque(maxlen=int(HOUR / interval) + 1)

    def sample(self) -> None:
        self._samples.append(self._read())

    async def run(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # a sample missed is a gap, not a failure
                await asyncio.to_thread(self.sample)
            await asyncio.sleep(self._interval)

    def last_hour(self, now: Totals) -> tuple[Totals, list[dict[str, Any]]]:
        """The hour's totals, and per interval: requests, hits."""
        samples = [*self._samples, now]
        if now.at - self._started <= HOUR:
            # The service's first hour: every total was zero at its start, whenever this
            # process (one worker of several, perhaps) took its first sample.
            samples = [Totals(self._started, 0, 0, 0, 0, 0), *samples[1:]]
        hour = now.minus(samples[0])
        chart = []
        for earlier, later in itertools.pairwise(samples):
            delta = later.minus(earlier)
            chart.append(
                {"at": round(later.at), "requests": int(delta.requests), "hits": int(delta.hits)}
            )
        return hour, chart


class RecentErrors:
    """The last upstream errors of every process on the host, in one small file."""

    def __init__(self, run_dir: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = run_dir / "upstream-errors.jsonl"
        self._clock = clock
        self._throttle = LogThrottle(10.0)

    def add(self, upstream: str, kind: str, error: str) -> None:
        if self._throttle.admit((upstream, kind, error[:80])) is None:
            return
        line = json.dumps(
            {"at": round(self._clock(), 3), "upstream": upstream, "kind": kind, "error": error}
        )
        with contextlib.suppress(OSError):  # the page loses a line; the pull loses nothing
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as file:
                file.write(line + "\n")
                grown = file.tell() > ERRORS_FILE_LINES * 400
            if grown:
                self._cut_back()

    def latest(self, count: int = ERRORS_KEPT) -> list[dict[str, Any]]:
        try:
            lines = self.path.read_text().splitlines()[-count:]
        except OSError:
            return []
        found = []
        for line in reversed(lines):
            with contextlib.suppress(ValueError):
                found.append(json.loads(line))
        return found

    def _cut_back(self) -> None:
        lines = self.path.read_text().splitlines()[-ERRORS_KEPT:]
        partial = self.path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text("".join(line + "\n" for line in lines))
        partial.replace(self.path)


def started_at(run_dir: Path, default: float) -> float:
    """When the service started: the supervisor's time with ``--workers``, else ours."""
    try:
        return float((run_dir / "metrics" / STARTED_FILE).read_text())
    except (OSError, ValueError):
        return default


def disk(data_dir: Path) -> dict[str, int]:
    usage = shutil.disk_usage(data_dir)
    return {"free": usage.free, "total": usage.total}


async def held(engine: Engine) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """What the cache holds (bytes, blobs, and the bucket when blobs are in one) and the
    most pulled images; nothing from the store when it is down: the page says less, it
    still answers."""
    shown: dict[str, Any] = {}
    storage = engine.settings.storage
    if storage is not None:  # blobs in a bucket: which, and whether it answers
        answers = await engine.content.reachable()
        shown["storage"] = {
            "bucket": storage.bucket,
            "endpoint": shown_url(storage.endpoint or "AWS S3"),
            "state": "ok" if answers else "degraded",
        }
    graph = engine.store.graph
    try:
        usage = await graph.usage()
        top = [
            {"image": f"{registry}/{repository}:{tag}", "pulls": pulls}
            for (registry, repository, tag), pulls in await graph.most_pulled(TOP_IMAGES)
        ]
    except Exception as exc:
        log.debug("status_without_store", error=str(exc))
        return shown, []
    return shown | {"used": usage.bytes, "blobs": usage.blobs}, top


async def backends(engine: Engine) -> dict[str, str]:
    """What readiness reports without requiring it: the metadata store and, with blobs in a
    bucket, object storage; each "ok" or "degraded" (the mirror serves what it can)."""
    store = engine.store
    reported = {"store": "ok" if not store.degraded and await store.ping() else "degraded"}
    if not engine.content.local:  # object storage down: blobs come from upstream, unstored
        reported["storage"] = "ok" if await engine.content.reachable() else "degraded"
    return reported


def store_degraded(engine: Engine) -> bool:
    """Is the metadata store known down (its outage mode)? For the alerting gauge."""
    return engine.store.degraded


def shown_url(url: str) -> str:
    """An upstream's URL as the page shows it: without a user or password it may carry."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def document(
    *,
    started: float,
    now: Totals,
    hour: Totals,
    chart: list[dict[str, Any]],
    upstreams: dict[str, Any],
    offline: bool,
    disk_state: dict[str, Any],
    top_images: Iterable[dict[str, Any]],
    errors: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "version": __version__,
        "started_at": round(started, 3),
        "uptime_seconds": round(now.at - started, 1),
        "offline": offline,
        "upstreams": upstreams,
        "since_start": now.as_json(),
        "last_hour": hour.as_json(),
        "chart": chart,
        "disk": disk_state,
        "top_images": list(top_images),
        "upstream_errors": errors,
    }
