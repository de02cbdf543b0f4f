"""Prometheus metrics, kept in a registry of the app's own (no module-level state)."""

from __future__ import annotations

import asyncio
import math
import os
from bisect import bisect_left
from collections.abc import Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    multiprocess,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

# Routes as the access log and mirror_requests_total name them.
ROUTES = ("manifest", "blob", "tags", "referrers", "ops", "status", "other")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(
        self, registry: CollectorRegistry | None = None, *, upstreams: Iterable[str] = ()
    ) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        # Requests answered since the last flush: counts by labels; per route, counts by
        # duration bucket and (last) the sum of the durations.
        self._tally: dict[tuple[str, str, int, str], int] = {}
        self._shared = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))  # --workers
        self._durations: dict[str, list[float]] = {}
        self._served: dict[str, int] = {}  # blob bytes by source
        self.requests = Counter(
            "mirror_requests",
            "Client requests by route, method, status and cache outcome.",
            ["route", "method", "status", "cache"],
            registry=self.registry,
        )
        self.upstream_requests = Counter(
            "mirror_upstream_requests",
            "Requests sent to upstream registries, by kind and status.",
            ["upstream", "kind", "status"],
            registry=self.registry,
        )
        self.ratelimit_remaining = Gauge(
            "mirror_upstream_ratelimit_remaining",
            "The last ratelimit-remaining an upstream announced (Docker Hub's pull quota).",
            ["upstream"],
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.ratelimit_limit = Gauge(
            "mirror_upstream_ratelimit_limit",
            "The last ratelimit-limit an upstream announced.",
            ["upstream"],
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.circuit_open = Gauge(
            "mirror_upstream_circuit_open",
            "1 while the circuit breaker keeps requests away from an unreachable upstream.",
            ["upstream"],
            registry=self.registry,
            multiprocess_mode="max",
        )
        self.bytes_served = Counter(
            "mirror_blob_bytes_served",
            "Blob bytes sent to clients, from the cache or while arriving from upstream.",
            ["source"],
            registry=self.registry,
        )
        self.fills_in_flight = Gauge(
            "mirror_blob_fills_in_flight",
            "Blob downloads from upstream under way, and blobs still landing in object storage "
            "(summed over worker processes).",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.request_duration = Histogram(
            "mirror_request_duration_seconds",
            "Time to answer a request, by route (a blob's includes sending it).",
            ["route"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        for route in ROUTES:
            self.request_duration.labels(route)
        self.ready = Gauge(
            "mirror_ready",
            "1 while /readyz would answer ready (the data dir is usable); 0 otherwise.",
            registry=self.registry,
            multiprocess_mode="min",
        )
        self.ready.set(1)
        self.store_degraded = Gauge(
            "mirror_store_degraded",
            "1 while the metadata store (Redis or the embedded one) is failing and the mirror "
            "answers from memory.",
            registry=self.registry,
            multiprocess_mode="max",
        )
        self.store_degraded.set(0)
        self.disk_free = Gauge(
            "mirror_disk_free_bytes",
            "Free bytes on the data dir's filesystem.",
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.disk_total = Gauge(
            "mirror_disk_total_bytes",
            "Size of the data dir's filesystem.",
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.logins = Counter(
            "mirror_logins",
            "Logins not verified before, by result: ok, failed (a wrong password, or one "
            "over 72 bytes), throttled (refused with no check), unavailable (the password "
            "file unreadable).",
            ["result"],
            registry=self.registry,
        )
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # CPU, memory, open files of this process (one process: workers are summed
            # by name only for the mirror's own metrics).
            ProcessCollector(registry=self.registry)
        self.offline = Gauge(
            "mirror_offline",
            "1 when the mirror runs offline (serve --offline): no upstream is ever contacted.",
            registry=self.registry,
            multiprocess_mode="max",
        )
        self.offline.set(0)
        self._cache_metrics()
        for name in upstreams:
            self._upstream_known(name)

    def _cache_metrics(self) -> None:
        """The disk budget (``mirror.services.eviction``): written by the process that runs the
        evictor, so across workers the most recent value is the answer."""

        def gauge(name: str, documentation: str) -> Gauge:
            return Gauge(
                name, documentation, registry=self.registry, multiprocess_mode="mostrecent"
            )

        self.cache_bytes = gauge("mirror_cache_bytes", "Bytes of blobs on disk.")
        self.cache_blobs = gauge("mirror_cache_blobs", "Blobs on disk.")
        self.cache_budget = gauge(
            "mirror_cache_budget_bytes", "The disk budget for blobs (NaN: none)."
        )
        self.pinned_bytes = gauge("mirror_pinned_bytes", "Bytes of blobs that pinned images need.")
        self.pins_over_budget = gauge(
            "mirror_pins_over_budget", "1 while pinned content alone exceeds the budget."
        )
        self.evictions = Counter(
            "mirror_evictions",
            "Blobs evicted, by reason: budget, free_space or unused.",
            ["reason"],
            registry=self.registry,
        )
        self.evicted_bytes = Counter(
            "mirror_evicted_bytes", "Bytes of blobs evicted.", registry=self.registry
        )
        self.storage_requests = Counter(
            "mirror_storage_requests",
            "Requests to object storage, by operation (get_object, upload_part, ...) and"
            " result: ok, not_found, refused (4xx), failed (5xx) or unreachable.",
            ["op", "result"],
            registry=self.registry,
        )
        self.storage_duration = Histogram(
            "mirror_storage_request_duration_seconds",
            "Time object storage took to answer, by operation (a GET's until its headers).",
            ["op"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.cache_budget.set(math.nan)
        for reason in ("budget", "free_space", "unused"):
            self.evictions.labels(reason)

    def _upstream_known(self, name: str) -> None:
        """Every upstream gauge has a sample from the start: a circuit closed, a quota not
        yet announced (NaN), rather than series that appear only after the first answer."""
        self.circuit_open.labels(name).set(0)
        self.ratelimit_remaining.labels(name).set(math.nan)
        self.ratelimit_limit.labels(name).set(math.nan)

    def count_request(
        self, route: str, method: str, status: int, cache: str, seconds: float
    ) -> None:
        """One answered request, counted by route, method, status and cache outcome, its
        duration observed by route. Tallied here and handed to prometheus-client by
        ``flush``, before a render or (--workers) once per turn of the event loop: its every
        update takes a lock, and a histogram's walks the buckets in Python, which together
        cost more than answering a cached manifest."""
        self._flush_soon()
        key = (route, method, status, cache)
        self._tally[key] = self._tally.get(key, 0) + 1
        durations = self._durations.get(route)
        if durations is None:
            durations = self._durations[route] = [0.0] * (len(LATENCY_BUCKETS) + 2)
        durations[bisect_left(LATENCY_BUCKETS, seconds)] += 1  # the last but one is +Inf
        durations[-1] += seconds

    def count_bytes_served(self, source: str, sent: int) -> None:
        """Blob bytes sent to a client, tallied like ``count_request``."""
        self._flush_soon()
        self._served[source] = self._served.get(source, 0) + sent

    def _flush_soon(self) -> None:
        """With --workers another worker may render the shared files at any moment: the
        first tally after a flush has the next one run as soon as the event loop has run
        what is ready now."""
        if self._shared and not self._tally and not self._served:
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Hand the tallied requests to prometheus-client."""
        served, self._served = self._served, {}
        for source, sent in served.items():
            self.bytes_served.labels(source).inc(sent)
        tally, self._tally = self._tally, {}
        for (route, method, status, cache), count in tally.items():
            self.requests.labels(route, method, str(status), cache).inc(count)
        durations, self._durations = self._durations, {}
        for route, counts in durations.items():
            child = self.request_duration.labels(route)
            # prometheus-client has no call to observe many at once: add to its buckets
            # (one each, cumulated when collected) and sum as observe() itself does.
            for bucket, observed in zip(child._buckets, counts[:-1], strict=True):
                if observed:
                    bucket.inc(observed)
            child._sum.inc(counts[-1])

    def render(self) -> bytes:
        self.flush()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # Several workers (--workers): sum what every process wrote to the shared dir.
            merged = CollectorRegistry()
            # prometheus-client ships without annotations for this class.
            multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
            return generate_latest(merged)
        return generate_latest(self.registry)
