"""A soak run: a real mirror under a site's mix of pulls and upstream faults, for minutes.

    python -m tests.support.soak --minutes 30 [--out samples.csv] [--svg plot.svg]

Starts a real redis-server, a fake Docker Hub (in this process, so faults are switched on
and off by setting its attributes) and ``mirror serve --workers 2`` sharing that Redis, with
``--max-cache-size`` well below what the run pulls, so eviction works all the time. Clients
then pull as a site does: warm tags over and over, cold tags of images the hub publishes as
the run goes, Range requests, and clients that hang up mid-blob. Meanwhile faults come in
turn: upstream 429s, 5xx, a blob transfer that hangs, the hub down, Redis restarted (empty).

Every 10 s it samples the RSS (summed over the supervisor and its workers) and open
descriptors from /proc. The run fails (exit 1, saying why) when:

- the RSS at the end of the load is more than 10% above the first sample after the warm-up;
- the descriptors, once the load stops and keep-alive connections close, stay above the
  baseline taken after the priming pass (the connection pools at their working size). The
  Redis pool's connections are counted apart, sampled and plotted but not judged: redis-py
  keeps as many as the busiest moment needed, and a Redis restart drops them;
- a body that arrived whole does not match its digest (every blob, every Range slice);
- a 5xx is not 502/503/504 with the registry's JSON error body, or a request gets no answer.

``scripts/soak`` runs it; a test runs two minutes of it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

from tests.support.fakehub import FakeHub
from tests.support.oci import DOCKER_MANIFEST, OCI_MANIFEST, Image, make_image, make_random_layer
from tests.support.process import MirrorProcess
from tests.support.redis_server import RedisServer

MiB = 1024 * 1024
BUDGET = 12 * MiB  # --max-cache-size
INTERVAL = 10.0  # seconds between samples
RSS_GROWTH = 0.10  # the most RSS may grow after the warm-up
ANSWER_TIMEOUT = 60.0  # the mirror's --read-timeout is 5 s: an answer must come well before
UPSTREAM_STATUSES = (502, 503, 504)
ACCEPT = ", ".join((OCI_MANIFEST, DOCKER_MANIFEST))
WARM_IMAGES = 8
COLD_KEPT = 6  # the hub keeps this many cold images; older ones are unpublished
CLIENTS = 6
THINK = 0.05  # seconds a client pauses between requests: load, not a flood
FAULT_EVERY = 12.0
DRAIN_TIMEOUT = 60.0  # how long the descriptors get to return to the baseline


@dataclass
class Sample:
    seconds: float
    phase: str  # "warm-up", "load" or "idle"
    rss_mib: float
    fds: int  # all of them, the Redis pool's connections included
    redis: int  # connections to Redis (the pool keeps those of its busiest moment)
    processes: int
    requests: int
    disk_mib: float = 0.0  # blobs on disk (the budget is BUDGET); not judged, see run()


@dataclass
class Report:
    minutes: float
    samples: list[Sample] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    upstream: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    fd_baseline: int = 0
    fd_leaked: Counter[str] = field(default_factory=Counter)  # open at the end, not before
    fd_end: int = 0
    rss_start: float = 0.0
    rss_end: float = 0.0
    tracebacks: int = 0

    @property
    def failures(self) -> list[str]:
        found = []
        if self.rss_start and self.rss_end > self.rss_start * (1 + RSS_GROWTH):
            growth = (self.rss_end / self.rss_start - 1) * 100
            found.append(
                f"RSS grew {growth:.1f}% after the warm-up"
                f" ({self.rss_start:.1f} -> {self.rss_end:.1f} MiB; the limit is 10%)"
            )
        if self.fd_end > self.fd_baseline:  # both without the Redis pool's connections
            found.append(
                f"descriptors did not return to the baseline: {self.fd_end} open at the end,"
                f" {self.fd_baseline} after the priming pass; more than then: "
                + ", ".join(f"{n} {kind}" for kind, n in self.fd_leaked.most_common())
            )
        if self.violations:
            found.append(f"{len(self.violations)} wrong answers, first: {self.violations[0]}")
        if self.tracebacks:
            found.append(f"{self.tracebacks} tracebacks in the mirror's log")
        return found

    def table(self) -> str:
        lines = [
            f"{'time':>7} {'phase':<8} {'RSS MiB':>8} {'fds':>5} {'redis':>5} {'procs':>5}"
            f" {'requests':>9} {'disk MiB':>8}"
        ]
        lines += [
            f"{s.seconds:7.0f} {s.phase:<8} {s.rss_mib:8.1f} {s.fds:5d} {s.redis:5d}"
            f" {s.processes:5d} {s.requests:9d} {s.disk_mib:8.1f}"
            for s in self.samples
        ]
        return "\n".join(lines)

    def render(self) -> str:
        lines = [
            self.table(),
            "outcomes: " + ", ".join(f"{k}={v}" for k, v in sorted(self.outcomes.items())),
            "faults: " + ", ".join(f"{k}={v}" for k, v in sorted(self.faults.items())),
            "upstream requests: " + ", ".join(f"{k}={v}" for k, v in sorted(self.upstream.items())),
            f"RSS after the warm-up {self.rss_start:.1f} MiB, at the end of the load"
            f" {self.rss_end:.1f} MiB; descriptors (besides Redis connections) after priming"
            f" {self.fd_baseline}, at the end {self.fd_end}",
        ]
        lines += [f"  {text}" for text in self.violations[:20]]
        failures = self.failures
        lines.append("FAIL: " + "; ".join(failures) if failures else "PASS")
        return "\n".join(lines)

    def write(self, path: Path) -> None:
        rows = [asdict(sample) for sample in self.samples]
        if path.suffix == ".json":
            path.write_text(json.dumps({"samples": rows, "failures": self.failures}, indent=1))
            return
        with path.open("w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["seconds"])
            writer.writeheader()
            writer.writerows(rows)


# -- /proc ---------------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (the supervisor, its workers and their helpers)."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                children = Path(f"/proc/{current}/task/{task}/children").read_text().split()
                queue += [int(child) for child in children]
    return found


def measure(pid: int, sockets: Sockets) -> tuple[float, int, int, int]:
    """(RSS in MiB, open descriptors, connections to Redis, processes) over ``pid``'s tree."""
    rss_kib = fds = count = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{member}/status").read_text()
            rss_kib += next(
                int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")
            )
            fds += len(os.listdir(f"/proc/{member}/fd"))
            count += 1
    redis = open_files(pid, sockets)["socket to redis"]
    return rss_kib / 1024, fds, redis, count


