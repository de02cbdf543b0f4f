"""The six figures of issue 6, each measured side by side with its reference in one run.

Each function takes the running ``Lab`` and returns table rows; the numbers behind every
median are kept in the rows' ``samples`` for the JSON.
"""

from __future__ import annotations

import os
import resource
import shutil
import time
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path
from statistics import median

from bench import report
from bench.clients import (
    AccessLog,
    MemoryWatch,
    Request,
    WrkResult,
    fetch,
    fetch_parallel,
    head_load,
    wrk,
)
from bench.content import MANY_LAYERS, Image
from bench.lab import Lab, cpu_ticks, steal_share, supports_workers, wait_stored
from bench.report import Row, row
from bench.services import Mirror, Registry, Service

# The bench drives containerd as the integration tests do.
from tests.support.clients import Containerd, short_tempdir, write_hosts_toml

MIB = 1024 * 1024
ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    )
)


def blob_gets(requests: list[Request], digest: str) -> int:
    return sum(1 for r in requests if r.method == "GET" and r.path.endswith(f"/blobs/{digest}"))


# 1. Warm blob ------------------------------------------------------------------------------


def warm_blob(lab: Lab, mirror: Mirror, proxy: Registry, nginx: Service) -> list[Row]:
    """The large blob, already cached everywhere: mirror vs nginx sendfile vs registry proxy."""
    big = lab.images["big"]
    size = big.layer.size
    urls = {
        name: lab.blob_url(s, big)
        for name, s in (("mirror", mirror), ("nginx", nginx), ("proxy", proxy))
    }
    for url in urls.values():
        fetch(url, expect_size=size)
    wait_stored(proxy, big.layer.digest)
    fetch(urls["proxy"], expect_size=size)  # now from the proxy's own storage
    times: dict[str, list[float]] = {name: [] for name in urls}
    for _ in range(lab.plan.blob_repetitions):
        for name, url in urls.items():  # interleaved, so drift hits every server alike
            times[name].append(fetch(url, expect_size=size).seconds)
    m, n, p = (median(times[name]) for name in ("mirror", "nginx", "proxy"))
    reps = lab.plan.blob_repetitions
    label = f"warm blob {size / MIB:,.0f} MiB: time"
    return [
        row(
            f"{label} vs nginx",
            "s",
            m,
            reference=n,
            reference_name="nginx sendfile",
            ratio=report.ratio_of(m, n),
            target=report.at_most_ratio(1.0, "nginx"),
            repetitions=reps,
            samples=times,
        ),
        row(
            f"{label} vs registry proxy",
            "s",
            m,
            reference=p,
            reference_name="registry proxy",
            ratio=report.ratio_of(m, p),
            repetitions=reps,
            samples=times,
        ),
    ]


# 2. Warm tag manifests ---------------------------------------------------------------------


@dataclass
class WrkRuns:
    results: list[WrkResult]
    upstream_requests: list[int]
    steal: list[float] = field(default_factory=list)  # share of the CPU the host took

    @property
    def rate(self) -> float:
        return median(r.requests_per_second for r in self.results)

    @property
    def p99(self) -> float:
        return median(r.p99_ms for r in self.results)

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.results)


def _warm_manifest(url: str, method: str, times: int = 1) -> None:
    request = urllib.request.Request(url, method=method, headers={"Accept": ACCEPT})
    for _ in range(times):
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()


def _load(lab: Lab, url: str, method: str, tool: str) -> WrkResult:
    plan = lab.plan
    if tool == "wrk":
        return wrk(
            url,
            method=method,
            accept=ACCEPT,
            seconds=plan.wrk_seconds,
            connections=plan.wrk_connections,
            threads=plan.wrk_threads,
            script_dir=lab.root,
        )
    return head_load(
        url,
        method=method,
        accept=ACCEPT,
        seconds=plan.wrk_seconds,
        connections=plan.wrk_connections,
        threads=plan.wrk_threads,
    )