class Sockets:
    """Names sockets by the port at their other end (``names``: port -> what listens there).

    A name, once known, stays with its socket: a connection whose peer went away (Redis
    restarted) leaves the kernel's tables while the process may still hold it open, and
    it must still count as what it was.
    """

    def __init__(self, names: dict[int, str]) -> None:
        self.names = names
        self.known: dict[str, str] = {}  # inode -> name

    def name(self, inode: str, peers: dict[str, int]) -> str:
        if inode in peers:
            port = peers[inode]
            self.known[inode] = (
                f"socket to {self.names.get(port, port)}" if port else "listening socket"
            )
        return self.known.get(inode, "socket of a connection already closed (peer unknown)")


def open_files(pid: int, sockets: Sockets) -> Counter[str]:
    """What the descriptors of ``pid``'s tree point at: files, pipes, and sockets by what
    is at their other end, for saying what leaked."""
    peers = _socket_peers()
    found: Counter[str] = Counter()
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{member}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{member}/fd/{fd}")
                    if target.startswith("socket:["):
                        target = sockets.name(target[8:-1], peers)
                    found[target] += 1
    return found


def _socket_peers() -> dict[str, int]:
    """Socket inode -> the remote port of a TCP connection (from ``ss``: /proc/net/tcp
    does not list every connection on every kernel)."""
    try:
        listing = subprocess.run(
            ["ss", "-tanHe"], capture_output=True, text=True, check=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    peers = {}
    for line in listing.splitlines():
        fields = line.split()
        inode = next((f[4:] for f in fields if f.startswith("ino:")), None)
        if inode is not None and len(fields) > 4:
            peers[inode] = int(fields[4].rpartition(":")[2].replace("*", "0"))
    return peers


# -- content ---------------------------------------------------------------------------------


class Content:
    """The images the hub serves: warm ones for the whole run, cold ones published as it goes."""

    def __init__(self, hub: FakeHub, rng: random.Random) -> None:
        self.hub = hub
        self.rng = rng
        self.blobs: dict[str, bytes] = {}
        self.warm: list[tuple[str, str, Image]] = []
        self.cold: list[tuple[str, str, Image]] = []
        self.published = 0
        for number in range(WARM_IMAGES):
            self.warm.append(self._add(f"library/warm{number}", "latest", number))

    def _add(self, repository: str, tag: str, seed: int) -> tuple[str, str, Image]:
        # Mostly small layers, now and then one of a few MiB: a hang-up needs a long body.
        big = self.rng.random() < 0.25
        sizes = [self.rng.randint(4, 256) * 1024, (self.rng.randint(2, 4) * MiB if big else 0)]
        layers = [
            make_random_layer(size, seed=seed * 7 + i) for i, size in enumerate(sizes) if size
        ]
        image = make_image(layers, docker=self.rng.random() < 0.5)
        self.hub.add_image(repository, tag, image)
        for blob in image.blobs:
            self.blobs[blob.digest] = blob.data
        return repository, tag, image

    def publish(self) -> None:
        """A new cold image; the oldest one leaves the hub (and the driver's memory)."""
        self.published += 1
        number = self.published
        self.cold.append(self._add(f"cold/app{number % 4}", f"v{number}", 10_000 + number))
        if len(self.cold) > COLD_KEPT:
            repository, tag, image = self.cold.pop(0)
            repo = self.hub.repositories[repository]
            repo.tags.pop(tag, None)
            repo.manifests.pop(image.digest, None)
            for blob in image.blobs:
                repo.blobs.pop(blob.digest, None)
                self.blobs.pop(blob.digest, None)

    def pick(self) -> tuple[str, str, Image]:
        if self.cold and self.rng.random() < 0.3:
            return self.rng.choice(self.cold)
        return self.rng.choice(self.warm)


# -- clients ---------------------------------------------------------------------------------


class Clients:
    def __init__(self, base: str, content: Content, report: Report, rng: random.Random) -> None:
        self.base = base
        self.content = content
        self.report = report
        self.rng = rng
        self.requests = 0

    async def run(self, session: aiohttp.ClientSession, until: float) -> None:
        actions = [self.pull, self.range, self.hang_up, self.head]
        while time.monotonic() < until:
            action = self.rng.choices(actions, [60, 15, 10, 15])[0]
            try:
                await action(session)
            except (aiohttp.ClientError, TimeoutError) as error:
                self.report.outcomes[f"client_error:{type(error).__name__}"] += 1
            await asyncio.sleep(THINK)

    async def _get(
        self, session: aiohttp.ClientSession, path: str, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes] | None:
        """A whole answer, or None when the body came short (a cut the mirror had to make
        because its upstream failed mid-transfer: allowed, counted)."""
        self.requests += 1
        try:
            async with session.get(self.base + path, headers=headers or {}) as response:
                body = await response.read()
                status, got = response.status, dict(response.headers)
        except aiohttp.ClientPayloadError:
            self.report.outcomes["cut_mid_body"] += 1
            return None
        except TimeoutError:
            self.report.violations.append(f"no answer in {ANSWER_TIMEOUT:.0f} s: GET {path}")
            return None
        self._judge(path, status, got, body)
        return status, got, body

    def _judge(self, path: str, status: int, headers: dict[str, str], body: bytes) -> None:
        self.report.outcomes[str(status)] += 1
        if status < 500:
            return
        json_body = "application/json" in headers.get("Content-Type", "") and b'"errors"' in body
        if status not in UPSTREAM_STATUSES or not json_body:
            self.report.violations.append(f"{status} for GET {path}: {body[:200]!r}")

    async def pull(
        self, session: aiohttp.ClientSession, chosen: tuple[str, str, Image] | None = None
    ) -> None:
        repository, tag, image = chosen or self.content.pick()
        got = await self._get(session, f"/v2/{repository}/manifests/{tag}", {"Accept": ACCEPT})
        if got is None or got[0] != 200:
            return
        if got[2] != image.manifest:
            self.report.violations.append(f"manifest {repository}:{tag}: wrong bytes")
            return
        for blob in image.blobs:
            await self.blob(session, repository, blob.digest)

    async def blob(self, session: aiohttp.ClientSession, repository: str, digest: str) -> None:
        got = await self._get(session, f"/v2/{repository}/blobs/{digest}")
        if got is None or got[0] != 200:
            return
        if "sha256:" + hashlib.sha256(got[2]).hexdigest() != digest:
            self.report.violations.append(f"blob {digest} of {repository}: wrong bytes")

    async def range(self, session: aiohttp.ClientSession) -> None:
        repository, _, image = self.content.pick()
        blob = self.rng.choice(image.layers)
        start = self.rng.randrange(blob.size)
        stop = min(blob.size, start + self.rng.randint(1, 256 * 1024))
        path = f"/v2/{repository}/blobs/{blob.digest}"
        got = await self._get(session, path, {"Range": f"bytes={start}-{stop - 1}"})
        if got is None or got[0] not in (200, 206):
            return
        expected = blob.data[start:stop] if got[0] == 206 else blob.data
        if got[2] != expected:
            self.report.violations.append(f"Range {start}-{stop - 1} of {blob.digest}: wrong bytes")

    async def hang_up(self, session: aiohttp.ClientSession) -> None:
        repository, _, image = self.content.pick()
        blob = max(image.layers, key=lambda layer: layer.size)
        self.requests += 1
        async with session.get(f"{self.base}/v2/{repository}/blobs/{blob.digest}") as response:
            self.report.outcomes[str(response.status)] += 1
            if response.status == 200:
                await response.content.read(self.rng.randint(1, 64 * 1024))
                self.report.outcomes["hung_up"] += 1
            response.close()  # drops the connection with the rest of the body unread

    async def head(self, session: aiohttp.ClientSession) -> None:
        repository, tag, _ = self.content.pick()
        self.requests += 1
        url = f"{self.base}/v2/{repository}/manifests/{tag}"
        async with session.head(url, headers={"Accept": ACCEPT}) as response:
            self._judge(url, response.status, dict(response.headers), b'"errors"')


# -- faults ----------------------------------------------------------------------------------


async def inject_faults(hub: FakeHub, redis: RedisServer, report: Report, until: float) -> None:
    """One fault after another, with quiet time between them."""

    async def for_a_while(setting: str, value: object, seconds: float = 4.0) -> None:
        setattr(hub, setting, value)
        try:
            await asyncio.sleep(seconds)
        finally:
            setattr(hub, setting, None if setting == "status_override" else False)

    async def redis_restart() -> None:
        await asyncio.to_thread(redis.stop)
        await asyncio.sleep(2.0)
        await asyncio.to_thread(redis.start)

    async def stall() -> None:
        hub.stall_next_blob_at = 16 * 1024

    faults: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        ("upstream_429", lambda: for_a_while("status_override", 429)),
        ("upstream_500", lambda: for_a_while("status_override", 500)),
        ("blob_hangs", stall),
        ("upstream_503", lambda: for_a_while("status_override", 503)),
        ("redis_restart", redis_restart),
        ("hub_down", lambda: for_a_while("down", True)),
    ]
    turn = 0
    while time.monotonic() + FAULT_EVERY < until:
        await asyncio.sleep(FAULT_EVERY)
        name, fault = faults[turn % len(faults)]
        turn += 1
        report.faults[name] += 1
        await fault()