def _load_runs(
    lab: Lab, jobs: dict[str, tuple[str, str]], method: str, repetitions: int = 0
) -> dict[str, WrkRuns]:
    """Each job (URL, tool) in turn, per repetition, counting what reached the upstream and
    how much of the CPU the VM's host took meanwhile (steal).

    The tool is wrk, or ``bench.headload`` for HEAD, which wrk cannot measure.
    """
    log = AccessLog(lab.upstream.access_log)
    runs = {name: WrkRuns([], []) for name in jobs}
    for _ in range(repetitions or lab.plan.wrk_repetitions):
        for name, (url, tool) in jobs.items():
            mark, ticks = log.mark(), cpu_ticks()
            runs[name].results.append(_load(lab, url, method, tool))
            runs[name].steal.append(steal_share(ticks, cpu_ticks()))
            runs[name].upstream_requests.append(len(log.settle(mark)))
    return runs


def paired_ratio(mine: WrkRuns, theirs: WrkRuns) -> float | None:
    """The median of the ratios of runs made one after the other: on a VM whose speed drifts
    between repetitions, each pair saw about the same machine."""
    pairs = zip(mine.results, theirs.results, strict=True)
    ratios = [
        a.requests_per_second / b.requests_per_second for a, b in pairs if b.requests_per_second
    ]
    return median(ratios) if ratios else None


def warm_manifests(lab: Lab, mirror: Mirror, proxy: Registry) -> list[Row]:
    """Tag manifest GET and HEAD at 32 connections: mirror vs registry proxy."""
    small = lab.images["small"]
    mine, peer = lab.manifest_url(mirror, small), lab.manifest_url(proxy, small)
    rows: list[Row] = []
    for method, tool in (("GET", "wrk"), ("HEAD", "headload")):
        for url in (mine, peer):
            _warm_manifest(url, method)
        jobs = {"mirror": (mine, tool), "proxy": (peer, tool)}
        if method == "GET":
            jobs["headload"] = (mine, "headload")  # calibrates the HEAD figures against wrk
        runs = _load_runs(lab, jobs, method)
        rows += _manifest_rows(lab, method, runs["mirror"], runs["proxy"], tool)
        if method == "GET":
            rows.append(_calibration_row(lab, runs["headload"], runs["mirror"]))
    return rows


def _calibration_row(lab: Lab, headload: WrkRuns, wrk_runs: WrkRuns) -> Row:
    return row(
        "load generator check: mirror GET, bench.headload vs wrk",
        "req/s",
        headload.rate,
        reference=wrk_runs.rate,
        reference_name="wrk",
        ratio=report.ratio_of(headload.rate, wrk_runs.rate),
        repetitions=lab.plan.wrk_repetitions,
        note="how far the HEAD figures' load generator reads below wrk",
        samples={"headload": [r.requests_per_second for r in headload.results]},
    )


def _manifest_rows(lab: Lab, method: str, mine: WrkRuns, peer: WrkRuns, tool: str) -> list[Row]:
    reps = lab.plan.wrk_repetitions
    label = f"tag manifest {method}, {lab.plan.wrk_connections} conns ({tool})"
    errors = mine.errors + peer.errors
    note = f"error responses: mirror {mine.errors}, proxy {peer.errors}" if errors else ""
    upstream = {
        "mirror": [float(n) for n in mine.upstream_requests],
        "proxy": [float(n) for n in peer.upstream_requests],
    }
    return [
        row(
            f"{label}: rate",
            "req/s",
            mine.rate,
            reference=peer.rate,
            reference_name="registry proxy",
            ratio=report.ratio_of(mine.rate, peer.rate),
            target=report.rate_and_ratio(10_000, 50, "proxy"),
            repetitions=reps,
            note=note,
            samples={
                "mirror": [r.requests_per_second for r in mine.results],
                "proxy": [r.requests_per_second for r in peer.results],
            },
        ),
        row(
            f"{label}: p99 latency",
            "ms",
            mine.p99,
            reference=peer.p99,
            reference_name="registry proxy",
            ratio=report.ratio_of(mine.p99, peer.p99),
            target=report.below(10, "ms"),
            repetitions=reps,
            samples={
                "mirror": [r.p99_ms for r in mine.results],
                "proxy": [r.p99_ms for r in peer.results],
            },
        ),
        row(
            f"{label}: upstream requests (total)",
            "",
            sum(upstream["mirror"]),
            reference=sum(upstream["proxy"]),
            reference_name="registry proxy",
            target=report.exactly(0),
            repetitions=reps,
            samples=upstream,
        ),
    ]