async def publish_cold(content: Content, until: float, every: float = 5.0) -> None:
    while time.monotonic() + every < until:
        await asyncio.sleep(every)
        await asyncio.to_thread(content.publish)


Probe = tuple[int, Sockets, Path]  # the mirror's PID, its sockets' names, the blob directory


def take(
    pid: int, sockets: Sockets, blobs: Path, seconds: float, phase: str, requests: int
) -> Sample:
    rss, fds, redis, count = measure(pid, sockets)
    return Sample(seconds, phase, rss, fds, redis, count, requests, _size(blobs) / MiB)


def _size(directory: Path) -> int:
    """Bytes in the files under ``directory``; files removed meanwhile (eviction) count 0."""
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, name)).st_size
    return total


async def sample(
    probe: Probe, report: Report, clients: Clients, times: tuple[float, float, float]
) -> None:
    """A sample every INTERVAL; ``probe`` is (the mirror's PID, Redis's port), ``times``
    (start, end, warm-up)."""
    started, until, warm_up = times
    print(report.table().splitlines()[0], flush=True)
    while True:
        now = time.monotonic()
        phase = "warm-up" if now - started < warm_up else "load"
        report.samples.append(take(*probe, now - started, phase, clients.requests))
        print(report.table().splitlines()[-1], flush=True)
        if now + INTERVAL > until:
            return
        await asyncio.sleep(INTERVAL)


def tally_upstream(hub: FakeHub, report: Report) -> None:
    """Count what the hub saw, and forget it: the driver's memory stays flat too."""
    for entry in hub.log:
        report.upstream[f"{entry.server} {entry.status}"] += 1
    hub.log.clear()


async def tally_forever(hub: FakeHub, report: Report) -> None:
    while True:
        await asyncio.sleep(30)
        tally_upstream(hub, report)


# -- the run ---------------------------------------------------------------------------------


async def run(minutes: float, *, work_dir: Path, seed: int = 1, workers: int = 2) -> Report:
    report = Report(minutes)
    rng = random.Random(seed)
    duration = minutes * 60
    warm_up = min(300.0, max(40.0, duration / 4))
    with RedisServer() as redis:
        async with FakeHub() as hub:
            hub.retry_after = "3"  # a 429 fault ends within seconds, not a minute later
            content = Content(hub, rng)
            # Well below what a run pulls: eviction never rests. The blobs' size on disk is
            # sampled but not judged: after Redis restarts empty, the blobs it no longer
            # knows are never evicted, and the disk outgrows the budget (reported).
            process = MirrorProcess(
                work_dir / "data",
                hub.url,
                "--workers", str(workers),
                "--redis-url", redis.url(),
                "--max-cache-size", str(BUDGET),
                "--read-timeout", "5",
                "--log-level", "warning",
                name="soak",
            )  # fmt: skip
            await asyncio.to_thread(process.start)
            try:
                await _drive(process, hub, redis, content, report, duration, warm_up, rng)
            finally:
                await asyncio.to_thread(process.stop)
            report.tracebacks = process.log().count("Traceback (most recent call last)")
            tally_upstream(hub, report)
    return report