# 3. Cold pull ------------------------------------------------------------------------------


def cold_pull(lab: Lab) -> tuple[list[Row], float]:
    """The large blob through a mirror with an empty data dir vs straight from the upstream,
    on loopback and through a link of ``plan.link_mib`` MiB/s.

    Also returns the median cold pull time over the link, the yardstick of the concurrent
    figures (which run over the same link).
    """
    big = lab.images["big"]
    size = big.layer.size
    times: dict[str, list[float]] = {"mirror": [], "direct": [], "disk": []}
    linked: dict[str, list[float]] = {"mirror": [], "direct": []}
    for _ in range(lab.plan.cold_repetitions):
        for upstream, into in ((lab.upstream, times), (lab.link, linked)):
            mirror = lab.new_mirror(upstream=upstream)
            try:
                into["mirror"].append(fetch(lab.blob_url(mirror, big), expect_size=size).seconds)
            finally:
                lab.discard(mirror)
            into["direct"].append(fetch(lab.blob_url(upstream, big), expect_size=size).seconds)
        times["disk"].append(disk_write_seconds(lab.root, size))
    rows = [
        _throughput_row(f"cold pull {size / MIB:,.0f} MiB, loopback", size, times, lab),
        _throughput_row(
            f"cold pull {size / MIB:,.0f} MiB, {lab.plan.link_mib:g} MiB/s link", size, linked, lab
        ),
        _disk_row(size, times, lab),
    ]
    return rows, median(linked["mirror"])


def _throughput_row(label: str, size: int, times: dict[str, list[float]], lab: Lab) -> Row:
    mine, theirs = (size / MIB / median(times[name]) for name in ("mirror", "direct"))
    return row(
        f"{label}: throughput",
        "MiB/s",
        mine,
        reference=theirs,
        reference_name="upstream direct",
        ratio=report.ratio_of(mine, theirs),
        target=report.at_least_ratio(0.9, "direct"),
        repetitions=lab.plan.cold_repetitions,
        samples=times,
    )


def _disk_row(size: int, times: dict[str, list[float]], lab: Lab) -> Row:
    mine, disk = (size / MIB / median(times[name]) for name in ("mirror", "disk"))
    return row(
        "cold pull, loopback: throughput vs the disk's write speed",
        "MiB/s",
        mine,
        reference=disk,
        reference_name="write + fsync, 1 MiB writes",
        ratio=report.ratio_of(mine, disk),
        repetitions=lab.plan.cold_repetitions,
        note="a cold blob must reach the disk; loopback outruns it",
        samples=times,
    )


def disk_write_seconds(directory: Path, size: int) -> float:
    """Seconds to write ``size`` bytes to a new file in ``directory`` and fsync it, as a fill
    does (1 MiB writes), without hashing or network: the ceiling of any cold pull here."""
    chunk = os.urandom(MIB)
    path = directory / "disk-write-probe"
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(size // MIB):
            os.write(fd, chunk)
        os.write(fd, chunk[: size % MIB])
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - started
    path.unlink()
    return seconds


# 4 and 5. Concurrent cold pulls, and memory while 50 clients stream ------------------------


@dataclass
class Crowd:
    walls: list[float]
    blob_gets: list[int]
    peak_kib: list[int]


def _mirror_crowd(lab: Lab, clients: int) -> tuple[Crowd, Crowd]:
    """(cold, warm): N clients at once on a fresh mirror each time, then once more warm."""
    log = AccessLog(lab.upstream.access_log)
    cold, warm = Crowd([], [], []), Crowd([], [], [])
    mirror: Mirror | None = None
    try:
        for _ in range(lab.plan.concurrent_repetitions):
            if mirror is not None:
                lab.discard(mirror)
            mirror = lab.new_mirror(upstream=lab.link)
            _crowd_once(lab, mirror, clients, log, cold)
        assert mirror is not None
        lab.restart(mirror)  # the blob is cached now; a new process, so a new high-water mark
        _crowd_once(lab, mirror, clients, log, warm)
    finally:
        if mirror is not None:
            lab.discard(mirror)
    return cold, warm


def _crowd_once(lab: Lab, mirror: Mirror, clients: int, log: AccessLog, into: Crowd) -> None:
    big = lab.images["big"]
    mark = log.mark()
    with MemoryWatch(mirror.pid) as memory:
        result = fetch_parallel(lab.blob_url(mirror, big), clients, expect_size=big.layer.size)
    into.walls.append(result.wall)
    into.blob_gets.append(blob_gets(log.settle(mark), big.layer.digest))
    into.peak_kib.append(memory.peak_kib)


def _proxy_crowd(lab: Lab, clients: int) -> Crowd:
    """The registry proxy's upstream blob GETs for the same crowd; on loopback, since over the
    link its N fetches of 1 GiB would take minutes and only their count is reported."""
    big = lab.images["big"]
    log = AccessLog(lab.upstream.access_log)
    crowd = Crowd([], [], [])
    for _ in range(lab.plan.proxy_concurrent_repetitions):
        proxy = lab.new_proxy()
        try:
            mark = log.mark()
            result = fetch_parallel(lab.blob_url(proxy, big), clients, expect_size=big.layer.size)
            wait_stored(proxy, big.layer.digest)  # its own fetch to store the blob ends later
            crowd.walls.append(result.wall)
            crowd.blob_gets.append(blob_gets(log.settle(mark), big.layer.digest))
        finally:
            lab.discard(proxy)
    return crowd


def concurrent_pulls(lab: Lab, clients: int, one_cold: float, nginx: Service) -> list[Row]:
    cold, warm = _mirror_crowd(lab, clients)
    peer = _proxy_crowd(lab, clients)
    big, reps = lab.images["big"], lab.plan.concurrent_repetitions
    nginx_walls = [
        fetch_parallel(lab.blob_url(nginx, big), clients, expect_size=big.layer.size).wall
        for _ in range(reps)
    ]
    label = f"{clients} concurrent cold pulls, {lab.plan.link_mib:g} MiB/s link"
    wall, warm_wall = median(cold.walls), median(warm.walls)
    rows = [
        row(
            f"{label}: upstream blob GETs (worst)",
            "",
            float(max(cold.blob_gets)),
            reference=float(max(peer.blob_gets)),
            reference_name="registry proxy",
            target=report.exactly(1),
            repetitions=reps,
            samples={
                "mirror": [float(n) for n in cold.blob_gets],
                "proxy": [float(n) for n in peer.blob_gets],
                "proxy_wall_s": peer.walls,
            },
        ),
        row(
            f"{label}: wall / one cold pull",
            "s",
            wall,
            reference=one_cold,
            reference_name="1 cold pull, same link",
            ratio=report.ratio_of(wall, one_cold),
            target=report.at_most_ratio(1.3, "one"),
            repetitions=reps,
            samples={"mirror": cold.walls},
        ),
        row(
            f"{label}: wall / same {clients} warm",
            "s",
            wall,
            reference=warm_wall,
            reference_name=f"{clients} warm pulls",
            ratio=report.ratio_of(wall, warm_wall),
            repetitions=reps,
            note="the delivery floor: what the same clients take from cache",
            samples={"mirror": cold.walls, "warm": warm.walls},
        ),
        row(
            f"{clients} concurrent warm pulls: wall vs nginx",
            "s",
            warm_wall,
            reference=median(nginx_walls),
            reference_name=f"nginx, {clients} clients",
            ratio=report.ratio_of(warm_wall, median(nginx_walls)),
            repetitions=reps,
            note="this machine's own floor for serving the crowd",
            samples={"mirror": warm.walls, "nginx": nginx_walls},
        ),
    ]
    if clients == 50:
        rows += _memory_rows(cold, warm, reps)
    return rows


def _memory_rows(cold: Crowd, warm: Crowd, reps: int) -> list[Row]:
    cold_mib = [kib / 1024 for kib in cold.peak_kib]
    warm_mib = [kib / 1024 for kib in warm.peak_kib]
    return [
        row(
            "peak RSS, 50 clients streaming the cached blob",
            "MiB",
            max(warm_mib),
            target=report.at_most(150, "MiB"),
            repetitions=1,
            samples={"mirror": warm_mib},
        ),
        row(
            "peak RSS, 50 clients streaming one cold fill",
            "MiB",
            max(cold_mib),
            target=report.at_most(150, "MiB"),
            repetitions=reps,
            samples={"mirror": cold_mib},
        ),
    ]


# 6. --workers N ----------------------------------------------------------------------------

WORKERS_CONNECTIONS = 64  # enough to keep two processes busy


def workers_scaling(lab: Lab) -> list[Row]:
    """Figure 2 for ``mirror serve --workers N``; n/a until the flag exists."""
    if not supports_workers(lab.mirror_executable):
        return [report.not_available("tag manifests, --workers N", "n/a (no --workers)")]
    small = lab.images["small"]
    rates: dict[str, dict[int, WrkRuns]] = {"GET": {}, "HEAD": {}}
    plan, lab.plan = lab.plan, replace(lab.plan, wrk_connections=WORKERS_CONNECTIONS)
    try:
        for workers in lab.plan.workers:
            _workers_runs(lab, small, workers, rates)
    finally:
        lab.plan = plan
    return [_workers_row(lab, method, runs) for method, runs in rates.items()]


def _workers_runs(
    lab: Lab, small: Image, workers: int, rates: dict[str, dict[int, WrkRuns]]
) -> None:
    mirror = lab.new_mirror(workers=workers)
    try:
        url = lab.manifest_url(mirror, small)
        for method, runs in rates.items():
            _warm_manifest(url, method, times=8 * workers)  # reach every worker's cache
            tool = "wrk" if method == "GET" else "headload"
            runs[workers] = _load_runs(lab, {"w": (url, tool)}, method)["w"]
    finally:
        lab.discard(mirror)


def _workers_row(lab: Lab, method: str, runs: dict[int, WrkRuns]) -> Row:
    low, high = min(runs), max(runs)
    upstream = sum(sum(r.upstream_requests) for r in runs.values())
    return row(
        f"tag manifest {method}, --workers {high} vs {low}, {WORKERS_CONNECTIONS} conns",
        "req/s",
        runs[high].rate,
        reference=runs[low].rate,
        reference_name=f"--workers {low}",
        ratio=report.ratio_of(runs[high].rate, runs[low].rate),
        repetitions=lab.plan.wrk_repetitions,
        note=f"p99 {runs[high].p99:.2f} ms; upstream requests {upstream}",
        samples={
            f"workers_{n}": [r.requests_per_second for r in w.results] for n, w in runs.items()
        },
    )


# 7. The defaults, and what they cost -------------------------------------------------------

CPU_FETCHES = 4  # warm fetches of the large blob per CPU measurement
# Pairs of tag GET runs, defaults and access log off: their ratio is the target, and
# a 10% effect needs more pairs than the other figures on a VM whose speed drifts.
DEFAULTS_REPETITIONS = 5


def defaults(lab: Lab, nginx: Service) -> list[Row]:
    """The mirror as users run it (access log on, uvloop) against itself with the access log
    off and with asyncio's loop; small blobs and CPU per GiB against nginx."""
    small, big = lab.images["small"], lab.images["big"]
    variants = {
        "defaults": (),
        "access log off": ("--log-level", "warning"),
        "asyncio loop": ("--event-loop", "asyncio"),
    }
    mirrors = {name: lab.new_mirror(extra=extra) for name, extra in variants.items()}
    try:
        for mirror in mirrors.values():
            _warm_manifest(lab.manifest_url(mirror, small), "GET", times=2)
            fetch(lab.blob_url(mirror, big), expect_size=big.layer.size)
            fetch(lab.blob_url(mirror, small), expect_size=small.layer.size)
        manifests = _load_runs(
            lab,
            {n: (lab.manifest_url(m, small), "wrk") for n, m in mirrors.items()},
            "GET",
            repetitions=max(DEFAULTS_REPETITIONS, lab.plan.wrk_repetitions),
        )
        blobs = _load_runs(
            lab,
            {
                "mirror": (lab.blob_url(mirrors["defaults"], small), "wrk"),
                "nginx": (lab.blob_url(nginx, small), "wrk"),
            },
            "GET",
        )
        loops = {"uvloop": mirrors["defaults"], "asyncio": mirrors["asyncio loop"]}
        times: dict[str, list[float]] = {name: [] for name in loops}
        for _ in range(lab.plan.blob_repetitions):
            for name, mirror in loops.items():  # interleaved
                url = lab.blob_url(mirror, big)
                times[name].append(fetch(url, expect_size=big.layer.size).seconds)
        cpu = {
            name: cpu_per_gib(lab, service, lab.blob_url(service, big), big.layer.size)
            for name, service in (("mirror", mirrors["defaults"]), ("nginx", nginx))
        }
    finally:
        for mirror in mirrors.values():
            lab.discard(mirror)
    return _defaults_rows(lab, manifests, blobs, times, cpu)


@dataclass
class CpuPerGib:
    """CPU seconds per GiB of one blob fetched warm: the server's processes, and curl's."""

    server: list[float] = field(default_factory=list)
    client: list[float] = field(default_factory=list)

    @property
    def delivery(self) -> list[float]:
        """Both sides together. On loopback the kernel's work of moving the bytes is charged
        to whichever side is running when it is done; the sum is what the machine spent."""
        return [s + c for s, c in zip(self.server, self.client, strict=True)]


def cpu_per_gib(lab: Lab, service: Service, url: str, size: int) -> CpuPerGib:
    samples = CpuPerGib()
    gib = CPU_FETCHES * size / (1024 * MIB)
    for _ in range(lab.plan.blob_repetitions):
        before, children = lab.process_cpu(service), _children_cpu()
        for _ in range(CPU_FETCHES):
            fetch(url, expect_size=size)
        samples.server.append((lab.process_cpu(service) - before) / gib)
        samples.client.append((_children_cpu() - children) / gib)
    return samples


def _children_cpu() -> float:
    """CPU seconds of the bench's finished child processes (the curls): user and system."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _defaults_rows(
    lab: Lab,
    manifests: dict[str, WrkRuns],
    blobs: dict[str, WrkRuns],
    times: dict[str, list[float]],
    cpu: dict[str, CpuPerGib],
) -> list[Row]:
    reps = len(manifests["defaults"].results)
    on, off = manifests["defaults"].rate, manifests["access log off"].rate
    slow = manifests["asyncio loop"].rate
    uv, plain = median(times["uvloop"]), median(times["asyncio"])
    small_size = lab.images["small"].layer.size
    small_label = f"small blob GET ({small_size:,} bytes), {lab.plan.wrk_connections} conns"
    steal = max(s for runs in manifests.values() for s in runs.steal)
    rates = {n: [r.requests_per_second for r in w.results] for n, w in manifests.items()}
    return [
        row(
            "tag manifest GET, defaults (access log on) vs access log off",
            "req/s",
            on,
            reference=off,
            reference_name="access log off",
            ratio=paired_ratio(manifests["defaults"], manifests["access log off"]),
            target=report.rate_and_ratio(15000, 0.9, "log off"),
            repetitions=reps,
            note=f"ratio: median of {reps} pairs run back to back; "
            f"p99 {manifests['defaults'].p99:.2f} ms; CPU steal up to {steal:.0%}",
            samples=rates,
        ),
        row(
            "tag manifest GET, uvloop (default) vs asyncio loop",
            "req/s",
            on,
            reference=slow,
            reference_name="asyncio loop",
            ratio=paired_ratio(manifests["defaults"], manifests["asyncio loop"]),
            target=report.at_least_ratio(1.0, "asyncio"),
            repetitions=reps,
            note="ratio: median of the pairs",
        ),
        row(
            f"warm blob {lab.images['big'].layer.size / MIB:,.0f} MiB, uvloop vs asyncio loop",
            "s",
            uv,
            reference=plain,
            reference_name="asyncio loop",
            ratio=report.ratio_of(uv, plain),
            target=report.at_most_ratio(1.1, "asyncio"),
            repetitions=lab.plan.blob_repetitions,
            samples=times,
        ),
        row(
            f"{small_label}: rate vs nginx",
            "req/s",
            blobs["mirror"].rate,
            reference=blobs["nginx"].rate,
            reference_name="nginx",
            ratio=report.ratio_of(blobs["mirror"].rate, blobs["nginx"].rate),
            target=report.Target("≥ 10,000/s", lambda value, _: value >= 10000),
            repetitions=lab.plan.wrk_repetitions,
            samples={n: [r.requests_per_second for r in w.results] for n, w in blobs.items()},
        ),
        *_cpu_rows(lab, cpu),
    ]


def _cpu_rows(lab: Lab, cpu: dict[str, CpuPerGib]) -> list[Row]:
    mine, theirs = median(cpu["mirror"].server), median(cpu["nginx"].server)
    both, theirs_both = median(cpu["mirror"].delivery), median(cpu["nginx"].delivery)
    return [
        row(
            "CPU per GiB of warm blob served vs nginx",
            "s",
            mine,
            reference=theirs,
            reference_name="nginx",
            ratio=report.ratio_of(mine, theirs),
            target=report.at_most_ratio(1.2, "nginx"),
            repetitions=lab.plan.blob_repetitions,
            note="CPU seconds of the server process(es), user and system",
            samples={n: c.server for n, c in cpu.items()},
        ),
        row(
            "CPU per GiB delivered, server + client (curl), vs nginx + curl",
            "s",
            both,
            reference=theirs_both,
            reference_name="nginx",
            ratio=report.ratio_of(both, theirs_both),
            repetitions=lab.plan.blob_repetitions,
            note=f"curl's share: {median(cpu['mirror'].client):.3f} s from the mirror, "
            f"{median(cpu['nginx'].client):.3f} s from nginx (loopback charges the kernel's "
            "delivery work to whichever side runs)",
            samples={f"{n} client": c.client for n, c in cpu.items()},
        ),
    ]


# 8. A whole pull by containerd -----------------------------------------------------------


def whole_pull(lab: Lab) -> list[Row]:
    """The many-layer image pulled by ``ctr images pull`` (containerd 1.6, what Kubernetes
    nodes run) through a warm mirror and straight from the upstream registry, taking turns;
    containerd's copy is removed (``ctr images rm --sync``) after every pull, so each pull
    fetches every blob again and unpacks every layer."""
    image = lab.images["layers"]
    reference = f"docker.io/{image.repository}:{image.tag}"
    mirror = lab.new_mirror()
    directory = short_tempdir("bench-ctr-")
    containerd = Containerd(directory / "containerd")
    hosts = {
        name: write_hosts_toml(directory / f"hosts-{name}", url, fallback=False)
        for name, url in (("mirror", mirror.url), ("direct", lab.upstream.url))
    }
    times: dict[str, list[float]] = {name: [] for name in hosts}
    upstream = AccessLog(lab.upstream.access_log)
    asked = 0  # requests the mirror's pulls sent upstream
    try:
        containerd.start()
        _ctr_pull(containerd, reference, hosts["mirror"])  # the mirror fetches and keeps it
        for _ in range(lab.plan.blob_repetitions):
            for name, hosts_dir in hosts.items():
                mark = upstream.mark()
                times[name].append(_ctr_pull(containerd, reference, hosts_dir))
                if name == "mirror":
                    asked += len(upstream.settle(mark))
    finally:
        containerd.stop()
        lab.discard(mirror)
        shutil.rmtree(directory, ignore_errors=True)
    mine, theirs = median(times["mirror"]), median(times["direct"])
    return [
        row(
            f"whole pull, {MANY_LAYERS} layers (ctr images pull): warm mirror vs upstream",
            "s",
            mine,
            reference=theirs,
            reference_name="upstream direct",
            ratio=report.ratio_of(mine, theirs),
            target=report.at_most_ratio(1.1, "direct"),
            repetitions=lab.plan.blob_repetitions,
            note=f"upstream requests during the mirror's pulls: {asked}",
            samples=times,
        )
    ]


def _ctr_pull(containerd: Containerd, reference: str, hosts_dir: Path) -> float:
    started = time.perf_counter()
    containerd.pull(reference, hosts_dir)
    seconds = time.perf_counter() - started
    containerd.remove_image(reference)
    return seconds