async def _drive(
    process: MirrorProcess,
    hub: FakeHub,
    redis: RedisServer,
    content: Content,
    report: Report,
    duration: float,
    warm_up: float,
    rng: random.Random,
) -> None:
    clients = Clients(process.url, content, report, rng)
    timeout = aiohttp.ClientTimeout(total=ANSWER_TIMEOUT)
    connector = aiohttp.TCPConnector(limit=CLIENTS * 2, force_close=False)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        # Priming: every warm image once from every client, so the pools grow to their size.
        prime_until = time.monotonic() + 20
        await asyncio.gather(*(clients.pull(session, image) for image in content.warm * CLIENTS))
        await asyncio.gather(*(clients.run(session, prime_until) for _ in range(CLIENTS)))
    await asyncio.sleep(5)  # the clients' connections close; the mirror notices
    sockets = Sockets(_port_names(process, hub, redis))
    probe = (process.pid, sockets, process.data_dir / "blobs")
    primed = take(*probe, 0.0, "primed", clients.requests)
    report.fd_baseline = primed.fds - primed.redis
    before = open_files(process.pid, sockets)
    started = time.monotonic()
    until = started + duration
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(limit=CLIENTS * 2)
    ) as session:
        background = [
            asyncio.create_task(inject_faults(hub, redis, report, until)),
            asyncio.create_task(publish_cold(content, until)),
            asyncio.create_task(tally_forever(hub, report)),
        ]
        try:
            await asyncio.gather(
                sample(probe, report, clients, (started, until, warm_up)),
                *(clients.run(session, until) for _ in range(CLIENTS)),
            )
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
    load = [s for s in report.samples if s.phase == "load"]
    if load:
        report.rss_start, report.rss_end = load[0].rss_mib, load[-1].rss_mib
    hub.stall_next_blob_at = None
    report.fd_end = await _drain(probe, report.fd_baseline, started, report, clients)
    leaked = open_files(process.pid, sockets) - before
    report.fd_leaked = Counter({k: n for k, n in leaked.items() if k != "socket to redis"})


def _port_names(process: MirrorProcess, hub: FakeHub, redis: RedisServer) -> dict[int, str]:
    def port(url: str) -> int:
        return int(url.rpartition(":")[2].partition("/")[0])

    return {
        redis.port: "redis",
        port(hub.url): "the hub's registry",
        port(hub.token_url): "the hub's token server",
        port(hub.cdn_url): "the hub's CDN",
        process.port: "a client (the mirror's port)",
    }


async def _drain(
    probe: Probe, baseline: int, started: float, report: Report, clients: Clients
) -> int:
    """Wait for the descriptors (but the Redis pool's) to come back to ``baseline``; the
    last count."""
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while True:
        last = take(*probe, time.monotonic() - started, "idle", clients.requests)
        if last.fds - last.redis <= baseline or time.monotonic() > deadline:
            report.samples.append(last)
            return last.fds - last.redis
        await asyncio.sleep(1.0)


PLOT_LEFT, PLOT_TOP, PLOT_GAP = 60, 50, 50


def plot(report: Report, width: int = 720, height: int = 200) -> str:
    """RSS and descriptors over time, as an SVG of two panels (no plotting library needed)."""
    samples = report.samples
    panels = [
        ("RSS (MiB, supervisor + workers)", [s.rss_mib for s in samples], "#1f77b4"),
        (
            "open descriptors (all; of them to Redis: dashed)",
            [float(s.fds) for s in samples],
            "#d62728",
        ),
    ]
    total = 2 * (height + PLOT_GAP) + PLOT_TOP
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{total}"'
        ' font-family="sans-serif" font-size="12">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="{PLOT_LEFT}" y="18" font-size="14">mirror soak: {report.minutes:g} minutes,'
        " --workers 2, faults injected</text>",
    ]
    for number, (title, values, colour) in enumerate(panels):
        top = PLOT_TOP + number * (height + PLOT_GAP)
        parts += _panel(samples, values, title, colour, (top, width, height))
    parts.append(
        f'<text x="{width / 2}" y="{total - 8}" text-anchor="middle">'
        "minutes (dashed: end of the warm-up)</text>"
    )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _panel(
    samples: list[Sample],
    values: list[float],
    title: str,
    colour: str,
    box: tuple[int, int, int],
) -> list[str]:
    top, width, height = box
    left, inner = PLOT_LEFT, width - PLOT_LEFT - 20
    end = max((s.seconds for s in samples), default=1.0) or 1.0
    peak = max(values, default=1.0) * 1.15 or 1.0
    parts = [
        f'<text x="{left}" y="{top - 6}">{title}</text>',
        f'<rect x="{left}" y="{top}" width="{inner}" height="{height}" fill="none" stroke="#999"/>',
    ]
    for tick in range(5):
        y = top + height - height * tick / 4
        parts.append(
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{peak * tick / 4:.0f}</text>'
        )
    step = max(1, int(end // 60) // 10)
    for minute in range(0, int(end // 60) + 1, step):
        x = left + inner * minute * 60 / end
        parts.append(
            f'<text x="{x:.1f}" y="{top + height + 14}" text-anchor="middle">{minute}</text>'
        )
    series = [(values, "")]
    if "Redis" in title:
        series.append(([float(s.redis) for s in samples], ' stroke-dasharray="6 3"'))
    for line, dash in series:
        points = " ".join(
            f"{left + inner * s.seconds / end:.1f},{top + height - height * v / peak:.1f}"
            for s, v in zip(samples, line, strict=True)
        )
        parts.append(
            f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>'
        )
    warm = next((s.seconds for s in samples if s.phase != "warm-up"), None)
    if warm is not None:
        x = left + inner * warm / end
        parts.append(
            f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + height}"'
            ' stroke="#999" stroke-dasharray="4"/>'
        )
    return parts


def read_samples(path: Path, minutes: float) -> Report:
    """A report holding the samples a run wrote with ``--out FILE.csv``."""
    with path.open(newline="") as source:
        rows = list(csv.DictReader(source))
    report = Report(minutes)
    report.samples = [
        Sample(
            float(row["seconds"]),
            row["phase"],
            float(row["rss_mib"]),
            int(row["fds"]),
            int(row["redis"]),
            int(row["processes"]),
            int(row["requests"]),
            float(row.get("disk_mib") or 0.0),
        )
        for row in rows
    ]
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2, help="mirror serve --workers")
    parser.add_argument("--out", type=Path, help="write the samples here (.csv or .json)")
    parser.add_argument("--svg", type=Path, help="plot RSS and descriptors over time here")
    parser.add_argument("--keep", type=Path, help="keep the data dir and the log here")
    parser.add_argument("--replot", type=Path, help="no run: plot the samples of this CSV")
    args = parser.parse_args(argv)
    if args.replot is not None and args.svg is not None:
        args.svg.write_text(plot(read_samples(args.replot, args.minutes)))
        return 0
    with contextlib.ExitStack() as stack:
        work = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        report = asyncio.run(run(args.minutes, work_dir=work, seed=args.seed, workers=args.workers))
    print(report.render())
    if args.out is not None:
        report.write(args.out)
    if args.svg is not None:
        args.svg.write_text(plot(report))
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
